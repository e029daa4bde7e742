//! Account operations that combine the profile and the broker link: register, join as a new
//! device, log in, read and verify BROKER-INFO, delete the entity at its broker.

use std::path::Path;

use micromsg_crypto::Secret32;
use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey};
use micromsg_wire::message::request::{
    AccountDeleteArgs, DeviceJoinArgs, ForwardArgs, RegisterArgs,
};
use micromsg_wire::message::response::BrokerInfoData;
use micromsg_wire::{Blob, ErrorCode, Hex32, Number, Request, ResponseData, encode_info_canonical};
use rand_core::OsRng;

use crate::link::{BrokerLink, LinkError};
use crate::profile::{Profile, ProfileError, ProfileInfo, Secrets};
use crate::tls::{TlsSetupError, client_config};

mod relogin;

pub use relogin::clock_warning;
use relogin::{
    AuthCause, BrokerClock, auth_failed, clock_is_off, second_login, store_clock_offset,
    store_step, stored_clock_offset,
};

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// The profile could not be read or written.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// The broker link failed or the broker refused.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// BROKER-INFO's signature does not verify, or the broker's identity changed.
    #[error("BROKER-INFO: {0}")]
    BrokerInfo(String),
    /// A command-line value is malformed.
    #[error("{0}")]
    BadInput(String),
}

/// A logged-in link and the profile it belongs to.
#[derive(Debug)]
pub struct Session {
    /// The link, logged in.
    pub link: BrokerLink,
    /// The profile's public part.
    pub info: ProfileInfo,
    /// The inbox count the broker reported at login.
    pub inbox: u32,
    /// The broker's clock less this device's, in seconds, when the login was made at the
    /// broker's time (learned at a login this device's clock made fail); else 0.
    pub clock_offset: i64,
}

/// The host part of `HOST:PORT` (or `[V6]:PORT`), which the certificate must name.
pub fn tls_name_of(broker: &str) -> Result<String, AccountError> {
    let bad = || AccountError::BadInput(format!("--broker must be HOST:PORT, got {broker:?}"));
    let (host, port) = broker.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host.to_owned())
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn open_link(broker: &str, ca: &Path) -> Result<(BrokerLink, String), AccountError> {
    let tls_name = tls_name_of(broker)?;
    let config = client_config(ca)?;
    let link = BrokerLink::connect(broker, &tls_name, config).await?;
    Ok((link, tls_name))
}

/// Fetches BROKER-INFO and checks its signature against the identity key it carries.
pub async fn fetch_broker_info(link: &mut BrokerLink) -> Result<BrokerInfoData, AccountError> {
    let data = match link.call(Request::BrokerInfo).await? {
        ResponseData::BrokerInfo(data) => data,
        other => {
            return Err(AccountError::BrokerInfo(format!(
                "answered with {}",
                other.kind().as_str()
            )));
        }
    };
    verify_broker_info(&data)?;
    Ok(data)
}

/// Checks BROKER-INFO's signature by the identity key it carries, and its protocol version
/// (6.1; an unknown `NONCE-ALGORITHM` does not decode).
fn verify_broker_info(data: &BrokerInfoData) -> Result<(), AccountError> {
    let key = IdentityPublicKey::from_bytes(data.identity_key.as_bytes())
        .map_err(|e| AccountError::BrokerInfo(format!("identity key: {e}")))?;
    let signature = data.signature.as_bytes();
    key.verify(&encode_info_canonical(&data.info), signature)
        .map_err(|_| AccountError::BrokerInfo("signature does not verify".into()))?;
    if data.info.protocol != 1 {
        return Err(AccountError::BrokerInfo(format!(
            "protocol {} (this client speaks 1)",
            data.info.protocol
        )));
    }
    Ok(())
}

/// Checks BROKER-INFO's identity key against the one the profile pinned at registration.
fn check_pinned(info: &ProfileInfo, data: &BrokerInfoData) -> Result<(), AccountError> {
    match &info.broker_identity {
        Some(pinned) if *pinned != data.identity_key.to_hex() => {
            Err(AccountError::BrokerInfo(format!(
                "the broker's identity key changed since registration (pinned {pinned}, now {}); \
                 this may be a different broker",
                data.identity_key.to_hex()
            )))
        }
        _ => Ok(()),
    }
}

/// Registers a new entity with `broker` and writes the profile. The CA file is copied into
/// the profile so later commands need only `--profile`.
pub async fn register(
    profile: &Profile,
    broker: &str,
    ca: &Path,
    token: Option<String>,
) -> Result<Session, AccountError> {
    profile.ensure_unregistered()?;
    let identity_seed = IdentityKey::generate(&mut OsRng).seed();
    let (link, profile_info, secrets) = register_entity(broker, ca, token, identity_seed).await?;
    // A new entity's keys are its own (a marker left by a failed join does not count).
    profile.set_awaiting_keys(false)?;
    save(profile, ca, &secrets, &profile_info)?;
    login_on(profile, link, profile_info, &secrets).await
}

/// Joins an existing entity as a new device with a registration secret from `device add`.
pub async fn join(
    profile: &Profile,
    broker: &str,
    ca: &Path,
    number: &str,
    registration_secret: &str,
) -> Result<Session, AccountError> {
    profile.ensure_unregistered()?;
    let entity = Number::new(number)
        .map_err(|e| AccountError::BadInput(format!("--number {number:?}: {e}")))?;
    let secret = Secret32::from_hex(registration_secret.trim())
        .map_err(|e| AccountError::BadInput(format!("--secret: {e}")))?;
    let (mut link, tls_name) = open_link(broker, ca).await?;
    let info = fetch_broker_info(&mut link).await?;
    let server_secret = Secret32::generate(&mut OsRng);
    let request = Request::DeviceJoin(DeviceJoinArgs {
        entity: entity.clone(),
        secret: Hex32::from_bytes(*secret.expose()),
        server_secret: Hex32::from_bytes(*server_secret.expose()),
    });
    let data = match link.call(request).await? {
        ResponseData::DeviceJoin(data) => data,
        other => {
            return Err(LinkError::Protocol(format!(
                "DEVICE-JOIN answered with {}",
                other.kind().as_str()
            ))
            .into());
        }
    };
    let secrets = Secrets {
        client_secret: Secret32::from_bytes(*data.client_secret.as_bytes()),
        server_secret,
        identity_seed: IdentityKey::generate(&mut OsRng).seed(),
    };
    let profile_info = ProfileInfo {
        broker: broker.to_owned(),
        tls_name,
        number: entity.as_str().to_owned(),
        device: data.device.get(),
        nonce_step: data.nonce_step,
        broker_identity: Some(info.identity_key.to_hex()),
    };
    // Before the profile is complete: a joined device waits for the entity's keys from the
    // start, so nothing run on it drops the link transfer before it is received.
    profile.set_awaiting_keys(true)?;
    save(profile, ca, &secrets, &profile_info)?;
    login_on(profile, link, profile_info, &secrets).await
}

/// REGISTERs a new entity at `broker` without writing any profile: the link (not logged in
/// yet), the profile info for it, and its secrets with `identity_seed` as the identity key
/// (a new one for `register`, the entity's own for `move`).
pub async fn register_entity(
    broker: &str,
    ca: &Path,
    token: Option<String>,
    identity_seed: Secret32,
) -> Result<(BrokerLink, ProfileInfo, Secrets), AccountError> {
    let (mut link, tls_name) = open_link(broker, ca).await?;
    let info = fetch_broker_info(&mut link).await?;
    let server_secret = Secret32::generate(&mut OsRng);
    let request = Request::Register(RegisterArgs {
        token,
        server_secret: Hex32::from_bytes(*server_secret.expose()),
    });
    let data = match link.call(request).await? {
        ResponseData::Register(data) => data,
        other => {
            return Err(LinkError::Protocol(format!(
                "REGISTER answered with {}",
                other.kind().as_str()
            ))
            .into());
        }
    };
    let secrets = Secrets {
        client_secret: Secret32::from_bytes(*data.client_secret.as_bytes()),
        server_secret,
        identity_seed,
    };
    let profile_info = ProfileInfo {
        broker: broker.to_owned(),
        tls_name,
        number: data.entity.as_str().to_owned(),
        device: data.device.get(),
        nonce_step: data.nonce_step,
        broker_identity: Some(info.identity_key.to_hex()),
    };
    Ok((link, profile_info, secrets))
}

/// Writes a whole profile: the CA, the secrets, then `profile.toml`, each atomically.
pub fn save(
    profile: &Profile,
    ca: &Path,
    secrets: &Secrets,
    info: &ProfileInfo,
) -> Result<(), AccountError> {
    let ca_pem = std::fs::read(ca).map_err(|source| ProfileError::Io {
        path: ca.to_owned(),
        source,
    })?;
    profile.write_atomic("ca.pem", &ca_pem, false)?;
    // Secrets first: profile.toml is what marks the profile complete.
    profile.write_secrets(secrets)?;
    profile.write_info(info)?;
    Ok(())
}

async fn login_on(
    profile: &Profile,
    mut link: BrokerLink,
    mut info: ProfileInfo,
    secrets: &Secrets,
) -> Result<Session, AccountError> {
    let offset = stored_clock_offset(profile, &info.broker);
    let proved_at = unix_now().saturating_add_signed(offset);
    let sent = std::time::Instant::now();
    let first = login_at(&mut link, &info, secrets, proved_at).await;
    let (data, clock_offset) = match first {
        Ok(data) => (data, offset),
        // The broker says the same for a device it does not know and for a nonce of another
        // moment (9.3): its signed BROKER-INFO tells which (its clock, and the nonce step and
        // skew it verifies with), and a second LOGIN may then go through.
        Err(LinkError::Refused {
            code: ErrorCode::AuthFailed,
            retry_after,
            ..
        }) => {
            let broker = match broker_clock(&mut link, &info).await {
                Ok(Some(broker)) => broker,
                Ok(None) => return Err(auth_failed(AuthCause::ClockUnknown, retry_after).into()),
                // A lost connection: the caller tries again as after any outage; an identity
                // that is not the pinned one is said as such.
                Err(e) => return Err(e),
            };
            let local_now = unix_now();
            // The broker checked the LOGIN at some moment of this wait, before its TIME.
            let waited = sent.elapsed().as_secs() + 1;
            let Some(second) = second_login(&broker, waited, proved_at, local_now, info.nonce_step)
            else {
                return Err(auth_failed(AuthCause::NotTheClock, retry_after).into());
            };
            if let Some(step) = second.step {
                info.nonce_step = step;
            }
            let at = local_now.saturating_add_signed(second.offset.unwrap_or(offset));
            match login_at(&mut link, &info, secrets, at).await {
                Ok(data) => {
                    let kept = match second.offset {
                        // Within TIME's resolution: the clocks agree.
                        Some(offset) if offset.unsigned_abs() <= 1 => 0,
                        Some(offset) => offset,
                        None => offset,
                    };
                    if second.offset.is_some() {
                        store_clock_offset(profile, &info.broker, kept).await;
                    }
                    if let Some(step) = second.step {
                        store_step(profile, &info, step).await;
                    }
                    (data, kept)
                }
                Err(LinkError::Refused {
                    code: ErrorCode::AuthFailed,
                    retry_after,
                    ..
                }) => {
                    let cause = match second.offset {
                        Some(offset) if clock_is_off(offset, info.nonce_step) => {
                            AuthCause::NotEvenAtItsTime(offset)
                        }
                        _ => AuthCause::NotTheClock,
                    };
                    return Err(auth_failed(cause, retry_after).into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Session {
        link,
        info,
        inbox: data.session.inbox,
        clock_offset,
    })
}

/// LOGIN proving the nonce step of `at` (Unix seconds).
async fn login_at(
    link: &mut BrokerLink,
    info: &ProfileInfo,
    secrets: &Secrets,
    at: u64,
) -> Result<micromsg_wire::message::response::LoginData, LinkError> {
    link.login(
        &info.number,
        info.device,
        &secrets.client_secret,
        &secrets.server_secret,
        info.nonce_step,
        at,
    )
    .await
}

/// Reads BROKER-INFO on the link of a refused LOGIN (it needs no login) and checks it as
/// [`broker_info`] does: its signature, and its identity against the pinned one. `None` when
/// the broker refused it or answered something else (no broker does that): its clock cannot
/// be told.
async fn broker_clock(
    link: &mut BrokerLink,
    info: &ProfileInfo,
) -> Result<Option<BrokerClock>, AccountError> {
    let data = match link.call(Request::BrokerInfo).await {
        Ok(ResponseData::BrokerInfo(data)) => data,
        // Refused for now (too many requests, shutting down): the caller waits as told.
        Err(
            e @ LinkError::Refused {
                code: ErrorCode::RateLimited | ErrorCode::ShuttingDown,
                ..
            },
        ) => return Err(e.into()),
        Err(LinkError::Refused { .. }) | Ok(_) => return Ok(None),
        // An answer that does not decode (an unknown `NONCE-ALGORITHM`, 6.1) is refused, as
        // a BROKER-INFO that does not verify: retrying would only add refused LOGINs.
        Err(LinkError::Protocol(why)) => return Err(AccountError::BrokerInfo(why)),
        Err(e) => return Err(e.into()),
    };
    verify_broker_info(&data)?;
    check_pinned(info, &data)?;
    Ok(Some(BrokerClock {
        now: data.info.time,
        step: data.info.nonce_step,
        skew: data.info.nonce_skew,
    }))
}

/// Connects with the profile's broker, CA and secrets, and logs in (mutually).
pub async fn connect(profile: &Profile) -> Result<Session, AccountError> {
    let info = profile.info()?;
    // Every command and agent connects first: what a crash left half-written goes here.
    let sweeping = profile.clone();
    drop(tokio::task::spawn_blocking(move || {
        sweeping.sweep_temporaries();
    }));
    let secrets = profile.secrets()?;
    let config = client_config(&profile.path("ca.pem"))?;
    let link = BrokerLink::connect(&info.broker, &info.tls_name, config).await?;
    login_on(profile, link, info, &secrets).await
}

/// Reads BROKER-INFO for a registered profile and checks the broker's identity key against the
/// one pinned at registration.
pub async fn broker_info(profile: &Profile) -> Result<BrokerInfoData, AccountError> {
    let info = profile.info()?;
    let config = client_config(&profile.path("ca.pem"))?;
    let mut link = BrokerLink::connect(&info.broker, &info.tls_name, config).await?;
    let data = fetch_broker_info(&mut link).await?;
    check_pinned(&info, &data)?;
    Ok(data)
}

/// ACCOUNT-DELETE on a logged-in session: the broker removes the entity with its devices,
/// inboxes, contacts, blocks and key backup, and never gives its number out again. The broker
/// closes the link after answering. Irreversible: the caller asks the user first.
pub async fn delete(session: &mut Session) -> Result<(), AccountError> {
    let confirm = Number::new(&session.info.number)
        .map_err(|e| AccountError::BadInput(format!("the profile's number: {e}")))?;
    match session
        .link
        .call(Request::AccountDelete(AccountDeleteArgs { confirm }))
        .await?
    {
        ResponseData::AccountDelete => Ok(()),
        other => Err(LinkError::Protocol(format!(
            "ACCOUNT-DELETE answered with {}",
            other.kind().as_str()
        ))
        .into()),
    }
}

/// FORWARD on a logged-in session: the broker keeps `notice` (a signed moved notice,
/// protocol.md 12.13) for `days` days and hands it to whoever INITIATEs this number meanwhile
/// (a caller this entity blocked excepted). Returns when it expires (Unix seconds).
pub async fn forward(session: &mut Session, notice: &[u8], days: u64) -> Result<u64, AccountError> {
    let request = Request::Forward(ForwardArgs {
        notice: Blob::from(notice.to_vec()),
        days,
    });
    match session.link.call(request).await? {
        ResponseData::Forward(data) => Ok(data.expires),
        other => Err(LinkError::Protocol(format!(
            "FORWARD answered with {}",
            other.kind().as_str()
        ))
        .into()),
    }
}
