//! Group control ops (docs/groups.md 2) merged by two members in different arrival orders.
//!
//! Four identities make a group and change it with signed ops the input describes (author,
//! change, target member, Lamport clock, id), some with a changed signature or signed by the
//! wrong key; raw frames decoded from the input go in as well. Member X merges the ops one by
//! one in input order, member Y in the reverse order, each as they would arrive.
//!
//! Invariants: merging never panics; a forged op never changes the state (the state is what
//! the genuinely signed ops alone make); and once both have merged everything, both hold the
//! same log and the same state (the convergence rule), whatever the arrival order.

use micromsg_client::groups::{Change, Frame, Group, Member, Op, Payload, fold, signing};
use micromsg_crypto::Secret32;
use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey};

use crate::input::Input;

const NUMBERS: [&str; 4] = ["5550000001", "5550000002", "5550000003", "5550000004"];

fn key(i: usize) -> IdentityKey {
    IdentityKey::from_seed(&Secret32::from_bytes([i as u8 + 1; 32]))
}

fn member(i: usize) -> Member {
    Member {
        number: NUMBERS[i].to_owned(),
        key: key(i).public_key(),
    }
}

/// The pins a member holds: every one of the four, with its true key.
fn pinned(number: &str) -> Option<IdentityPublicKey> {
    NUMBERS
        .iter()
        .position(|n| *n == number)
        .map(|i| key(i).public_key())
}

/// The target.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let creator = input.below(4);
    let invited: Vec<Member> = (0..4)
        .filter(|i| *i != creator && input.byte() & 1 == 1)
        .map(member)
        .collect();
    let (empty, create) = Group::create(&key(creator), NUMBERS[creator], "fuzz".into(), invited);
    let group_id = empty.id.clone();
    let mut ops: Vec<Op> = vec![create];
    let mut steps = 0;
    while !input.is_empty() && steps < 48 {
        steps += 1;
        if input.below(8) == 0 {
            // A raw frame: whatever decodes goes in as it would from a peer.
            if let Ok(frame) = Frame::decode(&input.bytes(512)) {
                match frame.payload {
                    Payload::Op(op) => ops.push(*op),
                    Payload::State(more) => ops.extend(more),
                    Payload::Message { .. } => {}
                }
            }
            continue;
        }
        let author = input.below(4);
        let target = input.below(4);
        let change = match input.below(5) {
            0 => Change::Add(member(target)),
            1 => Change::Remove(NUMBERS[target].to_owned()),
            2 => Change::Leave,
            3 => Change::Rename(format!("name {}", input.byte())),
            _ => Change::Create {
                name: "again".into(),
                members: vec![member(author), member(target)],
            },
        };
        let mut op = Op {
            id: format!("{:032x}", u128::from(input.u16()) << 8 | steps as u128),
            lamport: u64::from(input.byte() % 16) + 1,
            author: NUMBERS[author].to_owned(),
            change,
            sig: [0; 64],
        };
        let signer = match input.below(8) {
            0 => (author + 1) % 4, // the wrong key: a forgery
            _ => author,
        };
        op.sig = signing::sign(&key(signer), &group_id, &op);
        if input.below(8) == 0 {
            op.sig[usize::from(input.byte()) % 64] ^= 1 << input.below(8);
        }
        ops.push(op);
    }

    let mut x = Group::new(&group_id);
    for op in ops.iter().cloned() {
        x.merge([op], pinned);
    }
    let mut y = Group::new(&group_id);
    for op in ops.iter().rev().cloned() {
        y.merge([op], pinned);
    }
    // Forged ops never count: the state is what the genuinely signed ops alone make. (A
    // forged op may stay in the log while its claimed author has no key in the group, since
    // nothing can check it then; it changes nothing, and goes once the author gets a key.)
    for g in [&x, &y] {
        let genuine: Vec<Op> = g
            .log
            .iter()
            .filter(|op| pinned(&op.author).is_some_and(|k| signing::verifies(&k, &group_id, op)))
            .cloned()
            .collect();
        assert_eq!(
            fold(&group_id, &genuine).state,
            g.state,
            "a forged op changed the state"
        );
    }
    if x.log != y.log {
        let only = |a: &Group, b: &Group| -> Vec<String> {
            a.log
                .iter()
                .filter(|o| !b.log.contains(o))
                .map(|o| {
                    format!(
                        "{} {} by {} ({:?})",
                        o.lamport,
                        o.name(),
                        o.author,
                        o.change
                    )
                })
                .collect()
        };
        panic!(
            "two arrival orders gave different logs: only in input order {:?}, only in reverse {:?}",
            only(&x, &y),
            only(&y, &x)
        );
    }
    assert_eq!(x.state, y.state, "two arrival orders gave different states");
}
