//! The device labels of kept sessions (`keys/`) across a switch to another broker (`move`,
//! `move --keep-number`).
//!
//! Each kept session is labelled with the device of this entity that set it up, and one
//! labelled with this device's own id is taken as this device's: it may be sealed with while a
//! newer one is unconfirmed (`confirm.rs`), and this device's latest session replaces it
//! (`prune.rs`). At the new broker this device gets another id (after a port it is device 1),
//! which another device's sessions may carry; sealing with another device's keys would reuse
//! the counters, hence the nonces, that device sealed with after its keys were shared. So
//! before the profile names the new id, the labels are swapped: this device's kept sessions
//! take the new id, and any labelled with the new id take the old one (a device of the old
//! account, which no longer sends).
//!
//! The swap is planned once, written to the stage (`relabel-keys.json`), and applied as
//! absolute labels: a switch that is interrupted and run again applies the same plan, never a
//! second swap.

use micromsg_crypto::handshake::SESSION_ID_LEN;
use micromsg_crypto::hex;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, corrupt};
use crate::profile::Profile;

/// The stage's file holding the plan.
const PLAN: &str = "relabel-keys.json";

/// One kept session's label after the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Relabel {
    /// The session's id, hex.
    session: String,
    /// The device it is labelled with after the switch.
    device: u32,
}

impl Store {
    /// The labels that change when this device's id goes from `old` to `new`.
    fn relabel_plan(&self, old: u32, new: u32) -> Result<Vec<Relabel>, StoreError> {
        if old == new {
            return Ok(Vec::new());
        }
        let _guard = self.lock();
        Ok(self
            .shared_sessions_locked()?
            .into_iter()
            .filter_map(|s| {
                let device = match s.device {
                    d if d == old => new,
                    d if d == new => old,
                    _ => return None,
                };
                Some(Relabel {
                    session: hex::encode(&s.session.session_id),
                    device,
                })
            })
            .collect())
    }

    /// Gives each session of `plan` its label (a session gone since is skipped).
    fn apply_relabel(&self, plan: &[Relabel]) -> Result<(), StoreError> {
        let _guard = self.lock();
        for step in plan {
            let Ok(id) = hex::decode_array::<SESSION_ID_LEN>(&step.session) else {
                continue;
            };
            if let Some(mut kept) = self.read_shared(&id)?
                && kept.device != step.device
            {
                kept.device = step.device;
                self.write_shared(&kept)?;
            }
        }
        Ok(())
    }
}

/// Before `switch` puts the staged profile (`stage`, with the new broker's device id) in
/// place of `profile`: relabels the kept sessions (see the module's doc), by the plan the
/// stage holds, or a new one written there first.
pub fn relabel_for_switch(profile: &Profile, stage: &Profile) -> Result<(), StoreError> {
    let store = Store::new(profile);
    let path = stage.path(PLAN);
    let plan: Vec<Relabel> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let plan = store.relabel_plan(profile.info()?.device, stage.info()?.device)?;
            let json = serde_json::to_vec(&plan).map_err(|e| corrupt(&path, e))?;
            stage.write_atomic(PLAN, &json, true)?;
            plan
        }
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    store.apply_relabel(&plan)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::SharedSession;
    use crate::profile::ProfileInfo;
    use crate::store::test_sessions;

    const PEER: &str = "5550002";

    fn profile_at(dir: &std::path::Path, device: u32) -> Profile {
        let profile = Profile::new(dir);
        profile
            .write_info(&ProfileInfo {
                broker: "127.0.0.1:1".into(),
                tls_name: "localhost".into(),
                number: "5550001".into(),
                device,
                nonce_step: 30,
                broker_identity: None,
            })
            .unwrap();
        profile
    }

    fn labels(store: &Store) -> Vec<(u8, u32)> {
        let mut out: Vec<(u8, u32)> = store
            .shared_sessions()
            .unwrap()
            .iter()
            .map(|s| (s.session.session_id[0], s.device))
            .collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn this_devices_sessions_take_the_new_id_and_another_devices_with_it_the_old_one_once() {
        let dir = tempfile::tempdir().unwrap();
        let stage_dir = tempfile::tempdir().unwrap();
        // Device 3 ports; at the new broker it is device 1, the old account's device 1 had
        // sessions too, and device 2's are left alone.
        let profile = profile_at(dir.path(), 3);
        let stage = profile_at(stage_dir.path(), 1);
        let store = Store::new(&profile);
        for (id, device) in [(1u8, 1u32), (2, 2), (3, 3), (4, 3)] {
            let session = test_sessions::session(id, 1_000);
            store
                .save_shared(&SharedSession {
                    peer: PEER.into(),
                    device,
                    session,
                })
                .unwrap();
        }
        relabel_for_switch(&profile, &stage).unwrap();
        let swapped = vec![(1, 3), (2, 2), (3, 1), (4, 1)];
        assert_eq!(labels(&store), swapped);
        // Run again (a switch interrupted before or after the profile named device 1): the
        // plan in the stage is applied again, never a second swap.
        relabel_for_switch(&profile, &stage).unwrap();
        assert_eq!(labels(&store), swapped);
        let profile = profile_at(dir.path(), 1);
        relabel_for_switch(&profile, &stage).unwrap();
        assert_eq!(labels(&store), swapped);
    }
}
