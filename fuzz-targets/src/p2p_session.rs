//! Two P2P endpoints (protocol.md 12) driven by the fuzzer: the handshake (INIT, ACCEPT,
//! FINISH, any of which the input may corrupt), then DATA, heartbeats and BYE both ways over a
//! channel that the input makes drop, reorder, replay and corrupt frames.
//!
//! Invariants:
//! - the handshake completes on both sides only if no frame was changed, and then both hold
//!   matching keys and each other's true identity;
//! - a receiver accepts a frame only if it is the next one its peer sent (live rule, 12.7),
//!   with the kind, time and payload that were sealed; a changed, replayed, reordered or
//!   dropped-before frame is refused, and after a refusal nothing more is accepted from that
//!   direction (the session ends).

use std::collections::{HashMap, VecDeque};

use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::handshake::{Initiator, Responder, SessionKeys, token_id};
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::message::{Kind, ReplayGuard};

use crate::input::Input;

/// One direction: the sealing side's keys and counter, the frames in flight, what was sealed
/// under each counter, and the receiving side's keys and replay guard.
struct Direction {
    send: micromsg_crypto::message::DirectionKeys,
    next: u64,
    channel: VecDeque<Vec<u8>>,
    sealed: HashMap<u64, (Kind, u64, Vec<u8>)>,
    recv: micromsg_crypto::message::DirectionKeys,
    guard: ReplayGuard,
    ended: bool,
}

impl Direction {
    fn new(sender: &SessionKeys, receiver: &SessionKeys) -> Self {
        Self {
            send: sender.send.clone(),
            next: 0,
            channel: VecDeque::new(),
            sealed: HashMap::new(),
            recv: receiver.recv.clone(),
            guard: ReplayGuard::new(),
            ended: false,
        }
    }

    fn seal(&mut self, input: &mut Input<'_>) {
        let kind = match input.below(3) {
            0 => Kind::Text,
            1 => Kind::Heartbeat,
            _ => Kind::Disconnect,
        };
        let unix = u64::from(input.u16());
        // TEXT and BYE carry UTF-8 (a sealer refuses anything else).
        let payload = match kind {
            Kind::Heartbeat => Vec::new(),
            _ => String::from_utf8_lossy(&input.bytes(200))
                .into_owned()
                .into_bytes(),
        };
        let frame = self
            .send
            .seal(self.next, unix, kind, &payload)
            .expect("sealing a small frame with a fresh counter works");
        self.sealed.insert(self.next, (kind, unix, payload));
        self.next += 1;
        self.channel.push_back(frame);
    }

    fn deliver(&mut self) {
        let Some(frame) = self.channel.pop_front() else {
            return;
        };
        if self.ended {
            return;
        }
        let opened = match self.recv.open(&frame) {
            Ok(opened) => opened,
            Err(_) => {
                // A frame that does not open ends the session.
                self.ended = true;
                return;
            }
        };
        if self.guard.accept_next(opened.counter).is_err() {
            self.ended = true;
            return;
        }
        let (kind, unix, payload) = self
            .sealed
            .get(&opened.counter)
            .expect("an accepted counter was sealed");
        assert_eq!(opened.kind, *kind, "kind of counter {}", opened.counter);
        assert_eq!(opened.unix_secs, *unix);
        assert_eq!(
            &opened.payload, payload,
            "payload of counter {}",
            opened.counter
        );
        if opened.kind == Kind::Disconnect {
            self.ended = true;
        }
    }

    fn fault(&mut self, input: &mut Input<'_>) {
        match input.below(4) {
            0 => {
                self.channel.pop_front();
            }
            1 => {
                if let Some(front) = self.channel.front().cloned() {
                    self.channel.push_back(front);
                }
            }
            2 => {
                if self.channel.len() >= 2 {
                    self.channel.swap(0, 1);
                }
            }
            _ => {
                let at = usize::from(input.u16());
                let bit = 1u8 << input.below(8);
                if let Some(front) = self.channel.front_mut()
                    && !front.is_empty()
                {
                    let at = at % front.len();
                    front[at] ^= bit;
                }
            }
        }
    }
}

/// Flips one input-chosen bit of `frame` when the input says so; whether it did.
fn maybe_corrupt(input: &mut Input<'_>, frame: &mut [u8]) -> bool {
    if input.below(8) != 0 || frame.is_empty() {
        return false;
    }
    let at = usize::from(input.u16()) % frame.len();
    frame[at] ^= 1 << input.below(8);
    true
}

/// The target.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let token = Secret32::from_bytes(input.array());
    let id_i = IdentityKey::from_seed(&Secret32::from_bytes(input.array()));
    let id_r = IdentityKey::from_seed(&Secret32::from_bytes(input.array()));
    let eph_i = EphemeralSecret::from_secret(&Secret32::from_bytes(input.array()));
    let eph_r = EphemeralSecret::from_secret(&Secret32::from_bytes(input.array()));
    let (nonce_i, nonce_r) = (input.array(), input.array());

    let (initiator, mut init) = Initiator::from_parts(&id_i, &token, nonce_i, eph_i);
    let mut changed = maybe_corrupt(&mut input, &mut init);
    let expected_id = token_id(&token);
    let responder = Responder::handle_init_with(
        &id_r,
        &init,
        |id| (*id == expected_id).then(|| token.clone()),
        nonce_r,
        eph_r,
    );
    let Ok((responder, mut accept)) = responder else {
        return;
    };
    changed |= maybe_corrupt(&mut input, &mut accept);
    let Ok(outcome) = initiator.handle_accept(&accept) else {
        return;
    };
    let mut finish = outcome.finish;
    changed |= maybe_corrupt(&mut input, &mut finish);
    let r_peer = *responder.peer_identity();
    let Ok(r_keys) = responder.handle_finish(&finish) else {
        return;
    };
    let i_keys = outcome.keys;
    // Every byte of INIT, ACCEPT and FINISH is covered by a proof, the transcript hash or a
    // signature: a changed bit never lets both sides finish.
    assert!(!changed, "a handshake with a changed frame completed");
    assert_eq!(
        i_keys.send, r_keys.recv,
        "initiator send keys are the responder's receive keys"
    );
    assert_eq!(i_keys.recv, r_keys.send);
    assert_eq!(outcome.peer_identity, id_r.public_key());
    assert_eq!(r_peer, id_i.public_key());

    let mut i_to_r = Direction::new(&i_keys, &r_keys);
    let mut r_to_i = Direction::new(&r_keys, &i_keys);
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let which = input.byte();
        let dir = if which & 1 == 0 {
            &mut i_to_r
        } else {
            &mut r_to_i
        };
        match (which >> 1) % 4 {
            0 => dir.seal(&mut input),
            1 | 2 => dir.deliver(),
            _ => dir.fault(&mut input),
        }
    }
    // What is still in flight, delivered: still only genuine frames in order.
    while !i_to_r.channel.is_empty() {
        i_to_r.deliver();
    }
    while !r_to_i.channel.is_empty() {
        r_to_i.deliver();
    }
}
