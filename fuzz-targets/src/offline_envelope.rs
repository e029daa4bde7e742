//! MMO1 offline envelopes (protocol.md 12.11) into a stored session: genuine ones the sender
//! sealed, the same replayed, changed ones, and any bytes at all.
//!
//! Invariants: a genuine envelope opens once, with what was sealed, and its repeat is taken as
//! a duplicate (`Ok(None)`); a counter the live session already received is a duplicate too;
//! anything else that decodes as an envelope opens only if it is byte for byte a genuine one.

use std::collections::HashMap;

use micromsg_client::p2p::StoredSession;
use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::handshake::{Initiator, Responder, Role, token_id};
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::message::{Kind, OfflineEnvelope};

use crate::input::Input;

/// Two stored sessions of one completed handshake, from fixed keys.
fn sessions() -> (StoredSession, StoredSession) {
    let token = Secret32::from_bytes([1; 32]);
    let id_i = IdentityKey::from_seed(&Secret32::from_bytes([2; 32]));
    let id_r = IdentityKey::from_seed(&Secret32::from_bytes([3; 32]));
    let eph = |b| EphemeralSecret::from_secret(&Secret32::from_bytes([b; 32]));
    let (initiator, init) = Initiator::from_parts(&id_i, &token, [4; 32], eph(5));
    let id = token_id(&token);
    let (responder, accept) = Responder::handle_init_with(
        &id_r,
        &init,
        |t| (*t == id).then(|| token.clone()),
        [6; 32],
        eph(7),
    )
    .expect("a genuine INIT");
    let outcome = initiator.handle_accept(&accept).expect("a genuine ACCEPT");
    let r_keys = responder
        .handle_finish(&outcome.finish)
        .expect("a genuine FINISH");
    (
        StoredSession::new(&outcome.keys, Role::Initiator, id_r.public_key(), 0),
        StoredSession::new(&r_keys, Role::Responder, id_i.public_key(), 0),
    )
}

/// The target.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (mut sender, mut receiver) = sessions();
    // What the live session received before: counters up to this are duplicates offline.
    let live = input.below(4);
    receiver.recv_last_live = live.checked_sub(1).map(|c| c as u64);
    let mut genuine: HashMap<Vec<u8>, (u64, Kind, Vec<u8>)> = HashMap::new();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut opened_counters = std::collections::BTreeSet::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let envelope = match input.below(4) {
            0 => {
                let kind = if input.byte() & 1 == 0 {
                    Kind::Text
                } else {
                    Kind::Group
                };
                let payload = String::from_utf8_lossy(&input.bytes(300))
                    .into_owned()
                    .into_bytes();
                let counter = sender.next_send_counter;
                let env = sender
                    .seal_offline(u64::from(input.u16()), kind, &payload)
                    .expect("sealing with a fresh counter");
                genuine.insert(env.clone(), (counter, kind, payload));
                sent.push(env.clone());
                env
            }
            1 if !sent.is_empty() => sent[input.below(sent.len())].clone(),
            2 if !sent.is_empty() => {
                let mut env = sent[input.below(sent.len())].clone();
                let at = usize::from(input.u16()) % env.len();
                env[at] ^= 1 << input.below(8);
                env
            }
            _ => input.bytes(600),
        };
        let Ok(decoded) = OfflineEnvelope::decode(&envelope) else {
            continue;
        };
        if decoded.session_id != receiver.session_id {
            continue;
        }
        match receiver.open_offline(decoded.frame) {
            Ok(Some(opened)) => {
                let (counter, kind, payload) = genuine
                    .get(&envelope)
                    .expect("only a genuine envelope opens");
                assert_eq!(opened.counter, *counter);
                assert_eq!(opened.kind, *kind);
                assert_eq!(&opened.payload, payload);
                assert!(
                    Some(opened.counter) > receiver.recv_last_live,
                    "a counter received live opened again offline"
                );
                assert!(opened_counters.insert(opened.counter), "opened twice");
            }
            Ok(None) => {
                let (counter, ..) = genuine
                    .get(&envelope)
                    .expect("only a genuine envelope is a duplicate");
                assert!(
                    opened_counters.contains(counter) || Some(*counter) <= receiver.recv_last_live,
                    "a first arrival was taken as a duplicate"
                );
            }
            Err(_) => assert!(
                !genuine.contains_key(&envelope),
                "a genuine envelope did not open"
            ),
        }
    }
}
