//! Forgetting kept session keys that nothing can use any more (`DIR/keys/`).
//!
//! Keys are kept in `keys/` for two ends: opening deposits and copies sealed with them that are
//! still on their way (a replaced session of this device's, or another device's session), and
//! sealing while this device's newer session with the contact is unconfirmed (`confirm.rs`).
//! Kept for ever, they would let whoever takes the device open every old deposit recorded on
//! the way, and the directory would only grow. A kept session is forgotten when all of these
//! hold:
//!
//! - a newer session of the same contact and device is known: the newest is never forgotten,
//!   as the contact may still seal with it;
//! - when it is this device's own, the contact's latest own session is confirmed (until then
//!   an older one may be the one that seals);
//! - it was neither used (sealed or opened with) nor replaced within the keep period
//!   (`AgentConfig::keep_replaced_keys`, 90 days by default: three times the broker's default
//!   `MESSAGE-TTL`, and never less than this broker's, so a deposit made before the
//!   replacement has expired at the broker).
//!
//! `contact remove` forgets every session kept with that contact at once, along with the
//! latest one this device sends with ([`Store::remove_contact`]).
//!
//! A message sealed before the replacement but deposited much later (it waited in the
//! sender's outbox, or a broker's, for longer than the keep period less the `MESSAGE-TTL`)
//! may come after its keys are gone: it then waits as any envelope whose keys are unknown, and
//! goes when its inbox item expires; nothing else is lost. Deleting a file does not wipe the
//! disk blocks that held it: the keys are out of the profile, and of a copy or export made
//! afterwards, not out of a raw image of the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use micromsg_crypto::handshake::SESSION_ID_LEN;
use micromsg_crypto::hex;

use super::{KEYS_DIR, Store, StoreError};
use crate::keys::SharedSession;
use crate::p2p::StoredSession;

impl Store {
    /// Removes from `keys/` the sessions the module's rules let go at `now_unix`, with `keep`
    /// as the keep period; how many it removed.
    pub fn forget_old_keys(&self, now_unix: u64, keep: Duration) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let kept = self.shared_sessions_locked()?;
        let latest = self.own_sessions_locked()?;
        let unconfirmed = self.read_unconfirmed()?;
        let own = self.own_device();
        let doomed = forgettable(&kept, &latest, own, &unconfirmed, now_unix, keep.as_secs());
        self.remove_kept_locked(&doomed)?;
        Ok(doomed.len())
    }

    /// Removes from `keys/` every session kept with `peer` (whichever device of this entity's
    /// it is); how many it removed. Call with the lock held.
    pub(super) fn forget_peer_keys_locked(&self, peer: &str) -> Result<usize, StoreError> {
        let ids: Vec<[u8; SESSION_ID_LEN]> = self
            .shared_sessions_locked()?
            .iter()
            .filter(|s| s.peer == peer)
            .map(|s| s.session.session_id)
            .collect();
        self.remove_kept_locked(&ids)?;
        Ok(ids.len())
    }

    /// Deletes the kept sessions `ids` from `keys/` and makes the deletions durable, so a
    /// crash does not bring the files back. Call with the lock held.
    fn remove_kept_locked(&self, ids: &[[u8; SESSION_ID_LEN]]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let dir = self.dir().join(KEYS_DIR);
        for id in ids {
            let path = dir.join(format!("{}.json", hex::encode(id)));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(crate::profile::ProfileError::Io { path, source }.into());
                }
            }
        }
        let synced = std::fs::File::open(&dir).and_then(|d| d.sync_all());
        synced.map_err(|source| crate::profile::ProfileError::Io { path: dir, source })?;
        Ok(())
    }
}

/// A session's id and when it was set up.
type SetUp<'a> = (&'a [u8; SESSION_ID_LEN], u64);

/// The ids of the `kept` sessions the module's rules let go at `now`: `latest` are this
/// device's (`own`) latest sessions per contact, `unconfirmed` the ids (hex) listed as such.
fn forgettable(
    kept: &[SharedSession],
    latest: &[(String, StoredSession)],
    own: u32,
    unconfirmed: &BTreeSet<String>,
    now: u64,
    keep_secs: u64,
) -> Vec<[u8; SESSION_ID_LEN]> {
    // Each (contact, device) pair's known sessions, with when they were set up.
    let mut set_up: BTreeMap<(&str, u32), Vec<SetUp<'_>>> = BTreeMap::new();
    for s in kept {
        set_up
            .entry((s.peer.as_str(), s.device))
            .or_default()
            .push((&s.session.session_id, s.session.established_at));
    }
    for (peer, s) in latest {
        set_up
            .entry((peer.as_str(), own))
            .or_default()
            .push((&s.session_id, s.established_at));
    }
    let latest_at: BTreeMap<&str, u64> = latest
        .iter()
        .map(|(peer, s)| (peer.as_str(), s.established_at))
        .collect();
    // Contacts this device may still seal for with an older session.
    let sealing_older: BTreeSet<&str> = latest
        .iter()
        .filter(|(_, s)| unconfirmed.contains(&hex::encode(&s.session_id)))
        .map(|(peer, _)| peer.as_str())
        .collect();
    kept.iter()
        .filter(|s| {
            let own_session = s.device == own;
            if own_session && sealing_older.contains(s.peer.as_str()) {
                return false;
            }
            // Replaced when the first later session of its pair was set up: only a later
            // second tells which came after, except that this device's own kept sessions were
            // all replaced by its latest one (`sessions/`), even one set up in the same second.
            let (id, at) = (&s.session.session_id, s.session.established_at);
            let later = set_up
                .get(&(s.peer.as_str(), s.device))
                .into_iter()
                .flatten()
                .filter(|&&(other, t)| other != id && t > at)
                .map(|&(_, t)| t);
            let by_latest = latest_at
                .get(s.peer.as_str())
                .copied()
                .filter(|&t| own_session && t >= at);
            let replaced = later.chain(by_latest).min();
            let Some(replaced) = replaced else {
                return false;
            };
            let quiet_since = s.session.last_used.max(replaced);
            now.saturating_sub(quiet_since) >= keep_secs
        })
        .map(|s| s.session.session_id)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::profile::{Profile, ProfileInfo};
    use crate::store::test_sessions;

    const PEER: &str = "5550002";
    const OTHER: &str = "5550003";
    const DAY: u64 = 86_400;
    const KEEP: Duration = Duration::from_secs(90 * DAY);

    fn session(id: u8, established_at: u64, last_used: u64) -> StoredSession {
        let mut s = test_sessions::session(id, established_at);
        s.last_used = last_used;
        s
    }

    fn kept(peer: &str, device: u32, session: StoredSession) -> SharedSession {
        SharedSession {
            peer: peer.to_owned(),
            device,
            session,
        }
    }

    /// A store of device 1.
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::new(dir.path());
        profile
            .write_info(&ProfileInfo {
                broker: "127.0.0.1:1".into(),
                tls_name: "localhost".into(),
                number: "5550001".into(),
                device: 1,
                nonce_step: 30,
                broker_identity: None,
            })
            .unwrap();
        (dir, Store::new(&profile))
    }

    fn ids(store: &Store) -> BTreeSet<u8> {
        store
            .shared_sessions()
            .unwrap()
            .iter()
            .map(|s| s.session.session_id[0])
            .collect()
    }

    #[test]
    fn a_replaced_session_quiet_past_the_keep_period_is_forgotten_and_no_other() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        // Device 1 (this one) with PEER: 1 replaced by 2, 2 by 3 (the latest, in sessions/).
        store.save_session(PEER, &session(1, t0, t0 + DAY)).unwrap();
        store
            .save_session(PEER, &session(2, t0 + 10 * DAY, t0 + 10 * DAY))
            .unwrap();
        store
            .save_session(PEER, &session(3, t0 + 20 * DAY, t0 + 20 * DAY))
            .unwrap();
        // Another device's sessions with PEER: 4 replaced by 5; and its only one with OTHER, 6.
        store
            .save_shared(&kept(PEER, 2, session(4, t0, t0)))
            .unwrap();
        store
            .save_shared(&kept(PEER, 2, session(5, t0 + 5 * DAY, t0 + 5 * DAY)))
            .unwrap();
        store
            .save_shared(&kept(OTHER, 2, session(6, t0, t0)))
            .unwrap();
        assert_eq!(ids(&store), BTreeSet::from([1, 2, 4, 5, 6]));

        // Within 90 days of each replacement: nothing goes.
        assert_eq!(store.forget_old_keys(t0 + 94 * DAY, KEEP).unwrap(), 0);
        // 1 was replaced at +10 days, 4 at +5: 95 days on, 4 goes; 1 at 100.
        assert_eq!(store.forget_old_keys(t0 + 95 * DAY, KEEP).unwrap(), 1);
        assert_eq!(ids(&store), BTreeSet::from([1, 2, 5, 6]));
        assert_eq!(store.forget_old_keys(t0 + 100 * DAY, KEEP).unwrap(), 1);
        assert_eq!(ids(&store), BTreeSet::from([2, 5, 6]));
        // Years later: 2 (replaced by the latest) goes; 5 and 6, the newest of their pairs,
        // stay, and the latest own session is not in keys/ at all.
        assert_eq!(store.forget_old_keys(t0 + 1000 * DAY, KEEP).unwrap(), 1);
        assert_eq!(ids(&store), BTreeSet::from([5, 6]));
        assert_eq!(
            store.load_session(PEER).unwrap().unwrap().session_id,
            [3; 16]
        );
    }

    #[test]
    fn a_session_used_lately_is_kept_however_long_ago_it_was_replaced() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        store
            .save_shared(&kept(PEER, 2, session(4, t0, t0 + 200 * DAY)))
            .unwrap();
        store
            .save_shared(&kept(PEER, 2, session(5, t0 + DAY, t0 + DAY)))
            .unwrap();
        assert_eq!(store.forget_old_keys(t0 + 250 * DAY, KEEP).unwrap(), 0);
        assert_eq!(store.forget_old_keys(t0 + 290 * DAY, KEEP).unwrap(), 1);
        assert_eq!(ids(&store), BTreeSet::from([5]));
    }

    #[test]
    fn older_own_sessions_stay_while_the_latest_is_unconfirmed() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        store.save_session(PEER, &session(1, t0, t0)).unwrap();
        // The latest, set up by a handshake, unconfirmed: 1 may be the one that seals.
        store
            .save_new_session(PEER, &session(2, t0 + DAY, t0 + DAY))
            .unwrap();
        assert_eq!(store.forget_old_keys(t0 + 1000 * DAY, KEEP).unwrap(), 0);
        assert_eq!(ids(&store), BTreeSet::from([1]));
        // Confirmed: 1 can go.
        assert!(store.confirm_session(&[2; 16]).unwrap());
        assert_eq!(store.forget_old_keys(t0 + 1000 * DAY, KEEP).unwrap(), 1);
        assert!(ids(&store).is_empty());
    }

    #[test]
    fn a_replaced_session_never_confirmed_goes_like_any_other_and_leaves_the_list() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        // 1 set up by a handshake and never confirmed (nothing seals with it), then replaced
        // by 2, confirmed at once.
        store.save_new_session(PEER, &session(1, t0, t0)).unwrap();
        store
            .save_new_session(PEER, &session(2, t0 + DAY, t0 + DAY))
            .unwrap();
        assert!(store.confirm_session(&[2; 16]).unwrap());
        assert_eq!(store.forget_old_keys(t0 + 90 * DAY, KEEP).unwrap(), 0);
        assert_eq!(store.forget_old_keys(t0 + 91 * DAY, KEEP).unwrap(), 1);
        assert!(ids(&store).is_empty());
        // The next write of the unconfirmed list leaves its id out.
        store
            .save_new_session(PEER, &session(3, t0 + 92 * DAY, t0 + 92 * DAY))
            .unwrap();
        assert!(store.is_confirmed(&[1; 16]).unwrap());
    }

    #[test]
    fn an_own_session_replaced_in_the_same_second_is_forgotten_too() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        // A reconnect right after the first session: both set up in the same second.
        store.save_session(PEER, &session(1, t0, t0)).unwrap();
        store.save_session(PEER, &session(2, t0, t0)).unwrap();
        assert_eq!(ids(&store), BTreeSet::from([1]));
        assert_eq!(store.forget_old_keys(t0 + 89 * DAY, KEEP).unwrap(), 0);
        assert_eq!(store.forget_old_keys(t0 + 90 * DAY, KEEP).unwrap(), 1);
        assert!(ids(&store).is_empty());
    }

    #[test]
    fn own_sessions_kept_from_the_same_second_wait_for_the_latest_ones_replacement() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        // Two kept from one second (which came first is not known), the latest 80 days on.
        store
            .save_shared(&kept(PEER, 1, session(1, t0, t0)))
            .unwrap();
        store
            .save_shared(&kept(PEER, 1, session(2, t0, t0)))
            .unwrap();
        store
            .save_session(PEER, &session(3, t0 + 80 * DAY, t0 + 80 * DAY))
            .unwrap();
        assert_eq!(store.forget_old_keys(t0 + 169 * DAY, KEEP).unwrap(), 0);
        assert_eq!(store.forget_old_keys(t0 + 170 * DAY, KEEP).unwrap(), 2);
    }

    #[test]
    fn removing_a_contact_forgets_every_key_kept_with_them_and_no_other() {
        let (_dir, store) = store();
        let t0 = 1_000 * DAY;
        store.save_session(PEER, &session(1, t0, t0)).unwrap();
        store.save_session(PEER, &session(2, t0, t0)).unwrap();
        store
            .save_shared(&kept(PEER, 2, session(4, t0, t0)))
            .unwrap();
        store
            .save_shared(&kept(OTHER, 2, session(6, t0, t0)))
            .unwrap();
        store.save_session(OTHER, &session(7, t0, t0)).unwrap();
        assert_eq!(ids(&store), BTreeSet::from([1, 4, 6]));
        assert!(store.remove_contact(PEER).unwrap());
        assert_eq!(ids(&store), BTreeSet::from([6]));
        assert!(store.load_session(PEER).unwrap().is_none());
        assert!(store.load_session(OTHER).unwrap().is_some());
        // Nothing left of them: a second removal finds no such contact.
        assert!(!store.remove_contact(PEER).unwrap());
    }

    #[test]
    fn another_devices_sessions_set_up_in_the_same_second_do_not_replace_each_other() {
        let t0 = 1_000 * DAY;
        let both = [
            kept(PEER, 2, session(4, t0, t0)),
            kept(PEER, 2, session(5, t0, t0)),
        ];
        let none = forgettable(&both, &[], 1, &BTreeSet::new(), t0 + 1000 * DAY, 90 * DAY);
        assert!(none.is_empty(), "{none:?}");
    }
}
