//! Devices of the logged-in entity: ADD-DEVICE (a one-time registration secret),
//! DEVICE-LIST and DEVICE-REVOKE.

use micromsg_crypto::{Secret32, kdf};
use micromsg_store::{Store, StoreError};
use micromsg_wire::message::event::DeviceRevoked;
use micromsg_wire::message::request::{AddDeviceArgs, DeviceRevokeArgs};
use micromsg_wire::message::response::{AddDeviceData, DeviceInfo, DeviceListData};
use micromsg_wire::{DeviceName, ErrorCode, Event, Hex32, ResponseData};
use rand_core::OsRng;
use tracing::info;

use super::{Handled, Login, Refusal, Session};
use crate::broker::Broker;
use crate::clock::Now;
use crate::config::LimitsConfig;
use crate::online::{Online, Push};

/// What the device handlers use.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// The device cap and how long a registration secret lives.
    pub limits: &'a LimitsConfig,
    /// Devices and registration secrets.
    pub store: &'a Store,
    /// Where a revoked device's connections are.
    pub online: &'a Online,
}

impl<'a> Cx<'a> {
    /// The device handlers' part of the broker.
    pub fn of(broker: &'a Broker) -> Self {
        Self {
            limits: &broker.config.limits,
            store: &broker.store,
            online: &broker.online,
        }
    }
}

/// ADD-DEVICE: a registration secret for a new device, valid for
/// `limits.device_secret_ttl_secs`; only its hash is stored.
pub async fn add(cx: Cx<'_>, login: &Login, args: AddDeviceArgs, now: Now) -> Handled {
    let secret = Secret32::generate(&mut OsRng);
    let hash = kdf::sha256(&[secret.expose()]);
    let expires = now.unix + cx.limits.device_secret_ttl_secs;
    let name = args.name.as_ref().map(DeviceName::as_str);
    match cx
        .store
        .create_registration_secret(
            login.number(),
            &hash,
            name,
            now.unix_i64(),
            expires as i64,
            cx.limits.max_devices,
        )
        .await
    {
        Ok(()) => Ok(ResponseData::AddDevice(AddDeviceData {
            secret: Hex32::from_bytes(*secret.expose()),
            expires,
        })),
        Err(StoreError::DeviceLimit) => Err(Refusal::new(
            ErrorCode::DeviceLimit,
            "the entity has reached its device limit (pending registrations count)",
        )),
        Err(e) => Err(e.into()),
    }
}

/// DEVICE-LIST: the entity's active devices.
pub async fn list(cx: Cx<'_>, login: &Login) -> Handled {
    let devices = cx.store.list_devices(login.number()).await?;
    let devices = devices
        .into_iter()
        .filter(|d| d.revoked_at.is_none())
        .map(|d| DeviceInfo {
            id: d.device_id,
            name: d.name.and_then(|n| DeviceName::new(n).ok()),
            created: d.created_at.max(0) as u64,
            last_seen: d.last_seen.map(|t| t.max(0) as u64),
            current: d.device_id == login.device,
        })
        .collect();
    Ok(ResponseData::DeviceList(DeviceListData { devices }))
}

/// DEVICE-REVOKE: another device of the entity can no longer log in; its connections get
/// DEVICE-REVOKED and close.
pub async fn revoke(
    cx: Cx<'_>,
    session: &Session,
    login: &Login,
    args: DeviceRevokeArgs,
    now: Now,
) -> Handled {
    let target = args.device.get();
    if args.device == login.device {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            "a device cannot revoke itself; revoke it from another device",
        ));
    }
    let revoked = cx
        .store
        .revoke_device(login.number(), args.device, now.unix_i64())
        .await?;
    if !revoked {
        return Err(Refusal::new(ErrorCode::NotFound, "no such active device"));
    }
    let event_device = args.device;
    cx.online
        .push_all(login.number().as_str(), Some(target), || {
            Push::close(Event::DeviceRevoked(DeviceRevoked {
                device: event_device,
            }))
        });
    info!(conn = session.conn_id, device = target, "device revoked");
    Ok(ResponseData::DeviceRevoke)
}
