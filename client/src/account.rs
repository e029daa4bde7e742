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

/// The profile's file that keeps, for its broker, the broker's clock less this device's (in
/// seconds), learned at a login this device's clock made fail: later logins, of any command,
/// are made at the broker's time and do not fail first (each refused LOGIN counts towards the
/// broker's limits on failed logins).
const CLOCK_FILE: &str = "clock-offset.json";

/// What [`CLOCK_FILE`] holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct ClockOffset {
    broker: String,
    offset: i64,
}

/// The offset the profile keeps for `broker`; 0 when none (or an unreadable file: the next
/// refused login learns it again).
fn stored_clock_offset(profile: &Profile, broker: &str) -> i64 {
    std::fs::read(profile.path(CLOCK_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ClockOffset>(&bytes).ok())
        .filter(|kept| kept.broker == broker && kept.offset.unsigned_abs() <= MAX_CLOCK_OFFSET)
        .map_or(0, |kept| kept.offset)
}

/// The largest difference kept (ten years): a file with more is taken as damaged.
const MAX_CLOCK_OFFSET: u64 = 10 * 365 * 86_400;

/// Keeps `offset` for `broker` in the profile (no file for 0), on the blocking pool. A failure
/// only costs the next login a refusal, so it is not an error.
async fn store_clock_offset(profile: &Profile, broker: &str, offset: i64) {
    let (profile, broker) = (profile.clone(), broker.to_owned());
    let _ = tokio::task::spawn_blocking(move || write_clock_offset(&profile, broker, offset)).await;
}

/// [`store_clock_offset`]'s write.
fn write_clock_offset(profile: &Profile, broker: String, offset: i64) {
    // Beyond ten years it would be ignored when read: keep none.
    if offset == 0 || offset.unsigned_abs() > MAX_CLOCK_OFFSET {
        let _ = std::fs::remove_file(profile.path(CLOCK_FILE));
        return;
    }
    let kept = ClockOffset { broker, offset };
    if let Ok(json) = serde_json::to_vec(&kept) {
        let _ = profile.write_atomic(CLOCK_FILE, &json, false);
    }
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

/// What BROKER-INFO tells of the broker's LOGIN check.
#[derive(Debug, Clone, Copy)]
struct BrokerClock {
    /// Its clock (`TIME`), Unix seconds.
    now: u64,
    /// `NONCE-STEP`, seconds.
    step: u32,
    /// `NONCE-SKEW`, steps accepted on either side.
    skew: u32,
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

/// The second LOGIN after a refused one: at which offset from this device's clock, and with
/// which nonce step.
#[derive(Debug, PartialEq, Eq)]
struct SecondLogin {
    /// The broker's clock less this device's, when the time the first LOGIN proved is outside
    /// the steps the broker accepts at its own time (its step ± skew, 9.2): log in at the
    /// broker's time, and keep the offset for later logins. `None`: the clock is not the cause
    /// (the offset kept, if any, stays).
    offset: Option<i64>,
    /// The broker's `NONCE-STEP`, when it is not the profile's (the operator changed it since
    /// this device registered): log in with it, and keep it in the profile.
    step: Option<u32>,
}

/// The second LOGIN after a LOGIN refused for the time `proved_at` (Unix seconds) with the
/// profile's nonce step `profile_step`, from the broker's clock and check, this device's clock
/// (`local_now`) and the whole seconds `waited` from sending the LOGIN to BROKER-INFO's answer
/// (the broker checked the LOGIN at some moment of it, up to `waited` seconds before its
/// `TIME`); `None` when neither the time nor the step can be the cause, and the refusal stands.
///
/// The step the LOGIN proved is taken with the broker's step. The clock can be the cause when,
/// at some moment the broker may have checked it, that step was more than the skew from the
/// broker's: a step boundary passing during the wait must not hide it.
fn second_login(
    broker: &BrokerClock,
    waited: u64,
    proved_at: u64,
    local_now: u64,
    profile_step: u32,
) -> Option<SecondLogin> {
    let broker_step = u64::from(broker.step.max(1));
    let skew = u64::from(broker.skew);
    let proved = proved_at / broker_step;
    let earliest = broker.now.saturating_sub(waited) / broker_step;
    let latest = broker.now / broker_step;
    let outside = proved > earliest.saturating_add(skew) || proved.saturating_add(skew) < latest;
    let step = (broker.step != profile_step && broker.step > 0).then_some(broker.step);
    let offset = match outside {
        // A broker clock past i64 cannot be used.
        true => i64::try_from(broker.now)
            .ok()
            .zip(i64::try_from(local_now).ok())
            .map(|(broker, local)| broker - local),
        false => None,
    };
    (offset.is_some() || step.is_some()).then_some(SecondLogin { offset, step })
}

/// Keeps a nonce step learned at a login in the profile, on the blocking pool. The profile is
/// read again first and changed only if it is still the one `info` was read from (a `move`
/// or a port in another process may have rewritten it). As with [`store_clock_offset`], a
/// failure only costs the next login a refusal.
async fn store_step(profile: &Profile, info: &ProfileInfo, step: u32) {
    let (profile, info) = (profile.clone(), info.clone());
    let _ = tokio::task::spawn_blocking(move || {
        let mut now = profile.info()?;
        if (&now.broker, &now.number, now.device) != (&info.broker, &info.number, info.device) {
            return Ok(());
        }
        now.nonce_step = step;
        profile.write_info(&now)
    })
    .await;
}

/// Whether `offset` (seconds) is a clock that is off: a nonce step (`step_secs`) or more.
fn clock_is_off(offset: i64, step_secs: u32) -> bool {
    offset.unsigned_abs() >= u64::from(step_secs.max(1))
}

/// What a refused LOGIN is put down to.
enum AuthCause {
    /// The LOGIN proved the step the broker's clock is in.
    NotTheClock,
    /// The broker's clock could not be read (BROKER-INFO refused or not answered as such).
    ClockUnknown,
    /// Refused again at the broker's time, this many seconds from this device's.
    NotEvenAtItsTime(i64),
}

/// The AUTH-FAILED refusal of a LOGIN, saying what it means for this device.
fn auth_failed(cause: AuthCause, retry_after: Option<u32>) -> LinkError {
    let why = match cause {
        AuthCause::NotTheClock => String::new(),
        AuthCause::ClockUnknown => {
            " (or this device's clock is off: the broker's could not be read to tell)".to_owned()
        }
        AuthCause::NotEvenAtItsTime(offset) => format!(
            " (refused at the broker's time too, {} this device's)",
            clock_difference(offset)
        ),
    };
    LinkError::Refused {
        code: ErrorCode::AuthFailed,
        message: format!(
            "login failed: this device was revoked (`device list` on another device of this \
             entity shows the active ones), or the broker does not know it{why}"
        ),
        retry_after,
    }
}

/// `offset` (the broker's clock less this device's) for people: `95 s ahead of`, `120 s
/// behind`, to be followed by what it is compared with.
fn clock_difference(offset: i64) -> String {
    let side = if offset > 0 { "ahead of" } else { "behind" };
    format!("{} s {side}", offset.unsigned_abs())
}

/// What to tell the user of a login made at the broker's time (`Session::clock_offset`), if
/// anything: this device's clock is off by a nonce step (`step_secs`) or more.
pub fn clock_warning(offset: i64, step_secs: u32) -> Option<String> {
    clock_is_off(offset, step_secs).then(|| {
        format!(
            "this device's clock is off: the broker's is {} it; logging in at the broker's \
             time (set this device's clock right: the time on each message sent comes from it)",
            clock_difference(offset)
        )
    })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_login_is_made_again_only_when_the_time_proved_or_the_step_can_be_the_cause() {
        let now = 1_800_000_000; // a multiple of 30: each case below is in a known step
        let broker = |at: u64, skew| BrokerClock {
            now: at,
            step: 30,
            skew,
        };
        let again = |offset, step| Some(SecondLogin { offset, step });
        // Proved within the broker's step ± skew: not the cause, whatever the seconds.
        assert_eq!(second_login(&broker(now + 59, 1), 1, now, now, 30), None);
        assert_eq!(second_login(&broker(now - 1, 1), 1, now, now, 30), None);
        // Outside it, either way: log in at the broker's time.
        assert_eq!(
            second_login(&broker(now + 95, 1), 1, now, now, 30),
            again(Some(95), None)
        );
        assert_eq!(
            second_login(&broker(now - 31, 1), 1, now, now, 30),
            again(Some(-31), None)
        );
        // With a skew of 0, a step apart is outside, under a step's seconds.
        assert_eq!(
            second_login(&broker(now + 30, 0), 1, now + 29, now + 29, 30),
            again(Some(1), None)
        );
        assert_eq!(second_login(&broker(now + 29, 0), 1, now, now, 30), None);
        // Refused at the broker's time already (an offset learned before): not the cause.
        assert_eq!(
            second_login(&broker(now + 96, 1), 1, now + 95, now + 1, 30),
            None
        );
        // The clock set right since an earlier correction: log in at about this device's time.
        assert_eq!(
            second_login(&broker(now + 1, 1), 1, now + 95, now, 30),
            again(Some(1), None)
        );
        // The operator changed the step since this device registered: log in with the new
        // one, at this device's time when that is within it.
        assert_eq!(
            second_login(&broker(now + 2, 1), 1, now, now, 6),
            again(None, Some(30))
        );
        assert_eq!(
            second_login(&broker(now + 300, 1), 1, now, now, 6),
            again(Some(300), Some(30))
        );
        // A step of 0 (no broker sends one) is not taken; a clock past i64 cannot be used.
        let zero = BrokerClock {
            now,
            step: 0,
            skew: 1,
        };
        assert_eq!(second_login(&zero, 1, now, now, 30), None);
        assert_eq!(second_login(&broker(u64::MAX, 1), 1, now, now, 30), None);
        // The broker checked the LOGIN before its TIME, and a step boundary may have passed
        // in between: proved at 18 s (step 3 of 6 s), checked at 11 s (step 1: refused), TIME
        // 12 s (step 2, within the skew of 3). The wait keeps the clock as the cause.
        let six = |now| BrokerClock {
            now,
            step: 6,
            skew: 1,
        };
        assert_eq!(second_login(&six(12), 1, 18, 18, 6), again(Some(-6), None));
        assert_eq!(second_login(&six(12), 0, 18, 18, 6), None);
        // The step changed, with a clock past i64: the step is still learned.
        let huge = BrokerClock {
            now: u64::MAX,
            step: 6,
            skew: 1,
        };
        assert_eq!(second_login(&huge, 1, now, now, 30), again(None, Some(6)));
        // Only a step or more is a clock to tell the user about.
        assert!(!clock_is_off(29, 30));
        assert!(clock_is_off(-30, 30));
    }

    #[test]
    fn the_offset_learned_is_kept_in_the_profile_for_its_broker() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::new(dir.path());
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        write_clock_offset(&profile, "b:1".into(), -120);
        assert_eq!(stored_clock_offset(&profile, "b:1"), -120);
        // Another broker (the profile moved): its own clock, not yet known.
        assert_eq!(stored_clock_offset(&profile, "c:1"), 0);
        // A clock set right: the file goes.
        write_clock_offset(&profile, "b:1".into(), 0);
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        assert!(!profile.path(CLOCK_FILE).exists());
        // An unreadable file, or one with an offset beyond ten years, counts as none.
        std::fs::write(profile.path(CLOCK_FILE), b"{").unwrap();
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        write_clock_offset(&profile, "b:1".into(), i64::MIN);
        assert_eq!(stored_clock_offset(&profile, "b:1"), 0);
        // One beyond ten years is not kept (it would be ignored when read), and replaces
        // what was.
        write_clock_offset(&profile, "b:1".into(), -120);
        write_clock_offset(&profile, "b:1".into(), 11 * 365 * 86_400);
        assert!(!profile.path(CLOCK_FILE).exists());
    }

    #[test]
    fn a_refused_login_says_what_it_means_and_keeps_its_code() {
        let refused = auth_failed(AuthCause::NotTheClock, Some(5));
        let text = refused.to_string();
        assert!(text.contains("AUTH-FAILED"), "{text}");
        assert!(text.contains("this device was revoked"), "{text}");
        assert_eq!(refused.code(), Some(ErrorCode::AuthFailed));
        let again = auth_failed(AuthCause::NotEvenAtItsTime(-120), None).to_string();
        assert!(
            again.contains("refused at the broker's time too, 120 s behind this device's)"),
            "{again}"
        );
        let unknown = auth_failed(AuthCause::ClockUnknown, None).to_string();
        assert!(unknown.contains("could not be read"), "{unknown}");
        assert_eq!(clock_warning(0, 30), None);
        assert_eq!(clock_warning(29, 30), None);
        let warning = clock_warning(95, 30).unwrap();
        assert!(
            warning.contains("the broker's is 95 s ahead of it;"),
            "{warning}"
        );
    }
}
