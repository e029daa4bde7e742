//! Moves in the local store (protocol.md 12.13): following a contact to its new number, and
//! the mover's own side. The contact keeps its name, pinned key, safety number and history;
//! only the number they are filed under changes.

use std::fs;
use std::io;

use micromsg_crypto::identity::IdentityPublicKey;

use super::{Contact, HISTORY_DIR, KEYS_DIR, Store, StoreError, safety_number, valid};
use crate::keys::SharedSession;

/// How many former numbers a contact keeps ([`Contact::former`]).
pub const MAX_FORMER: usize = 8;

/// Why a move could not be followed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// No key is pinned for the old number: nothing to check the notice against.
    #[error("{0} is not a contact with a pinned identity key")]
    NotAContact(String),
    /// The new number is already a contact with another identity key.
    #[error(
        "{new} is already a contact with a different identity key: the move of {old} to it was \
         not followed"
    )]
    KeyConflict {
        /// The number that moved.
        old: String,
        /// The number it moved to.
        new: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Files the contact `old` under `new` (its signed notice was checked by the caller):
    /// history, the session this device sends with and the keys it opens with move along; the
    /// contact entry keeps its name, pin and verification, records `time` (a later notice
    /// must be newer) and the numbers its safety number is computed over, and is marked for a
    /// new broker-level contact pair ([`Contact::repair`]). Files move before the entry, so a
    /// crash in between leaves the contact under `old` with nothing lost.
    pub fn follow_move(&self, old: &str, new: &str, time: u64) -> Result<Contact, FollowError> {
        let (old, new) = (valid(old)?, valid(new)?);
        let own = self.inner.profile.info().map_err(StoreError::from)?.number;
        let _guard = self.lock();
        let mut contacts = self.read_contacts()?;
        let Some(mut moved) = contacts.get(old).cloned().filter(|c| c.identity.is_some()) else {
            return Err(FollowError::NotAContact(old.to_owned()));
        };
        if let Some(there) = contacts.get(new)
            && there.identity.is_some()
            && there.identity != moved.identity
        {
            return Err(FollowError::KeyConflict {
                old: old.to_owned(),
                new: new.to_owned(),
            });
        }
        self.move_history(old, new)?;
        self.move_sessions(old, new)?;
        if moved.safety_as.is_none() {
            moved.safety_as = Some((own, old.to_owned()));
        }
        moved.moved_at = Some(time);
        moved.former.retain(|n| n != new);
        moved.former.push(old.to_owned());
        if moved.former.len() > MAX_FORMER {
            moved.former.remove(0);
        }
        moved.repair = true;
        moved.address = None;
        contacts.remove(old);
        contacts.insert(new.to_owned(), moved.clone());
        self.write_contacts(&contacts)?;
        Ok(moved)
    }

    /// The mover's side, after it moved from `old_own` to a new number: the safety number
    /// with each contact stays the one over `old_own`, and each contact is marked for a new
    /// broker-level contact pair. Returns how many contacts were marked.
    pub fn moved_self(&self, old_own: &str) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let mut contacts = self.read_contacts()?;
        let mut marked = 0;
        for (number, c) in contacts.iter_mut() {
            if c.identity.is_none() {
                continue;
            }
            if c.safety_as.is_none() {
                c.safety_as = Some((old_own.to_owned(), number.clone()));
            }
            c.repair = true;
            marked += 1;
        }
        self.write_contacts(&contacts)?;
        Ok(marked)
    }

    /// A session with the pinned key came up with `number`: the brokers hold a contact pair
    /// for the current numbers again.
    pub fn repaired(&self, number: &str, now_unix: u64) -> Result<(), StoreError> {
        if !self.contact(number)?.is_some_and(|c| c.repair) {
            return Ok(());
        }
        self.update_contact(number, now_unix, |c| c.repair = false)
            .map(drop)
    }

    fn move_history(&self, old: &str, new: &str) -> Result<(), StoreError> {
        let dir = self.dir().join(HISTORY_DIR);
        let from = dir.join(format!("{old}.jsonl"));
        let to = dir.join(format!("{new}.jsonl"));
        let io_err = |path: &std::path::Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let Some(older) = super::read_optional(&from)? else {
            return Ok(());
        };
        match super::read_optional(&to)? {
            // Nothing filed under the new number yet: one rename.
            None => fs::rename(&from, &to).map_err(io_err(&from))?,
            Some(newer) => {
                let mut both = older.into_bytes();
                both.extend_from_slice(newer.as_bytes());
                crate::profile::Profile::new(&dir).write_atomic(
                    &format!("{new}.jsonl"),
                    &both,
                    true,
                )?;
                match fs::remove_file(&from) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&from)(e)),
                }
            }
        }
        Ok(())
    }

    fn move_sessions(&self, old: &str, new: &str) -> Result<(), StoreError> {
        if let Some(session) = self.read_session(old)? {
            match self.read_session(new)? {
                None => self.write_session(new, &session)?,
                // The newer session keeps sending; the other one is kept for opening.
                Some(there) => {
                    let (keep, archive) = if there.established_at >= session.established_at {
                        (there, session)
                    } else {
                        (session, there)
                    };
                    self.write_shared(&SharedSession {
                        peer: new.to_owned(),
                        device: self.own_device(),
                        session: archive,
                    })?;
                    self.write_session(new, &keep)?;
                }
            }
            let path = self.session_path(old);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Io { path, source }),
            }
        }
        for name in super::list_dir(&self.dir().join(KEYS_DIR))? {
            let Some(hex_id) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(id) = micromsg_crypto::hex::decode_array(hex_id) else {
                continue;
            };
            if let Some(mut shared) = self.read_shared(&id)?
                && shared.peer == old
            {
                shared.peer = new.to_owned();
                self.write_shared(&shared)?;
            }
        }
        Ok(())
    }
}

/// The safety number with a contact (protocol 12.10), over the numbers the two compared it
/// with when one of them has moved since ([`Contact::safety_as`]).
pub fn safety_number_with(
    own_number: &str,
    own_identity: &IdentityPublicKey,
    peer_number: &str,
    peer_identity: &IdentityPublicKey,
    contact: Option<&Contact>,
) -> Result<String, StoreError> {
    match contact.and_then(|c| c.safety_as.as_ref()) {
        Some((own, peer)) => safety_number(own, own_identity, peer, peer_identity),
        None => safety_number(own_number, own_identity, peer_number, peer_identity),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use micromsg_crypto::Secret32;
    use micromsg_crypto::identity::IdentityKey;

    use super::*;
    use crate::profile::{Profile, ProfileInfo};
    use crate::store::{Direction, Entry};

    fn key(byte: u8) -> IdentityPublicKey {
        IdentityKey::from_seed(&Secret32::from_bytes([byte; 32])).public_key()
    }

    fn entry(text: &str, counter: u64) -> Entry {
        Entry {
            direction: Direction::In,
            time: 1,
            text: text.into(),
            session: [1; 16],
            counter,
            offline: false,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::new(dir.path());
        profile
            .write_info(&ProfileInfo {
                broker: "x:7400".into(),
                tls_name: "x".into(),
                number: "5550009".into(),
                device: 1,
                nonce_step: 6,
                broker_identity: None,
            })
            .unwrap();
        (dir, Store::new(&profile))
    }

    #[test]
    fn a_followed_move_keeps_name_pin_history_and_safety_number() {
        let (_dir, store) = store();
        store.pin_identity("5550001", &key(1), 10).unwrap();
        store.set_name("5550001", Some("Bob"), 10).unwrap();
        store.append_history("5550001", &entry("one", 0)).unwrap();
        let own = key(9);
        let before = safety_number_with(
            "5550009",
            &own,
            "5550001",
            &key(1),
            store.contact("5550001").unwrap().as_ref(),
        )
        .unwrap();

        let moved = store.follow_move("5550001", "5560002", 100).unwrap();
        assert_eq!(moved.name.as_deref(), Some("Bob"));
        assert_eq!(moved.identity, Some(key(1)));
        assert_eq!((moved.moved_at, moved.repair), (Some(100), true));
        assert_eq!(moved.former, ["5550001"]);
        assert!(store.contact("5550001").unwrap().is_none());
        assert_eq!(store.read_history("5560002").unwrap(), [entry("one", 0)]);
        assert!(store.read_history("5550001").unwrap().is_empty());
        let after = safety_number_with(
            "5550009",
            &own,
            "5560002",
            &key(1),
            store.contact("5560002").unwrap().as_ref(),
        )
        .unwrap();
        assert_eq!(after, before);
        store.repaired("5560002", 101).unwrap();
        assert!(!store.contact("5560002").unwrap().unwrap().repair);
    }

    #[test]
    fn history_already_under_the_new_number_is_kept_after_the_old() {
        let (_dir, store) = store();
        store.pin_identity("5550001", &key(1), 10).unwrap();
        store.append_history("5550001", &entry("old", 0)).unwrap();
        store.append_history("5560002", &entry("new", 1)).unwrap();
        store.follow_move("5550001", "5560002", 100).unwrap();
        let texts: Vec<String> = store
            .read_history("5560002")
            .unwrap()
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(texts, ["old", "new"]);
    }

    #[test]
    fn a_move_onto_a_contact_with_another_key_or_from_an_unpinned_one_changes_nothing() {
        let (_dir, store) = store();
        store.pin_identity("5550001", &key(1), 10).unwrap();
        store.pin_identity("5560002", &key(2), 10).unwrap();
        store.append_history("5550001", &entry("kept", 0)).unwrap();
        let contacts = store.contacts().unwrap();
        assert!(matches!(
            store.follow_move("5550001", "5560002", 100),
            Err(FollowError::KeyConflict { .. })
        ));
        store.add_contact("5550003", 10).unwrap();
        assert!(matches!(
            store.follow_move("5550003", "5560004", 100),
            Err(FollowError::NotAContact(_))
        ));
        assert_eq!(store.contacts().unwrap(), contacts_with(&contacts, &store));
        assert_eq!(store.read_history("5550001").unwrap(), [entry("kept", 0)]);
    }

    /// `before` plus the contact added in between (the refusals change nothing else).
    fn contacts_with(
        before: &std::collections::BTreeMap<String, Contact>,
        store: &Store,
    ) -> std::collections::BTreeMap<String, Contact> {
        let mut all = before.clone();
        all.insert("5550003".into(), store.contact("5550003").unwrap().unwrap());
        all
    }

    #[test]
    fn the_mover_keeps_its_old_number_for_the_safety_numbers_and_re_pairs_every_contact() {
        let (_dir, store) = store();
        store.pin_identity("5550001", &key(1), 10).unwrap();
        store.add_contact("5550003", 10).unwrap();
        assert_eq!(store.moved_self("5550009").unwrap(), 1);
        let c = store.contact("5550001").unwrap().unwrap();
        assert_eq!(
            (c.safety_as, c.repair),
            (Some(("5550009".into(), "5550001".into())), true)
        );
        assert!(!store.contact("5550003").unwrap().unwrap().repair);
    }
}
