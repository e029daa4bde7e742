//! Giving a device of the entity the keys it needs (protocol 13.4): the key backup at the
//! broker (`keys backup` / `keys restore`) and the transfer when a device is linked
//! (`device add` on the old device, `device join` on the new one).
//!
//! ```text
//! old device                               broker                         new device
//!  ADD-DEVICE ───────────────────────────────►│ registration secret S
//!  prints S and a transfer key T (never sent to the broker)
//!                                              │◄──────────── DEVICE-JOIN S, LOGIN (device n)
//!  DEVICE-LIST (polls) sees device n           │
//!  SYNC-COPY MML1(T, n, bundle) ──────────────►│ inbox of device n
//!                                              │────────────► INBOX-FETCH, opens with T,
//!                                              │              installs identity, pins, keys
//!                                              │◄──────────── INBOX-ACK
//! ```
//!
//! The broker stores the transfer like any inbox item and cannot read it: T is typed on the
//! new device with S (one QR code in a graphical client) and never leaves the two devices.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use micromsg_crypto::Secret32;
use micromsg_wire::message::request::{BackupPutArgs, InboxAckArgs, InboxFetchArgs, SyncCopyArgs};
use micromsg_wire::{Blob, ErrorCode, Number, Request, ResponseData};
use rand_core::OsRng;
use zeroize::Zeroizing;

use crate::account::{AccountError, Session, unix_now};
use crate::inbox::new_message_id;
use crate::keys::{self, KeyBundle, KeysError, LINK_MAGIC, SharedSession};
use crate::link::LinkError;
use crate::profile::{Profile, ProfileError};
use crate::store::{Store, StoreError};

/// The file holding this device's copy of the recovery secret (0600), so later backups use
/// the same one.
pub const RECOVERY_FILE: &str = "recovery-secret";
/// Largest bundle plaintext put in one blob: the default `MESSAGE-MAX` (48 000) less the
/// envelope overhead, with room to spare.
pub const MAX_BUNDLE_BYTES: usize = 47_000;

/// Why a key sync step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The broker link failed or refused.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The profile could not be read or written.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing or opening failed (a wrong recovery secret shows here).
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// Connecting failed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The broker holds no backup for this entity.
    #[error("the broker holds no key backup for this entity (make one with `keys backup`)")]
    NoBackup,
    /// The bundle belongs to another entity.
    #[error("the keys are for {found}, but this device belongs to {expected}")]
    WrongEntity {
        /// This profile's number.
        expected: String,
        /// The bundle's number.
        found: String,
    },
    /// Nothing arrived in time.
    #[error("{0}")]
    Timeout(String),
    /// The broker answered something unexpected.
    #[error("unexpected answer {0}")]
    Unexpected(String),
}

/// What `keys backup` did.
#[derive(Debug)]
pub struct BackupDone {
    /// The version now stored.
    pub version: u64,
    /// The recovery secret, when this backup created it (show it once to the user).
    pub new_recovery: Option<Zeroizing<String>>,
    /// Sessions in the backup.
    pub sessions: usize,
    /// Contacts in the backup.
    pub contacts: usize,
    /// Sessions left out because the blob would have been too large.
    pub left_out: usize,
}

/// What installing a bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Contacts now known.
    pub contacts: usize,
    /// Sessions whose keys were stored (for reading).
    pub sessions: usize,
    /// Contacts whose pinned key here differs from the bundle's (kept as they were).
    pub conflicts: Vec<String>,
}

/// This device's key material as a bundle: the identity seed, contacts with pins, and the
/// session keys it holds (its own first, then others' newest first), as many as fit
/// [`MAX_BUNDLE_BYTES`]. Returns the bundle and how many sessions were left out.
pub fn make_bundle(profile: &Profile) -> Result<(KeyBundle, usize), SyncError> {
    let info = profile.info()?;
    let secrets = profile.secrets()?;
    let store = Store::new(profile);
    let contacts = store.contacts()?;
    let mut sessions: Vec<SharedSession> = store
        .own_sessions()?
        .into_iter()
        .map(|(peer, session)| SharedSession {
            peer,
            device: info.device,
            session,
        })
        .collect();
    let mut others = store.shared_sessions()?;
    others.sort_by_key(|s| std::cmp::Reverse(s.session.last_used));
    sessions.extend(others);
    let total = sessions.len();
    let mut bundle = KeyBundle::new(
        &info.number,
        &secrets.identity_seed,
        contacts,
        Vec::new(),
        unix_now(),
    );
    let mut size = bundle.to_json()?.len();
    for s in sessions {
        let cost = serde_json::to_vec(&s)
            .map(|v| v.len() + 1)
            .unwrap_or(usize::MAX);
        if size.saturating_add(cost) > MAX_BUNDLE_BYTES {
            continue;
        }
        size += cost;
        bundle.sessions.push(s);
    }
    let left_out = total - bundle.sessions.len();
    Ok((bundle, left_out))
}

/// Installs a bundle on this device: the entity's identity key replaces the device's own,
/// contacts and pins are merged, session keys are stored for reading only.
pub fn install(profile: &Profile, bundle: &KeyBundle) -> Result<Installed, SyncError> {
    let info = {
        // Read and written back under the profile's lock: a `move` or `port` in another process
        // that switched the secrets meanwhile would otherwise get the old account's back.
        let _lock = profile.lock()?;
        let info = profile.info()?;
        if bundle.number != info.number {
            return Err(SyncError::WrongEntity {
                expected: info.number,
                found: bundle.number.clone(),
            });
        }
        let mut secrets = profile.secrets()?;
        secrets.identity_seed = bundle.identity_seed()?;
        profile.write_secrets(&secrets)?;
        info
    };
    let store = Store::new(profile);
    let conflicts = store.merge_contacts(&bundle.contacts)?;
    let mut sessions = 0;
    for s in &bundle.sessions {
        if s.device == info.device {
            // Our own session coming back (a backup made on this device): ours already.
            continue;
        }
        store.save_shared(s)?;
        sessions += 1;
    }
    // The entity's keys are here: a link transfer that does not open is another device's.
    profile.set_awaiting_keys(false)?;
    Ok(Installed {
        contacts: store.contacts()?.len(),
        sessions,
        conflicts,
    })
}

/// The recovery secret: `given`, else the one saved in the profile, else a new one (saved,
/// and returned as new so it can be shown once).
fn recovery_secret(
    profile: &Profile,
    given: Option<&str>,
) -> Result<(Zeroizing<String>, bool), SyncError> {
    if let Some(given) = given {
        let given = Zeroizing::new(given.trim().to_owned());
        if given.is_empty() {
            return Err(KeysError::EmptySecret.into());
        }
        profile.write_atomic(RECOVERY_FILE, given.as_bytes(), true)?;
        return Ok((given, false));
    }
    let path = profile.path(RECOVERY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            let trimmed = Zeroizing::new(text.trim().to_owned());
            if !trimmed.is_empty() {
                return Ok((trimmed, false));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ProfileError::Io { path, source }.into()),
    }
    let fresh = keys::new_recovery_secret();
    profile.write_atomic(RECOVERY_FILE, fresh.as_bytes(), true)?;
    Ok((fresh, true))
}

/// Seals this device's keys with the recovery secret and stores them at the broker
/// (BACKUP-GET for the version, then BACKUP-PUT with version + 1; one retry on CONFLICT).
pub async fn backup(
    session: &mut Session,
    profile: &Profile,
    recovery: Option<&str>,
) -> Result<BackupDone, SyncError> {
    let (secret, created) = recovery_secret(profile, recovery)?;
    let (bundle, left_out) = make_bundle(profile)?;
    let json = bundle.to_json()?;
    let key_secret = secret.clone();
    // Argon2id takes 64 MiB and a noticeable moment: off the async threads.
    let blob = tokio::task::spawn_blocking(move || keys::seal_backup(&key_secret, &json))
        .await
        .map_err(|e| SyncError::Unexpected(format!("backup task: {e}")))??;
    let mut attempt = 0;
    loop {
        let version = match session.link.call(Request::BackupGet).await? {
            ResponseData::BackupGet(d) => d.version,
            other => return Err(SyncError::Unexpected(other.kind().as_str().into())),
        };
        let put = Request::BackupPut(BackupPutArgs {
            blob: Blob::new(blob.clone()),
            version: version + 1,
        });
        match session.link.call(put).await {
            Ok(_) => {
                return Ok(BackupDone {
                    version: version + 1,
                    new_recovery: created.then_some(secret),
                    sessions: bundle.sessions.len(),
                    contacts: bundle.contacts.len(),
                    left_out,
                });
            }
            Err(LinkError::Refused {
                code: ErrorCode::Conflict,
                ..
            }) if attempt == 0 => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the backup from the broker, opens it with the recovery secret and installs it.
pub async fn restore(
    session: &mut Session,
    profile: &Profile,
    recovery: &str,
) -> Result<Installed, SyncError> {
    let data = match session.link.call(Request::BackupGet).await? {
        ResponseData::BackupGet(d) => d,
        other => return Err(SyncError::Unexpected(other.kind().as_str().into())),
    };
    let blob = data.blob.ok_or(SyncError::NoBackup)?.into_vec();
    let secret = Zeroizing::new(recovery.trim().to_owned());
    let json = tokio::task::spawn_blocking(move || keys::open_backup(&secret, &blob))
        .await
        .map_err(|e| SyncError::Unexpected(format!("restore task: {e}")))??;
    let bundle = KeyBundle::from_json(&json)?;
    let installed = install(profile, &bundle)?;
    // Later backups from this device use the same secret.
    profile.write_atomic(RECOVERY_FILE, recovery.trim().as_bytes(), true)?;
    Ok(installed)
}

/// A new transfer key for `device add`.
pub fn new_transfer_key() -> Secret32 {
    Secret32::generate(&mut OsRng)
}

/// The highest device id of the entity now (device ids only grow): call it before
/// ADD-DEVICE and pass it to [`send_link_transfer`].
pub async fn highest_device(session: &mut Session) -> Result<u32, SyncError> {
    Ok(device_ids(session).await?.last().copied().unwrap_or(0))
}

/// On the old device after ADD-DEVICE: waits (up to `wait`) for a device with an id above
/// `known_highest` to join, then sends it this device's keys sealed with `transfer_key`.
/// Returns the new device's id.
pub async fn send_link_transfer(
    session: &mut Session,
    profile: &Profile,
    transfer_key: &Secret32,
    known_highest: u32,
    wait: Duration,
) -> Result<u32, SyncError> {
    let deadline = Instant::now() + wait;
    let device = loop {
        if let Some(new) = device_ids(session)
            .await?
            .into_iter()
            .find(|d| *d > known_highest)
        {
            break new;
        }
        if Instant::now() >= deadline {
            return Err(SyncError::Timeout(
                "no new device joined in time; its keys were not sent (use `keys backup` and \
                 `keys restore`, or `device add` again)"
                    .into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (bundle, _left_out) = make_bundle(profile)?;
    let blob = keys::seal_link(transfer_key, device, &bundle)?;
    let peer = Number::new(session.info.number.clone())
        .map_err(|e| SyncError::Unexpected(format!("own number: {e}")))?;
    session
        .link
        .call(Request::SyncCopy(SyncCopyArgs {
            id: new_message_id(),
            body: Blob::new(blob),
            peer,
        }))
        .await?;
    Ok(device)
}

async fn device_ids(session: &mut Session) -> Result<BTreeSet<u32>, SyncError> {
    match session.link.call(Request::DeviceList).await? {
        ResponseData::DeviceList(d) => Ok(d.devices.iter().map(|d| d.id.get()).collect()),
        other => Err(SyncError::Unexpected(other.kind().as_str().into())),
    }
}

/// On the new device after DEVICE-JOIN: waits (up to `wait`) for the old device's transfer,
/// opens it with `transfer_key`, installs it and acknowledges it. Other inbox items are left
/// for later (this device cannot read them before it has the keys).
pub async fn receive_link_transfer(
    session: &mut Session,
    profile: &Profile,
    transfer_key: &Secret32,
    wait: Duration,
) -> Result<Installed, SyncError> {
    let deadline = Instant::now() + wait;
    let own = session.info.number.clone();
    let device = session.info.device;
    loop {
        let mut after = None;
        loop {
            let page = match session
                .link
                .call(Request::InboxFetch(InboxFetchArgs {
                    limit: Some(crate::inbox::FETCH_LIMIT),
                    after,
                }))
                .await?
            {
                ResponseData::InboxFetch(p) => p,
                other => return Err(SyncError::Unexpected(other.kind().as_str().into())),
            };
            for item in &page.messages {
                if item.from.as_str() != own || !item.body.as_bytes().starts_with(LINK_MAGIC) {
                    continue;
                }
                let Ok(bundle) = keys::open_link(transfer_key, device, item.body.as_bytes()) else {
                    continue;
                };
                let installed = install(profile, &bundle)?;
                session
                    .link
                    .call(Request::InboxAck(InboxAckArgs { ids: vec![item.id] }))
                    .await?;
                return Ok(installed);
            }
            match (page.more, page.messages.last()) {
                (true, Some(last)) => after = Some(last.id),
                _ => break,
            }
        }
        if Instant::now() >= deadline {
            if !profile.awaiting_keys() {
                return Err(SyncError::Timeout(
                    "no key transfer arrived, and this device is not waiting for one: it \
                     already has the entity's keys (it registered the entity, or installed them \
                     from a transfer or `keys restore`)"
                        .to_owned(),
                ));
            }
            return Err(SyncError::Timeout(format!(
                "the old device's key transfer did not arrive in time (is `device add` still \
                 running there?); wait again with `{}`, or use `keys restore`",
                profile.command("device receive-keys --transfer-key KEY")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::profile::{ProfileInfo, Secrets};
    use micromsg_crypto::Secret32;

    fn secrets(byte: char) -> Secrets {
        let secret = || Secret32::from_hex(&byte.to_string().repeat(64)).unwrap();
        Secrets {
            client_secret: secret(),
            server_secret: secret(),
            identity_seed: secret(),
        }
    }

    #[test]
    fn keys_installed_while_the_profile_switches_do_not_bring_the_old_secrets_back() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::new(dir.path());
        let old = ProfileInfo::for_tests();
        profile.write_secrets(&secrets('a')).unwrap();
        profile.write_info(&old).unwrap();
        // A `move` to another number holds the lock while it switches secrets and profile.
        let switching = profile.lock().unwrap();
        let installing = std::thread::spawn({
            let profile = profile.clone();
            move || {
                let bundle = KeyBundle {
                    version: 1,
                    number: "5550001".into(),
                    identity_seed: "c".repeat(64),
                    contacts: Default::default(),
                    sessions: Vec::new(),
                    created: 0,
                };
                install(&profile, &bundle).map(|_| ())
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !installing.is_finished(),
            "the keys were installed while the profile was locked"
        );
        profile.write_secrets(&secrets('b')).unwrap();
        let new = ProfileInfo {
            number: "5550002".into(),
            ..old
        };
        profile.write_info(&new).unwrap();
        drop(switching);
        // Read under the lock, the profile is the new entity's: the old one's keys do not go in,
        // and the new secrets stay.
        let result = installing.join().unwrap();
        assert!(
            matches!(result, Err(SyncError::WrongEntity { .. })),
            "{result:?}"
        );
        assert!(profile.secrets().unwrap().client_secret == secrets('b').client_secret);
        assert_eq!(profile.info().unwrap(), new);
    }
}
