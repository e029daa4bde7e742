//! Session records for the store's tests.

use micromsg_crypto::handshake::Role;
use micromsg_crypto::message::DirectionKeys;
use micromsg_crypto::{IdentityKey, Secret32, SessionKeys};

use crate::p2p::StoredSession;

/// A session record whose id and keys are all made of `id`, with a fixed peer, set up (and
/// last used) at `established_at`.
pub(super) fn session(id: u8, established_at: u64) -> StoredSession {
    let keys = SessionKeys {
        session_id: [id; 16],
        send: DirectionKeys {
            ts_key: Secret32::from_bytes([id; 32]),
            seed: Secret32::from_bytes([id ^ 0x55; 32]),
        },
        recv: DirectionKeys {
            ts_key: Secret32::from_bytes([id ^ 0xaa; 32]),
            seed: Secret32::from_bytes([id ^ 0xff; 32]),
        },
    };
    let peer = IdentityKey::from_seed(&Secret32::from_bytes([3; 32])).public_key();
    StoredSession::new(&keys, Role::Initiator, peer, established_at)
}
