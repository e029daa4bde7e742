//! Accounts: REGISTER (a new entity and its first device), DEVICE-JOIN (a further device with
//! a registration secret), LOGIN (the mutually verified rotating nonce, protocol.md 9) and
//! ACCOUNT-DELETE (the entity and all it holds here, its number retired) and FORWARD (a moved
//! entity's signed notice for callers of its number, for a grace period).

use std::sync::Arc;

use micromsg_crypto::nonce::{self, Direction, NonceContext, NoncePolicy};
use micromsg_crypto::{Secret32, kdf};

use micromsg_store::{AdmittedLogin, NewDevice, Store, StoreError};
use micromsg_wire::message::event::DeviceRevoked;
use micromsg_wire::message::request::{
    AccountDeleteArgs, DeviceJoinArgs, ForwardArgs, LoginArgs, RegisterArgs,
};
use micromsg_wire::message::response::{
    DeviceJoinData, ForwardData, LoginData, NonceAlgorithm, RegisterData, SessionCounts,
};
use micromsg_wire::{ErrorCode, Event, Hex32, ResponseData};
use rand_core::OsRng;
use subtle::ConstantTimeEq;
use tracing::{debug, info, warn};

use super::{Handled, Login, Refusal, Session, wire_number};
use crate::broker::Broker;
use crate::clock::Now;
use crate::config::{Config, RegistrationPolicy};
use crate::limits::{FailureLock, ReplayCache, Source, WindowLimiter};
use crate::numbers::NumberAllocator;
use crate::online::{Online, Push};

/// What the account handlers use.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// Registration policy and tokens, nonce settings, the device cap.
    pub config: &'a Config,
    /// Entities and devices.
    pub store: &'a Store,
    /// Where a logged-in device's events go.
    pub online: &'a Online,
    /// Draws the numbers of new entities.
    pub numbers: &'a NumberAllocator,
    /// Registrations and device joins per client source (IPv4 address, IPv6 /64).
    pub registrations: &'a WindowLimiter<Source>,
    /// Login failures per entity, with the sources that failed.
    pub login_failures: &'a FailureLock,
    /// Login failures per source.
    pub login_sources: &'a WindowLimiter<Source>,
    /// Login nonces already accepted.
    pub replay: &'a Arc<ReplayCache>,
    /// The network, for numbers ported away from here; `None` on a standalone broker.
    pub federation: Option<&'a crate::federation::Federation>,
}

impl<'a> Cx<'a> {
    /// The account handlers' part of the broker.
    pub fn of(broker: &'a Broker) -> Self {
        Self {
            config: &broker.config,
            store: &broker.store,
            online: &broker.online,
            numbers: &broker.numbers,
            registrations: &broker.limiters.registrations,
            login_failures: &broker.limiters.login_failures,
            login_sources: &broker.limiters.login_sources,
            replay: &broker.limiters.replay,
            federation: broker.federation.as_deref(),
        }
    }
}

/// How stale a device's `last_seen` may get before a login writes it again.
const LAST_SEEN_GRANULARITY_SECS: i64 = 60;

/// Registrations and device joins per client source (`registration.per_ip_per_hour`).
fn check_registration_rate(cx: Cx<'_>, session: &Session, now: Now) -> Result<(), Refusal> {
    cx.registrations
        .hit(&Source::of(session.peer.ip()), now.instant)
        .map_err(|wait| {
            Refusal::retry(
                ErrorCode::RateLimited,
                "too many registrations from this address",
                wait,
            )
        })
}

/// REGISTER: a new entity with a random number of this broker's prefixes.
pub async fn register(cx: Cx<'_>, session: &Session, args: RegisterArgs, now: Now) -> Handled {
    let config = &cx.config;
    match config.registration.policy {
        RegistrationPolicy::Closed => {
            return Err(Refusal::new(
                ErrorCode::RegistrationClosed,
                "this broker does not accept registrations",
            ));
        }
        RegistrationPolicy::Token => {
            let offered = args.token.as_deref().unwrap_or("").as_bytes();
            // Every configured token is compared, in constant time, whatever matched.
            let mut ok = subtle::Choice::from(0);
            for token in &config.registration.tokens {
                ok |= token.as_bytes().ct_eq(offered);
            }
            if !bool::from(ok) {
                return Err(Refusal::new(
                    ErrorCode::BadToken,
                    "a valid registration TOKEN is required",
                ));
            }
        }
        RegistrationPolicy::Open => {}
    }
    check_registration_rate(cx, session, now)?;
    let client_secret = Secret32::generate(&mut OsRng);
    let device = NewDevice {
        client_secret: *client_secret.expose(),
        server_secret: *args.server_secret.as_bytes(),
        name: None,
    };
    // A collision is unlikely (random numbers in a large space); a few draws make it
    // vanishingly so, and the unique key keeps it correct either way.
    for _ in 0..16 {
        let number = wire_number(&cx.numbers.draw(&mut OsRng))?;
        match cx
            .store
            .create_entity(&number, &device, now.unix_i64())
            .await
        {
            Ok(device_id) => {
                info!(conn = session.conn_id, "entity registered");
                return Ok(ResponseData::Register(RegisterData {
                    entity: number,
                    device: device_id,
                    client_secret: Hex32::from_bytes(*client_secret.expose()),
                    nonce_step: config.auth.nonce_step_secs,
                    nonce_algorithm: NonceAlgorithm::MmNonce1,
                }));
            }
            Err(StoreError::NumberTaken) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    warn!("number space crowded: 16 random draws collided");
    Err(Refusal::new(
        ErrorCode::Internal,
        "could not allocate a number; try again",
    ))
}

/// DEVICE-JOIN: a new device of an entity, with a registration secret from ADD-DEVICE.
pub async fn device_join(cx: Cx<'_>, session: &Session, args: DeviceJoinArgs, now: Now) -> Handled {
    check_registration_rate(cx, session, now)?;
    let hash = kdf::sha256(&[args.secret.as_bytes()]);
    let client_secret = Secret32::generate(&mut OsRng);
    let device = NewDevice {
        client_secret: *client_secret.expose(),
        server_secret: *args.server_secret.as_bytes(),
        name: None,
    };
    let result = cx
        .store
        .redeem_registration_secret(
            &args.entity,
            &hash,
            &device,
            now.unix_i64(),
            cx.config.limits.max_devices,
        )
        .await;
    match result {
        Ok(device_id) => {
            info!(
                conn = session.conn_id,
                device = device_id.get(),
                "device joined"
            );
            Ok(ResponseData::DeviceJoin(DeviceJoinData {
                device: device_id,
                client_secret: Hex32::from_bytes(*client_secret.expose()),
                nonce_step: cx.config.auth.nonce_step_secs,
                nonce_algorithm: NonceAlgorithm::MmNonce1,
            }))
        }
        Err(StoreError::BadSecret) => Err(Refusal::new(
            ErrorCode::BadSecret,
            "registration secret unknown, expired or already used",
        )),
        Err(StoreError::DeviceLimit) => Err(Refusal::new(
            ErrorCode::DeviceLimit,
            "the entity has reached its device limit",
        )),
        Err(e) => Err(e.into()),
    }
}

/// LOGIN: verifies the client's nonce, proves the broker's, and registers the device online
/// (its events go to `session.queue`). The caller refuses LOGIN on a logged-in connection.
pub async fn login(
    cx: Cx<'_>,
    session: &Session,
    args: LoginArgs,
    now: Now,
) -> Result<(ResponseData, Login), Refusal> {
    let number = args.entity.as_str().to_owned();
    let device_id = args.device.get();
    let source = Source::of(session.peer.ip());
    // The source first: one that fails too often is throttled whatever entity it tries.
    if let Err(wait) = cx.login_sources.check(&source, now.instant) {
        return Err(Refusal::retry(
            ErrorCode::RateLimited,
            "too many failed logins from this address; wait",
            wait,
        ));
    }
    // Then the entity, locked only against the sources that failed for it (9.5): a device
    // logging in from elsewhere is not locked out by someone else's failures.
    if let Err(wait) = cx.login_failures.check(&number, source, now.instant) {
        return Err(Refusal::retry(
            ErrorCode::Locked,
            "too many failed logins for this entity from this address; the entity is locked \
             against it for a while",
            wait,
        ));
    }
    // A number ported to another broker is served there now (docs/federation.md 12): say
    // where. That a number moved is public (IS-NETWORKED shows its home), so this tells
    // nothing the network does not.
    if let Some(f) = cx.federation
        && let Some(route) = f.route(&number)
        && route.to != f.me.id
    {
        return Err(Refusal::new(
            ErrorCode::Ported,
            format!(
                "this number was ported to broker {}; log in there (micromsg move --keep-number)",
                route.to
            ),
        ));
    }
    let auth = &cx.config.auth;
    let policy = NoncePolicy {
        step_secs: u64::from(auth.nonce_step_secs),
        skew_steps: u64::from(auth.nonce_skew_steps),
    };
    // The nonce is checked between the store's two reads, on the connection that read the
    // device (on SQLite, on a login reader's thread: hence the owned copies): the inbox count
    // is read only for a login that verified.
    let replay = Arc::clone(cx.replay);
    let binding = session.binding;
    let login_nonce = *args.secret.as_bytes();
    let checked_number = number.clone();
    let looked_up = cx
        .store
        .device_for_login(&args.entity, args.device, now.unix_i64(), move |record| {
            // Unknown and revoked devices run the same verification against a throwaway
            // secret, so the answer and its timing do not tell which numbers and devices
            // exist.
            let (client_secret, usable) = match record {
                Some(r) if !r.is_revoked() => (Secret32::from_bytes(r.client_secret), true),
                _ => (Secret32::generate(&mut OsRng), false),
            };
            let ctx = NonceContext {
                entity: &checked_number,
                device: device_id,
                binding: &binding,
            };
            let verified = nonce::verify(
                &client_secret,
                Direction::ClientToBroker,
                &ctx,
                &policy,
                now.unix,
                &login_nonce,
            );
            match verified {
                Ok(step) if usable && replay.first_use(login_nonce, now.instant) => Some(step),
                _ => None,
            }
        })
        .await?;
    let Some(AdmittedLogin {
        record,
        verdict: step,
        pending,
    }) = looked_up
    else {
        let _ = cx.login_sources.hit(&source, now.instant);
        if cx.login_failures.fail(&number, source, now.instant) {
            warn!(
                conn = session.conn_id,
                "entity locked after repeated login failures"
            );
        }
        debug!(conn = session.conn_id, "login refused");
        return Err(Refusal::new(
            ErrorCode::AuthFailed,
            "login failed: unknown entity or device, or the nonce did not verify",
        ));
    };
    // The count is for the user's information: a login stands without it, as before the
    // reads shared a connection.
    let inbox = pending.unwrap_or_else(|e| {
        warn!(conn = session.conn_id, error = %e, "pending count unavailable; LOGIN says 0");
        0
    });
    let ctx = NonceContext {
        entity: &number,
        device: device_id,
        binding: &session.binding,
    };
    let server_secret = Secret32::from_bytes(record.server_secret);
    let proof = nonce::compute(&server_secret, Direction::BrokerToClient, &ctx, step)
        .map_err(|_| Refusal::internal())?;
    cx.login_failures.succeed(&number, source);
    // `last_seen` is for people (DEVICE-LIST), so minute precision will do: a device that
    // logs in again and again (one-shot commands, reconnects) costs no write each time.
    let last_seen = record.last_seen.unwrap_or(0);
    if now.unix_i64().saturating_sub(last_seen) >= LAST_SEEN_GRANULARITY_SECS {
        cx.store
            .touch_device(&args.entity, args.device, now.unix_i64())
            .await?;
    }
    cx.online.insert(
        &number,
        device_id,
        session.conn_id,
        session.queue.clone(),
        now.instant,
    );
    info!(conn = session.conn_id, device = device_id, "logged in");
    let answer = ResponseData::Login(LoginData {
        proof: Hex32::from_bytes(proof),
        step,
        session: SessionCounts {
            inbox: u32::try_from(inbox).unwrap_or(u32::MAX),
        },
        client_ip: Some(session.peer.ip().to_canonical().to_string()),
    });
    Ok((
        answer,
        Login {
            number: args.entity,
            device: args.device,
        },
    ))
}

/// ACCOUNT-DELETE: removes the logged-in entity and everything it holds at this broker, in one
/// transaction, and retires its number (never handed out again). `CONFIRM` must repeat the
/// entity's own number, so a stray or replayed-by-mistake request deletes nothing. Every
/// connection of its devices gets DEVICE-REVOKED and closes; this one closes after the answer.
/// A later LOGIN fails as for an unknown device.
pub async fn delete(
    cx: Cx<'_>,
    session: &Session,
    login: &Login,
    args: AccountDeleteArgs,
    now: Now,
) -> Handled {
    if args.confirm != *login.number() {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            "CONFIRM must be this entity's own number; nothing was deleted",
        ));
    }
    let devices = match cx.store.delete_entity(login.number(), now.unix_i64()).await {
        Ok(devices) => devices,
        // Deleted meanwhile by another of its devices.
        Err(StoreError::NotFound) => {
            return Err(Refusal::new(ErrorCode::NotFound, "no such entity"));
        }
        Err(e) => return Err(e.into()),
    };
    for device in devices {
        cx.online
            .push_all(login.number().as_str(), Some(device.get()), || {
                Push::close(Event::DeviceRevoked(DeviceRevoked { device }))
            });
    }
    info!(conn = session.conn_id, "entity deleted");
    Ok(ResponseData::AccountDelete)
}

/// The most bytes a FORWARD notice may have (a moved notice, protocol.md 12.13, is far
/// smaller; the bound keeps the table small).
pub const MAX_FORWARD_NOTICE: usize = 1024;

const DAY_SECS: u64 = 86_400;

/// FORWARD: keeps `NOTICE` (opaque to the broker: callers' clients verify it against the key
/// they pinned) for `DAYS` days, at most `contacts.forward_max_days`; replaces an earlier one.
/// While it lives, an INITIATE to this number from a caller it has not blocked gets FORWARDED
/// (protocol.md 10.2). It outlives ACCOUNT-DELETE until its expiry.
pub async fn forward(cx: Cx<'_>, login: &Login, args: ForwardArgs, now: Now) -> Handled {
    let max_days = cx.config.contacts.forward_max_days;
    if max_days == 0 {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            "this broker keeps no forwards (contacts.forward_max_days is 0)",
        ));
    }
    if args.days == 0 || args.days > max_days {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            format!("DAYS must be 1 to {max_days} on this broker"),
        ));
    }
    let len = args.notice.as_bytes().len();
    if len == 0 || len > MAX_FORWARD_NOTICE {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            format!("NOTICE is {len} bytes; 1 to {MAX_FORWARD_NOTICE} are kept"),
        ));
    }
    // `days` is at most `MAX_FORWARD_DAYS` (config validation), so this stays far from overflow.
    let expires = now.unix.saturating_add(args.days.saturating_mul(DAY_SECS));
    cx.store
        .set_forward(
            login.number(),
            args.notice.as_bytes(),
            now.unix_i64(),
            i64::try_from(expires).unwrap_or(i64::MAX),
        )
        .await?;
    Ok(ResponseData::Forward(ForwardData { expires }))
}
