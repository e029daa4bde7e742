//! The local outbox: messages that could not go out when they were sent, kept in the profile
//! directory until they can (`DIR/outbox.json`, 0600).
//!
//! A message is sealed once, when it is queued, with this device's stored session with the
//! contact, and gets its deposit id then. Every attempt sends the same id and the same
//! envelope, so a retry after a lost answer is a repeat the broker recognises, never a second
//! message. Items leave in order per contact. The file is replaced atomically and synced
//! (file and directory) before the command that queued the message returns, so a queued
//! message survives a crash of the agent or of the machine.

use std::path::PathBuf;

use micromsg_crypto::hex;
use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::store::StoreError;

const OUTBOX: &str = "outbox.json";

/// One message waiting to be deposited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queued {
    /// The deposit id (32 hex digits), fixed when the message was queued.
    pub id: String,
    /// The contact's number.
    pub to: String,
    /// The text (for the history once it has gone out, and for `micromsg outbox`).
    pub text: String,
    /// When it was queued (Unix seconds; also the time sealed into it).
    pub queued_at: u64,
    /// The session it is sealed with (32 hex digits) and its counter, for the history.
    pub session: String,
    /// The counter it was sealed with.
    pub counter: u64,
    /// The sealed offline envelope (hex), sent as the DEPOSIT body.
    pub envelope: String,
    /// Attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before this time (Unix seconds).
    #[serde(default)]
    pub next_attempt: u64,
    /// Why the last attempt did not go through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set when it cannot ever go out (the broker refused it for good): kept for the user to
    /// see and cancel, never tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// For a group frame, the group's id (the text is then what it says, for people; the
    /// group history already has the message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A group frame for a member this device has no session with yet (docs/groups.md 3,
    /// "Sessions between members"): its JSON, not sealed (there are no keys to seal it with
    /// yet; `session`, `counter` and `envelope` are empty). It goes out over the session once
    /// one is up, and is never deposited as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsealed: Option<String>,
    /// A *moved* notice (protocol.md 12.13), not a message: no history line when it goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moved: bool,
    /// A copy of a message that already went out live (protocol.md 13.3), queued because the
    /// broker could not take it then: no history line and no notice when it goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyFor>,
}

/// Whose other devices a queued copy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyFor {
    /// The contact's other devices: a DEPOSIT for the contact's number (the device that had
    /// the live session drops it as a repeat).
    Contact,
    /// This entity's other devices: a SYNC-COPY (also how a new session's keys are shared).
    OwnDevices,
}

impl Queued {
    /// The envelope's bytes.
    pub fn envelope_bytes(&self) -> Result<Vec<u8>, String> {
        hex::decode(&self.envelope).map_err(|e| format!("outbox item {}: envelope: {e}", self.id))
    }

    /// True when it waits to be tried (not failed for good).
    pub fn pending(&self) -> bool {
        self.failed.is_none()
    }

    /// True when it waits for a first session with the member, not for the broker.
    pub fn awaits_session(&self) -> bool {
        self.unsealed.is_some()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    items: Vec<Queued>,
}

/// The outbox file of a profile.
#[derive(Debug, Clone)]
pub struct Outbox {
    profile: Profile,
}

impl Outbox {
    /// The outbox of `profile` (the file need not exist).
    pub fn new(profile: &Profile) -> Self {
        Self {
            profile: profile.clone(),
        }
    }

    fn path(&self) -> PathBuf {
        self.profile.path(OUTBOX)
    }

    /// Every item, oldest first.
    pub fn load(&self) -> Result<Vec<Queued>, StoreError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let file: File = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        Ok(file.items)
    }

    /// Replaces the file with `items`, durably (the file and its directory synced). Blocks on
    /// the disk: call it from `spawn_blocking` in async code.
    pub fn save(&self, items: &[Queued]) -> Result<(), StoreError> {
        let file = File {
            items: items.to_vec(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
            path: self.path(),
            reason: e.to_string(),
        })?;
        self.profile.write_atomic(OUTBOX, &text, true)?;
        // The rename is durable only once the directory is synced.
        let dir = self.profile.dir();
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn item(id: &str, to: &str) -> Queued {
        Queued {
            id: id.into(),
            to: to.into(),
            text: "hello".into(),
            queued_at: 1,
            session: "00".repeat(16),
            counter: 3,
            envelope: "abcd".into(),
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            failed: None,
            group: None,
            unsealed: None,
            moved: false,
            copy: None,
        }
    }

    #[test]
    fn items_survive_a_reload_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(&Profile::new(dir.path()));
        assert!(
            outbox.load().unwrap().is_empty(),
            "no file is an empty outbox"
        );
        let copy = Queued {
            copy: Some(CopyFor::OwnDevices),
            ..item("03", "5550002")
        };
        let items = vec![item("01", "5550001"), item("02", "5550002"), copy];
        outbox.save(&items).unwrap();
        assert_eq!(
            Outbox::new(&Profile::new(dir.path())).load().unwrap(),
            items
        );
        assert_eq!(items[0].envelope_bytes().unwrap(), vec![0xab, 0xcd]);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_outbox() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(OUTBOX), "{\"items\": [").unwrap();
        let err = Outbox::new(&Profile::new(dir.path()))
            .load()
            .expect_err("damaged");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
