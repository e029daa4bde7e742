//! [`StoredSession`]: what a client keeps of a session for later offline use (protocol 12.11,
//! 12.12), and its file form (JSON, keys as lowercase hex).
//!
//! ```json
//! { "version": 1, "session_id": "…32 hex…", "role": "initiator", "peer_identity": "…64 hex…",
//!   "send": { "ts_key": "…", "seed": "…" }, "next_send_counter": 12,
//!   "recv": { "ts_key": "…", "seed": "…" }, "recv_last_live": 7, "recv_offline_seen": [9, 10],
//!   "established_at": 1700000000, "last_used": 1700000100 }
//! ```

use std::collections::BTreeSet;
use std::fmt;

use micromsg_crypto::handshake::{Role, SESSION_ID_LEN};
use micromsg_crypto::identity::IdentityPublicKey;
use micromsg_crypto::message::{DirectionKeys, Kind, MessageError, OfflineEnvelope, Opened};
use micromsg_crypto::{Secret32, SessionKeys, hex};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

use super::SessionEnd;

const FILE_VERSION: u32 = 1;

/// One session's durable state. Its keys zeroize on drop; `Debug` shows only the session id,
/// role and counters.
///
/// Counter rule (12.7): `next_send_counter` only grows; a frame sealed with counter `c` may
/// leave the device only after a record with `next_send_counter > c` is on disk.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Names the session in offline envelopes.
    pub session_id: [u8; SESSION_ID_LEN],
    /// Which end of the handshake we were.
    pub role: Role,
    /// The peer's identity key as authenticated in the handshake.
    pub peer_identity: IdentityPublicKey,
    /// Our send keys.
    pub send: DirectionKeys,
    /// The first send counter never used.
    pub next_send_counter: u64,
    /// The peer's send keys (what we open with).
    pub recv: DirectionKeys,
    /// The last counter received live.
    pub recv_last_live: Option<u64>,
    /// Counters above `recv_last_live` already accepted from offline envelopes.
    pub recv_offline_seen: BTreeSet<u64>,
    /// When the handshake completed (Unix seconds).
    pub established_at: u64,
    /// When the session was last used (Unix seconds).
    pub last_used: u64,
}

impl fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSession")
            .field("session_id", &hex::encode(&self.session_id))
            .field("role", &self.role)
            .field("peer_identity", &self.peer_identity)
            .field("next_send_counter", &self.next_send_counter)
            .field("recv_last_live", &self.recv_last_live)
            .field("keys", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl StoredSession {
    /// The record of a session that just completed its handshake.
    pub fn new(
        keys: &SessionKeys,
        role: Role,
        peer_identity: IdentityPublicKey,
        now_unix: u64,
    ) -> Self {
        Self {
            session_id: keys.session_id,
            role,
            peer_identity,
            send: keys.send.clone(),
            next_send_counter: 0,
            recv: keys.recv.clone(),
            recv_last_live: None,
            recv_offline_seen: BTreeSet::new(),
            established_at: now_unix,
            last_used: now_unix,
        }
    }

    /// Takes in the counters a live session ended with. Counters never move back.
    pub fn record_end(&mut self, end: &SessionEnd, now_unix: u64) {
        self.next_send_counter = self.next_send_counter.max(end.next_send_counter);
        self.recv_last_live = self.recv_last_live.max(end.last_recv_counter);
        self.recv_offline_seen
            .retain(|&c| Some(c) > self.recv_last_live);
        self.last_used = self.last_used.max(now_unix);
    }

    /// Seals a TEXT for offline delivery with the send keys and the next counter, and returns
    /// the `MMO1` envelope (12.11). Save this record before the envelope leaves the device.
    pub fn seal_offline_text(&mut self, unix: u64, text: &str) -> Result<Vec<u8>, MessageError> {
        self.seal_offline(unix, Kind::Text, text.as_bytes())
    }

    /// Like [`StoredSession::seal_offline_text`] for any content kind (GROUP: docs/groups.md).
    pub fn seal_offline(
        &mut self,
        unix: u64,
        kind: Kind,
        payload: &[u8],
    ) -> Result<Vec<u8>, MessageError> {
        let counter = self.next_send_counter;
        let next = counter
            .checked_add(1)
            .ok_or(MessageError::CounterExhausted)?;
        let mut frame = Vec::with_capacity(payload.len() + 128);
        self.send
            .seal_into(counter, unix, kind, payload, &mut frame)?;
        self.next_send_counter = next;
        self.last_used = self.last_used.max(unix);
        Ok(OfflineEnvelope {
            session_id: self.session_id,
            frame: &frame,
        }
        .encode())
    }

    /// Opens a DATA frame the peer sealed with this session's keys (offline rule, 12.7):
    /// `Ok(None)` for a duplicate or a counter already received live. Save this record after
    /// storing the message.
    pub fn open_offline(&mut self, frame: &[u8]) -> Result<Option<Opened>, MessageError> {
        let opened = self.recv.open(frame)?;
        let counter = opened.counter;
        if Some(counter) <= self.recv_last_live || !self.recv_offline_seen.insert(counter) {
            return Ok(None);
        }
        Ok(Some(opened))
    }
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RoleName {
    Initiator,
    Responder,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    ts_key: String,
    seed: String,
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        self.ts_key.zeroize();
        self.seed.zeroize();
    }
}

impl KeysFile {
    fn from_keys(keys: &DirectionKeys) -> Self {
        Self {
            ts_key: keys.ts_key.to_hex().to_string(),
            seed: keys.seed.to_hex().to_string(),
        }
    }

    fn to_keys(&self) -> Result<DirectionKeys, String> {
        Ok(DirectionKeys {
            ts_key: Secret32::from_hex(&self.ts_key).map_err(|e| format!("ts_key: {e}"))?,
            seed: Secret32::from_hex(&self.seed).map_err(|e| format!("seed: {e}"))?,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSessionFile {
    version: u32,
    session_id: String,
    role: RoleName,
    peer_identity: String,
    send: KeysFile,
    next_send_counter: u64,
    recv: KeysFile,
    #[serde(default)]
    recv_last_live: Option<u64>,
    #[serde(default)]
    recv_offline_seen: Vec<u64>,
    established_at: u64,
    last_used: u64,
}

impl Serialize for StoredSession {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StoredSessionFile {
            version: FILE_VERSION,
            session_id: hex::encode(&self.session_id),
            role: match self.role {
                Role::Initiator => RoleName::Initiator,
                Role::Responder => RoleName::Responder,
            },
            peer_identity: self.peer_identity.to_hex(),
            send: KeysFile::from_keys(&self.send),
            next_send_counter: self.next_send_counter,
            recv: KeysFile::from_keys(&self.recv),
            recv_last_live: self.recv_last_live,
            recv_offline_seen: self.recv_offline_seen.iter().copied().collect(),
            established_at: self.established_at,
            last_used: self.last_used,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StoredSession {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let file = StoredSessionFile::deserialize(deserializer)?;
        if file.version != FILE_VERSION {
            return Err(D::Error::custom(format!(
                "unsupported session file version {}",
                file.version
            )));
        }
        Ok(Self {
            session_id: hex::decode_array(&file.session_id)
                .map_err(|e| D::Error::custom(format!("session_id: {e}")))?,
            role: match file.role {
                RoleName::Initiator => Role::Initiator,
                RoleName::Responder => Role::Responder,
            },
            peer_identity: IdentityPublicKey::from_hex(&file.peer_identity)
                .map_err(|e| D::Error::custom(format!("peer_identity: {e}")))?,
            send: file
                .send
                .to_keys()
                .map_err(|e| D::Error::custom(format!("send.{e}")))?,
            next_send_counter: file.next_send_counter,
            recv: file
                .recv
                .to_keys()
                .map_err(|e| D::Error::custom(format!("recv.{e}")))?,
            recv_last_live: file.recv_last_live,
            recv_offline_seen: file.recv_offline_seen.iter().copied().collect(),
            established_at: file.established_at,
            last_used: file.last_used,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use micromsg_crypto::IdentityKey;

    fn sample() -> StoredSession {
        let keys = SessionKeys {
            session_id: [7; 16],
            send: DirectionKeys {
                ts_key: Secret32::from_bytes([0xa1; 32]),
                seed: Secret32::from_bytes([0xa2; 32]),
            },
            recv: DirectionKeys {
                ts_key: Secret32::from_bytes([0xb1; 32]),
                seed: Secret32::from_bytes([0xb2; 32]),
            },
        };
        let peer = IdentityKey::from_seed(&Secret32::from_bytes([3; 32])).public_key();
        StoredSession::new(&keys, Role::Responder, peer, 1_700_000_000)
    }

    #[test]
    fn json_round_trip_and_redacted_debug() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(&"a1".repeat(32)), "keys are stored as hex");
        let back: StoredSession = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("a1a1") && !shown.contains("b2b2"),
            "{shown}"
        );
    }

    #[test]
    fn offline_seal_and_open_follow_the_counters() {
        let mut a = sample();
        // The peer's view: our send keys are its receive keys.
        let mut b = sample();
        std::mem::swap(&mut b.send, &mut b.recv);
        b.recv_last_live = Some(2);
        a.next_send_counter = 2;
        let env = a.seal_offline_text(5, "late").unwrap();
        assert_eq!(a.next_send_counter, 3);
        let env = OfflineEnvelope::decode(&env).unwrap();
        assert_eq!(env.session_id, b.session_id);
        // Counter 2 was already received live.
        assert_eq!(b.open_offline(env.frame).unwrap(), None);
        let env = a.seal_offline_text(6, "later").unwrap();
        let env = OfflineEnvelope::decode(&env).unwrap();
        let opened = b.open_offline(env.frame).unwrap().unwrap();
        assert_eq!(
            (opened.counter, opened.payload.as_slice()),
            (3, &b"later"[..])
        );
        assert_eq!(b.open_offline(env.frame).unwrap(), None, "duplicate");
    }
}
