//! Moving to another broker of the same network and keeping the number (protocol.md 6.27,
//! 6.28; docs/federation.md 12).
//!
//! [`port`] does the whole move, in this order, so nothing waiting is lost and the profile
//! never points at a broker that does not serve it:
//!
//! 0. refuse while an agent (`listen`, `chat`) runs for the profile;
//! 1. log in at the old broker and fetch everything waiting in the inbox into the local store
//!    (what arrives after this moves to the new broker with the number);
//! 2. read the new broker's BROKER-INFO (signature checked) for its id, and check that both
//!    brokers are of the same network;
//! 3. PORT-OUT {TO: new broker} at the old broker: a single-use token;
//! 4. PORT-IN at the new broker with the token, the statement signed by this entity's identity
//!    key and a fresh server secret;
//! 5. write the profile: the new secrets (same identity key), the new CA, then the new broker
//!    and its pinned identity (each file replaced atomically; `profile.toml` last, as at
//!    registration, so until it is written the profile still names the old broker).
//!
//! [`Step`] tells these to `move --keep-number`, which prints them numbered `1/6` to `6/6`
//! (logging in and fetching are two steps there).
//!
//! **Interrupted ports.** The PORT-IN request is staged in `DIR/porting/` (0600) before it is
//! sent, and its answer before the profile is switched. The next `move --keep-number` finds the stage and
//! sends the very same request again — the brokers answer a repeat alike (docs/federation.md
//! 12.2) — or only finishes the switch. A request refused for good removes the stage.

use std::path::Path;

use micromsg_crypto::Secret32;
use micromsg_crypto::identity::IdentityKey;
use micromsg_wire::message::request::{PortInArgs, PortOutArgs};
use micromsg_wire::{Hex32, Hex64, Request, ResponseData, port_statement};
use rand_core::OsRng;

use crate::account::{self, AccountError, Session, fetch_broker_info, unix_now};
use crate::inbox::{Delivery, InboxError, LiveTable};
use crate::link::{BrokerLink, LinkError};
use crate::profile::{Profile, ProfileError, ProfileInfo, Secrets};
use crate::store::Store;
use crate::tls::client_config;

/// Why a port failed. Until [`PortError::Link`] from PORT-IN succeeded nothing changed at
/// either broker; the profile is written only after it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// Logging in, reading BROKER-INFO or the profile failed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The profile could not be written.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// A broker refused or the link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Fetching the old inbox failed (nothing was ported).
    #[error("fetching the old inbox failed, nothing was ported: {0}")]
    Inbox(#[from] InboxError),
    /// The two brokers cannot port between them.
    #[error("{0}")]
    NotPossible(String),
}

/// Where the port went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReport {
    /// The number, kept.
    pub number: String,
    /// The broker it left (id).
    pub from: String,
    /// The broker that serves it now (id).
    pub to: String,
    /// Its address (`HOST:PORT`).
    pub broker: String,
    /// The device id at the new broker.
    pub device: u32,
    /// The ported-number entry's sequence.
    pub seq: u64,
    /// Messages fetched from the old inbox before the move.
    pub fetched: usize,
}

/// A step of a port, told to `progress` as it begins (for people: `move --keep-number` prints
/// them numbered, `n/STEPS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Logging in at the old broker.
    LoggingIn,
    /// Fetching everything waiting in the old inbox.
    Fetching,
    /// Connecting to the new broker and checking it is of the same network.
    CheckingNewBroker,
    /// PORT-OUT at the old broker.
    PortOut,
    /// PORT-IN at the new broker.
    PortIn,
    /// The same PORT-IN again, its answer lost.
    RetryingPortIn,
    /// A staged PORT-IN of an interrupted port, sent again.
    ResumingPortIn,
    /// Writing the new broker's account into the profile.
    UpdatingProfile,
    /// Writing the profile of an interrupted port whose PORT-IN was answered.
    ResumingSwitch,
}

/// How many numbered steps a port has ([`Step::number`]).
pub const STEPS: u8 = 6;

impl Step {
    /// Its place among the [`STEPS`]: a retry or a resumed step has the place of what it does.
    pub fn number(self) -> u8 {
        match self {
            Step::LoggingIn => 1,
            Step::Fetching => 2,
            Step::CheckingNewBroker => 3,
            Step::PortOut => 4,
            Step::PortIn | Step::RetryingPortIn | Step::ResumingPortIn => 5,
            Step::UpdatingProfile | Step::ResumingSwitch => 6,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::LoggingIn => "logging in at the old broker",
            Step::Fetching => "fetching everything waiting in the old inbox",
            Step::CheckingNewBroker => "checking the new broker",
            Step::PortOut => "asking the old broker to let the number go (PORT-OUT)",
            Step::PortIn => "taking the number over at the new broker (PORT-IN)",
            Step::RetryingPortIn => {
                "the answer did not come through; sending the same PORT-IN again"
            }
            Step::ResumingPortIn => "sending the unfinished port's PORT-IN again",
            Step::UpdatingProfile => "updating the profile",
            Step::ResumingSwitch => "finishing the profile switch of an interrupted port",
        })
    }
}

/// Moves this profile's number to the broker at `broker` (trusting `ca`), keeping the number
/// (see the module docs). `progress` is told each step, for people.
pub async fn port(
    profile: &Profile,
    broker: &str,
    ca: &Path,
    mut progress: impl FnMut(Step),
) -> Result<PortReport, PortError> {
    // Held to the end: a second port (or `move`) of this profile now would send its own
    // PORT-OUT, or stage into the same directory.
    let _moving = profile.lock_for_move()?;
    let info = profile.info()?;
    let secrets = profile.secrets()?;
    let identity = IdentityKey::from_seed(&secrets.identity_seed);
    // A running agent holds the old broker link and writes the same store: the move must not
    // happen under it.
    if tokio::net::UnixStream::connect(crate::agent::control_path(profile))
        .await
        .is_ok()
    {
        return Err(PortError::NotPossible(
            "a `listen` or `chat` runs for this profile; stop it first, then port".into(),
        ));
    }

    let stage = stage_of(profile);
    if stage.path(STAGE_REQUEST).exists() {
        return resume(profile, &stage, broker, &mut progress).await;
    }

    progress(Step::LoggingIn);
    let mut old = account::connect(profile).await?;
    let old_info = fetch_broker_info(&mut old.link).await?;
    progress(Step::Fetching);
    let fetched = fetch_everything(profile, &info, &secrets, &mut old).await?;

    progress(Step::CheckingNewBroker);
    let tls_name = account::tls_name_of(broker)?;
    let mut new_link = BrokerLink::connect(
        broker,
        &tls_name,
        client_config(ca).map_err(AccountError::from)?,
    )
    .await?;
    let new_info = fetch_broker_info(&mut new_link).await?;
    let from = old_info.info.broker_id.clone();
    let to = new_info.info.broker_id.clone();
    if from == to {
        return Err(PortError::NotPossible(format!(
            "{broker} is broker {to}, which serves this number already"
        )));
    }
    let network = old_info.info.network.name.clone();
    if network.is_none() || network != new_info.info.network.name {
        return Err(PortError::NotPossible(
            "a number can only be ported between brokers of the same network; use a move to \
             another broker with a new number instead"
                .into(),
        ));
    }

    progress(Step::PortOut);
    let token = match old
        .link
        .call(Request::PortOut(PortOutArgs {
            to: to.clone(),
            identity_key: Hex32::from_bytes(*identity.public_key().as_bytes()),
        }))
        .await?
    {
        ResponseData::PortOut(data) => data.token,
        other => return Err(unexpected("PORT-OUT", &other)),
    };
    drop(old);

    progress(Step::PortIn);
    let time = unix_now();
    let statement = port_statement(&info.number, &from, &to, time);
    let server_secret = Secret32::generate(&mut OsRng);
    let request = Request::PortIn(PortInArgs {
        number: micromsg_wire::Number::new(info.number.clone())
            .map_err(|e| PortError::NotPossible(format!("profile number: {e}")))?,
        from: from.clone(),
        token,
        identity_key: Hex32::from_bytes(*identity.public_key().as_bytes()),
        time,
        signature: Hex64::from_bytes(identity.sign(&statement)),
        server_secret: Hex32::from_bytes(*server_secret.expose()),
    });
    // Staged before it is sent: from here on the old broker may let the number go, and a
    // crash must not lose the one request that completes the port.
    let target = Target {
        broker: broker.to_owned(),
        tls_name,
        broker_identity: new_info.identity_key.to_hex(),
        from,
        to,
    };
    let stage = stage_of(profile);
    let ca_pem = std::fs::read(ca).map_err(|source| ProfileError::Io {
        path: ca.to_owned(),
        source,
    })?;
    stage.write_atomic(STAGE_CA, &ca_pem, false)?;
    stage.write_atomic(STAGE_TARGET, &target.to_json()?, false)?;
    stage.write_atomic(STAGE_REQUEST, &request.encode(1), true)?;
    complete(
        profile,
        &stage,
        &info,
        &secrets,
        target,
        request,
        fetched,
        &mut progress,
    )
    .await
}

/// Files of the stage (`DIR/porting/`): the new broker's CA, where the port goes, the PORT-IN
/// request (secret: it holds the token and the new device's server secret) and, once answered,
/// the new profile (`profile.toml`, `secrets.toml`) and the entry's sequence.
const STAGE_DIR: &str = "porting";
const STAGE_CA: &str = "ca.pem";
const STAGE_TARGET: &str = "target.json";
const STAGE_REQUEST: &str = "port-in.yaml";
const STAGE_SEQ: &str = "seq";

fn stage_of(profile: &Profile) -> Profile {
    Profile::new(profile.path(STAGE_DIR))
}

/// Where a staged port goes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Target {
    broker: String,
    tls_name: String,
    broker_identity: String,
    from: String,
    to: String,
}

impl Target {
    fn to_json(&self) -> Result<Vec<u8>, PortError> {
        serde_json::to_vec(self).map_err(|e| PortError::NotPossible(e.to_string()))
    }

    fn read(stage: &Profile) -> Result<Self, PortError> {
        let path = stage.path(STAGE_TARGET);
        let bytes = std::fs::read(&path).map_err(|source| ProfileError::Io { path, source })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| PortError::NotPossible(format!("the staged port is unreadable: {e}")))
    }
}

/// Sends the staged PORT-IN (again, after a crash: the brokers answer a repeat of the same
/// request alike), stages the answer, and switches the profile.
#[allow(clippy::too_many_arguments)]
async fn complete(
    profile: &Profile,
    stage: &Profile,
    info: &ProfileInfo,
    secrets: &Secrets,
    target: Target,
    request: Request,
    fetched: usize,
    progress: &mut impl FnMut(Step),
) -> Result<PortReport, PortError> {
    let Request::PortIn(args) = &request else {
        return Err(PortError::NotPossible(
            "the staged request is not PORT-IN".into(),
        ));
    };
    let server_secret = Secret32::from_bytes(*args.server_secret.as_bytes());
    let ca = stage.path(STAGE_CA);
    let link = BrokerLink::connect(
        &target.broker,
        &target.tls_name,
        client_config(&ca).map_err(AccountError::from)?,
    )
    .await?;
    let data = match port_in_with_retries(
        link,
        &target.broker,
        &target.tls_name,
        &ca,
        request.clone(),
        progress,
    )
    .await
    {
        Ok(data) => data,
        Err(PortError::Link(e)) if is_final(&e) => {
            // Refused for good: nothing to resume; the profile still names the old broker.
            let _ = std::fs::remove_dir_all(stage.dir());
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    progress(Step::UpdatingProfile);
    stage.write_secrets(&Secrets {
        client_secret: Secret32::from_bytes(*data.client_secret.as_bytes()),
        server_secret,
        identity_seed: Secret32::from_bytes(*secrets.identity_seed.expose()),
    })?;
    stage.write_info(&ProfileInfo {
        broker: target.broker.clone(),
        tls_name: target.tls_name.clone(),
        number: info.number.clone(),
        device: data.device.get(),
        nonce_step: data.nonce_step,
        broker_identity: Some(target.broker_identity.clone()),
    })?;
    stage.write_atomic(STAGE_SEQ, data.seq.to_string().as_bytes(), false)?;
    switch(profile, stage)?;
    Ok(PortReport {
        number: info.number.clone(),
        from: target.from,
        to: target.to,
        broker: target.broker,
        device: data.device.get(),
        seq: data.seq,
        fetched,
    })
}

/// Whether a PORT-IN error will not change by sending the same request again.
fn is_final(e: &LinkError) -> bool {
    use micromsg_wire::ErrorCode as E;
    matches!(
        e.code(),
        Some(code) if !matches!(code, E::PeerUnavailable | E::RateLimited | E::Unavailable
            | E::Internal | E::ShuttingDown)
    )
}

/// Puts the staged profile in place: the secrets, the CA, then `profile.toml` (it names the
/// broker the rest belongs to; until it is written the profile names the old one), then
/// removes the stage.
fn switch(profile: &Profile, stage: &Profile) -> Result<(), PortError> {
    // No read-decide-write of profile.toml (a learned nonce step) may straddle the switch.
    let _lock = profile.lock()?;
    // Before anything names the new device id (`store/relabel.rs`).
    crate::store::relabel_for_switch(profile, stage)
        .map_err(|e| PortError::NotPossible(format!("relabelling the kept session keys: {e}")))?;
    profile.write_secrets(&stage.secrets()?)?;
    let path = stage.path(STAGE_CA);
    let ca = std::fs::read(&path).map_err(|source| ProfileError::Io { path, source })?;
    profile.write_atomic("ca.pem", &ca, false)?;
    profile.write_info(&stage.info()?)?;
    std::fs::remove_dir_all(stage.dir()).map_err(|source| ProfileError::Io {
        path: stage.dir().to_owned(),
        source,
    })?;
    Ok(())
}

/// A port left unfinished by a crash or a lost connection: sends its staged PORT-IN again, or,
/// when the answer was staged already, only switches the profile.
async fn resume(
    profile: &Profile,
    stage: &Profile,
    broker: &str,
    progress: &mut impl FnMut(Step),
) -> Result<PortReport, PortError> {
    let target = Target::read(stage)?;
    if target.broker != broker {
        return Err(PortError::NotPossible(format!(
            "a port to {} is unfinished; run `move --keep-number --broker {} --ca …` again to finish it",
            target.broker, target.broker
        )));
    }
    let info = profile.info()?;
    let secrets = profile.secrets()?;
    if let Ok(staged) = stage.info() {
        progress(Step::ResumingSwitch);
        let seq_path = stage.path(STAGE_SEQ);
        let seq = std::fs::read_to_string(&seq_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        switch(profile, stage)?;
        return Ok(PortReport {
            number: info.number,
            from: target.from,
            to: target.to,
            broker: target.broker,
            device: staged.device,
            seq,
            fetched: 0,
        });
    }
    progress(Step::ResumingPortIn);
    let path = stage.path(STAGE_REQUEST);
    let bytes = std::fs::read(&path).map_err(|source| ProfileError::Io { path, source })?;
    let (_, request) = micromsg_wire::decode_request(&bytes, &micromsg_wire::Limits::default())
        .map_err(|e| PortError::NotPossible(format!("the staged PORT-IN is unreadable: {e:?}")))?;
    complete(
        profile, stage, &info, &secrets, target, request, 0, progress,
    )
    .await
}

/// How often PORT-IN is sent again after a lost connection or PEER-UNAVAILABLE.
const PORT_IN_ATTEMPTS: u32 = 3;

/// Sends PORT-IN, and the very same request again (same statement, same token) when the
/// answer was lost or the old broker could not be reached: the old broker answers a repeat of
/// the port it agreed to again (docs/federation.md 12.2), so a port cut short completes.
async fn port_in_with_retries(
    mut link: BrokerLink,
    broker: &str,
    tls_name: &str,
    ca: &Path,
    request: Request,
    progress: &mut impl FnMut(Step),
) -> Result<micromsg_wire::message::response::PortInData, PortError> {
    let mut attempt = 1;
    loop {
        let error = match link.call(request.clone()).await {
            Ok(ResponseData::PortIn(data)) => return Ok(data),
            Ok(other) => return Err(unexpected("PORT-IN", &other)),
            Err(e) => e,
        };
        let again = matches!(
            error,
            LinkError::Io(_) | LinkError::Closed | LinkError::Timeout(_)
        ) || error.code() == Some(micromsg_wire::ErrorCode::PeerUnavailable);
        if !again || attempt >= PORT_IN_ATTEMPTS {
            return Err(error.into());
        }
        progress(Step::RetryingPortIn);
        tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt))).await;
        attempt += 1;
        let config = client_config(ca).map_err(AccountError::from)?;
        link = BrokerLink::connect(broker, tls_name, config).await?;
    }
}

/// Fetches, stores and acknowledges the whole inbox of the old broker; the count of items.
async fn fetch_everything(
    profile: &Profile,
    info: &ProfileInfo,
    secrets: &Secrets,
    session: &mut Session,
) -> Result<usize, PortError> {
    let store = Store::new(profile);
    let mut delivery = Delivery::new(
        store,
        &info.number,
        info.device,
        Secret32::from_bytes(*secrets.identity_seed.expose()),
    )
    .map_err(InboxError::from)?;
    let mut live = LiveTable::new();
    let arrived = delivery
        .fetch_all(&mut session.link, &mut live, unix_now())
        .await?;
    Ok(arrived.len())
}

fn unexpected(request: &str, answer: &ResponseData) -> PortError {
    PortError::Link(LinkError::Protocol(format!(
        "{request} answered with {}",
        answer.kind().as_str()
    )))
}
