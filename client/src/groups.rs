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
//! The signed bytes and the group id derivation are in [`signing`], the frame format in
//! `frame`, the order and fold of the log in `fold` (both re-exported here); this module keeps
//! a group's log, its merge and who receives what.

use std::collections::BTreeSet;

use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey, SIGNATURE_LEN};
use serde::{Deserialize, Serialize};

mod fold;
mod frame;
pub mod signing;

pub use fold::{Folded, GroupState, Refusal, Refused, fold};
pub use frame::{Change, Frame, FrameError, Member, Op, Payload, new_id};

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
