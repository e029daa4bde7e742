//! Key confirmation in the local store (protocol.md 12.3, 12.11): which of this device's own
//! sessions the peer has not yet proved it holds, and so which session seals offline messages.
//!
//! ```text
//! DIR/unconfirmed.json   ["<session id hex>", ...]: own sessions saved by a handshake whose
//!                        peer has not yet sent an authentic DATA frame under them      (0600)
//! ```
//!
//! A handshake cut off half-way (the peer killed, or the connection lost, around FINISH)
//! leaves the keys on one side only; deposits sealed with them would wait at the peer, which
//! cannot open them, until they expire. So a new session is listed here *before* its file is
//! written (a crash in between cannot leave it taken for confirmed), leaves the list when the
//! peer's first DATA frame arrives (live, or in an offline envelope), and until then offline
//! messages are sealed with the newest *confirmed* own session with that contact, which is
//! kept for sending in `keys/` when a newer one replaces it. A session that is not listed is
//! confirmed: this includes every session saved before the list existed. The list is local: it
//! is not part of the session records shared with other devices (13.4).
//!
//! Each write of the list leaves out the ids whose session is gone: neither some contact's
//! latest session (`sessions/`) nor kept in `keys/` (the contact was removed, or a crash fell
//! between the listing and the session's file). A session replaced by a newer one is kept in
//! `keys/` and stays listed until confirmed, or it would be taken for confirmed and seal
//! deposits. The id being listed is never left out, though its file is not written yet; and
//! the listing and that file are written under one hold of the store's lock, so that no other
//! write of the list (a confirmation) falls in between and prunes it.

use std::collections::BTreeSet;

use micromsg_crypto::handshake::SESSION_ID_LEN;
use micromsg_crypto::hex;

use super::{FoundSession, KEYS_DIR, Store, StoreError, corrupt, read_optional, valid};
use crate::p2p::StoredSession;

const UNCONFIRMED: &str = "unconfirmed.json";

impl Store {
    /// Saves the session a handshake just set up with `number` as the latest one, listed as
    /// unconfirmed until [`Store::confirm_session`]. Use it instead of
    /// [`Store::save_session`] for a new session's first save.
    pub fn save_new_session(
        &self,
        number: &str,
        session: &StoredSession,
    ) -> Result<(), StoreError> {
        let number = valid(number)?;
        // One hold of the lock for both writes: a list written meanwhile (a confirmation) must
        // not prune this id as one whose session is gone.
        let _guard = self.lock();
        let mut ids = self.read_unconfirmed()?;
        let id = hex::encode(&session.session_id);
        if ids.insert(id.clone()) {
            self.write_unconfirmed(&mut ids, Some(&id))?;
        }
        self.save_session_locked(number, session)
    }

    /// Records that the peer proved it holds session `id` (an authentic DATA frame sealed
    /// with its keys arrived). Returns true when it was listed as unconfirmed.
    pub fn confirm_session(&self, id: &[u8; SESSION_ID_LEN]) -> Result<bool, StoreError> {
        let _guard = self.lock();
        let mut ids = self.read_unconfirmed()?;
        if !ids.remove(&hex::encode(id)) {
            return Ok(false);
        }
        self.write_unconfirmed(&mut ids, None)?;
        Ok(true)
    }

    /// Whether the peer proved it holds session `id` (true for any session not saved with
    /// [`Store::save_new_session`]).
    pub fn is_confirmed(&self, id: &[u8; SESSION_ID_LEN]) -> Result<bool, StoreError> {
        let _guard = self.lock();
        Ok(!self.read_unconfirmed()?.contains(&hex::encode(id)))
    }

    /// The session this device seals offline messages for `number` with (12.11): the latest
    /// own session when it is confirmed, else the newest confirmed own session it replaced
    /// (kept in `keys/`), made with the identity key pinned now. `None` when there is none:
    /// nothing can be deposited for `number` until a session is confirmed. Save it back with
    /// [`Store::save_found`] after sealing.
    pub fn send_session(&self, number: &str) -> Result<Option<FoundSession>, StoreError> {
        let number = valid(number)?;
        let latest = self.load_session(number)?;
        let unconfirmed = {
            let _guard = self.lock();
            self.read_unconfirmed()?
        };
        let confirmed = |s: &StoredSession| !unconfirmed.contains(&hex::encode(&s.session_id));
        let latest_id = match latest {
            Some(session) if confirmed(&session) => {
                return Ok(Some(FoundSession::Own {
                    peer: number.to_owned(),
                    session,
                }));
            }
            Some(session) => Some(session.session_id),
            None => None,
        };
        let pinned = self.contact(number)?.and_then(|c| c.identity);
        let own = self.own_device();
        let older = self
            .shared_sessions()?
            .into_iter()
            .filter(|s| {
                s.peer == number
                    && s.device == own
                    && Some(s.session.session_id) != latest_id
                    && Some(s.session.peer_identity) == pinned
                    && confirmed(&s.session)
            })
            .max_by_key(|s| (s.session.established_at, s.session.last_used));
        Ok(older.map(FoundSession::Shared))
    }

    pub(super) fn read_unconfirmed(&self) -> Result<BTreeSet<String>, StoreError> {
        let path = self.dir().join(UNCONFIRMED);
        match read_optional(&path)? {
            None => Ok(BTreeSet::new()),
            Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(&path, e)),
        }
    }

    /// Writes the list, without the ids whose session is gone (see the module's doc) but
    /// `listing`, the one whose file is written next. Call with the lock held.
    fn write_unconfirmed(
        &self,
        ids: &mut BTreeSet<String>,
        listing: Option<&str>,
    ) -> Result<(), StoreError> {
        // Kept in `keys/` (replaced by a newer session, or saved there): listed still. A
        // file that cannot be looked at counts as there.
        let keys = self.dir().join(KEYS_DIR);
        let mut gone: Vec<String> = ids
            .iter()
            .filter(|id| Some(id.as_str()) != listing)
            .filter(|id| matches!(keys.join(format!("{id}.json")).try_exists(), Ok(false)))
            .cloned()
            .collect();
        if !gone.is_empty() {
            // Some contact's latest session (read only when an id is not in `keys/`).
            let latest: BTreeSet<String> = self
                .own_sessions_locked()?
                .iter()
                .map(|(_, s)| hex::encode(&s.session_id))
                .collect();
            gone.retain(|id| !latest.contains(id));
            for id in &gone {
                ids.remove(id);
            }
        }
        let path = self.dir().join(UNCONFIRMED);
        let json = serde_json::to_vec(ids).map_err(|e| corrupt(&path, e))?;
        self.inner.profile.write_atomic(UNCONFIRMED, &json, true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use micromsg_crypto::{IdentityKey, Secret32};

    use super::*;
    use crate::profile::Profile;
    use crate::store::test_sessions::session;

    const PEER: &str = "5550002";

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&Profile::new(dir.path()));
        let peer = IdentityKey::from_seed(&Secret32::from_bytes([3; 32])).public_key();
        store.pin_identity(PEER, &peer, 1).unwrap();
        (dir, store)
    }

    fn sending(store: &Store) -> Option<[u8; 16]> {
        store
            .send_session(PEER)
            .unwrap()
            .map(|f| f.session().session_id)
    }

    /// The bug: a handshake cut off after FINISH left session 2 on this side only; offline
    /// messages must still be sealed with session 1, which the peer holds, until the peer
    /// proves it holds session 2.
    #[test]
    fn an_unconfirmed_session_does_not_seal_offline_messages() {
        let (_dir, store) = store();
        store.save_new_session(PEER, &session(1, 100)).unwrap();
        assert_eq!(sending(&store), None, "no confirmed session yet");
        assert!(store.confirm_session(&[1; 16]).unwrap());
        assert_eq!(sending(&store), Some([1; 16]));

        store.save_new_session(PEER, &session(2, 200)).unwrap();
        assert_eq!(
            store.load_session(PEER).unwrap().unwrap().session_id,
            [2; 16]
        );
        assert!(!store.is_confirmed(&[2; 16]).unwrap());
        assert_eq!(sending(&store), Some([1; 16]), "the older, confirmed one");

        // Sealing with it raises its counter where it is kept, for good.
        let mut found = store.send_session(PEER).unwrap().unwrap();
        found.session_mut().seal_offline_text(300, "x").unwrap();
        store.save_found(&found).unwrap();
        let again = store.send_session(PEER).unwrap().unwrap();
        assert_eq!(again.session().next_send_counter, 1);

        assert!(store.confirm_session(&[2; 16]).unwrap());
        assert!(!store.confirm_session(&[2; 16]).unwrap(), "once");
        assert_eq!(sending(&store), Some([2; 16]));
    }

    fn listed(store: &Store) -> Vec<String> {
        store.read_unconfirmed().unwrap().into_iter().collect()
    }

    /// The list used to keep the ids of sessions that are gone for good. Now each write of it
    /// leaves them out: a removed contact's sessions (its latest and those kept in `keys/`),
    /// and one listed by a handshake that died before its file was written. A replaced one,
    /// kept in `keys/`, stays listed (else it would be taken for confirmed), and so does the
    /// one being listed.
    #[test]
    fn ids_of_sessions_that_are_gone_leave_the_list_when_it_is_written() {
        const OTHER: &str = "5550003";
        const THIRD: &str = "5550004";
        let (_dir, store) = store();
        store.save_new_session(PEER, &session(1, 100)).unwrap();
        store.save_new_session(PEER, &session(2, 200)).unwrap(); // 1 replaced, in keys/
        store.save_new_session(THIRD, &session(6, 100)).unwrap();
        store.save_new_session(THIRD, &session(7, 200)).unwrap(); // 6 replaced, in keys/
        assert!(store.remove_contact(PEER).unwrap()); // 1 and 2 gone
        // A handshake that died between the listing and the session's file (and the list as
        // a client that did not prune left it).
        let mut ids = listed(&store);
        ids.push(hex::encode(&[3; 16]));
        let json = serde_json::to_vec(&ids).unwrap();
        std::fs::write(store.dir().join(UNCONFIRMED), json).unwrap();
        assert_eq!(listed(&store).len(), 5);

        store.save_new_session(OTHER, &session(4, 300)).unwrap();
        let hexes =
            |ids: &[u8]| -> Vec<String> { ids.iter().map(|&i| hex::encode(&[i; 16])).collect() };
        assert_eq!(
            listed(&store),
            hexes(&[4, 6, 7]),
            "the replaced one and the latest stay, the removed and the never written go"
        );
        assert!(!store.is_confirmed(&[6; 16]).unwrap());
        assert!(!store.is_confirmed(&[4; 16]).unwrap());

        // A confirmation writes the list too.
        store.save_new_session(PEER, &session(5, 400)).unwrap();
        assert!(store.remove_contact(PEER).unwrap());
        assert!(store.confirm_session(&[4; 16]).unwrap());
        assert_eq!(listed(&store), hexes(&[6, 7]));
    }

    #[test]
    fn sessions_saved_before_the_list_are_confirmed() {
        let (_dir, store) = store();
        store.save_session(PEER, &session(1, 100)).unwrap();
        assert!(store.is_confirmed(&[1; 16]).unwrap());
        assert_eq!(sending(&store), Some([1; 16]));
    }

    #[test]
    fn an_older_session_made_with_another_identity_key_is_not_used() {
        let (_dir, store) = store();
        store.save_session(PEER, &session(1, 100)).unwrap();
        // The contact reinstalled: a new key, re-pinned, and a half-finished first session.
        let new_key = IdentityKey::from_seed(&Secret32::from_bytes([4; 32])).public_key();
        store.repin(PEER, &new_key, 150).unwrap();
        let mut s2 = session(2, 200);
        s2.peer_identity = new_key;
        store.save_new_session(PEER, &s2).unwrap();
        assert_eq!(sending(&store), None);
    }
}
