//! The *moved* notice (protocol.md 12.13): a contact tells its contacts that it now has a new
//! number at another broker, signed with the identity key they pinned. Sans-IO: encoding,
//! signing, parsing, checking; the caller passes the time and the keys.
//!
//! ```text
//! body      = 0x01                              format version
//!          || u8(len(old))    || old            the number the contact knew (ASCII digits)
//!          || u8(len(new))    || new            the new number
//!          || u8(len(broker)) || broker         the new broker's HOST:PORT (ASCII)
//!          || u8(len(tls))    || tls            the name its certificate carries (ASCII)
//!          || broker_key (32)                   the new broker's Ed25519 identity key
//!          || u64be(time)                       when the mover signed (Unix seconds)
//! signed    = "micromsg/moved/v1" || body        17 ASCII bytes, then the body
//! notice    = body || signature (64)             the payload of content kind 0x05 MOVED
//! ```
//!
//! A receiver accepts a notice only from the session of the contact it names as `old`, only if
//! the signature verifies (`verify_strict`) under the key pinned for that contact, and only if
//! its time is later than the last notice it followed for that contact (so an old notice
//! replayed later cannot move the contact back).

use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey, SIGNATURE_LEN};
use micromsg_wire::Number;

/// The domain-separation prefix of the signed bytes.
pub const CONTEXT: &[u8] = b"micromsg/moved/v1";
/// The format version byte.
pub const VERSION: u8 = 0x01;
/// The longest HOST:PORT or TLS name a notice carries.
pub const MAX_NAME: usize = 255;

/// A moved notice, before or after signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The number the contacts knew.
    pub old: String,
    /// The new number.
    pub new: String,
    /// The new broker's `HOST:PORT`.
    pub broker: String,
    /// The name the new broker's certificate carries.
    pub tls_name: String,
    /// The new broker's Ed25519 identity key (from its signed BROKER-INFO).
    pub broker_key: [u8; 32],
    /// When the mover signed it (Unix seconds).
    pub time: u64,
}

/// Why a notice is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MovedError {
    /// The bytes are not a notice of this format.
    #[error("malformed moved notice: {0}")]
    Malformed(&'static str),
    /// The signature does not verify under the pinned key.
    #[error("the moved notice is not signed by the identity key pinned for the contact")]
    BadSignature,
    /// It names another number than the contact whose session carried it.
    #[error("the moved notice is for {named}, but came from {from}")]
    WrongSender {
        /// The `old` number it names.
        named: String,
        /// The contact whose session carried it.
        from: String,
    },
    /// Not later than the notice already followed for this contact.
    #[error("the moved notice is not newer than the one already followed (replayed?)")]
    Stale,
}

impl Moved {
    /// The body: every field but the signature.
    pub fn body(&self) -> Result<Vec<u8>, MovedError> {
        let mut out = Vec::with_capacity(64 + self.broker.len() + self.tls_name.len());
        out.push(VERSION);
        for (text, what) in [
            (&self.old, "old number"),
            (&self.new, "new number"),
            (&self.broker, "broker address"),
            (&self.tls_name, "TLS name"),
        ] {
            let len = u8::try_from(text.len())
                .ok()
                .filter(|&l| l > 0)
                .ok_or(MovedError::Malformed(what))?;
            out.push(len);
            out.extend_from_slice(text.as_bytes());
        }
        out.extend_from_slice(&self.broker_key);
        out.extend_from_slice(&self.time.to_be_bytes());
        Ok(out)
    }

    /// The bytes the identity key signs: [`CONTEXT`] then the body.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, MovedError> {
        let mut out = CONTEXT.to_vec();
        out.extend_from_slice(&self.body()?);
        Ok(out)
    }

    /// The notice signed with `key`: body then signature.
    pub fn sign(&self, key: &IdentityKey) -> Result<Vec<u8>, MovedError> {
        self.check_fields()?;
        let signature = key.sign(&self.signed_bytes()?);
        let mut out = self.body()?;
        out.extend_from_slice(&signature);
        Ok(out)
    }

    /// Parses a notice and checks its signature under `pinned`, the key pinned for the
    /// contact whose session carried it.
    pub fn open(bytes: &[u8], pinned: &IdentityPublicKey) -> Result<Self, MovedError> {
        let body_len = bytes
            .len()
            .checked_sub(SIGNATURE_LEN)
            .ok_or(MovedError::Malformed("too short"))?;
        let (body, signature) = bytes.split_at(body_len);
        let moved = Self::parse_body(body)?;
        let signature: [u8; SIGNATURE_LEN] = signature
            .try_into()
            .map_err(|_| MovedError::Malformed("signature"))?;
        let mut signed = CONTEXT.to_vec();
        signed.extend_from_slice(body);
        pinned
            .verify(&signed, &signature)
            .map_err(|_| MovedError::BadSignature)?;
        Ok(moved)
    }

    /// The checks a receiver makes beyond the signature: the notice names the contact whose
    /// session carried it, and it is later than the last one followed (`last`).
    pub fn check_for(&self, from: &str, last: Option<u64>) -> Result<(), MovedError> {
        if self.old != from {
            return Err(MovedError::WrongSender {
                named: self.old.clone(),
                from: from.to_owned(),
            });
        }
        if last.is_some_and(|last| self.time <= last) {
            return Err(MovedError::Stale);
        }
        Ok(())
    }

    /// Parses a notice WITHOUT checking its signature: for a FORWARD answer about a number
    /// nobody pinned a key for (protocol.md 6.28), shown to the user as what the broker says,
    /// never acted on by itself. A notice about a pinned contact goes through [`Moved::open`].
    pub fn read_unverified(bytes: &[u8]) -> Result<Self, MovedError> {
        let body_len = bytes
            .len()
            .checked_sub(SIGNATURE_LEN)
            .ok_or(MovedError::Malformed("too short"))?;
        Self::parse_body(&bytes[..body_len])
    }

    fn parse_body(body: &[u8]) -> Result<Self, MovedError> {
        let mut rest = body;
        let mut take = |n: usize, what: &'static str| -> Result<&[u8], MovedError> {
            if rest.len() < n {
                return Err(MovedError::Malformed(what));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        if take(1, "version")? != [VERSION] {
            return Err(MovedError::Malformed("unknown version"));
        }
        let mut texts = Vec::with_capacity(4);
        for what in ["old number", "new number", "broker address", "TLS name"] {
            let len = usize::from(take(1, what)?[0]);
            let bytes = take(len, what)?;
            let text = std::str::from_utf8(bytes).map_err(|_| MovedError::Malformed(what))?;
            texts.push(text.to_owned());
        }
        let broker_key: [u8; 32] = take(32, "broker key")?
            .try_into()
            .map_err(|_| MovedError::Malformed("broker key"))?;
        let time: [u8; 8] = take(8, "time")?
            .try_into()
            .map_err(|_| MovedError::Malformed("time"))?;
        if !rest.is_empty() {
            return Err(MovedError::Malformed("trailing bytes"));
        }
        let mut texts = texts.into_iter();
        let mut next = || texts.next().unwrap_or_default();
        let moved = Self {
            old: next(),
            new: next(),
            broker: next(),
            tls_name: next(),
            broker_key,
            time: u64::from_be_bytes(time),
        };
        moved.check_fields()?;
        Ok(moved)
    }

    fn check_fields(&self) -> Result<(), MovedError> {
        if Number::new(self.old.clone()).is_err() {
            return Err(MovedError::Malformed("old number"));
        }
        if Number::new(self.new.clone()).is_err() {
            return Err(MovedError::Malformed("new number"));
        }
        if self.old == self.new {
            return Err(MovedError::Malformed("the new number is the old one"));
        }
        for (text, what) in [
            (&self.broker, "broker address"),
            (&self.tls_name, "TLS name"),
        ] {
            if text.is_empty()
                || text.len() > MAX_NAME
                || !text.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(MovedError::Malformed(what));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use micromsg_crypto::Secret32;
    use micromsg_crypto::hex;

    use super::*;

    fn key(byte: u8) -> IdentityKey {
        IdentityKey::from_seed(&Secret32::from_bytes([byte; 32]))
    }

    fn sample() -> Moved {
        Moved {
            old: "5550001".into(),
            new: "5560002".into(),
            broker: "broker2.example:7400".into(),
            tls_name: "broker2.example".into(),
            broker_key: [0x22; 32],
            time: 1_800_000_000,
        }
    }

    /// The vector of protocol.md 15.2 ("Moved notice"): identity seed 32 × 0x11.
    #[test]
    fn the_documented_vector_signs_and_opens() {
        let notice = sample().sign(&key(0x11)).unwrap();
        let body = hex::encode(&sample().body().unwrap());
        assert_eq!(
            body,
            "0107353535303030310735353630303032146272\
             6f6b6572322e6578616d706c653a37343030\
             0f62726f6b6572322e6578616d706c65\
             2222222222222222222222222222222222222222222222222222222222222222\
             000000006b49d200"
        );
        assert_eq!(
            hex::encode(&notice[notice.len() - 64..]),
            "d5ed83a81a718bee7cfaa381f930c0b2498dca815e9321c10af0368e393f0d42\
             ed5879c5a208ebb46006f3bee9205935c1a2cd5a20f04fbcf4792e1651a8c30e"
        );
        assert_eq!(
            Moved::open(&notice, &key(0x11).public_key()).unwrap(),
            sample()
        );
    }

    #[test]
    fn a_notice_signed_with_another_key_is_refused() {
        let notice = sample().sign(&key(0x33)).unwrap();
        assert_eq!(
            Moved::open(&notice, &key(0x11).public_key()),
            Err(MovedError::BadSignature)
        );
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let notice = sample().sign(&key(0x11)).unwrap();
        let pinned = key(0x11).public_key();
        for i in 0..notice.len() {
            let mut bad = notice.clone();
            bad[i] ^= 0x01;
            assert!(Moved::open(&bad, &pinned).is_err(), "byte {i} changed");
        }
        assert!(Moved::open(&notice[..notice.len() - 1], &pinned).is_err());
        let mut longer = notice.clone();
        longer.insert(notice.len() - 64, 0);
        assert!(Moved::open(&longer, &pinned).is_err());
        assert!(Moved::open(&[], &pinned).is_err());
    }

    #[test]
    fn the_signature_is_domain_separated() {
        // A signature over the body alone (no context) does not make a notice.
        let moved = sample();
        let mut forged = moved.body().unwrap();
        let signature = key(0x11).sign(&forged);
        forged.extend_from_slice(&signature);
        assert_eq!(
            Moved::open(&forged, &key(0x11).public_key()),
            Err(MovedError::BadSignature)
        );
    }

    #[test]
    fn only_the_named_contact_and_only_a_newer_time_are_followed() {
        let moved = sample();
        assert_eq!(moved.check_for("5550001", None), Ok(()));
        assert_eq!(moved.check_for("5550001", Some(1_799_999_999)), Ok(()));
        assert_eq!(
            moved.check_for("5550001", Some(1_800_000_000)),
            Err(MovedError::Stale)
        );
        assert!(matches!(
            moved.check_for("5550009", None),
            Err(MovedError::WrongSender { .. })
        ));
    }

    #[test]
    fn bad_fields_are_refused_before_signing() {
        let k = key(0x11);
        for change in [
            |m: &mut Moved| m.new = m.old.clone(),
            |m: &mut Moved| m.new = "12ab".into(),
            |m: &mut Moved| m.broker = String::new(),
            |m: &mut Moved| m.tls_name = "a b".into(),
            |m: &mut Moved| m.broker = "x".repeat(256),
        ] {
            let mut m = sample();
            change(&mut m);
            assert!(matches!(m.sign(&k), Err(MovedError::Malformed(_))), "{m:?}");
        }
    }
}
