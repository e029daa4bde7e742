//! The client's local store, in the profile directory: contacts with their pinned identity
//! keys, message history, and the latest session keys per contact.
//!
//! ```text
//! DIR/contacts.json               number -> pinned identity, added_at, blocked, address  (0600)
//! DIR/history/<number>.jsonl      one JSON object per message, append-only               (0600)
//! DIR/sessions/<number>.json      the latest session THIS device set up with that contact:
//!                                 the only keys it may send with                          (0600)
//! DIR/keys/<session id>.json      SharedSession: keys it may only open with (another device's
//!                                 sessions, synced or restored), and its own older ones
//!                                 (it seals with one of those only while the latest is
//!                                 unconfirmed, [`Store::send_session`]); deleted once
//!                                 nothing can use them ([`Store::forget_old_keys`])        (0600)
//! DIR/unconfirmed.json            own sessions the peer has not proved it holds yet
//!                                 (protocol 12.3; `confirm`)                               (0600)
//! DIR/inbox.json                  InboxState: inbox ids already stored (until they expire),
//!                                 envelopes waiting for their session keys, and group
//!                                 frames and MOVED notices not yet applied                (0600)
//! DIR/inbox-copies.json           ids of the last inbox page's copies from this entity's other
//!                                 devices, written before their history lines
//!                                 ([`Store::save_copies_in_flight`])                      (0600)
//! DIR/outbox.json                 messages queued until the broker takes them
//!                                 ([`crate::outbox`])                                      (0600)
//! DIR/awaiting-keys               empty: this device joined and waits for the entity's keys
//!                                 ([`Profile::awaiting_keys`])
//! ```
//!
//! Whole files are replaced atomically ([`Profile::write_atomic`]); history lines are appended
//! with one write each and synced. Numbers are validated (4 to 15 ASCII digits) before they
//! become file names. Calls block on file I/O: from async code, use `spawn_blocking` where it
//! matters. One [`Store`] (clone it freely) serialises its own read-modify-write cycles;
//! two processes writing the same profile at once are not coordinated.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use micromsg_crypto::handshake::SESSION_ID_LEN;
use micromsg_crypto::identity::IdentityPublicKey;
use micromsg_crypto::safety::{self, Party, SafetyError};
use micromsg_wire::Number;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::groups::{self, Group, GroupEntry};
use crate::keys::SharedSession;
use crate::p2p::{CounterPersist, StoredSession};
use crate::profile::{Profile, ProfileError};

mod confirm;
mod moves;
mod prune;
mod relabel;
#[cfg(test)]
mod test_sessions;
pub use moves::{FollowError, MAX_FORMER, safety_number_with};
pub use relabel::relabel_for_switch;

const CONTACTS: &str = "contacts.json";
const HISTORY_DIR: &str = "history";
const SESSIONS_DIR: &str = "sessions";
const KEYS_DIR: &str = "keys";
const INBOX_STATE: &str = "inbox.json";
const COPIES_IN_FLIGHT: &str = "inbox-copies.json";
const GROUPS_DIR: &str = "groups";

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Not a valid number (4 to 15 ASCII digits).
    #[error("{}", not_a_number(.0))]
    InvalidNumber(String),
    /// Not a usable contact name.
    #[error("a contact name is 1 to 64 characters without control characters, not {0:?}")]
    InvalidName(String),
    /// Not a group id (32 lowercase hex digits).
    #[error("invalid group id {0:?}")]
    InvalidGroup(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A group file of format 1 (unsigned control ops, before docs/groups.md 2.1): refused, as
    /// its ops cannot be verified.
    #[error(
        "group {0} was made by a MicroMsg before signed groups (unsigned control ops): it is no \
         longer used; create it again (its history stays readable)"
    )]
    UnsignedGroup(String),
    /// A file is not in the expected format.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An atomic write failed.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The safety number could not be computed.
    #[error("safety number: {0}")]
    Safety(#[from] SafetyError),
}

/// What the store knows about one contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    /// The identity key pinned at the first handshake (trust on first use).
    #[serde(default, with = "opt_identity_hex")]
    pub identity: Option<IdentityPublicKey>,
    /// When the contact was added (Unix seconds).
    pub added_at: u64,
    /// Whether messages from this contact are refused.
    #[serde(default)]
    pub blocked: bool,
    /// The last address the contact was reached at (`HOST:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A name the user gave the contact, shown instead of (or beside) the number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A different identity key than the pinned one that the contact presented: nothing is
    /// sent to it until the user has verified the safety number and re-pinned.
    #[serde(
        default,
        with = "opt_identity_hex",
        skip_serializing_if = "Option::is_none"
    )]
    pub presented: Option<IdentityPublicKey>,
    /// The identity key (64 hex) whose safety number the user compared and marked verified;
    /// the contact is verified while it is the pinned key (a changed key is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
    /// The time of the last *moved* notice this device followed for the contact (protocol
    /// 12.13): a notice not later than it is refused, so an old one cannot move it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_at: Option<u64>,
    /// The numbers the safety number with this contact is computed over, (own, contact), when
    /// either side moved to a new number since the key was pinned: the safety number stays
    /// the one the two compared (protocol 12.13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_as: Option<(String, String)>,
    /// The broker-level contact pair must be set up again for the current numbers (one side
    /// moved): this device asks with INITIATE-NEW, and accepts the contact's request without
    /// asking when its handshake presents the pinned key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
    /// The numbers the contact had before it moved, latest last (at most
    /// [`MAX_FORMER`]): deposits it left from there before moving still open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former: Vec<String>,
}

impl Contact {
    /// Whether the user verified the safety number of the key pinned now.
    pub fn is_verified(&self) -> bool {
        matches!((&self.verified, &self.identity), (Some(v), Some(k)) if *v == k.to_hex())
    }

    fn new(now_unix: u64) -> Self {
        Self {
            identity: None,
            added_at: now_unix,
            blocked: false,
            address: None,
            name: None,
            presented: None,
            verified: None,
            moved_at: None,
            safety_as: None,
            repair: false,
            former: Vec::new(),
        }
    }
}

/// The outcome of comparing a handshake's identity key with the pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinResult {
    /// No key was pinned; this one now is.
    FirstUse,
    /// The pinned key.
    Same,
    /// A different key than the pinned one, which stays pinned until [`Store::repin`]. Warn
    /// loudly; show and send nothing on the session until the user accepts the new key.
    Changed {
        /// The pinned key.
        old: IdentityPublicKey,
    },
}

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the contact.
    In,
    /// To the contact.
    Out,
}

/// One history line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Which way it went.
    pub direction: Direction,
    /// The sender's clock when sealing (Unix seconds).
    pub time: u64,
    /// The message.
    pub text: String,
    /// The session whose keys carried it.
    #[serde(with = "session_hex")]
    pub session: [u8; SESSION_ID_LEN],
    /// The sender's counter in that session (with `session` and `direction`, unique).
    pub counter: u64,
    /// True when it came through the broker (an offline deposit or a copy from another
    /// device) rather than a live session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
}

/// Where [`Store::find_session`] found a session's keys.
#[derive(Debug, Clone)]
pub enum FoundSession {
    /// This device's latest session with `peer`: it may send with it.
    Own {
        /// The contact.
        peer: String,
        /// The session.
        session: StoredSession,
    },
    /// Keys for opening only.
    Shared(SharedSession),
}

impl FoundSession {
    /// The contact.
    pub fn peer(&self) -> &str {
        match self {
            Self::Own { peer, .. } => peer,
            Self::Shared(s) => &s.peer,
        }
    }

    /// The session record.
    pub fn session(&self) -> &StoredSession {
        match self {
            Self::Own { session, .. } => session,
            Self::Shared(s) => &s.session,
        }
    }

    /// The session record, to open with.
    pub fn session_mut(&mut self) -> &mut StoredSession {
        match self {
            Self::Own { session, .. } => session,
            Self::Shared(s) => &mut s.session,
        }
    }
}

/// An inbox item kept unopened until its session keys arrive (protocol 12.11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingItem {
    /// The message id, hex.
    pub id: String,
    /// The sender's number.
    pub from: String,
    /// The sender's device.
    pub from_device: u32,
    /// Deposit time at the broker.
    pub time: u64,
    /// When the broker would have dropped it; it is dropped here then too.
    pub expires: u64,
    /// The envelope, base64.
    pub body: String,
}

/// What the inbox delivery keeps between runs: ids already stored (kept until the item's
/// expiry, so a repeat is recognised) and items waiting for keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxState {
    /// Message id (hex) -> expiry.
    #[serde(default)]
    pub seen: BTreeMap<String, u64>,
    /// Envelopes that could not be opened yet.
    #[serde(default)]
    pub pending: Vec<PendingItem>,
    /// Group frames and MOVED notices taken from the inbox (so acknowledged to the broker)
    /// that the agent has not finished with yet; replayed when the agent starts
    /// (docs/groups.md 4). Named `groups` in the file, as when it held group frames only.
    #[serde(rename = "groups", default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<KeptFrame>,
}

/// A frame opened from the inbox whose effect is not in the store yet when the inbox batch is:
/// kept until the agent has applied it (or dropped it for good).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptFrame {
    /// The inbox item's id, hex.
    pub id: String,
    /// What it is (absent in files written before MOVED notices were kept: a group frame).
    #[serde(default, skip_serializing_if = "KeptKind::is_group")]
    pub kind: KeptKind,
    /// The contact whose session carried it.
    pub peer: String,
    /// `in` from the contact, `out` a copy of what another device of this entity sent.
    pub direction: Direction,
    /// The sender's clock when sealing.
    pub time: u64,
    /// When the broker would have dropped it; it is dropped here then too.
    pub expires: u64,
    /// The frame's payload (a group frame's JSON, a signed notice), base64.
    pub payload: String,
}

/// What a [`KeptFrame`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeptKind {
    /// A GROUP frame, for the group layer (docs/groups.md).
    #[default]
    Group,
    /// A MOVED notice (protocol.md 12.13), to check and follow.
    Moved,
}

impl KeptKind {
    fn is_group(&self) -> bool {
        *self == Self::Group
    }
}

/// The local store of one profile.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    profile: Profile,
    /// Serialises read-modify-write of contacts and session files.
    lock: Mutex<()>,
}

impl Store {
    /// The store in `profile`'s directory (created on first write).
    pub fn new(profile: &Profile) -> Self {
        Self {
            inner: Arc::new(Inner {
                profile: profile.clone(),
                lock: Mutex::new(()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is on disk; a panic elsewhere leaves nothing half-updated here.
        self.inner
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dir(&self) -> &Path {
        self.inner.profile.dir()
    }

    // ---- contacts ----

    /// Every contact, by number.
    pub fn contacts(&self) -> Result<BTreeMap<String, Contact>, StoreError> {
        let _guard = self.lock();
        self.read_contacts()
    }

    /// One contact.
    pub fn contact(&self, number: &str) -> Result<Option<Contact>, StoreError> {
        let number = valid(number)?;
        let _guard = self.lock();
        Ok(self.read_contacts()?.remove(number))
    }

    /// Adds a contact (no key pinned yet) unless it exists; returns it.
    pub fn add_contact(&self, number: &str, now_unix: u64) -> Result<Contact, StoreError> {
        self.update_contact(number, now_unix, |_| ())
    }

    /// Compares `key` with the identity pinned for `number`, pinning it on first use (and
    /// adding the contact if needed). A [`PinResult::Changed`] key is not stored.
    pub fn pin_identity(
        &self,
        number: &str,
        key: &IdentityPublicKey,
        now_unix: u64,
    ) -> Result<PinResult, StoreError> {
        let number = valid(number)?;
        let _guard = self.lock();
        let mut contacts = self.read_contacts()?;
        let contact = contacts
            .entry(number.to_owned())
            .or_insert_with(|| Contact::new(now_unix));
        match contact.identity {
            Some(old) if old == *key => Ok(PinResult::Same),
            Some(old) => {
                if contact.presented != Some(*key) {
                    contact.presented = Some(*key);
                    self.write_contacts(&contacts)?;
                }
                Ok(PinResult::Changed { old })
            }
            None => {
                contact.identity = Some(*key);
                self.write_contacts(&contacts)?;
                Ok(PinResult::FirstUse)
            }
        }
    }

    /// Pins `key` for `number`, replacing any pinned key. Only after the user accepted a
    /// [`PinResult::Changed`] key (or verified the safety number).
    pub fn repin(
        &self,
        number: &str,
        key: &IdentityPublicKey,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        self.update_contact(number, now_unix, |c| {
            c.identity = Some(*key);
            c.presented = None;
        })
        .map(drop)
    }

    /// Names a contact (`None` clears the name). The name is 1 to 64 characters, none of
    /// them a control character.
    pub fn set_name(
        &self,
        number: &str,
        name: Option<&str>,
        now_unix: u64,
    ) -> Result<Contact, StoreError> {
        let name = match name.map(str::trim) {
            None => None,
            Some(n)
                if n.is_empty() || n.chars().count() > 64 || n.chars().any(char::is_control) =>
            {
                return Err(StoreError::InvalidName(n.to_owned()));
            }
            Some(n) => Some(n.to_owned()),
        };
        self.update_contact(number, now_unix, |c| c.name = name)
    }

    /// Removes a contact from this device: its entry (name, pinned key, block), the session
    /// keys this device sends with, and every session kept for opening their messages
    /// (`keys/`; a message from them still on its way is not opened here). The history stays.
    /// False when there was no such contact.
    pub fn remove_contact(&self, number: &str) -> Result<bool, StoreError> {
        let number = valid(number)?;
        let _guard = self.lock();
        let mut contacts = self.read_contacts()?;
        let known = contacts.remove(number).is_some();
        if known {
            self.write_contacts(&contacts)?;
        }
        let session = self.session_path(number);
        let had_session = match fs::remove_file(&session) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(StoreError::Io {
                    path: session,
                    source,
                });
            }
        };
        let had_kept = self.forget_peer_keys_locked(number)? > 0;
        Ok(known || had_session || had_kept)
    }

    /// Marks the contact's pinned identity key verified (the user compared the safety number).
    pub fn set_verified(&self, number: &str, now_unix: u64) -> Result<Contact, StoreError> {
        self.update_contact(number, now_unix, |c| {
            c.verified = c.identity.as_ref().map(IdentityPublicKey::to_hex);
        })
    }

    /// Blocks or unblocks a contact.
    pub fn set_blocked(
        &self,
        number: &str,
        blocked: bool,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        self.update_contact(number, now_unix, |c| c.blocked = blocked)
            .map(drop)
    }

    /// Records the last address a contact was reached at.
    pub fn set_address(
        &self,
        number: &str,
        address: Option<String>,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        self.update_contact(number, now_unix, |c| c.address = address)
            .map(drop)
    }

    pub(crate) fn update_contact(
        &self,
        number: &str,
        now_unix: u64,
        change: impl FnOnce(&mut Contact),
    ) -> Result<Contact, StoreError> {
        let number = valid(number)?;
        let _guard = self.lock();
        let mut contacts = self.read_contacts()?;
        let new = !contacts.contains_key(number);
        let contact = contacts
            .entry(number.to_owned())
            .or_insert_with(|| Contact::new(now_unix));
        let before = contact.clone();
        change(contact);
        let after = contact.clone();
        if new || after != before || !self.dir().join(CONTACTS).exists() {
            self.write_contacts(&contacts)?;
        }
        Ok(after)
    }

    fn read_contacts(&self) -> Result<BTreeMap<String, Contact>, StoreError> {
        let path = self.dir().join(CONTACTS);
        match read_optional(&path)? {
            None => Ok(BTreeMap::new()),
            Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(&path, e)),
        }
    }

    fn write_contacts(&self, contacts: &BTreeMap<String, Contact>) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(contacts)
            .map_err(|e| corrupt(&self.dir().join(CONTACTS), e))?;
        self.inner.profile.write_atomic(CONTACTS, &json, true)?;
        Ok(())
    }

    // ---- history ----

    /// Appends one message to the history with `number`.
    pub fn append_history(&self, number: &str, entry: &Entry) -> Result<(), StoreError> {
        self.append_history_all(number, std::slice::from_ref(entry))
    }

    /// Appends several messages with one write and one sync.
    pub fn append_history_all(&self, number: &str, entries: &[Entry]) -> Result<(), StoreError> {
        let number = valid(number)?;
        if entries.is_empty() {
            return Ok(());
        }
        let dir = self.dir().join(HISTORY_DIR);
        let path = dir.join(format!("{number}.jsonl"));
        let io_err = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        create_private_dir(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut lines = Vec::with_capacity(entries.len() * 128);
        for entry in entries {
            serde_json::to_writer(&mut lines, entry).map_err(|e| corrupt(&path, e))?;
            lines.push(b'\n');
        }
        let mut options = fs::OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let _guard = self.lock();
        let mut file = options.open(&path).map_err(io_err)?;
        // A crash may have left a torn last line; start on a fresh line so only that one
        // line is lost.
        if file.metadata().map_err(io_err)?.len() > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::End(-1)).map_err(io_err)?;
            file.read_exact(&mut last).map_err(io_err)?;
            if last[0] != b'\n' {
                lines.insert(0, b'\n');
            }
        }
        file.write_all(&lines).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
        Ok(())
    }

    /// The history with `number`, oldest first (empty if none). Lines torn by a crash are
    /// skipped.
    pub fn read_history(&self, number: &str) -> Result<Vec<Entry>, StoreError> {
        let number = valid(number)?;
        let path = self.dir().join(HISTORY_DIR).join(format!("{number}.jsonl"));
        let Some(text) = read_optional(&path)? else {
            return Ok(Vec::new());
        };
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Up to `max` messages of the history with `number` that end before byte `before` of its
    /// file (`None`: the end), oldest first, and where the page begins (`None` when it reaches
    /// the start: nothing older). Reads backwards from the end in blocks, so the newest page of
    /// a long conversation costs what the page costs, not the conversation (`micromsg chat`
    /// opens a 100,000-message conversation at once).
    pub fn read_history_page(
        &self,
        number: &str,
        before: Option<u64>,
        max: usize,
    ) -> Result<(Vec<Entry>, Option<u64>), StoreError> {
        const BLOCK: u64 = 64 * 1024;
        let number = valid(number)?;
        let path = self.dir().join(HISTORY_DIR).join(format!("{number}.jsonl"));
        let io_err = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), None));
            }
            Err(e) => return Err(io_err(e)),
        };
        let len = file.metadata().map_err(io_err)?.len();
        let end = before.unwrap_or(len).min(len);
        // `tail` holds the file's bytes [start, end).
        let mut start = end;
        let mut tail: Vec<u8> = Vec::new();
        loop {
            // Complete lines in `tail`: after its first newline (or all of it at the start).
            let lines = tail.iter().filter(|&&b| b == b'\n').count();
            if start == 0 || lines > max {
                break;
            }
            let from = start.saturating_sub(BLOCK);
            let mut block = vec![0u8; (start - from) as usize];
            file.seek(SeekFrom::Start(from)).map_err(io_err)?;
            file.read_exact(&mut block).map_err(io_err)?;
            block.extend_from_slice(&tail);
            tail = block;
            start = from;
        }
        // Lines that start inside the window: at `start` itself only when it is the file's start.
        let mut offsets = Vec::new();
        if start == 0 {
            offsets.push(0usize);
        }
        offsets.extend(
            tail.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1)
                .filter(|&i| i < tail.len()),
        );
        let first = offsets.len().saturating_sub(max);
        let page_start = offsets.get(first).copied().unwrap_or(tail.len());
        let entries = tail[page_start..]
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        let begins = start + page_start as u64;
        Ok((entries, (begins > 0).then_some(begins)))
    }

    // ---- groups (docs/groups.md section 4) ----

    /// The ids of the groups this device knows, sorted.
    pub fn group_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(list_dir(&self.dir().join(GROUPS_DIR))?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
            .filter(|n| valid_group(n).is_ok())
            .collect())
    }

    /// The group `id`, if known.
    pub fn load_group(&self, id: &str) -> Result<Option<Group>, StoreError> {
        let id = valid_group(id)?;
        let path = self.dir().join(GROUPS_DIR).join(format!("{id}.json"));
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        // The format first: a file of format 1 holds unsigned ops that do not parse as ops.
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(&path, e))?;
        if value.get("format").and_then(serde_json::Value::as_u64) != Some(groups::FORMAT) {
            return Err(StoreError::UnsignedGroup(id.to_owned()));
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| corrupt(&path, e))
    }

    /// Saves a group (atomically).
    pub fn save_group(&self, group: &Group) -> Result<(), StoreError> {
        let id = valid_group(&group.id)?;
        let dir = self.dir().join(GROUPS_DIR);
        let json = serde_json::to_vec_pretty(group).map_err(|e| corrupt(&dir, e))?;
        Profile::new(dir).write_atomic(&format!("{id}.json"), &json, true)?;
        Ok(())
    }

    /// Appends a message to the group's history unless its id is already there; true when
    /// it was new.
    pub fn append_group_message(
        &self,
        group: &str,
        entry: &GroupEntry,
    ) -> Result<bool, StoreError> {
        let group = valid_group(group)?;
        if self
            .read_group_history(group)?
            .iter()
            .any(|e| e.id == entry.id)
        {
            return Ok(false);
        }
        let dir = self.dir().join(HISTORY_DIR).join(GROUPS_DIR);
        let path = dir.join(format!("{group}.jsonl"));
        let io_err = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut line = serde_json::to_vec(entry).map_err(|e| corrupt(&path, e))?;
        line.push(b'\n');
        let mut options = fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let _guard = self.lock();
        let mut file = options.open(&path).map_err(io_err)?;
        file.write_all(&line).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
        Ok(true)
    }

    /// The group's history, oldest first (lines torn by a crash are skipped).
    pub fn read_group_history(&self, group: &str) -> Result<Vec<GroupEntry>, StoreError> {
        let group = valid_group(group)?;
        let path = self
            .dir()
            .join(HISTORY_DIR)
            .join(GROUPS_DIR)
            .join(format!("{group}.jsonl"));
        let Some(text) = read_optional(&path)? else {
            return Ok(Vec::new());
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    // ---- sessions ----

    /// Saves `session` as the latest session with `number`. Saving the same session again
    /// never lowers its stored send counter or receive state (a reservation made by the live
    /// session stays in force).
    pub fn save_session(&self, number: &str, session: &StoredSession) -> Result<(), StoreError> {
        let number = valid(number)?;
        let _guard = self.lock();
        self.save_session_locked(number, session)
    }

    /// [`Store::save_session`] for a caller that holds the lock.
    fn save_session_locked(&self, number: &str, session: &StoredSession) -> Result<(), StoreError> {
        match self.read_session(number)? {
            Some(mut stored) if stored.session_id == session.session_id => {
                let next = stored.next_send_counter.max(session.next_send_counter);
                let last_live = stored.recv_last_live.max(session.recv_last_live);
                let mut seen = std::mem::take(&mut stored.recv_offline_seen);
                seen.extend(session.recv_offline_seen.iter().copied());
                seen.retain(|&c| Some(c) > last_live);
                let mut merged = session.clone();
                merged.next_send_counter = next;
                merged.recv_last_live = last_live;
                merged.recv_offline_seen = seen;
                self.write_session(number, &merged)
            }
            Some(old) => {
                // A newer session replaces this one for sending; its keys stay for opening
                // deposits sealed with them that are still on their way.
                let archived = SharedSession {
                    peer: number.to_owned(),
                    device: self.own_device(),
                    session: old,
                };
                self.write_shared(&archived)?;
                self.write_session(number, session)
            }
            None => self.write_session(number, session),
        }
    }

    /// Every contact's latest own session (the ones this device may send with).
    pub fn own_sessions(&self) -> Result<Vec<(String, StoredSession)>, StoreError> {
        let _guard = self.lock();
        self.own_sessions_locked()
    }

    /// [`Store::own_sessions`] for a caller that holds the lock.
    fn own_sessions_locked(&self) -> Result<Vec<(String, StoredSession)>, StoreError> {
        let dir = self.dir().join(SESSIONS_DIR);
        let mut out = Vec::new();
        for name in list_dir(&dir)? {
            let Some(number) = name.strip_suffix(".json") else {
                continue;
            };
            if valid(number).is_err() {
                continue;
            }
            if let Some(s) = self.read_session(number)? {
                out.push((number.to_owned(), s));
            }
        }
        Ok(out)
    }

    /// Stores keys for opening only (a [`SharedSession`] from another device, a backup or a
    /// link transfer). Counters and seen sets never move back when it is stored again.
    pub fn save_shared(&self, shared: &SharedSession) -> Result<(), StoreError> {
        valid(&shared.peer)?;
        let _guard = self.lock();
        let merged = match self.read_shared(&shared.session.session_id)? {
            Some(old) => merge_shared(old, shared),
            None => shared.clone(),
        };
        self.write_shared(&merged)
    }

    /// Every stored [`SharedSession`].
    pub fn shared_sessions(&self) -> Result<Vec<SharedSession>, StoreError> {
        let _guard = self.lock();
        self.shared_sessions_locked()
    }

    /// [`Store::shared_sessions`] for a caller that holds the lock.
    fn shared_sessions_locked(&self) -> Result<Vec<SharedSession>, StoreError> {
        let dir = self.dir().join(KEYS_DIR);
        let mut out = Vec::new();
        for name in list_dir(&dir)? {
            let Some(hex_id) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(id) = micromsg_crypto::hex::decode_array::<SESSION_ID_LEN>(hex_id) else {
                continue;
            };
            if let Some(s) = self.read_shared(&id)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The keys of session `id`, wherever they are: this device's latest session with some
    /// contact ([`FoundSession::Own`]), or keys for opening only.
    pub fn find_session(
        &self,
        id: &[u8; SESSION_ID_LEN],
    ) -> Result<Option<FoundSession>, StoreError> {
        for (peer, session) in self.own_sessions()? {
            if session.session_id == *id {
                return Ok(Some(FoundSession::Own { peer, session }));
            }
        }
        let _guard = self.lock();
        Ok(self.read_shared(id)?.map(FoundSession::Shared))
    }

    /// Saves a session found with [`Store::find_session`] after opening with it.
    pub fn save_found(&self, found: &FoundSession) -> Result<(), StoreError> {
        match found {
            FoundSession::Own { peer, session } => self.save_session(peer, session),
            FoundSession::Shared(shared) => self.save_shared(shared),
        }
    }

    fn own_device(&self) -> u32 {
        self.inner.profile.info().map_or(0, |i| i.device)
    }

    fn shared_path(&self, id: &[u8; SESSION_ID_LEN]) -> PathBuf {
        self.dir()
            .join(KEYS_DIR)
            .join(format!("{}.json", micromsg_crypto::hex::encode(id)))
    }

    fn read_shared(&self, id: &[u8; SESSION_ID_LEN]) -> Result<Option<SharedSession>, StoreError> {
        let path = self.shared_path(id);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        let text = Zeroizing::new(text);
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| corrupt(&path, e))
    }

    fn write_shared(&self, shared: &SharedSession) -> Result<(), StoreError> {
        let path = self.shared_path(&shared.session.session_id);
        let json =
            Zeroizing::new(serde_json::to_vec_pretty(shared).map_err(|e| corrupt(&path, e))?);
        Profile::new(self.dir().join(KEYS_DIR)).write_atomic(
            &format!(
                "{}.json",
                micromsg_crypto::hex::encode(&shared.session.session_id)
            ),
            &json,
            true,
        )?;
        Ok(())
    }

    // ---- contacts from another device ----

    /// Takes in contacts from a backup or link transfer: unknown ones are added, a missing pin
    /// is filled in; an existing different pin is kept (and reported in the result).
    pub fn merge_contacts(
        &self,
        incoming: &BTreeMap<String, Contact>,
    ) -> Result<Vec<String>, StoreError> {
        let _guard = self.lock();
        let mut contacts = self.read_contacts()?;
        let mut conflicts = Vec::new();
        for (number, theirs) in incoming {
            if valid(number).is_err() {
                continue;
            }
            match contacts.get_mut(number) {
                None => {
                    contacts.insert(number.clone(), theirs.clone());
                }
                Some(ours) => match (ours.identity, theirs.identity) {
                    (None, Some(key)) => ours.identity = Some(key),
                    (Some(a), Some(b)) if a != b => conflicts.push(number.clone()),
                    _ => {}
                },
            }
        }
        self.write_contacts(&contacts)?;
        Ok(conflicts)
    }

    // ---- inbox state ----

    /// The inbox state (empty when none was saved).
    pub fn inbox_state(&self) -> Result<InboxState, StoreError> {
        let _guard = self.lock();
        let path = self.dir().join(INBOX_STATE);
        match read_optional(&path)? {
            None => Ok(InboxState::default()),
            Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(&path, e)),
        }
    }

    /// Replaces the inbox state (atomically, synced), forgetting ids that expired before
    /// `now_unix` (the broker has deleted them; they cannot come back).
    pub fn save_inbox_state(
        &self,
        state: &mut InboxState,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        state.seen.retain(|_, expires| *expires >= now_unix);
        state.pending.retain(|p| p.expires >= now_unix);
        state.frames.retain(|g| g.expires >= now_unix);
        let path = self.dir().join(INBOX_STATE);
        let json = serde_json::to_vec(state).map_err(|e| corrupt(&path, e))?;
        let _guard = self.lock();
        self.inner.profile.write_atomic(INBOX_STATE, &json, true)?;
        Ok(())
    }

    /// The inbox ids of copies from this entity's other devices (protocol 13.3) whose
    /// history lines the last inbox batch with copies wrote (empty when none was saved). Such
    /// a copy has no seen-set of its own, unlike a contact's message (its counter is the
    /// other device's): when a crash cut that batch after the history and before
    /// `inbox.json`, its items come again with unknown ids, and only these are looked up in
    /// the history before they are added.
    pub fn copies_in_flight(&self) -> Result<BTreeSet<String>, StoreError> {
        let path = self.dir().join(COPIES_IN_FLIGHT);
        let _guard = self.lock();
        match read_optional(&path)? {
            None => Ok(BTreeSet::new()),
            Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(&path, e)),
        }
    }

    /// Replaces [`Self::copies_in_flight`] (atomically, synced), before the history lines of
    /// those copies are written.
    pub fn save_copies_in_flight(&self, ids: &BTreeSet<String>) -> Result<(), StoreError> {
        let path = self.dir().join(COPIES_IN_FLIGHT);
        let json = serde_json::to_vec(ids).map_err(|e| corrupt(&path, e))?;
        let _guard = self.lock();
        self.inner
            .profile
            .write_atomic(COPIES_IN_FLIGHT, &json, true)?;
        Ok(())
    }

    /// The latest session with `number`, if any.
    pub fn load_session(&self, number: &str) -> Result<Option<StoredSession>, StoreError> {
        let number = valid(number)?;
        let _guard = self.lock();
        self.read_session(number)
    }

    /// A [`CounterPersist`] for live sessions with `number`: it raises the stored
    /// `next_send_counter` of the saved session with the same id. Save the session
    /// ([`Store::save_session`]) before starting it.
    pub fn counter_persister(&self, number: &str) -> Result<Arc<dyn CounterPersist>, StoreError> {
        let number = valid(number)?;
        Ok(Arc::new(SessionCounterPersister {
            store: self.clone(),
            number: number.to_owned(),
        }))
    }

    fn session_path(&self, number: &str) -> PathBuf {
        self.dir().join(SESSIONS_DIR).join(format!("{number}.json"))
    }

    fn read_session(&self, number: &str) -> Result<Option<StoredSession>, StoreError> {
        let path = self.session_path(number);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        let text = Zeroizing::new(text);
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| corrupt(&path, e))
    }

    fn write_session(&self, number: &str, session: &StoredSession) -> Result<(), StoreError> {
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(session)
                .map_err(|e| corrupt(&self.session_path(number), e))?,
        );
        Profile::new(self.dir().join(SESSIONS_DIR)).write_atomic(
            &format!("{number}.json"),
            &json,
            true,
        )?;
        Ok(())
    }
}

/// Raises a saved session's next send counter for a live session (see
/// [`Store::counter_persister`]).
#[derive(Debug)]
struct SessionCounterPersister {
    store: Store,
    number: String,
}

impl CounterPersist for SessionCounterPersister {
    fn persist_next_send_counter(
        &self,
        session_id: &[u8; SESSION_ID_LEN],
        next_send_counter: u64,
    ) -> io::Result<()> {
        let _guard = self.store.lock();
        let stored = self
            .store
            .read_session(&self.number)
            .map_err(io::Error::other)?;
        match stored {
            Some(mut s) if s.session_id == *session_id => {
                if s.next_send_counter < next_send_counter {
                    s.next_send_counter = next_send_counter;
                    self.store
                        .write_session(&self.number, &s)
                        .map_err(io::Error::other)?;
                }
                Ok(())
            }
            // Replaced by a newer session: its record is kept in `keys/`, and may seal offline
            // messages again while the newer one is unconfirmed, so it is raised there.
            Some(_) => {
                let own = self.store.own_device();
                match self
                    .store
                    .read_shared(session_id)
                    .map_err(io::Error::other)?
                {
                    Some(mut kept)
                        if kept.device == own
                            && kept.session.next_send_counter < next_send_counter =>
                    {
                        kept.session.next_send_counter = next_send_counter;
                        self.store.write_shared(&kept).map_err(io::Error::other)
                    }
                    _ => Ok(()),
                }
            }
            // No record of these keys on disk (never saved): nothing could reuse their
            // counters after a crash.
            None => Ok(()),
        }
    }
}

/// The safety number of two parties (protocol 12.10), to compare out of band.
pub fn safety_number(
    own_number: &str,
    own_identity: &IdentityPublicKey,
    peer_number: &str,
    peer_identity: &IdentityPublicKey,
) -> Result<String, StoreError> {
    Ok(safety::safety_number(
        Party {
            number: own_number,
            identity: own_identity,
        },
        Party {
            number: peer_number,
            identity: peer_identity,
        },
    )?)
}

/// Checks that `id` is a group id (32 lowercase hex), hence a safe file name.
fn valid_group(id: &str) -> Result<&str, StoreError> {
    if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id)
    } else {
        Err(StoreError::InvalidGroup(id.to_owned()))
    }
}

/// Says, for people, that `text` is not a number, and what one is.
pub fn not_a_number(text: &str) -> String {
    format!(
        "{text:?} is not a number (a number is {} to {} digits)",
        Number::MIN_LEN,
        Number::MAX_LEN
    )
}

/// Checks that `number` is a valid number, hence a safe file name.
fn valid(number: &str) -> Result<&str, StoreError> {
    Number::new(number).map_err(|_| StoreError::InvalidNumber(number.to_owned()))?;
    Ok(number)
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn list_dir(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Combines two records of the same shared session: counters and seen sets only grow.
pub(crate) fn merge_shared(old: SharedSession, new: &SharedSession) -> SharedSession {
    let mut merged = new.clone();
    let s = &mut merged.session;
    s.next_send_counter = s.next_send_counter.max(old.session.next_send_counter);
    s.recv_last_live = s.recv_last_live.max(old.session.recv_last_live);
    s.recv_offline_seen
        .extend(old.session.recv_offline_seen.iter().copied());
    let last = s.recv_last_live;
    s.recv_offline_seen.retain(|&c| Some(c) > last);
    s.last_used = s.last_used.max(old.session.last_used);
    merged
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

mod opt_identity_hex {
    use micromsg_crypto::identity::IdentityPublicKey;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        key: &Option<IdentityPublicKey>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match key {
            Some(key) => s.serialize_some(&key.to_hex()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<IdentityPublicKey>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| IdentityPublicKey::from_hex(&h).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod session_hex {
    use micromsg_crypto::handshake::SESSION_ID_LEN;
    use micromsg_crypto::hex;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        id: &[u8; SESSION_ID_LEN],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(id))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[u8; SESSION_ID_LEN], D::Error> {
        let h = String::deserialize(d)?;
        hex::decode_array(&h).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn numbers_are_checked_before_they_become_paths() {
        assert!(valid("5550001").is_ok());
        for bad in ["", "12", "../../etc", "555 0001", "1234567890123456"] {
            assert!(
                matches!(valid(bad), Err(StoreError::InvalidNumber(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn contacts_are_named_renamed_cleared_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&Profile::new(dir.path()));
        store.add_contact("5550001", 1).unwrap();
        assert_eq!(
            store
                .set_name("5550001", Some(" Bob "), 2)
                .unwrap()
                .name
                .as_deref(),
            Some("Bob")
        );
        for bad in ["", "   ", "a\u{7}b", &"x".repeat(65)] {
            assert!(
                matches!(
                    store.set_name("5550001", Some(bad), 2),
                    Err(StoreError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            store.contact("5550001").unwrap().unwrap().name.as_deref(),
            Some("Bob")
        );
        assert_eq!(store.set_name("5550001", None, 3).unwrap().name, None);
        assert!(store.remove_contact("5550001").unwrap());
        assert!(store.contact("5550001").unwrap().is_none());
        assert!(!store.remove_contact("5550001").unwrap(), "already gone");
    }

    #[test]
    fn history_pages_from_the_end_cover_the_whole_history_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&Profile::new(dir.path()));
        assert_eq!(
            store.read_history_page("5550001", None, 10).unwrap(),
            (vec![], None)
        );
        // Lines of different lengths, so pages end inside the read blocks.
        let entries: Vec<Entry> = (0..3000u64)
            .map(|i| Entry {
                direction: if i % 3 == 0 {
                    Direction::Out
                } else {
                    Direction::In
                },
                time: i,
                text: "x".repeat((i % 97) as usize + 1),
                session: [1; 16],
                counter: i,
                offline: false,
            })
            .collect();
        store.append_history_all("5550001", &entries).unwrap();
        let mut got: Vec<Entry> = Vec::new();
        let mut before = None;
        loop {
            let (page, next) = store.read_history_page("5550001", before, 250).unwrap();
            assert!(page.len() <= 250);
            got.splice(0..0, page);
            match next {
                Some(at) => before = Some(at),
                None => break,
            }
        }
        assert_eq!(got, entries);
        let (newest, _) = store.read_history_page("5550001", None, 1).unwrap();
        assert_eq!(newest, vec![entries[2999].clone()]);
    }

    #[test]
    fn entry_json_shape() {
        let e = Entry {
            direction: Direction::Out,
            time: 5,
            text: "hi".into(),
            session: [0xab; 16],
            counter: 3,
            offline: false,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"direction":"out","time":5,"text":"hi","session":"{}","counter":3}}"#,
                "ab".repeat(16)
            )
        );
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
    }
}
