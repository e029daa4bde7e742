//! Sealing and opening DATA frames, the header string, replay protection and the offline
//! envelope.
//!
//! ```text
//! hs        = decimal(counter) || "-" || decimal(unix)            e.g. "0-1700000000"
//! prefix    = 0x10 || u64be(counter) || u8 hlen
//! header_ct = ChaCha20-Poly1305(ts_key, 0x00000000 || u64be(counter), aad = prefix, hs)
//! okm       = HKDF-Expand(seed, "micromsg/msg/v1" || hs, 44)      key = okm[..32], nonce = okm[32..]
//! body_ct   = ChaCha20-Poly1305(key, nonce, aad = prefix || header_ct, u8 kind || payload)
//! frame     = prefix || header_ct || body_ct
//! ```
//!
//! Per message this is one HKDF-Expand and two AEAD operations, with no allocation beyond the
//! caller's output buffer. The counter makes every header string, hence every (key, nonce)
//! pair, distinct for the life of one direction's keys; the caller persists it.

use core::fmt;

use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::aead::{self, AeadError, TAG_LEN};
use crate::handshake::SESSION_ID_LEN;
use crate::kdf;
use crate::secret::Secret32;

/// Frame type byte of DATA.
pub const TYPE_DATA: u8 = 0x10;
/// `type || u64be(counter) || u8 hlen`.
pub const PREFIX_LEN: usize = 10;
/// Longest header string: two 20-digit numbers and a dash.
pub const MAX_HEADER_STRING_LEN: usize = 41;
/// Shortest header string, "0-0".
pub const MIN_HEADER_STRING_LEN: usize = 3;
/// Shortest valid frame: prefix, shortest header, kind byte, tag.
pub const MIN_FRAME_LEN: usize = PREFIX_LEN + MIN_HEADER_STRING_LEN + TAG_LEN + 1 + TAG_LEN;
/// Length of the per-message key material: 32-byte key and 12-byte nonce.
pub const OKM_LEN: usize = 44;
/// Magic of the offline envelope.
pub const OFFLINE_MAGIC: &[u8; 4] = b"MMO1";

const MSG_LABEL: &[u8] = b"micromsg/msg/v1";

/// What a message is; the first byte of the body plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Kind {
    /// Keeps the session alive; the payload is empty.
    Heartbeat = 0x00,
    /// A chat message, UTF-8.
    Text = 0x01,
    /// Ends the session; the payload is a UTF-8 reason, possibly empty.
    Disconnect = 0x02,
    /// Reserved for group messages; the payload is opaque here.
    Group = 0x03,
    /// Reserved for device sync; the payload is opaque here.
    Sync = 0x04,
    /// A signed *moved* notice (protocol.md 12.13); the payload is checked by the client.
    Moved = 0x05,
}

impl Kind {
    /// Decodes a kind byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x00 => Some(Self::Heartbeat),
            0x01 => Some(Self::Text),
            0x02 => Some(Self::Disconnect),
            0x03 => Some(Self::Group),
            0x04 => Some(Self::Sync),
            0x05 => Some(Self::Moved),
            _ => None,
        }
    }

    fn check_payload(self, payload: &[u8]) -> Result<(), MessageError> {
        let ok = match self {
            Self::Heartbeat => payload.is_empty(),
            Self::Text | Self::Disconnect => core::str::from_utf8(payload).is_ok(),
            Self::Group | Self::Sync | Self::Moved => true,
        };
        if ok {
            Ok(())
        } else {
            Err(MessageError::InvalidPayload(self))
        }
    }
}

/// Errors of message sealing and opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The frame or envelope does not have the DATA layout.
    #[error("malformed DATA frame")]
    Malformed,
    /// Authentication failed, or the authenticated header disagrees with the frame.
    #[error("DATA frame failed authentication")]
    Tampered,
    /// The body names a kind this version does not know.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// The payload does not fit its kind (non-empty heartbeat, text that is not UTF-8).
    #[error("payload invalid for kind {0:?}")]
    InvalidPayload(Kind),
    /// A header string is not `counter-unix` in canonical decimal.
    #[error("malformed header string")]
    InvalidHeaderString,
    /// The counter has reached `u64::MAX`; the keys must not be used again.
    #[error("message counter exhausted")]
    CounterExhausted,
    /// The counter was not above the last one accepted.
    #[error("replayed or reordered message: counter {counter} after {last}")]
    Replay {
        /// The counter presented.
        counter: u64,
        /// The last counter accepted.
        last: u64,
    },
    /// A live session's frame is not the next one in sequence.
    #[error("out-of-order message: counter {counter}, expected {expected}")]
    OutOfOrder {
        /// The counter presented.
        counter: u64,
        /// The counter that was due.
        expected: u64,
    },
    /// The payload exceeds the cipher's limit.
    #[error("payload too long")]
    TooLong,
}

/// The header string `counter-unix`, formatted on the stack.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeaderString {
    buf: [u8; MAX_HEADER_STRING_LEN],
    len: u8,
}

fn push_decimal(buf: &mut [u8; MAX_HEADER_STRING_LEN], len: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for d in digits[..n].iter().rev() {
        buf[*len] = *d;
        *len += 1;
    }
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    match s {
        [] => None,
        [b'0'] => Some(0),
        [b'0', ..] => None,
        _ => s.iter().try_fold(0u64, |acc, &c| {
            if !c.is_ascii_digit() {
                return None;
            }
            acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        }),
    }
}

impl HeaderString {
    /// Formats `counter-unix`.
    pub fn new(counter: u64, unix_secs: u64) -> Self {
        let mut buf = [0u8; MAX_HEADER_STRING_LEN];
        let mut len = 0;
        push_decimal(&mut buf, &mut len, counter);
        buf[len] = b'-';
        len += 1;
        push_decimal(&mut buf, &mut len, unix_secs);
        Self {
            buf,
            len: len as u8, // at most 41
        }
    }

    /// Parses strictly: ASCII digits, exactly one '-', no leading zeros, each part a u64.
    /// Returns `(counter, unix)`.
    pub fn parse(s: &[u8]) -> Result<(u64, u64), MessageError> {
        if s.len() > MAX_HEADER_STRING_LEN {
            return Err(MessageError::InvalidHeaderString);
        }
        let mut parts = s.splitn(2, |&c| c == b'-');
        let (Some(counter), Some(unix)) = (parts.next(), parts.next()) else {
            return Err(MessageError::InvalidHeaderString);
        };
        match (parse_decimal(counter), parse_decimal(unix)) {
            (Some(c), Some(u)) => Ok((c, u)),
            _ => Err(MessageError::InvalidHeaderString),
        }
    }

    /// The ASCII bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and '-' are ever written.
        core::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Display for HeaderString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for HeaderString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeaderString({:?})", self.as_str())
    }
}

/// The per-message key and nonce, from one HKDF-Expand. Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct MessageKeyMaterial {
    key: [u8; 32],
    nonce: [u8; 12],
}

impl MessageKeyMaterial {
    /// okm[0..32].
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// okm[32..44].
    pub fn nonce(&self) -> &[u8; 12] {
        &self.nonce
    }
}

impl fmt::Debug for MessageKeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageKeyMaterial(<redacted>)")
    }
}

/// okm = HKDF-Expand(seed, "micromsg/msg/v1" || hs, 44).
pub fn message_key_material(seed: &Secret32, hs: &[u8]) -> MessageKeyMaterial {
    let mut okm = Zeroizing::new([0u8; OKM_LEN]);
    // 44 bytes from a 32-byte PRK is within HKDF's limits.
    if kdf::expand_multi(seed.expose(), &[MSG_LABEL, hs], &mut okm[..]).is_err() {
        unreachable!("44-byte HKDF expand from a 32-byte PRK cannot fail");
    }
    MessageKeyMaterial {
        key: core::array::from_fn(|i| okm[i]),
        nonce: core::array::from_fn(|i| okm[32 + i]),
    }
}

/// The header nonce, 0x00000000 || u64be(counter).
pub fn header_nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// The counter of a DATA frame, read before authentication (for routing or a cheap
/// out-of-window check only; trust it after [`DirectionKeys::open_into`] succeeds).
pub fn frame_counter(frame: &[u8]) -> Result<u64, MessageError> {
    match frame {
        [TYPE_DATA, c0, c1, c2, c3, c4, c5, c6, c7, ..] => {
            Ok(u64::from_be_bytes([*c0, *c1, *c2, *c3, *c4, *c5, *c6, *c7]))
        }
        _ => Err(MessageError::Malformed),
    }
}

/// An opened frame's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedHeader {
    /// The sender's counter.
    pub counter: u64,
    /// The sender's clock when sealing, in Unix seconds.
    pub unix_secs: u64,
    /// The message kind.
    pub kind: Kind,
}

/// An opened frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender's counter.
    pub counter: u64,
    /// The sender's clock when sealing, in Unix seconds.
    pub unix_secs: u64,
    /// The message kind.
    pub kind: Kind,
    /// The payload (UTF-8 for [`Kind::Text`] and [`Kind::Disconnect`]).
    pub payload: Vec<u8>,
}

/// The payload of a frame opened by [`DirectionKeys::open_owned`], checked against its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The payload of [`Kind::Text`] and [`Kind::Disconnect`].
    Text(String),
    /// Any other kind's payload (empty for [`Kind::Heartbeat`]).
    Bytes(Vec<u8>),
}

/// What [`DirectionKeys::open_header`] learnt: the header fields and the body's keys.
struct OpenedPrefix {
    counter: u64,
    unix_secs: u64,
    body_start: usize,
    mk: MessageKeyMaterial,
}

impl OpenedPrefix {
    fn header(&self, kind: Kind) -> OpenedHeader {
        OpenedHeader {
            counter: self.counter,
            unix_secs: self.unix_secs,
            kind,
        }
    }
}

/// One direction's keys. Zeroized on drop, redacted in `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionKeys {
    /// Encrypts the header string.
    pub ts_key: Secret32,
    /// HKDF PRK of the per-message keys.
    pub seed: Secret32,
}

impl DirectionKeys {
    /// Appends the DATA frame for message `counter`, sealed at `unix_secs`, to `out`. The
    /// caller must never reuse a counter with these keys (see [`Sender`]). `out` is left as it
    /// was on error.
    pub fn seal_into(
        &self,
        counter: u64,
        unix_secs: u64,
        kind: Kind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), MessageError> {
        kind.check_payload(payload)?;
        self.seal_checked(counter, unix_secs, kind, payload, out)
    }

    /// [`DirectionKeys::seal_into`] for a payload that is text by its type: a `str` is UTF-8
    /// already, so a TEXT or DISCONNECT payload is not read a second time to check it (at
    /// 64 KiB that check cost as much as a tenth of the seal).
    pub fn seal_str_into(
        &self,
        counter: u64,
        unix_secs: u64,
        kind: Kind,
        text: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), MessageError> {
        if !matches!(kind, Kind::Text | Kind::Disconnect) {
            kind.check_payload(text.as_bytes())?;
        }
        self.seal_checked(counter, unix_secs, kind, text.as_bytes(), out)
    }

    /// Seals a payload already checked against its kind; `out` is left as it was on error.
    fn seal_checked(
        &self,
        counter: u64,
        unix_secs: u64,
        kind: Kind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), MessageError> {
        let start = out.len();
        let result = (|| {
            let hs = HeaderString::new(counter, unix_secs);
            let hlen = hs.as_bytes().len() + TAG_LEN;
            out.reserve(PREFIX_LEN + hlen + 1 + payload.len() + TAG_LEN);
            out.push(TYPE_DATA);
            out.extend_from_slice(&counter.to_be_bytes());
            out.push(hlen as u8); // at most 41 + 16
            let header_start = out.len();
            out.extend_from_slice(hs.as_bytes());
            let (before, header) = out.split_at_mut(header_start);
            let tag = aead::seal_in_place_detached(
                self.ts_key.expose(),
                &header_nonce(counter),
                &before[start..],
                header,
            )
            .map_err(map_aead)?;
            out.extend_from_slice(&tag);

            let body_start = out.len();
            out.push(kind as u8);
            out.extend_from_slice(payload);
            let mk = message_key_material(&self.seed, hs.as_bytes());
            let (before, body) = out.split_at_mut(body_start);
            let tag = aead::seal_in_place_detached(mk.key(), mk.nonce(), &before[start..], body)
                .map_err(map_aead)?;
            out.extend_from_slice(&tag);
            Ok(())
        })();
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// [`DirectionKeys::seal_into`] into a new buffer.
    pub fn seal(
        &self,
        counter: u64,
        unix_secs: u64,
        kind: Kind,
        payload: &[u8],
    ) -> Result<Vec<u8>, MessageError> {
        let mut out = Vec::new();
        self.seal_into(counter, unix_secs, kind, payload, &mut out)?;
        Ok(out)
    }

    /// Checks a DATA frame's layout and opens its header: the counter, the sender's clock,
    /// where the body starts and the body's key material.
    fn open_header(&self, frame: &[u8]) -> Result<OpenedPrefix, MessageError> {
        let counter = frame_counter(frame)?;
        let Some(&hlen) = frame.get(PREFIX_LEN - 1) else {
            return Err(MessageError::Malformed);
        };
        let hlen = usize::from(hlen);
        if !(MIN_HEADER_STRING_LEN + TAG_LEN..=MAX_HEADER_STRING_LEN + TAG_LEN).contains(&hlen)
            || frame.len() < PREFIX_LEN + hlen + 1 + TAG_LEN
        {
            return Err(MessageError::Malformed);
        }
        let (prefix, rest) = frame.split_at(PREFIX_LEN);
        let header_ct = &rest[..hlen];

        let mut hs = [0u8; MAX_HEADER_STRING_LEN];
        let hs_len = hlen - TAG_LEN;
        hs[..hs_len].copy_from_slice(&header_ct[..hs_len]);
        let header_tag: [u8; TAG_LEN] = core::array::from_fn(|i| header_ct[hs_len + i]);
        aead::open_in_place_detached(
            self.ts_key.expose(),
            &header_nonce(counter),
            prefix,
            &mut hs[..hs_len],
            &header_tag,
        )
        .map_err(|_| MessageError::Tampered)?;
        let hs = &hs[..hs_len];
        // An authentic but malformed or mismatched header means a broken or hostile sender.
        let (hs_counter, unix_secs) =
            HeaderString::parse(hs).map_err(|_| MessageError::Tampered)?;
        if hs_counter != counter {
            return Err(MessageError::Tampered);
        }
        Ok(OpenedPrefix {
            counter,
            unix_secs,
            body_start: PREFIX_LEN + hlen,
            mk: message_key_material(&self.seed, hs),
        })
    }

    /// Opens a DATA frame and appends its payload to `payload` (nothing on error). Replay
    /// checks are the caller's, after this succeeds (see [`ReplayGuard`]).
    pub fn open_into(
        &self,
        frame: &[u8],
        payload: &mut Vec<u8>,
    ) -> Result<OpenedHeader, MessageError> {
        let p = self.open_header(frame)?;
        let start = payload.len();
        if let Err(e) = aead::open_into(
            p.mk.key(),
            p.mk.nonce(),
            &frame[..p.body_start],
            &frame[p.body_start..],
            payload,
        ) {
            return Err(match e {
                AeadError::TooShort => MessageError::Malformed,
                _ => MessageError::Tampered,
            });
        }
        let kind_byte = payload[start];
        let checked = Kind::from_byte(kind_byte)
            .ok_or(MessageError::UnknownKind(kind_byte))
            .and_then(|kind| kind.check_payload(&payload[start + 1..]).map(|()| kind));
        match checked {
            Ok(kind) => {
                payload.remove(start);
                Ok(p.header(kind))
            }
            Err(e) => {
                payload.truncate(start);
                Err(e)
            }
        }
    }

    /// Opens a DATA frame in its own buffer, the receive path of a live session: the body is
    /// decrypted where it lies and moved to the front once, and a text payload becomes a
    /// `String` with one UTF-8 check. [`DirectionKeys::open_into`] copies instead.
    pub fn open_owned(&self, mut frame: Vec<u8>) -> Result<(OpenedHeader, Body), MessageError> {
        let p = self.open_header(&frame)?;
        // `open_header` has checked that a kind byte and a tag follow the header.
        let tag_start = frame.len() - TAG_LEN;
        let tag: [u8; TAG_LEN] = core::array::from_fn(|i| frame[tag_start + i]);
        let (aad, body) = frame[..tag_start].split_at_mut(p.body_start);
        aead::open_in_place_detached(p.mk.key(), p.mk.nonce(), aad, body, &tag)
            .map_err(|_| MessageError::Tampered)?;
        let kind_byte = frame[p.body_start];
        let kind = Kind::from_byte(kind_byte).ok_or(MessageError::UnknownKind(kind_byte))?;
        frame.truncate(tag_start);
        frame.drain(..=p.body_start);
        let body = match kind {
            Kind::Text | Kind::Disconnect => String::from_utf8(frame)
                .map(Body::Text)
                .map_err(|_| MessageError::InvalidPayload(kind))?,
            _ => {
                kind.check_payload(&frame)?;
                Body::Bytes(frame)
            }
        };
        Ok((p.header(kind), body))
    }

    /// [`DirectionKeys::open_into`] into a new buffer.
    pub fn open(&self, frame: &[u8]) -> Result<Opened, MessageError> {
        let mut payload = Vec::with_capacity(frame.len().saturating_sub(MIN_FRAME_LEN));
        let h = self.open_into(frame, &mut payload)?;
        Ok(Opened {
            counter: h.counter,
            unix_secs: h.unix_secs,
            kind: h.kind,
            payload,
        })
    }
}

fn map_aead(e: AeadError) -> MessageError {
    match e {
        AeadError::TooLong => MessageError::TooLong,
        _ => MessageError::Tampered,
    }
}

/// The sending side of one direction: its keys and the next counter, which the caller
/// persists (also across offline use of the same keys).
#[derive(Debug, Clone)]
pub struct Sender {
    keys: DirectionKeys,
    next_counter: Option<u64>,
}

impl Sender {
    /// Starts at `next_counter` (0 for a fresh session, the persisted value otherwise).
    pub fn new(keys: DirectionKeys, next_counter: u64) -> Self {
        Self {
            keys,
            next_counter: Some(next_counter),
        }
    }

    /// The counter the next message will use, or `None` once exhausted.
    pub fn next_counter(&self) -> Option<u64> {
        self.next_counter
    }

    /// The keys.
    pub fn keys(&self) -> &DirectionKeys {
        &self.keys
    }

    /// Seals the next message into `out` and returns the counter it used.
    pub fn seal_into(
        &mut self,
        unix_secs: u64,
        kind: Kind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u64, MessageError> {
        let counter = self.next_counter.ok_or(MessageError::CounterExhausted)?;
        self.keys
            .seal_into(counter, unix_secs, kind, payload, out)?;
        self.next_counter = counter.checked_add(1);
        Ok(counter)
    }

    /// [`Sender::seal_into`] for text ([`DirectionKeys::seal_str_into`]).
    pub fn seal_str_into(
        &mut self,
        unix_secs: u64,
        kind: Kind,
        text: &str,
        out: &mut Vec<u8>,
    ) -> Result<u64, MessageError> {
        let counter = self.next_counter.ok_or(MessageError::CounterExhausted)?;
        self.keys
            .seal_str_into(counter, unix_secs, kind, text, out)?;
        self.next_counter = counter.checked_add(1);
        Ok(counter)
    }
}

/// Refuses any counter not above the last one accepted. Live sessions, where frames arrive in
/// order, can also demand `counter == last + 1` with [`ReplayGuard::accept_next`]. Call it only
/// after the frame has been opened, so a forged frame cannot move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayGuard {
    last: Option<u64>,
}

impl ReplayGuard {
    /// Nothing accepted yet.
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Resumes after `last` (persisted).
    pub fn after(last: u64) -> Self {
        Self { last: Some(last) }
    }

    /// The last counter accepted.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Whether `counter` would be accepted.
    pub fn check(&self, counter: u64) -> Result<(), MessageError> {
        match self.last {
            Some(last) if counter <= last => Err(MessageError::Replay { counter, last }),
            _ => Ok(()),
        }
    }

    /// Accepts `counter` if it is above the last one.
    pub fn accept(&mut self, counter: u64) -> Result<(), MessageError> {
        self.check(counter)?;
        self.last = Some(counter);
        Ok(())
    }

    /// Accepts `counter` only if it is exactly the next one (0 first).
    pub fn accept_next(&mut self, counter: u64) -> Result<(), MessageError> {
        let expected = match self.last {
            None => 0,
            Some(last) => last.checked_add(1).ok_or(MessageError::CounterExhausted)?,
        };
        if counter != expected {
            return Err(MessageError::OutOfOrder { counter, expected });
        }
        self.last = Some(counter);
        Ok(())
    }
}

/// An offline envelope: `"MMO1" || session_id || DATA frame`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineEnvelope<'a> {
    /// Which session's keys sealed the frame.
    pub session_id: [u8; SESSION_ID_LEN],
    /// The DATA frame body, from the 0x10 byte on.
    pub frame: &'a [u8],
}

impl<'a> OfflineEnvelope<'a> {
    /// Appends the envelope to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(OFFLINE_MAGIC.len() + SESSION_ID_LEN + self.frame.len());
        out.extend_from_slice(OFFLINE_MAGIC);
        out.extend_from_slice(&self.session_id);
        out.extend_from_slice(self.frame);
    }

    /// The envelope as a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Parses an envelope (the frame inside is checked only for its type byte).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, MessageError> {
        let rest = bytes
            .strip_prefix(OFFLINE_MAGIC.as_slice())
            .ok_or(MessageError::Malformed)?;
        if rest.len() < SESSION_ID_LEN + 1 || rest[SESSION_ID_LEN] != TYPE_DATA {
            return Err(MessageError::Malformed);
        }
        let (id, frame) = rest.split_at(SESSION_ID_LEN);
        Ok(Self {
            session_id: core::array::from_fn(|i| id[i]),
            frame,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> DirectionKeys {
        DirectionKeys {
            ts_key: Secret32::from_bytes([1; 32]),
            seed: Secret32::from_bytes([2; 32]),
        }
    }

    #[test]
    fn header_string_edges() {
        assert_eq!(HeaderString::new(0, 1_700_000_000).as_str(), "0-1700000000");
        let max = HeaderString::new(u64::MAX, u64::MAX);
        assert_eq!(max.as_bytes().len(), MAX_HEADER_STRING_LEN);
        assert_eq!(
            HeaderString::parse(max.as_bytes()),
            Ok((u64::MAX, u64::MAX))
        );
        for bad in [
            &b""[..],
            b"-",
            b"0-",
            b"-0",
            b"01-1",
            b"1-01",
            b"1-2-3",
            b"1--2",
            b"+1-2",
            b"1-18446744073709551616",
            b" 1-2",
        ] {
            assert_eq!(
                HeaderString::parse(bad),
                Err(MessageError::InvalidHeaderString),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn seal_open_and_errors() {
        let k = keys();
        let frame = k.seal(0, 1_700_000_000, Kind::Text, b"hello");
        let Ok(frame) = frame else {
            panic!("seal failed: {frame:?}");
        };
        assert_eq!(frame.len(), PREFIX_LEN + 12 + TAG_LEN + 6 + TAG_LEN);
        let opened = k.open(&frame);
        assert_eq!(
            opened,
            Ok(Opened {
                counter: 0,
                unix_secs: 1_700_000_000,
                kind: Kind::Text,
                payload: b"hello".to_vec()
            })
        );
        assert_eq!(
            k.seal(1, 0, Kind::Heartbeat, b"x"),
            Err(MessageError::InvalidPayload(Kind::Heartbeat))
        );
        assert_eq!(
            k.seal(1, 0, Kind::Text, &[0xff]),
            Err(MessageError::InvalidPayload(Kind::Text))
        );
        let mut other = k.clone();
        other.seed = Secret32::from_bytes([3; 32]);
        assert_eq!(other.open(&frame), Err(MessageError::Tampered));
    }

    #[test]
    fn sender_and_guard() {
        let mut s = Sender::new(keys(), u64::MAX);
        let mut out = Vec::new();
        assert_eq!(s.seal_into(0, Kind::Heartbeat, b"", &mut out), Ok(u64::MAX));
        assert_eq!(
            s.seal_into(0, Kind::Heartbeat, b"", &mut out),
            Err(MessageError::CounterExhausted)
        );
        let mut g = ReplayGuard::new();
        assert_eq!(g.accept_next(0), Ok(()));
        assert!(g.accept_next(2).is_err());
        assert_eq!(g.accept(5), Ok(()));
        assert_eq!(
            g.accept(5),
            Err(MessageError::Replay {
                counter: 5,
                last: 5
            })
        );
    }
}
