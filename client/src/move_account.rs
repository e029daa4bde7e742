//! `micromsg move`: take this entity to another broker with a new number, keeping the
//! identity key, so every contact keeps it (protocol.md 12.13).
//!
//! In order, each step durable before the next:
//!
//! 1. fetch everything waiting in the old inbox (stored and opened as `inbox` does);
//! 2. REGISTER at the new broker (a new number there), keeping the identity key; the new
//!    profile is staged in `DIR/moving/` at once, so a crash after this step loses no account
//!    (running `move` again picks the staged one up instead of registering twice);
//! 3. sign a *moved* notice and send it to every contact (live, or deposited in its inbox,
//!    while still logged in at the OLD broker, which can reach them) and a `move` op to every
//!    group;
//! 4. mark every contact for a new broker-level contact pair and keep the safety numbers;
//! 5. put the staged profile in place (`secrets.toml`, `ca.pem`, then `profile.toml`, each
//!    replaced atomically; `profile.toml` last, so the profile names the new broker only once
//!    everything it needs is there), then remove the stage. A crash in the middle of this step
//!    is finished by the next `move`: it finds the staged secrets already in place.
//! 6. with `--delete-old`, ACCOUNT-DELETE at the old broker, on a link logged in before the
//!    switch (so a crash before it leaves an old account behind, never a profile that cannot
//!    log in anywhere).
//!
//! With `--forward DAYS`, the same signed notice is left at the old broker (FORWARD) just
//! before step 5, so that whoever asks for the old number during the grace period learns the
//! new one; it stays there after `--delete-old` until it expires.

use std::path::Path;

use micromsg_crypto::identity::IdentityKey;
use tokio::sync::mpsc;

use crate::account::{self, AccountError, unix_now};
use crate::agent::{self, AcceptPolicy, AgentConfig, Command, Detail, MoveReport, Notice};
use crate::moving::Moved;
use crate::profile::{Profile, ProfileError, ProfileInfo};
use crate::store::{Store, StoreError};

/// The directory inside the profile where the new profile waits until the move is done.
pub const STAGE: &str = "moving";

/// Why a move failed, and what state it left.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The profile, the links or the new broker failed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An agent (`listen` or `chat`) runs for this profile: it holds the old broker's link.
    #[error(
        "an agent (`micromsg listen` or `chat`) is running for this profile: stop it first, \
         then run `move` again"
    )]
    AgentRunning,
    /// The old broker's agent failed or refused a step.
    #[error("{step}: {reason}")]
    Step {
        /// Which step.
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// The new broker is the one this profile already uses.
    #[error("this profile already uses {0}: nothing to move")]
    SameBroker(String),
}

/// What a move did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveDone {
    /// The number before.
    pub old_number: String,
    /// The number now.
    pub new_number: String,
    /// The new broker's `HOST:PORT`.
    pub broker: String,
    /// Messages fetched from the old inbox first.
    pub fetched: usize,
    /// How each contact and group was told.
    pub report: MoveReport,
    /// What the old broker's agent warned about meanwhile, for people.
    pub warnings: Vec<String>,
    /// Whether the old account was deleted at the old broker (`--delete-old`).
    pub old_deleted: bool,
    /// When the forward left at the old broker expires (Unix seconds; `--forward`).
    pub forward_expires: Option<u64>,
}

/// One step, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Fetching the old inbox.
    FetchingInbox,
    /// Registering at the new broker.
    Registering,
    /// A new profile staged by an earlier, interrupted `move` is used.
    Resuming {
        /// Its number.
        number: String,
    },
    /// Telling the contacts and groups.
    Announcing {
        /// The new number.
        number: String,
    },
    /// Putting the new profile in place.
    Switching,
    /// Leaving the notice at the old broker for callers of the old number.
    Forwarding {
        /// For how many days.
        days: u64,
    },
    /// Deleting the account at the old broker.
    DeletingOld {
        /// The old number.
        number: String,
    },
}

/// What a move does besides moving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveOptions {
    /// Leave the signed notice at the old broker for this many days (FORWARD).
    pub forward_days: Option<u64>,
    /// Delete the account at the old broker once the profile is switched (ACCOUNT-DELETE).
    pub delete_old: bool,
}

/// Moves `profile` to `broker` (trusting `ca`), with `token` if the new broker needs one, and
/// with what `options` add.
pub async fn move_to(
    profile: &Profile,
    broker: &str,
    ca: &Path,
    token: Option<String>,
    options: MoveOptions,
    mut progress: impl FnMut(Step),
) -> Result<MoveDone, MoveError> {
    // Held to the end: a second `move` of this profile now would register again, or stage
    // into the same directory.
    let _moving = profile.lock_for_move().map_err(AccountError::from)?;
    // Before anything changes, finishing an interrupted switch included: an agent running
    // for the profile holds the old account.
    if agent::send_to_running(profile, &Command::Status)
        .await
        .is_some()
    {
        return Err(MoveError::AgentRunning);
    }
    let old = profile.info().map_err(AccountError::from)?;
    let stage = Profile::new(profile.path(STAGE));
    if let Some(done) = finish_interrupted_switch(profile, &stage, &old)? {
        progress(Step::Switching);
        return Ok(done);
    }
    if old.broker == broker {
        return Err(MoveError::SameBroker(broker.to_owned()));
    }
    let secrets = profile.secrets().map_err(AccountError::from)?;
    let identity = IdentityKey::from_seed(&secrets.identity_seed);

    let (notices_tx, notices_rx) = mpsc::channel(64);
    let collector = tokio::spawn(collect_warnings(notices_rx));
    let config = AgentConfig {
        accept: AcceptPolicy::Contacts,
        control: false,
        announce: false,
        inbox: false,
        ..AgentConfig::default()
    };
    let handle = agent::start(profile.clone(), config, notices_tx)
        .await
        .map_err(|e| MoveError::Step {
            step: "logging in at the old broker",
            reason: e.to_string(),
        })?;
    let result = async {
        progress(Step::FetchingInbox);
        let fetched = match handle.command(Command::Inbox).await {
            Ok(out) => match out.detail {
                Some(Detail::Inbox(batch)) => batch.messages.len(),
                _ => 0,
            },
            Err(e) => {
                return Err(MoveError::Step {
                    step: "fetching the old inbox",
                    reason: e.to_string(),
                });
            }
        };
        let new = match stage.info() {
            Ok(staged) => {
                progress(Step::Resuming {
                    number: staged.number.clone(),
                });
                staged
            }
            Err(ProfileError::Missing(_)) => {
                progress(Step::Registering);
                let (_link, info, new_secrets) =
                    account::register_entity(broker, ca, token, secrets.identity_seed.clone())
                        .await?;
                account::save(&stage, ca, &new_secrets, &info)?;
                info
            }
            Err(e) => return Err(AccountError::from(e).into()),
        };
        progress(Step::Announcing {
            number: new.number.clone(),
        });
        let notice = notice_for(&old, &new, unix_now())?
            .sign(&identity)
            .map_err(|e| MoveError::Step {
                step: "signing the moved notice",
                reason: e.to_string(),
            })?;
        let announced = handle
            .command(Command::AnnounceMove {
                notice: micromsg_crypto::hex::encode(&notice),
            })
            .await;
        let report = match announced {
            Ok(out) => match out.detail {
                Some(Detail::Moved(report)) => report,
                _ => {
                    return Err(MoveError::Step {
                        step: "telling the contacts",
                        reason: "the agent answered without a report".into(),
                    });
                }
            },
            Err(e) => {
                return Err(MoveError::Step {
                    step: "telling the contacts",
                    reason: e.to_string(),
                });
            }
        };
        Ok((fetched, new, report, notice))
    }
    .await;
    let _ = handle.stop().await;
    let warnings = collector.await.unwrap_or_default();
    let (fetched, new, report, notice) = result?;

    // Logged in at the old broker before the switch: afterwards the profile no longer holds
    // the old account's secrets.
    let mut old_session = if options.delete_old || options.forward_days.is_some() {
        Some(account::connect(profile).await?)
    } else {
        None
    };
    let mut forward_expires = None;
    if let (Some(days), Some(session)) = (options.forward_days, &mut old_session) {
        progress(Step::Forwarding { days });
        forward_expires = Some(account::forward(session, &notice, days).await?);
    }
    progress(Step::Switching);
    Store::new(profile).moved_self(&old.number)?;
    switch(profile, &stage)?;
    if let Some(session) = old_session.as_mut().filter(|_| options.delete_old) {
        progress(Step::DeletingOld {
            number: old.number.clone(),
        });
        account::delete(session).await?;
    }
    Ok(MoveDone {
        old_number: old.number,
        new_number: new.number,
        broker: new.broker,
        fetched,
        report,
        warnings,
        old_deleted: options.delete_old,
        forward_expires,
    })
}

/// A move interrupted while the profile was being switched (the staged secrets are in place,
/// `profile.toml` may or may not be): the contacts were told then, so only the switch is
/// finished. `None` when there is no such move.
fn finish_interrupted_switch(
    profile: &Profile,
    stage: &Profile,
    current: &ProfileInfo,
) -> Result<Option<MoveDone>, MoveError> {
    let staged = match stage.info() {
        Ok(info) => info,
        Err(ProfileError::Missing(_)) => return Ok(None),
        Err(e) => return Err(AccountError::from(e).into()),
    };
    let staged_secrets = stage.secrets().map_err(AccountError::from)?;
    let secrets = profile.secrets().map_err(AccountError::from)?;
    // Secret32's equality is constant-time.
    if secrets.client_secret != staged_secrets.client_secret {
        return Ok(None);
    }
    switch(profile, stage)?;
    Ok(Some(MoveDone {
        old_number: current.number.clone(),
        new_number: staged.number.clone(),
        broker: staged.broker.clone(),
        fetched: 0,
        report: MoveReport {
            new_number: staged.number,
            notified: std::collections::BTreeMap::new(),
            groups: Vec::new(),
        },
        warnings: vec![
            "finished a move that was interrupted while switching this profile; the contacts \
             and groups were told before"
                .into(),
        ],
        old_deleted: false,
        forward_expires: None,
    }))
}

/// The notice for a move from `old` to `new`, signed at `now`.
fn notice_for(old: &ProfileInfo, new: &ProfileInfo, now: u64) -> Result<Moved, MoveError> {
    let key_hex = new.broker_identity.as_deref().unwrap_or_default();
    let broker_key =
        micromsg_crypto::hex::decode_array::<32>(key_hex).map_err(|e| MoveError::Step {
            step: "reading the new broker's identity key",
            reason: e.to_string(),
        })?;
    Ok(Moved {
        old: old.number.clone(),
        new: new.number.clone(),
        broker: new.broker.clone(),
        tls_name: new.tls_name.clone(),
        broker_key,
        time: now,
    })
}

/// Puts the staged profile in place: the secrets, the CA, then `profile.toml` (it names the
/// broker the rest belongs to), then removes the stage.
fn switch(profile: &Profile, stage: &Profile) -> Result<(), MoveError> {
    // No read-decide-write of profile.toml (a learned nonce step) may straddle the switch.
    let _lock = profile.lock().map_err(AccountError::from)?;
    let read = |name: &str| {
        let path = stage.path(name);
        std::fs::read(&path).map_err(|source| ProfileError::Io { path, source })
    };
    // Before anything names the new device id (`store/relabel.rs`).
    crate::store::relabel_for_switch(profile, stage)?;
    // The secrets first: once they are in place, a later `move` knows the switch began (and
    // the old broker's CA is still there for everything before).
    let secrets = stage.secrets().map_err(AccountError::from)?;
    profile
        .write_secrets(&secrets)
        .map_err(AccountError::from)?;
    let ca = read("ca.pem").map_err(AccountError::from)?;
    profile
        .write_atomic("ca.pem", &ca, false)
        .map_err(AccountError::from)?;
    let info = stage.info().map_err(AccountError::from)?;
    profile.write_info(&info).map_err(AccountError::from)?;
    std::fs::remove_dir_all(stage.dir()).map_err(|source| {
        AccountError::from(ProfileError::Io {
            path: stage.dir().to_owned(),
            source,
        })
    })?;
    Ok(())
}

/// What the old broker's agent warns about during the move, for the report.
async fn collect_warnings(mut rx: mpsc::Receiver<Notice>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(notice) = rx.recv().await {
        match notice {
            Notice::Warning { message } => out.push(message),
            Notice::MoveRefused { from, reason } => {
                out.push(format!("a moved notice from {from} was refused: {reason}"));
            }
            _ => {}
        }
    }
    out
}
