//! THE MILLION TEST: one direction's keys, one million messages sealed in the same second.
//! No two may share a (message_key, message_nonce) pair, and no two may share a header
//! (key, nonce) pair. It derives the key material only (the AEAD would not change the
//! answer), which keeps it fast in a debug build.

use std::collections::HashSet;

use micromsg_crypto::message::{self, HeaderString};
use micromsg_crypto::{DirectionKeys, Secret32};

#[test]
fn a_million_messages_never_repeat_a_key_nonce_pair() {
    const N: u64 = 1_000_000;
    const UNIX: u64 = 1_700_000_000;
    let keys = DirectionKeys {
        ts_key: Secret32::from_bytes([0x11; 32]),
        seed: Secret32::from_bytes([0x22; 32]),
    };
    let mut body_pairs: HashSet<[u8; 44]> = HashSet::with_capacity(N as usize);
    // The header key is the direction's ts_key, the same for every message, so header
    // (key, nonce) pairs are distinct exactly when the nonces are.
    let mut header_nonces: HashSet<[u8; 12]> = HashSet::with_capacity(N as usize);
    for counter in 0..N {
        let hs = HeaderString::new(counter, UNIX);
        let mk = message::message_key_material(&keys.seed, hs.as_bytes());
        let mut pair = [0u8; 44];
        pair[..32].copy_from_slice(mk.key());
        pair[32..].copy_from_slice(mk.nonce());
        assert!(
            body_pairs.insert(pair),
            "body key/nonce repeats at {counter}"
        );
        assert!(
            header_nonces.insert(message::header_nonce(counter)),
            "header key/nonce repeats at {counter}"
        );
    }
    assert_eq!(body_pairs.len() as u64, N);
    assert_eq!(header_nonces.len() as u64, N);
}
