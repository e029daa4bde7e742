//! Group chat, handled by the clients (docs/groups.md). Sans-IO: the frame format, the control
//! log, its deterministic order and fold, and who receives what. The agent does the sending
//! and the store keeps the files.
//!
//! ```text
//! frame (JSON, content kind GROUP) ─► Frame::decode ─► Payload::{Op, State, Message}
//!   ops ─► Log::merge (dedup by id) ─► fold (sorted by lamport, author, id) ─► GroupState
//!   plan_control: new ops to the members who knew the group, the whole log to new ones
//! ```

use std::collections::BTreeSet;

use micromsg_crypto::hex;
use micromsg_wire::Number;
use serde::{Deserialize, Serialize};

/// The frame format version (`v`).
pub const FORMAT: u64 = 1;
/// Longest group name, in bytes.
pub const MAX_NAME_LEN: usize = 100;
/// Most members a `create` may list (a bound on work per frame).
pub const MAX_MEMBERS: usize = 1000;
/// Most ops a `state` may carry.
pub const MAX_OPS: usize = 10_000;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad group frame: {0}")]
pub struct FrameError(pub String);

fn bad<T>(what: impl Into<String>) -> Result<T, FrameError> {
    Err(FrameError(what.into()))
}

/// A new random 16-byte id, lowercase hex (group ids, op and message ids).
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

/// What a control op changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Creates the group.
    Create {
        /// Its name.
        name: String,
        /// The initial members, in order.
        members: Vec<String>,
    },
    /// Adds a member.
    Add(String),
    /// Removes a member.
    Remove(String),
    /// The author leaves.
    Leave,
    /// Renames the group.
    Rename(String),
}

/// One control op: self-contained, stored verbatim in every member's log.
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
}

impl Op {
    /// The total order of docs/groups.md section 2: (lamport, author bytewise, id).
    fn key(&self) -> (u64, &[u8], &[u8]) {
        (self.lamport, self.author.as_bytes(), self.id.as_bytes())
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
    members: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ops: Option<Vec<Raw>>,
}

fn check_name(name: Option<String>) -> Result<String, FrameError> {
    match name {
        Some(n) if n.len() <= MAX_NAME_LEN => Ok(n),
        Some(_) => bad(format!("name longer than {MAX_NAME_LEN} bytes")),
        None => bad("missing name"),
    }
}

fn check_member(member: Option<String>) -> Result<String, FrameError> {
    match member {
        Some(m) if valid_number(&m) => Ok(m),
        _ => bad("missing or invalid member"),
    }
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
        let change = match raw.op.as_str() {
            "create" => {
                let members = raw.members.unwrap_or_default();
                if members.len() > MAX_MEMBERS || !members.iter().all(|m| valid_number(m)) {
                    return bad("invalid members");
                }
                Change::Create {
                    name: check_name(raw.name)?,
                    members,
                }
            }
            "add" => Change::Add(check_member(raw.member)?),
            "remove" => Change::Remove(check_member(raw.member)?),
            "leave" => Change::Leave,
            "rename" => Change::Rename(check_name(raw.name)?),
            other => return bad(format!("unknown control op {other:?}")),
        };
        Ok(Self {
            id,
            lamport,
            author,
            change,
        })
    }
}

impl From<Op> for Raw {
    fn from(op: Op) -> Self {
        let mut raw = Raw {
            id: Some(op.id),
            lamport: Some(op.lamport),
            author: Some(op.author),
            ..Raw::default()
        };
        match op.change {
            Change::Create { name, members } => {
                raw.op = "create".into();
                raw.name = Some(name);
                raw.members = Some(members);
            }
            Change::Add(m) => {
                raw.op = "add".into();
                raw.member = Some(m);
            }
            Change::Remove(m) => {
                raw.op = "remove".into();
                raw.member = Some(m);
            }
            Change::Leave => raw.op = "leave".into(),
            Change::Rename(name) => {
                raw.op = "rename".into();
                raw.name = Some(name);
            }
        }
        raw
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// One control op.
    Op(Op),
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

impl Frame {
    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = match &self.payload {
            Payload::Op(op) => Raw::from(op.clone()),
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

    /// Parses and checks a frame; unknown fields are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| FrameError(e.to_string()))?;
        if raw.v != Some(FORMAT) {
            return bad("unsupported version");
        }
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
            _ => Payload::Op(Op::try_from(raw)?),
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
}

impl GroupState {
    /// True when `number` is a member.
    pub fn is_member(&self, number: &str) -> bool {
        self.members.iter().any(|m| m == number)
    }
}

/// Folds ops (in any order) into the state: sorts them, then applies the rules of
/// docs/groups.md section 2. Also returns everyone who was a member at some point.
pub fn fold(ops: &[Op]) -> (GroupState, BTreeSet<String>) {
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by(|a, b| a.key().cmp(&b.key()));
    let mut s = GroupState::default();
    let mut ever = BTreeSet::new();
    for op in sorted {
        let author_in = s.is_member(&op.author);
        match &op.change {
            Change::Create { name, members } => {
                if s.version != 0 {
                    continue;
                }
                let mut list = Vec::with_capacity(members.len() + 1);
                if !members.contains(&op.author) {
                    list.push(op.author.clone());
                }
                for m in members {
                    if !list.contains(m) {
                        list.push(m.clone());
                    }
                }
                s.members = list;
                s.name = name.clone();
                s.version = 1;
            }
            Change::Add(m) if author_in && !s.is_member(m) => {
                s.members.push(m.clone());
                s.version += 1;
            }
            Change::Remove(m) if author_in && s.is_member(m) && *m != op.author => {
                s.members.retain(|x| x != m);
                s.version += 1;
            }
            Change::Leave if author_in => {
                s.members.retain(|x| *x != op.author);
                s.version += 1;
            }
            Change::Rename(name) if author_in => {
                s.name = name.clone();
                s.version += 1;
            }
            _ => {}
        }
        ever.extend(s.members.iter().cloned());
    }
    (s, ever)
}

/// One group as a member keeps it: the log and the state derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The group id.
    pub id: String,
    /// The control log, in the order of docs/groups.md section 2.
    pub log: Vec<Op>,
    /// The state (derived; kept in the file for people reading it).
    pub state: GroupState,
}

impl Group {
    /// An empty group (nothing known yet).
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            log: Vec::new(),
            state: GroupState::default(),
        }
    }

    /// The Lamport clock for a new op: 1 + the largest in the log.
    pub fn next_lamport(&self) -> u64 {
        self.log.iter().map(|o| o.lamport).max().unwrap_or(0) + 1
    }

    /// A new op by `author`, not yet merged.
    pub fn new_op(&self, author: &str, change: Change) -> Op {
        Op {
            id: new_id(),
            lamport: self.next_lamport(),
            author: author.to_owned(),
            change,
        }
    }

    /// Merges ops; returns the ones that were new (in log order) and refreshes the state.
    pub fn merge(&mut self, ops: impl IntoIterator<Item = Op>) -> Vec<Op> {
        let mut new = Vec::new();
        for op in ops {
            if self.log.iter().any(|o| o.id == op.id) || new.iter().any(|o: &Op| o.id == op.id) {
                continue;
            }
            new.push(op);
        }
        if new.is_empty() {
            return new;
        }
        self.log.extend(new.iter().cloned());
        self.log.sort_by(|a, b| a.key().cmp(&b.key()));
        self.state = fold(&self.log).0;
        new.sort_by(|a, b| a.key().cmp(&b.key()));
        new
    }

    /// Whether ops from `peer` are taken (docs/groups.md section 3): `peer` must be a member
    /// at some point of the log as it would be after merging them.
    pub fn accepts_from(&self, peer: &str, ops: &[Op]) -> bool {
        let mut all = self.log.clone();
        all.extend(ops.iter().cloned());
        fold(&all).1.contains(peer)
    }

    /// Whether a `message` from `from` that [`accepts_message`] refuses may only be early: this
    /// device knows nothing of the group yet, or is a member and has seen no op ever making
    /// `from` one. (Across brokers a message can overtake the create or add before it.) A
    /// message from a removed member is not early: it is refused.
    pub fn may_be_early(&self, from: &str, me: &str) -> bool {
        self.log.is_empty() || (self.state.is_member(me) && !fold(&self.log).1.contains(from))
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
                            payload: Payload::Op(op.clone()),
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

    fn op(lamport: u64, author: &str, change: Change) -> Op {
        Op {
            id: new_id(),
            lamport,
            author: author.into(),
            change,
        }
    }

    fn create() -> Op {
        op(
            1,
            A,
            Change::Create {
                name: "g".into(),
                members: vec![A.into(), B.into(), C.into()],
            },
        )
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
        let mut g = Group::new("g1");
        // Nothing known of the group: anything may be early.
        assert!(g.may_be_early(B, C));
        g.merge(vec![create()]);
        // D was never added (as far as C knows): early. A member's message is not refused.
        assert!(g.may_be_early(D, C));
        assert!(accepts_message(&g.state, B, C));
        // B is removed: its later messages are refused, not held.
        g.merge(vec![op(2, A, Change::Remove(B.into()))]);
        assert!(!accepts_message(&g.state, B, C));
        assert!(!g.may_be_early(B, C));
        // C itself removed: nothing is early any more.
        g.merge(vec![op(3, A, Change::Remove(C.into()))]);
        assert!(!g.may_be_early(D, C));
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
            op(2, A, Change::Add(D.into())),
            op(3, B, Change::Remove(C.into())),
            op(4, D, Change::Rename("h".into())),
            op(5, B, Change::Leave),
        ];
        let (s, ever) = fold(&ops);
        assert_eq!(s.members, vec![A, D]);
        assert_eq!(s.name, "h");
        assert_eq!(s.version, 5);
        assert!(ever.contains(C) && ever.contains(B));
    }

    #[test]
    fn non_members_and_second_create_change_nothing() {
        let ops = vec![
            create(),
            op(2, E, Change::Add(D.into())),
            op(2, A, Change::Remove(A.into())),
            op(3, E, Change::Rename("x".into())),
            op(
                3,
                B,
                Change::Create {
                    name: "y".into(),
                    members: vec![B.into()],
                },
            ),
        ];
        let (s, _) = fold(&ops);
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
        assert_eq!(fold(&ops).0.members, vec![A, B]);
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
                op(2, A, Change::Add(D.into())),
                op(2, B, Change::Remove(C.into())),
                op(2, C, Change::Leave),
                op(3, D, Change::Rename("x".into())),
                op(3, C, Change::Add(E.into())),
            ],
            vec![
                op(2, B, Change::Add(E.into())),
                create(),
                op(2, A, Change::Remove(B.into())),
                op(3, E, Change::Remove(A.into())),
                op(4, A, Change::Rename("z".into())),
                op(
                    1,
                    B,
                    Change::Create {
                        name: "other".into(),
                        members: vec![B.into(), D.into()],
                    },
                ),
            ],
        ]
    }

    #[test]
    fn every_permutation_folds_and_merges_to_the_same_state() {
        for ops in sample_logs() {
            let expected = fold(&ops).0;
            let mut items = ops.clone();
            let n = items.len();
            let mut count = 0;
            permutations(&mut items, n, &mut |perm| {
                count += 1;
                assert_eq!(fold(perm).0, expected);
                // Merging one op at a time, in this order, reaches the same group too.
                let mut g = Group::new(&"0".repeat(32));
                for o in perm {
                    g.merge([o.clone()]);
                }
                assert_eq!(g.state, expected);
                assert_eq!(g.log.len(), n);
            });
            assert_eq!(count, (1..=n).product::<usize>());
        }
    }

    #[test]
    fn merge_drops_duplicates() {
        let c = create();
        let mut g = Group::new(&"0".repeat(32));
        assert_eq!(g.merge([c.clone(), c.clone()]).len(), 1);
        assert!(g.merge([c]).is_empty());
        assert_eq!(g.next_lamport(), 2);
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let group = new_id();
        for payload in [
            Payload::Op(create()),
            Payload::Op(op(7, B, Change::Leave)),
            Payload::State(vec![create(), op(2, A, Change::Add(D.into()))]),
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
        assert!(Frame::decode(br#"{"v":1,"group":"zz","op":"leave"}"#).is_err());
        let unknown = format!(
            r#"{{"v":1,"group":"{group}","op":"message","id":"{group}","text":"t","x":1}}"#
        );
        assert!(Frame::decode(unknown.as_bytes()).is_ok());
        let long = format!(
            r#"{{"v":1,"group":"{group}","op":"rename","id":"{group}","lamport":1,"author":"1001","name":"{}"}}"#,
            "n".repeat(101)
        );
        assert!(Frame::decode(long.as_bytes()).is_err());
    }

    #[test]
    fn plans_send_ops_to_old_members_and_the_log_to_new_ones() {
        let mut g = Group::new(&new_id());
        g.merge([create()]);
        let before = g.state.clone();
        let add = g.new_op(A, Change::Add(D.into()));
        let new = g.merge([add.clone()]);
        let plan = plan_control(&before, &g, &new, A, &[]);
        let to: Vec<(&str, bool)> = plan
            .iter()
            .map(|(m, f)| (m.as_str(), matches!(f.payload, Payload::State(_))))
            .collect();
        assert_eq!(to, vec![(B, false), (C, false), (D, true)]);
        // A removed member hears of its removal; nobody gets its own op back.
        let before = g.state.clone();
        let rm = g.new_op(B, Change::Remove(C.into()));
        let new = g.merge([rm]);
        let plan = plan_control(&before, &g, &new, A, &[]);
        let to: Vec<&str> = plan.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(to, vec![D, C]);
        assert_eq!(message_recipients(&g.state, A), vec![B, D]);
        assert!(!accepts_message(&g.state, C, A));
        assert!(!accepts_message(&g.state, A, C));
    }

    #[test]
    fn strangers_are_refused() {
        let mut g = Group::new(&new_id());
        g.merge([create()]);
        assert!(g.accepts_from(B, &[]));
        assert!(!g.accepts_from(E, &[op(2, A, Change::Rename("x".into()))]));
        let add = op(2, A, Change::Add(E.into()));
        assert!(g.accepts_from(E, std::slice::from_ref(&add)));
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
