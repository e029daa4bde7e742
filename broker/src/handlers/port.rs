//! Number portability, the client's side (protocol.md 6.27, 6.28; docs/federation.md 12):
//! PORT-OUT at the broker that serves the number (logged in: the user's agreement, as a
//! single-use token for one named broker) and PORT-IN at the broker of the same network the
//! number moves to (with the token, the user's signed statement and the new device's
//! secret). PORT-IN asks the losing broker over the federation link (`PortOut`) and creates
//! the entity only once that broker agreed.

use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::{Secret32, kdf};
use micromsg_store::{NewDevice, PortIn, PortedEntry, Store, StoreError};
use micromsg_wire::message::request::{PortInArgs, PortOutArgs};
use micromsg_wire::message::response::{NonceAlgorithm, PortInData, PortOutData};
use micromsg_wire::{ErrorCode, Hex32, Number, ResponseData};
use rand_core::{OsRng, RngCore};
use tracing::{info, warn};

use super::{Handled, Login, Refusal, Session};
use crate::broker::Broker;
use crate::clock::Now;
use crate::config::Config;
use crate::federation::proto::{PortOutRequest, PortOutResponse};
use crate::federation::{Federation, Home, porting};
use crate::limits::{Source, WindowLimiter};

/// What the port handlers use.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// Token lifetime and statement skew (`federation.port_*`), nonce settings.
    pub config: &'a Config,
    /// Tokens, entities, entries.
    pub store: &'a Store,
    /// The network; `None` on a standalone broker.
    pub federation: Option<&'a Federation>,
    /// Signs the entries this broker gains.
    pub identity: &'a IdentityKey,
    /// PORT-IN counts as a registration (`registration.per_ip_per_hour`).
    pub registrations: &'a WindowLimiter<Source>,
}

impl<'a> Cx<'a> {
    /// The port handlers' part of the broker.
    pub fn of(broker: &'a Broker) -> Self {
        Self {
            config: &broker.config,
            store: &broker.store,
            federation: broker.federation.as_deref(),
            identity: &broker.identity,
            registrations: &broker.limiters.registrations,
        }
    }
}

fn networked<'a>(cx: Cx<'a>) -> Result<&'a Federation, Refusal> {
    cx.federation.ok_or_else(|| {
        Refusal::new(
            ErrorCode::NotNetworked,
            "this broker is in no network: a number can only be ported between brokers of one \
             network",
        )
    })
}

/// PORT-OUT: a single-use token that lets broker `TO` take this number over.
pub async fn port_out(cx: Cx<'_>, login: &Login, args: PortOutArgs, now: Now) -> Handled {
    let f = networked(cx)?;
    if args.to == f.me.id || f.link(&args.to).is_none() {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            format!(
                "TO must be the id of another broker of the network {:?}",
                f.network.name
            ),
        ));
    }
    let mut token = [0u8; 32];
    OsRng.fill_bytes(&mut token);
    let token = Secret32::from_bytes(token);
    let expires = now.unix + f.config.port_token_ttl_secs.max(1);
    cx.store
        .create_port_token(
            login.number(),
            &kdf::sha256(&[token.expose()]),
            &args.to,
            args.identity_key.as_bytes(),
            expires as i64,
        )
        .await?;
    info!(to = %args.to, "port token issued");
    Ok(ResponseData::PortOut(PortOutData {
        token: Hex32::from_bytes(*token.expose()),
        expires,
    }))
}

/// PORT-IN: takes over `NUMBER` from broker `FROM` of the network, with FROM's token and the
/// user's signed statement; answers as REGISTER does.
pub async fn port_in(cx: Cx<'_>, session: &Session, args: PortInArgs, now: Now) -> Handled {
    let f = networked(cx)?;
    let number = args.number.as_str();
    match f.home_of(number) {
        Home::Peer(home) if home.id == args.from => {}
        Home::Own if f.route(number).is_some() => return repeated_port_in(cx, &args).await,
        Home::Own => {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                "this broker serves NUMBER already",
            ));
        }
        _ => {
            return Err(Refusal::new(
                ErrorCode::NotNetworked,
                "NUMBER is not served by the broker FROM of this network",
            ));
        }
    }
    let skew = f.config.port_max_skew_secs;
    if now.unix.abs_diff(args.time) > skew {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            format!("TIME is more than {skew} s away from this broker's clock"),
        ));
    }
    let identity_key = *args.identity_key.as_bytes();
    let signature = *args.signature.as_bytes();
    if !porting::statement_verifies(
        number,
        &args.from,
        &f.me.id,
        args.time,
        &identity_key,
        &signature,
    ) {
        return Err(Refusal::new(
            ErrorCode::AuthFailed,
            "SIGNATURE does not verify over the port statement (protocol.md 6.28)",
        ));
    }
    cx.registrations
        .hit(&Source::of(session.peer.ip()), now.instant)
        .map_err(|wait| {
            Refusal::retry(
                ErrorCode::RateLimited,
                "too many registrations from this address",
                wait,
            )
        })?;
    // A number this broker ported away before comes back: the entity it kept from then
    // (whose logins answer PORTED) is a leftover, replaced by the new one.
    let replaces_leftover = f.route(number).is_some_and(|r| r.to != f.me.id);
    if !replaces_leftover && cx.store.entity_exists(&args.number).await? {
        return Err(Refusal::new(
            ErrorCode::Conflict,
            "NUMBER is an entity of this broker already",
        ));
    }
    let agreed = ask_losing_broker(f, &args, &identity_key, &signature).await?;
    let contacts = agreed
        .contacts
        .iter()
        .filter_map(|c| {
            Some(micromsg_store::ContactRecord {
                owner: args.number.clone(),
                peer: Number::new(c.peer.clone()).ok()?,
                auto_existing: c.auto_existing,
                brokered: c.brokered,
                created_at: i64::try_from(c.created_at).unwrap_or(0),
            })
        })
        .collect();
    let blocks = agreed
        .blocks
        .iter()
        .filter_map(|b| Number::new(b.clone()).ok())
        .collect();
    let mut entry = PortedEntry {
        number: args.number.clone(),
        seq: agreed.seq.max(1),
        from_broker: args.from.clone(),
        to_broker: f.me.id.clone(),
        time: args.time,
        identity_key,
        user_signature: signature,
        broker_key: Vec::new(),
        broker_signature: Vec::new(),
    };
    porting::sign_entry(cx.identity, &mut entry);
    let client_secret = Secret32::generate(&mut OsRng);
    let port = PortIn {
        entry,
        device: NewDevice {
            client_secret: *client_secret.expose(),
            server_secret: *args.server_secret.as_bytes(),
            name: None,
        },
        contacts,
        blocks,
        announce_to: f.network.peers(&f.me.id).map(|p| p.id.clone()).collect(),
        now: now.unix_i64(),
        replaces_leftover,
    };
    let device = match cx.store.port_in(&port).await {
        Ok(device) => device,
        Err(StoreError::NumberTaken) => {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                "NUMBER is an entity of this broker already",
            ));
        }
        Err(e) => {
            // FROM has let the number go: say so in the log, the operator can replay it.
            warn!(error = %e, "storing a ported number failed after the losing broker agreed");
            return Err(e.into());
        }
    };
    porting::remember(f, &port.entry);
    f.announce_wake.notify_one();
    info!(
        conn = session.conn_id,
        from = %args.from,
        seq = port.entry.seq,
        "number ported in"
    );
    Ok(ResponseData::PortIn(PortInData {
        entity: args.number,
        device,
        client_secret: Hex32::from_bytes(*client_secret.expose()),
        nonce_step: cx.config.auth.nonce_step_secs,
        nonce_algorithm: NonceAlgorithm::MmNonce1,
        seq: port.entry.seq,
    }))
}

/// A PORT-IN this broker completed already, sent again because its answer was lost: the very
/// same statement with the same SERVER-SECRET gets the same answer (device 1 and its
/// CLIENT-SECRET); anything else is CONFLICT.
async fn repeated_port_in(cx: Cx<'_>, args: &PortInArgs) -> Handled {
    use subtle::ConstantTimeEq;
    let conflict = || Refusal::new(ErrorCode::Conflict, "this broker serves NUMBER already");
    let Some(entry) = cx.store.ported_entry(&args.number).await? else {
        return Err(conflict());
    };
    let same_statement = entry.from_broker == args.from
        && entry.time == args.time
        && entry.identity_key == *args.identity_key.as_bytes()
        && entry.user_signature == *args.signature.as_bytes();
    let device = cx
        .store
        .device(&args.number, micromsg_wire::DeviceId::FIRST)
        .await?;
    let Some(device) = device.filter(|d| !d.is_revoked() && same_statement) else {
        return Err(conflict());
    };
    if !bool::from(device.server_secret.ct_eq(args.server_secret.as_bytes())) {
        return Err(conflict());
    }
    Ok(ResponseData::PortIn(PortInData {
        entity: args.number.clone(),
        device: micromsg_wire::DeviceId::FIRST,
        client_secret: Hex32::from_bytes(device.client_secret),
        nonce_step: cx.config.auth.nonce_step_secs,
        nonce_algorithm: NonceAlgorithm::MmNonce1,
        seq: entry.seq,
    }))
}

/// Calls `PortOut` on the losing broker; its refusals become the client's error codes.
async fn ask_losing_broker(
    f: &Federation,
    args: &PortInArgs,
    identity_key: &[u8; 32],
    signature: &[u8; 64],
) -> Result<PortOutResponse, Refusal> {
    let Some(link) = f.link(&args.from) else {
        return Err(Refusal::new(
            ErrorCode::NotNetworked,
            "FROM is not a peer of this broker",
        ));
    };
    let mut client = link.client();
    let request = PortOutRequest {
        number: args.number.as_str().to_owned(),
        token: args.token.as_bytes().to_vec(),
        identity_key: identity_key.to_vec(),
        time: args.time,
        signature: signature.to_vec(),
    };
    let call = tokio::time::timeout(f.request_timeout(), client.port_out(request));
    let result = match call.await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("port_out timed out")),
    };
    link.record(result).map_err(|status| match status.code() {
        tonic::Code::PermissionDenied => Refusal::new(
            ErrorCode::BadToken,
            "FROM refused the TOKEN: unknown, expired, used, or issued for another broker",
        ),
        tonic::Code::InvalidArgument => {
            Refusal::new(ErrorCode::AuthFailed, "FROM refused the port statement")
        }
        tonic::Code::NotFound => {
            Refusal::new(ErrorCode::NotNetworked, "FROM does not serve NUMBER")
        }
        _ => Refusal::retry(
            ErrorCode::PeerUnavailable,
            "the broker FROM cannot be reached now; nothing changed",
            std::time::Duration::from_secs(f.config.probe_interval_secs.max(1)),
        ),
    })
}
