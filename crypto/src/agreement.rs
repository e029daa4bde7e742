//! X25519 key agreement (RFC 7748) for the per-session "timestamp" keys.
//!
//! The shared secret is refused when it is all zero, which is exactly what a low-order (or
//! twist-small-order) peer point yields; accepting it would let a peer force a known key.

use core::fmt;

use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::secret::Secret32;

/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Errors of key agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AgreementError {
    /// The peer's point has low order: the shared secret would be all zero.
    #[error("X25519 peer public key has low order (all-zero shared secret)")]
    LowOrderPoint,
}

/// A fresh X25519 secret for one session. Zeroized on drop; `Debug` redacts it.
///
/// (x25519-dalek's `StaticSecret` underneath, because known-answer vectors need to build one
/// from fixed bytes; use [`EphemeralSecret::generate`] once per session.)
pub struct EphemeralSecret(StaticSecret);

impl EphemeralSecret {
    /// Draws a fresh secret from `rng`.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self::from_secret(&Secret32::generate(rng))
    }

    /// Builds a secret from fixed bytes (clamping happens inside X25519).
    pub fn from_secret(bytes: &Secret32) -> Self {
        Self(StaticSecret::from(*bytes.expose()))
    }

    /// The public key to send to the peer.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        PublicKey::from(&self.0).to_bytes()
    }

    /// X25519 with the peer's public key; refuses an all-zero result.
    pub fn diffie_hellman(
        &self,
        peer_public: &[u8; PUBLIC_KEY_LEN],
    ) -> Result<Secret32, AgreementError> {
        let shared = self.0.diffie_hellman(&PublicKey::from(*peer_public));
        let out = Secret32::from_bytes(*shared.as_bytes());
        // Equivalent to `!was_contributory()`, but on our copy and in constant time.
        if bool::from(out.expose().ct_eq(&[0u8; 32])) {
            return Err(AgreementError::LowOrderPoint);
        }
        Ok(out)
    }
}

impl fmt::Debug for EphemeralSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EphemeralSecret(<redacted>)")
    }
}

/// Raw X25519(scalar, u) with the all-zero check, for callers that hold plain bytes (and for
/// the RFC 7748 and Wycheproof vectors).
pub fn x25519(scalar: &Secret32, u: &[u8; PUBLIC_KEY_LEN]) -> Result<Secret32, AgreementError> {
    EphemeralSecret::from_secret(scalar).diffie_hellman(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_and_refuse_zero_point() {
        let a = EphemeralSecret::from_secret(&Secret32::from_bytes([3; 32]));
        let b = EphemeralSecret::from_secret(&Secret32::from_bytes([4; 32]));
        let ab = a.diffie_hellman(&b.public_key());
        let ba = b.diffie_hellman(&a.public_key());
        assert!(ab.is_ok());
        assert_eq!(ab, ba);
        assert_eq!(
            a.diffie_hellman(&[0u8; 32]),
            Err(AgreementError::LowOrderPoint)
        );
        assert_eq!(format!("{a:?}"), "EphemeralSecret(<redacted>)");
    }
}
