//! A group's state from its control log (docs/groups.md 3): the deterministic order, each op's
//! signature checked under its author's key as the state holds it there, and what was refused.

use std::collections::{BTreeMap, BTreeSet};

use micromsg_crypto::identity::IdentityPublicKey;
use serde::{Deserialize, Serialize};

use super::{Change, Op, signing};

/// The state derived from a log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The name ("" before the create is known).
    pub name: String,
    /// The ordered member list.
    pub members: Vec<String>,
    /// The membership version: 1 at create, +1 per effective change.
    pub version: u64,
    /// Each member's identity key, as the op that made it a member carried it: it verifies
    /// that member's ops.
    #[serde(default, with = "key_map")]
    pub keys: BTreeMap<String, IdentityPublicKey>,
}

impl GroupState {
    /// True when `number` is a member.
    pub fn is_member(&self, number: &str) -> bool {
        self.members.iter().any(|m| m == number)
    }

    /// The identity key the state holds for member `number`.
    pub fn key_of(&self, number: &str) -> Option<&IdentityPublicKey> {
        self.keys.get(number)
    }
}

/// `number -> 64 hex` in the group file.
mod key_map {
    use std::collections::BTreeMap;

    use micromsg_crypto::identity::IdentityPublicKey;
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(
        keys: &BTreeMap<String, IdentityPublicKey>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let hex: BTreeMap<&str, String> =
            keys.iter().map(|(n, k)| (n.as_str(), k.to_hex())).collect();
        hex.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, IdentityPublicKey>, D::Error> {
        let hex = BTreeMap::<String, String>::deserialize(d)?;
        hex.into_iter()
            .map(|(n, k)| {
                IdentityPublicKey::from_hex(&k)
                    .map(|k| (n, k))
                    .map_err(D::Error::custom)
            })
            .collect()
    }
}

/// Why a control op was refused (never applied, not stored, not relayed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The signature does not verify under the author's key as the state holds it where the op
    /// sorts: forged, or altered on the way.
    #[error("its signature does not verify under {author}'s key in the group state")]
    BadSignature {
        /// The claimed author.
        author: String,
    },
    /// A `create` whose group id is not the one derived from its creator's key and id, or
    /// whose signature does not verify under the key it gives its author.
    #[error("it is not the create of this group (id or signature does not match)")]
    NotThisCreate,
    /// The op carries a key for `number` other than the one this device pinned for it (or,
    /// for this device's own number, other than its own key).
    #[error(
        "it carries an identity key for {number} that differs from the one you pinned; \
         compare safety numbers with {number}"
    )]
    KeyDiffersFromPin {
        /// Whose key.
        number: String,
    },
}

/// One op the fold or the merge refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The op's id.
    pub id: String,
    /// Its claimed author.
    pub author: String,
    /// Its name (`add`, `remove`, ...).
    pub op: &'static str,
    /// Why.
    pub reason: Refused,
}

impl Refusal {
    pub(super) fn of(op: &Op, reason: Refused) -> Self {
        Self {
            id: op.id.clone(),
            author: op.author.clone(),
            op: op.name(),
            reason,
        }
    }
}

/// What a fold gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folded {
    /// The state.
    pub state: GroupState,
    /// Everyone who was a member at some point.
    pub ever: BTreeSet<String>,
    /// The ops that were refused (bad signature, not this group's create).
    pub refused: Vec<Refusal>,
}

/// Folds ops (in any order) of group `group` into the state: sorts them, then applies the
/// rules of docs/groups.md section 2, checking each op's signature under its author's key as
/// the state holds it at that point.
pub fn fold(group: &str, ops: &[Op]) -> Folded {
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by(|a, b| a.key().cmp(&b.key()));
    let mut s = GroupState::default();
    let mut ever = BTreeSet::new();
    let mut refused = Vec::new();
    for op in sorted {
        if let Change::Create { name, members } = &op.change {
            // The create is self-certifying: its author's key comes with it, and the group id
            // is derived from that key, so only the creator can make it (and any other create
            // is refused wherever it sorts).
            let author_key = members
                .iter()
                .find(|m| m.number == op.author)
                .map(|m| m.key);
            let genuine = author_key.is_some_and(|k| {
                signing::group_id(&op.author, &k, &op.id) == group
                    && signing::verifies(&k, group, op)
            });
            if !genuine {
                refused.push(Refusal::of(op, Refused::NotThisCreate));
                continue;
            }
            if s.version != 0 {
                continue;
            }
            for m in members {
                if !s.is_member(&m.number) {
                    s.members.push(m.number.clone());
                    s.keys.insert(m.number.clone(), m.key);
                }
            }
            s.name = name.clone();
            s.version = 1;
            ever.extend(s.members.iter().cloned());
            continue;
        }
        // Only a member's op can change anything; a non-member's is void at its place in
        // the order (it may be concurrent with its removal), not a forgery.
        let Some(author_key) = s.key_of(&op.author).copied() else {
            continue;
        };
        if !signing::verifies(&author_key, group, op) {
            refused.push(Refusal::of(
                op,
                Refused::BadSignature {
                    author: op.author.clone(),
                },
            ));
            continue;
        }
        match &op.change {
            Change::Add(m) if !s.is_member(&m.number) => {
                s.members.push(m.number.clone());
                s.keys.insert(m.number.clone(), m.key);
                s.version += 1;
            }
            Change::Remove(m) if s.is_member(m) && *m != op.author => {
                s.members.retain(|x| x != m);
                s.keys.remove(m);
                s.version += 1;
            }
            Change::Leave => {
                s.members.retain(|x| *x != op.author);
                s.keys.remove(&op.author);
                s.version += 1;
            }
            Change::Rename(name) => {
                s.name = name.clone();
                s.version += 1;
            }
            Change::Move(new) if !s.is_member(new) => {
                for m in &mut s.members {
                    if *m == op.author {
                        m.clone_from(new);
                    }
                }
                s.keys.remove(&op.author);
                s.keys.insert(new.clone(), author_key);
                s.version += 1;
            }
            _ => {}
        }
        ever.extend(s.members.iter().cloned());
    }
    Folded {
        state: s,
        ever,
        refused,
    }
}
