//! Group chat, handled by the clients (docs/groups.md). Sans-IO: the frame format, the control
//! log, its deterministic order and fold, and who receives what. The agent does the sending
//! and the store keeps the files.
//!
//! ```text
//! frame (JSON, content kind GROUP) ─► Frame::decode ─► Payload::{Op, State, Message}
//!   ops ─► Group::merge (dedup by id, carried keys vs pins)
//!       ─► fold (sorted by lamport, author, id; each op's signature checked under its
//!          author's key in the state at that point) ─► GroupState (members, keys, name)
//!   refused ops (bad signature, not this group's create, key ≠ pin) ─► reported, not stored
//!   plan_control: new ops to the members who knew the group, the whole log to new ones
//! ```
//!
//! The signed bytes and the group id derivation are in [`signing`].

use std::collections::{BTreeMap, BTreeSet};

use micromsg_crypto::hex;
use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey, SIGNATURE_LEN, Signature};
use micromsg_wire::Number;
use serde::{Deserialize, Serialize};

pub mod signing;

/// The frame format version (`v`): 2 since control ops are signed (docs/groups.md 2.1).
pub const FORMAT: u64 = 2;
/// The last format without signatures; its frames and groups are refused.
pub const UNSIGNED_FORMAT: u64 = 1;
/// Longest group name, in bytes.
pub const MAX_NAME_LEN: usize = 100;
/// Most members a `create` may list (a bound on work per frame).
pub const MAX_MEMBERS: usize = 1000;
/// Most ops a `state` may carry.
pub const MAX_OPS: usize = 10_000;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame of the unsigned format 1, made before control ops were signed.
    #[error(
        "an unsigned group frame (format 1, from a MicroMsg before signed groups): refused; \
         its group must be created again"
    )]
    Unsigned,
    /// Malformed, or a field missing or out of range.
    #[error("bad group frame: {0}")]
    Bad(String),
}

fn bad<T>(what: impl Into<String>) -> Result<T, FrameError> {
    Err(FrameError::Bad(what.into()))
}

/// A new random 16-byte id, lowercase hex (op and message ids; a group id is derived,
/// [`signing::group_id`]).
pub fn new_id() -> String {
    use rand_core::RngCore;
    let mut id = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut id);
    hex::encode(&id)
}

fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_number(n: &str) -> bool {
    Number::new(n.to_owned()).is_ok()
}

/// A member as a `create` or an `add` names it: its number and the identity key its author
/// holds for it (pinned at the author's first session with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The number.
    pub number: String,
    /// Its identity key, which verifies the ops it signs.
    pub key: IdentityPublicKey,
}

/// What a control op changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Creates the group.
    Create {
        /// Its name.
        name: String,
        /// The initial members, in order, the author among them.
        members: Vec<Member>,
    },
    /// Adds a member.
    Add(Member),
    /// Removes a member.
    Remove(String),
    /// The author leaves.
    Leave,
    /// Renames the group.
    Rename(String),
    /// The author moved to this new number (protocol.md 12.13): same place in the member
    /// list, same key.
    Move(String),
}

impl Change {
    /// The keys this change brings into the state.
    pub fn carried_keys(&self) -> &[Member] {
        match self {
            Change::Create { members, .. } => members,
            Change::Add(m) => std::slice::from_ref(m),
            _ => &[],
        }
    }
}

/// One control op: self-contained, signed by its author, stored verbatim in every member's
/// log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Raw", into = "Raw")]
pub struct Op {
    /// Names this op (16 random bytes, hex).
    pub id: String,
    /// The author's Lamport clock.
    pub lamport: u64,
    /// Who made the change.
    pub author: String,
    /// The change.
    pub change: Change,
    /// The author's Ed25519 signature over [`signing::signed_bytes`].
    pub sig: Signature,
}

impl Op {
    /// The total order of docs/groups.md section 2: (lamport, author bytewise, id).
    fn key(&self) -> (u64, &[u8], &[u8]) {
        (self.lamport, self.author.as_bytes(), self.id.as_bytes())
    }

    /// The op's name (`create`, `add`, ...).
    pub fn name(&self) -> &'static str {
        signing::op_name(&self.change)
    }
}

/// The wire form of frames and ops: every field optional, checked by the typed conversions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Raw {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lamport: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    members: Option<Vec<RawMember>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ops: Option<Vec<Raw>>,
}

/// A member in a `create`: `{"number": ..., "key": 64 hex}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RawMember {
    number: String,
    key: String,
}

fn check_name(name: Option<String>) -> Result<String, FrameError> {
    match name {
        Some(n) if n.len() <= MAX_NAME_LEN => Ok(n),
        Some(_) => bad(format!("name longer than {MAX_NAME_LEN} bytes")),
        None => bad("missing name"),
    }
}

fn check_number(member: Option<String>) -> Result<String, FrameError> {
    match member {
        Some(m) if valid_number(&m) => Ok(m),
        _ => bad("missing or invalid member"),
    }
}

fn check_key(key: Option<&str>) -> Result<IdentityPublicKey, FrameError> {
    match key.map(IdentityPublicKey::from_hex) {
        Some(Ok(k)) => Ok(k),
        Some(Err(e)) => bad(format!("invalid member key: {e}")),
        None => bad("missing member key"),
    }
}

fn check_member(number: Option<String>, key: Option<&str>) -> Result<Member, FrameError> {
    Ok(Member {
        number: check_number(number)?,
        key: check_key(key)?,
    })
}

impl TryFrom<Raw> for Op {
    type Error = FrameError;

    fn try_from(raw: Raw) -> Result<Self, FrameError> {
        let id = match raw.id {
            Some(id) if valid_id(&id) => id,
            _ => return bad("missing or invalid id"),
        };
        let lamport = match raw.lamport {
            Some(l) if l >= 1 => l,
            _ => return bad("missing or invalid lamport"),
        };
        let author = match raw.author {
            Some(a) if valid_number(&a) => a,
            _ => return bad("missing or invalid author"),
        };
        let sig = match raw.sig.as_deref().map(hex::decode_array::<SIGNATURE_LEN>) {
            Some(Ok(sig)) => sig,
            Some(Err(_)) => return bad("invalid sig"),
            None => return bad("missing sig (unsigned control ops are refused)"),
        };
        let change = match raw.op.as_str() {
            "create" => {
                let raw_members = raw.members.unwrap_or_default();
                if raw_members.len() > MAX_MEMBERS {
                    return bad("too many members");
                }
                let members = raw_members
                    .into_iter()
                    .map(|m| check_member(Some(m.number), Some(&m.key)))
                    .collect::<Result<Vec<_>, _>>()?;
                if !members.iter().any(|m| m.number == author) {
                    return bad("a create must list its author, with its key");
                }
                Change::Create {
                    name: check_name(raw.name)?,
                    members,
                }
            }
            "add" => Change::Add(check_member(raw.member, raw.key.as_deref())?),
            "remove" => Change::Remove(check_number(raw.member)?),
            "leave" => Change::Leave,
            "rename" => Change::Rename(check_name(raw.name)?),
            "move" => Change::Move(check_number(raw.member)?),
            other => return bad(format!("unknown control op {other:?}")),
        };
        Ok(Self {
            id,
            lamport,
            author,
            change,
            sig,
        })
    }
}

impl From<Op> for Raw {
    fn from(op: Op) -> Self {
        let mut raw = Raw {
            op: op.name().into(),
            id: Some(op.id),
            lamport: Some(op.lamport),
            author: Some(op.author),
            sig: Some(hex::encode(&op.sig)),
            ..Raw::default()
        };
        match op.change {
            Change::Create { name, members } => {
                raw.name = Some(name);
                raw.members = Some(
                    members
                        .into_iter()
                        .map(|m| RawMember {
                            number: m.number,
                            key: m.key.to_hex(),
                        })
                        .collect(),
                );
            }
            Change::Add(m) => {
                raw.member = Some(m.number);
                raw.key = Some(m.key.to_hex());
            }
            Change::Remove(m) => raw.member = Some(m),
            Change::Leave => {}
            Change::Rename(name) => raw.name = Some(name),
            Change::Move(new) => raw.member = Some(new),
        }
        raw
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// One control op (boxed: an op with its keys is much larger than a message).
    Op(Box<Op>),
    /// The whole control log (to a new member, or after a change it may have missed).
    State(Vec<Op>),
    /// A group message.
    Message {
        /// Names it (dedup).
        id: String,
        /// The text.
        text: String,
        /// The sender's clock, Unix seconds.
        sent: u64,
    },
}

/// One group frame: the payload of a DATA frame of content kind GROUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The group id (32 lowercase hex).
    pub group: String,
    /// What it carries.
    pub payload: Payload,
}

/// Only the version, read first: the rest of a frame of another format may not parse.
#[derive(Deserialize)]
struct Version {
    #[serde(default)]
    v: Option<u64>,
}

impl Frame {
    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = match &self.payload {
            Payload::Op(op) => Raw::from((**op).clone()),
            Payload::State(ops) => Raw {
                op: "state".into(),
                ops: Some(ops.iter().cloned().map(Raw::from).collect()),
                ..Raw::default()
            },
            Payload::Message { id, text, sent } => Raw {
                op: "message".into(),
                id: Some(id.clone()),
                text: Some(text.clone()),
                sent: Some(*sent),
                ..Raw::default()
            },
        };
        raw.v = Some(FORMAT);
        raw.group = Some(self.group.clone());
        serde_json::to_vec(&raw).unwrap_or_default()
    }

    /// Parses and checks a frame; unknown fields are ignored. Signatures are checked by the
    /// fold, which knows the authors' keys.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| FrameError::Bad(e.to_string()))?;
        match version.v {
            Some(FORMAT) => {}
            Some(UNSIGNED_FORMAT) => return Err(FrameError::Unsigned),
            _ => return bad("unsupported version"),
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| FrameError::Bad(e.to_string()))?;
        let group = match raw.group.clone() {
            Some(g) if valid_id(&g) => g,
            _ => return bad("missing or invalid group"),
        };
        let payload = match raw.op.as_str() {
            "message" => match (raw.id, raw.text) {
                (Some(id), Some(text)) if valid_id(&id) => Payload::Message {
                    id,
                    text,
                    sent: raw.sent.unwrap_or(0),
                },
                _ => return bad("message without id or text"),
            },
            "state" => {
                let ops = raw.ops.unwrap_or_default();
                if ops.len() > MAX_OPS {
                    return bad("too many ops");
                }
                Payload::State(
                    ops.into_iter()
                        .map(Op::try_from)
                        .collect::<Result<_, _>>()?,
                )
            }
            _ => Payload::Op(Box::new(Op::try_from(raw)?)),
        };
        Ok(Self { group, payload })
    }
}

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
    fn of(op: &Op, reason: Refused) -> Self {
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

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// The ops that were new and taken, in log order.
    pub new: Vec<Op>,
    /// The new ops that were refused (not stored): report them.
    pub refused: Vec<Refusal>,
}

/// Most refused ops a group keeps aside ([`Group::held`]).
pub const MAX_HELD: usize = 1_000;

/// One group as a member keeps it: the log and the state derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The file format: [`FORMAT`]. A file without it holds unsigned ops of format 1, and is
    /// refused (docs/groups.md section 4).
    pub format: u64,
    /// The group id.
    pub id: String,
    /// The control log, in the order of docs/groups.md section 2: every op received that the
    /// fold does not refuse.
    pub log: Vec<Op>,
    /// Ops received that the fold refuses (forged or altered), kept aside and folded again
    /// with every merge, so that which ops are refused depends on the set received, never on
    /// the order it arrived in (an op can be refused under a key that a later op turns out to
    /// have brought in falsely). Never applied, never relayed. At most [`MAX_HELD`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<Op>,
    /// The state (derived; kept in the file for people reading it).
    pub state: GroupState,
}

impl Group {
    /// An empty group (nothing known yet).
    pub fn new(id: &str) -> Self {
        Self {
            format: FORMAT,
            id: id.to_owned(),
            log: Vec::new(),
            held: Vec::new(),
            state: GroupState::default(),
        }
    }

    /// A new group created by `creator` (whose key is `key`) with `members` (the creator's
    /// own entry is put first, with its own key): the empty group, its id derived from the
    /// create, and the signed create, not yet merged.
    pub fn create(
        key: &IdentityKey,
        creator: &str,
        name: String,
        members: Vec<Member>,
    ) -> (Self, Op) {
        let me = Member {
            number: creator.to_owned(),
            key: key.public_key(),
        };
        let mut list = vec![me];
        for m in members {
            if !list.iter().any(|x| x.number == m.number) {
                list.push(m);
            }
        }
        let op_id = new_id();
        let group = Self::new(&signing::group_id(creator, &key.public_key(), &op_id));
        let mut op = Op {
            id: op_id,
            lamport: 1,
            author: creator.to_owned(),
            change: Change::Create {
                name,
                members: list,
            },
            sig: [0; SIGNATURE_LEN],
        };
        op.sig = signing::sign(key, &group.id, &op);
        (group, op)
    }

    /// The Lamport clock for a new op: 1 + the largest in the log.
    pub fn next_lamport(&self) -> u64 {
        self.log.iter().map(|o| o.lamport).max().unwrap_or(0) + 1
    }

    /// A new op by `author`, signed with its `key`, not yet merged.
    pub fn new_op(&self, key: &IdentityKey, author: &str, change: Change) -> Op {
        let mut op = Op {
            id: new_id(),
            lamport: self.next_lamport(),
            author: author.to_owned(),
            change,
            sig: [0; SIGNATURE_LEN],
        };
        op.sig = signing::sign(key, &self.id, &op);
        op
    }

    /// Merges ops and refreshes the state. `pinned` gives the identity key this device holds
    /// for a number (its pin, or its own key for its own number): an op carrying another key
    /// for that number is refused, as is one the fold refuses (a bad signature). Refused ops
    /// are not stored, so they are never relayed.
    pub fn merge(
        &mut self,
        ops: impl IntoIterator<Item = Op>,
        pinned: impl Fn(&str) -> Option<IdentityPublicKey>,
    ) -> Merged {
        let mut new: Vec<Op> = Vec::new();
        let mut refused = Vec::new();
        for op in ops {
            if self.log.iter().any(|o| o.id == op.id)
                || self.held.iter().any(|o| o.id == op.id)
                || new.iter().any(|o| o.id == op.id)
            {
                continue;
            }
            let conflict = op
                .change
                .carried_keys()
                .iter()
                .find(|m| pinned(&m.number).is_some_and(|p| p != m.key));
            if let Some(m) = conflict {
                let number = m.number.clone();
                refused.push(Refusal::of(&op, Refused::KeyDiffersFromPin { number }));
                continue;
            }
            new.push(op);
        }
        if new.is_empty() {
            return Merged { new, refused };
        }
        let mut all = self.log.clone();
        all.extend(self.held.iter().cloned());
        all.extend(new.iter().cloned());
        let folded = fold(&self.id, &all);
        // Which ops the fold refuses is decided over everything received (log, held and new),
        // so every member that received the same ops holds the same log, whatever the order
        // (found by fuzzing: group_ops). A refused op changes nothing in the fold, so the state
        // is the same without the held ones.
        let bad: BTreeSet<&str> = folded.refused.iter().map(|r| r.id.as_str()).collect();
        refused.extend(
            folded
                .refused
                .iter()
                .filter(|r| new.iter().any(|o| o.id == r.id))
                .cloned(),
        );
        new.retain(|o| !bad.contains(o.id.as_str()));
        let (mut held, mut log): (Vec<Op>, Vec<Op>) =
            all.into_iter().partition(|o| bad.contains(o.id.as_str()));
        log.sort_by(|a, b| a.key().cmp(&b.key()));
        held.sort_by(|a, b| a.key().cmp(&b.key()));
        held.truncate(MAX_HELD);
        self.log = log;
        self.held = held;
        self.state = folded.state;
        new.sort_by(|a, b| a.key().cmp(&b.key()));
        Merged { new, refused }
    }

    /// Whether ops from `peer` are taken (docs/groups.md section 3): `peer` must be a member
    /// at some point of the log as it would be after merging them.
    pub fn accepts_from(&self, peer: &str, ops: &[Op]) -> bool {
        let mut all = self.log.clone();
        all.extend(ops.iter().cloned());
        fold(&self.id, &all).ever.contains(peer)
    }

    /// Whether a `message` from `from` that [`accepts_message`] refuses may only be early: this
    /// device knows nothing of the group yet, or is a member and has seen no op ever making
    /// `from` one. (Across brokers a message can overtake the create or add before it.) A
    /// message from a removed member is not early: it is refused.
    pub fn may_be_early(&self, from: &str, me: &str) -> bool {
        self.log.is_empty()
            || (self.state.is_member(me) && !fold(&self.id, &self.log).ever.contains(from))
    }
}

/// A group message held until the ops that make it acceptable arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Early {
    /// The group.
    pub group: String,
    /// The member it came from.
    pub from: String,
    /// The message.
    pub entry: GroupEntry,
    /// When it arrived (Unix seconds).
    pub held_at: u64,
    /// Whether it came through the inbox.
    pub offline: bool,
}

/// Early group messages (docs/groups.md section 3), bounded in count and age: the oldest goes
/// first when full, and none is kept longer than the time to live.
#[derive(Debug)]
pub struct EarlyMessages {
    held: std::collections::VecDeque<Early>,
    max: usize,
    ttl_secs: u64,
}

impl EarlyMessages {
    /// At most `max` messages, each for at most `ttl_secs`.
    pub fn new(max: usize, ttl_secs: u64) -> Self {
        Self {
            held: std::collections::VecDeque::new(),
            max,
            ttl_secs,
        }
    }

    /// Holds `early`; returns what had to be dropped for it (expired or, when full, the
    /// oldest), so the caller can say so.
    pub fn hold(&mut self, early: Early, now: u64) -> Vec<Early> {
        let mut dropped = self.expire(now);
        if self.max == 0 {
            dropped.push(early);
            return dropped;
        }
        while self.held.len() >= self.max {
            dropped.extend(self.held.pop_front());
        }
        self.held.push_back(early);
        dropped
    }

    /// Takes the unexpired messages held for `group`, in arrival order.
    pub fn take(&mut self, group: &str, now: u64) -> Vec<Early> {
        self.expire(now);
        let (taken, kept): (Vec<Early>, Vec<Early>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|e| e.group == group);
        self.held = kept.into();
        taken
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn expire(&mut self, now: u64) -> Vec<Early> {
        let ttl = self.ttl_secs;
        let (gone, kept): (Vec<Early>, Vec<Early>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|e| now.saturating_sub(e.held_at) > ttl);
        self.held = kept.into();
        gone
    }
}

/// Frames to send after a change: for every member of the state before or after it other
/// than `me` and those in `skip`: the whole log if it was not a member before (it may know
/// nothing of the group), else each new op.
pub fn plan_control(
    before: &GroupState,
    group: &Group,
    new_ops: &[Op],
    me: &str,
    skip: &[&str],
) -> Vec<(String, Frame)> {
    let mut out = Vec::new();
    let mut targets: Vec<&String> = group.state.members.iter().collect();
    for m in &before.members {
        if !targets.contains(&m) {
            targets.push(m);
        }
    }
    for m in targets {
        if m == me || skip.contains(&m.as_str()) {
            continue;
        }
        if before.is_member(m) {
            for op in new_ops {
                if op.author != *m {
                    out.push((
                        m.clone(),
                        Frame {
                            group: group.id.clone(),
                            payload: Payload::Op(Box::new(op.clone())),
                        },
                    ));
                }
            }
        } else {
            out.push((
                m.clone(),
                Frame {
                    group: group.id.clone(),
                    payload: Payload::State(group.log.clone()),
                },
            ));
        }
    }
    out
}

/// Who gets a message: every member of the sender's current state but the sender.
pub fn message_recipients(state: &GroupState, me: &str) -> Vec<String> {
    state.members.iter().filter(|m| *m != me).cloned().collect()
}

/// Whether a message from `from` is shown by `me`: both must be members now.
pub fn accepts_message(state: &GroupState, from: &str, me: &str) -> bool {
    state.is_member(from) && state.is_member(me)
}

/// A line of a group's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    /// The message id.
    pub id: String,
    /// The sender's number.
    pub from: String,
    /// The text.
    pub text: String,
    /// The sender's clock.
    pub sent: u64,
    /// When this device got it (or sent it).
    pub received: u64,
}

/// Finds the group named by `query` (an id or an unambiguous id prefix) among `ids`.
pub fn resolve<'a>(ids: &'a [String], query: &str) -> Result<&'a str, String> {
    let query = query.to_ascii_lowercase();
    if let Some(exact) = ids.iter().find(|i| **i == query) {
        return Ok(exact);
    }
    let hits: Vec<&String> = ids.iter().filter(|i| i.starts_with(&query)).collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no group {query:?} (see `micromsg group list`)")),
        _ => Err(format!(
            "{query:?} matches {} groups; give more of the id",
            hits.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1001";
    const B: &str = "1002";
    const C: &str = "1003";
    const D: &str = "1004";
    const E: &str = "1005";

    const CREATE_ID: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";

    /// Each number's identity key (seeded from its digits).
    fn k(number: &str) -> IdentityKey {
        let mut seed = [7u8; 32];
        seed[..number.len()].copy_from_slice(number.as_bytes());
        IdentityKey::from_seed(&micromsg_crypto::Secret32::from_bytes(seed))
    }

    fn m(number: &str) -> Member {
        Member {
            number: number.into(),
            key: k(number).public_key(),
        }
    }

    /// The id of the group [`create`] makes.
    fn gid() -> String {
        signing::group_id(A, &k(A).public_key(), CREATE_ID)
    }

    /// No pins.
    fn none(_: &str) -> Option<IdentityPublicKey> {
        None
    }

    fn signed(mut op: Op) -> Op {
        op.sig = signing::sign(&k(&op.author), &gid(), &op);
        op
    }

    /// An op of `author`, signed with its key.
    fn op(lamport: u64, author: &str, change: Change) -> Op {
        signed(Op {
            id: new_id(),
            lamport,
            author: author.into(),
            change,
            sig: [0; 64],
        })
    }

    fn create() -> Op {
        signed(Op {
            id: CREATE_ID.into(),
            lamport: 1,
            author: A.into(),
            change: Change::Create {
                name: "g".into(),
                members: vec![m(A), m(B), m(C)],
            },
            sig: [0; 64],
        })
    }

    fn early(group: &str, from: &str, text: &str, held_at: u64) -> Early {
        Early {
            group: group.into(),
            from: from.into(),
            entry: GroupEntry {
                id: new_id(),
                from: from.into(),
                text: text.into(),
                sent: held_at,
                received: held_at,
            },
            held_at,
            offline: true,
        }
    }

    #[test]
    fn early_messages_are_only_those_that_can_become_acceptable() {
        let mut g = Group::new(&gid());
        // Nothing known of the group: anything may be early.
        assert!(g.may_be_early(B, C));
        g.merge(vec![create()], none);
        // D was never added (as far as C knows): early. A member's message is not refused.
        assert!(g.may_be_early(D, C));
        assert!(accepts_message(&g.state, B, C));
        // B is removed: its later messages are refused, not held.
        g.merge(vec![op(2, A, Change::Remove(B.into()))], none);
        assert!(!accepts_message(&g.state, B, C));
        assert!(!g.may_be_early(B, C));
        // C itself removed: nothing is early any more.
        g.merge(vec![op(3, A, Change::Remove(C.into()))], none);
        assert!(!g.may_be_early(D, C));
    }

    #[test]
    fn a_move_op_puts_the_new_number_in_the_authors_place_with_its_key() {
        let mut g = Group::new(&gid());
        g.merge(vec![create()], none);
        let moved = op(2, B, Change::Move("2002".into()));
        // It goes over the wire and back unchanged (and still verifies).
        let frame = Frame {
            group: gid(),
            payload: Payload::Op(Box::new(moved.clone())),
        };
        assert_eq!(
            Frame::decode(&frame.encode()).expect("a move op decodes"),
            frame
        );
        let merged = g.merge(vec![moved], none);
        assert!(merged.refused.is_empty(), "{merged:?}");
        assert_eq!(g.state.members, [A, "2002", C]);
        assert_eq!(g.state.key_of("2002"), Some(&k(B).public_key()));
        assert_eq!(g.state.key_of(B), None);
        assert_eq!(g.state.version, 2);
        // The member goes on under the new number, with the same key.
        let mut rename = Op {
            id: new_id(),
            lamport: 3,
            author: "2002".into(),
            change: Change::Rename("h".into()),
            sig: [0; 64],
        };
        rename.sig = signing::sign(&k(B), &gid(), &rename);
        let merged = g.merge(vec![rename], none);
        assert!(merged.refused.is_empty(), "{merged:?}");
        assert_eq!((g.state.name.as_str(), g.state.version), ("h", 3));
        // Nobody moves another member: C's op naming B's place is signed by C, not by B, and
        // moves C itself, never B.
        let mut forged = op(4, C, Change::Move("3003".into()));
        forged.author = "2002".into();
        let merged = g.merge(vec![forged], none);
        assert_eq!(merged.refused.len(), 1);
        assert_eq!(g.state.members, [A, "2002", C]);
    }

    #[test]
    fn early_messages_are_bounded_in_count_and_age() {
        let mut held = EarlyMessages::new(2, 60);
        assert!(held.hold(early("g1", A, "one", 100), 100).is_empty());
        assert!(held.hold(early("g2", A, "two", 101), 101).is_empty());
        // Full: the oldest goes.
        let dropped = held.hold(early("g1", B, "three", 102), 102);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].entry.text, "one");
        let g1 = held.take("g1", 103);
        assert_eq!(g1.len(), 1);
        assert_eq!(g1[0].entry.text, "three");
        assert_eq!(held.len(), 1);
        // Too old: gone, not taken.
        assert!(held.take("g2", 101 + 61).is_empty());
        assert!(held.is_empty());
        // A limit of 0 holds nothing.
        let mut none = EarlyMessages::new(0, 60);
        assert_eq!(none.hold(early("g1", A, "x", 1), 1).len(), 1);
        assert!(none.is_empty());
    }

    #[test]
    fn create_add_remove_leave_rename() {
        let ops = vec![
            create(),
            op(2, A, Change::Add(m(D))),
            op(3, B, Change::Remove(C.into())),
            op(4, D, Change::Rename("h".into())),
            op(5, B, Change::Leave),
        ];
        let folded = fold(&gid(), &ops);
        let (s, ever) = (folded.state, folded.ever);
        assert_eq!(s.members, vec![A, D]);
        assert_eq!(s.name, "h");
        assert_eq!(s.version, 5);
        assert!(ever.contains(C) && ever.contains(B));
    }

    #[test]
    fn non_members_and_second_create_change_nothing() {
        let ops = vec![
            create(),
            op(2, E, Change::Add(m(D))),
            op(2, A, Change::Remove(A.into())),
            op(3, E, Change::Rename("x".into())),
            op(
                3,
                B,
                Change::Create {
                    name: "y".into(),
                    members: vec![m(B)],
                },
            ),
        ];
        let s = fold(&gid(), &ops).state;
        assert_eq!(s.members, vec![A, B, C]);
        assert_eq!((s.name.as_str(), s.version), ("g", 1));
    }

    #[test]
    fn concurrent_changes_use_the_order() {
        // Same lamport: B < C bytewise, so B's removal of C comes first and C's removal of B
        // (C no longer a member) is void.
        let ops = vec![
            create(),
            op(2, C, Change::Remove(B.into())),
            op(2, B, Change::Remove(C.into())),
        ];
        assert_eq!(fold(&gid(), &ops).state.members, vec![A, B]);
    }

    /// Heap's algorithm: every permutation.
    fn permutations(items: &mut Vec<Op>, k: usize, out: &mut dyn FnMut(&[Op])) {
        if k <= 1 {
            out(items);
            return;
        }
        for i in 0..k {
            permutations(items, k - 1, out);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            items.swap(j, k - 1);
        }
    }

    fn sample_logs() -> Vec<Vec<Op>> {
        vec![
            vec![
                create(),
                op(2, A, Change::Add(m(D))),
                op(2, B, Change::Remove(C.into())),
                op(2, C, Change::Leave),
                op(3, D, Change::Rename("x".into())),
                op(3, C, Change::Add(m(E))),
            ],
            vec![
                op(2, B, Change::Add(m(E))),
                create(),
                op(2, A, Change::Remove(B.into())),
                op(3, E, Change::Remove(A.into())),
                op(4, A, Change::Rename("z".into())),
                op(
                    1,
                    B,
                    Change::Create {
                        name: "other".into(),
                        members: vec![m(B), m(D)],
                    },
                ),
            ],
        ]
    }

    #[test]
    fn every_permutation_folds_and_merges_to_the_same_state() {
        for ops in sample_logs() {
            let folded = fold(&gid(), &ops);
            let expected = folded.state;
            // B's create is not this group's: refused in every order, never stored.
            let kept = ops.len() - folded.refused.len();
            let mut items = ops.clone();
            let n = items.len();
            let mut count = 0;
            permutations(&mut items, n, &mut |perm| {
                count += 1;
                assert_eq!(fold(&gid(), perm).state, expected);
                // Merging one op at a time, in this order, reaches the same group too.
                let mut g = Group::new(&gid());
                for o in perm {
                    g.merge([o.clone()], none);
                }
                assert_eq!(g.state, expected);
                assert_eq!(g.log.len(), kept);
            });
            assert_eq!(count, (1..=n).product::<usize>());
        }
    }

    #[test]
    fn merge_drops_duplicates() {
        let c = create();
        let mut g = Group::new(&gid());
        assert_eq!(g.merge([c.clone(), c.clone()], none).new.len(), 1);
        assert!(g.merge([c], none).new.is_empty());
        assert_eq!(g.next_lamport(), 2);
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let group = new_id();
        for payload in [
            Payload::Op(Box::new(create())),
            Payload::Op(Box::new(op(7, B, Change::Leave))),
            Payload::State(vec![create(), op(2, A, Change::Add(m(D)))]),
            Payload::Message {
                id: new_id(),
                text: "hi".into(),
                sent: 5,
            },
        ] {
            let f = Frame {
                group: group.clone(),
                payload,
            };
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        assert!(Frame::decode(b"not json").is_err());
        assert!(Frame::decode(br#"{"v":2,"group":"zz","op":"leave"}"#).is_err());
        let unknown = format!(
            r#"{{"v":2,"group":"{group}","op":"message","id":"{group}","text":"t","x":1}}"#
        );
        assert!(Frame::decode(unknown.as_bytes()).is_ok());
        let long = format!(
            r#"{{"v":2,"group":"{group}","op":"rename","id":"{group}","lamport":1,"author":"1001","sig":"{}","name":"{}"}}"#,
            "0".repeat(128),
            "n".repeat(101)
        );
        assert!(Frame::decode(long.as_bytes()).is_err());
    }

    #[test]
    fn plans_send_ops_to_old_members_and_the_log_to_new_ones() {
        let mut g = Group::new(&gid());
        g.merge([create()], none);
        let before = g.state.clone();
        let add = g.new_op(&k(A), A, Change::Add(m(D)));
        let new = g.merge([add.clone()], none).new;
        let plan = plan_control(&before, &g, &new, A, &[]);
        let to: Vec<(&str, bool)> = plan
            .iter()
            .map(|(m, f)| (m.as_str(), matches!(f.payload, Payload::State(_))))
            .collect();
        assert_eq!(to, vec![(B, false), (C, false), (D, true)]);
        // A removed member hears of its removal; nobody gets its own op back.
        let before = g.state.clone();
        let rm = g.new_op(&k(B), B, Change::Remove(C.into()));
        let new = g.merge([rm], none).new;
        let plan = plan_control(&before, &g, &new, A, &[]);
        let to: Vec<&str> = plan.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(to, vec![D, C]);
        assert_eq!(message_recipients(&g.state, A), vec![B, D]);
        assert!(!accepts_message(&g.state, C, A));
        assert!(!accepts_message(&g.state, A, C));
    }

    #[test]
    fn strangers_are_refused() {
        let mut g = Group::new(&gid());
        g.merge([create()], none);
        assert!(g.accepts_from(B, &[]));
        assert!(!g.accepts_from(E, &[op(2, A, Change::Rename("x".into()))]));
        let add = op(2, A, Change::Add(m(E)));
        assert!(g.accepts_from(E, std::slice::from_ref(&add)));
    }

    /// A member forging another member's `remove` or `rename` (author set to the victim,
    /// signed with the forger's own key, or not re-signed after an edit) is refused and
    /// reported, never applied nor stored. Before signatures both were applied.
    #[test]
    fn a_forged_remove_or_rename_is_refused_and_reported() {
        let mut g = Group::new(&gid());
        g.merge([create()], none);
        // B makes an op that claims A as its author.
        let mut forged = Op {
            id: new_id(),
            lamport: 2,
            author: A.into(),
            change: Change::Remove(C.into()),
            sig: [0; 64],
        };
        forged.sig = signing::sign(&k(B), &gid(), &forged);
        let merged = g.merge([forged.clone()], none);
        assert!(merged.new.is_empty());
        assert_eq!(
            merged.refused,
            vec![Refusal {
                id: forged.id.clone(),
                author: A.into(),
                op: "remove",
                reason: Refused::BadSignature { author: A.into() },
            }]
        );
        assert_eq!(g.state.members, vec![A, B, C]);
        assert!(g.log.iter().all(|o| o.id != forged.id));
        // A's genuine rename, altered on the way.
        let mut renamed = op(2, A, Change::Rename("mine".into()));
        renamed.change = Change::Rename("theirs".into());
        let merged = g.merge([renamed], none);
        assert_eq!(merged.refused.len(), 1);
        assert_eq!((g.state.name.as_str(), g.state.version), ("g", 1));
        // In a `state`, the forged op is refused and the genuine ones are taken.
        let mut fresh = Group::new(&gid());
        let ok = op(2, B, Change::Rename("h".into()));
        let merged = fresh.merge([create(), forged, ok], none);
        assert_eq!(merged.new.len(), 2);
        assert_eq!(merged.refused.len(), 1);
        assert_eq!(fresh.state.members, vec![A, B, C]);
        assert_eq!(fresh.state.name, "h");
    }

    /// D is added by A with D's key; C has no pin for D (not its contact) and still verifies
    /// D's ops with the key the state carries; an op signed by another key as D is refused.
    #[test]
    fn ops_of_a_member_who_is_not_a_contact_verify_with_the_key_in_the_state() {
        let mut g = Group::new(&gid());
        let pins_of_c = |n: &str| (n == A || n == C).then(|| k(n).public_key());
        g.merge([create(), op(2, A, Change::Add(m(D)))], pins_of_c);
        assert_eq!(g.state.key_of(D), Some(&k(D).public_key()));
        let merged = g.merge([op(3, D, Change::Rename("by d".into()))], pins_of_c);
        assert_eq!(merged.new.len(), 1);
        assert_eq!(g.state.name, "by d");
        let mut wrong = Op {
            id: new_id(),
            lamport: 4,
            author: D.into(),
            change: Change::Remove(B.into()),
            sig: [0; 64],
        };
        wrong.sig = signing::sign(&k(E), &gid(), &wrong);
        assert_eq!(g.merge([wrong], pins_of_c).refused.len(), 1);
        assert!(g.state.is_member(B));
        // After D's removal its key leaves the state.
        g.merge([op(5, A, Change::Remove(D.into()))], pins_of_c);
        assert_eq!(g.state.key_of(D), None);
    }

    /// Nobody but the creator can make a group's create: the id is derived from its key.
    #[test]
    fn a_create_not_made_by_the_groups_creator_is_refused() {
        // B claims to be the creator with its own key: the id does not match.
        let mut by_b = Op {
            id: CREATE_ID.into(),
            lamport: 1,
            author: B.into(),
            change: Change::Create {
                name: "evil".into(),
                members: vec![m(A), m(B)],
            },
            sig: [0; 64],
        };
        by_b.sig = signing::sign(&k(B), &gid(), &by_b);
        // B claims A's key but cannot sign with it.
        let mut as_a = create();
        as_a.change = Change::Create {
            name: "evil".into(),
            members: vec![m(A), m(B)],
        };
        for forged in [by_b, as_a] {
            let mut g = Group::new(&gid());
            let merged = g.merge([forged], none);
            assert_eq!(merged.refused[0].reason, Refused::NotThisCreate);
            assert!(g.log.is_empty() && g.state.version == 0);
        }
        let (group, op) = Group::create(&k(A), A, "real".into(), vec![m(B)]);
        let mut g = group;
        assert_eq!(g.merge([op], none).new.len(), 1);
        assert_eq!(g.state.members, vec![A, B]);
    }

    /// A create or add carrying a key that differs from the receiver's pin (or from the
    /// receiver's own key) is refused and reported.
    #[test]
    fn a_carried_key_that_differs_from_a_pin_is_refused() {
        let mut g = Group::new(&gid());
        let pins = |n: &str| (n == D).then(|| k(E).public_key());
        g.merge([create()], pins);
        let merged = g.merge([op(2, A, Change::Add(m(D)))], pins);
        assert!(merged.new.is_empty());
        assert_eq!(
            merged.refused[0].reason,
            Refused::KeyDiffersFromPin { number: D.into() }
        );
        assert!(!g.state.is_member(D));
        // The create itself, when it carries a wrong key for the receiver.
        let mut g = Group::new(&gid());
        let me_c = |n: &str| (n == C).then(|| k(E).public_key());
        assert_eq!(g.merge([create()], me_c).refused.len(), 1);
        assert!(g.log.is_empty());
    }

    #[test]
    fn unsigned_frames_of_format_1_are_refused() {
        let group = new_id();
        let v1 = format!(
            r#"{{"v":1,"group":"{group}","op":"create","id":"{group}","lamport":1,"author":"1001","name":"g","members":["1001","1002"]}}"#
        );
        assert_eq!(Frame::decode(v1.as_bytes()), Err(FrameError::Unsigned));
        // Format 2 without a signature.
        let unsigned = format!(
            r#"{{"v":2,"group":"{group}","op":"leave","id":"{group}","lamport":2,"author":"1001"}}"#
        );
        assert!(matches!(
            Frame::decode(unsigned.as_bytes()),
            Err(FrameError::Bad(_))
        ));
    }

    #[test]
    fn resolve_by_prefix() {
        let ids = vec!["ab12".to_owned(), "ab34".to_owned(), "cd56".to_owned()];
        assert_eq!(resolve(&ids, "cd"), Ok("cd56"));
        assert_eq!(resolve(&ids, "AB12"), Ok("ab12"));
        assert!(resolve(&ids, "ab").is_err());
        assert!(resolve(&ids, "ef").is_err());
    }
}
