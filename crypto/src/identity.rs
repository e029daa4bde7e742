//! Long-term Ed25519 identity keys (RFC 8032).
//!
//! Verification is always `verify_strict`: it refuses small-order public keys and `R` values and
//! non-canonical `S`, so a signature has exactly one valid encoding and a key cannot be chosen to
//! make a signature verify for several messages. Small-order public keys are refused when they
//! are parsed already.

use core::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::hex::{self, HexError};
use crate::secret::Secret32;

/// Length of an encoded public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of a signature.
pub const SIGNATURE_LEN: usize = 64;

/// An Ed25519 signature, `R || S`.
pub type Signature = [u8; SIGNATURE_LEN];

/// Errors of identity keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The bytes do not encode a curve point.
    #[error("invalid Ed25519 public key encoding")]
    InvalidPublicKey,
    /// The point has small order; no honest key is like that.
    #[error("weak (small-order) Ed25519 public key")]
    WeakPublicKey,
    /// The signature does not verify under the strict rules.
    #[error("Ed25519 signature verification failed")]
    BadSignature,
    /// A hex form could not be parsed.
    #[error("public key hex: {0}")]
    Hex(#[from] HexError),
}

/// A long-term Ed25519 signing key. Zeroized on drop; `Debug` shows only the public half.
#[derive(Clone)]
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// Generates a fresh key from `rng`.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self::from_seed(&Secret32::generate(rng))
    }

    /// Rebuilds a key from its 32-byte seed (the RFC 8032 "secret key").
    pub fn from_seed(seed: &Secret32) -> Self {
        Self(SigningKey::from_bytes(seed.expose()))
    }

    /// The 32-byte seed, for storage in the client's key store.
    pub fn seed(&self) -> Secret32 {
        Secret32::from_bytes(self.0.to_bytes())
    }

    /// The public half.
    pub fn public_key(&self) -> IdentityPublicKey {
        IdentityPublicKey(self.0.verifying_key())
    }

    /// Signs `msg` (deterministic, RFC 8032).
    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.0.sign(msg).to_bytes()
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKey")
            .field("public", &self.public_key())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// An Ed25519 public key that decodes to a point of large order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityPublicKey(VerifyingKey);

impl IdentityPublicKey {
    /// Parses a 32-byte encoding; refuses non-points and small-order points.
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<Self, IdentityError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| IdentityError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(IdentityError::WeakPublicKey);
        }
        Ok(Self(key))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, IdentityError> {
        Self::from_bytes(&hex::decode_array(s)?)
    }

    /// The 32-byte encoding.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.0.as_bytes()
    }

    /// The lowercase hex encoding.
    pub fn to_hex(&self) -> String {
        hex::encode(self.as_bytes())
    }

    /// Verifies `signature` over `msg` with `verify_strict`.
    pub fn verify(&self, msg: &[u8], signature: &Signature) -> Result<(), IdentityError> {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.0
            .verify_strict(msg, &sig)
            .map_err(|_| IdentityError::BadSignature)
    }
}

impl fmt::Debug for IdentityPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityPublicKey({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_debug() {
        let key = IdentityKey::from_seed(&Secret32::from_bytes([9; 32]));
        let public = key.public_key();
        let sig = key.sign(b"msg");
        assert_eq!(public.verify(b"msg", &sig), Ok(()));
        assert_eq!(
            public.verify(b"msh", &sig),
            Err(IdentityError::BadSignature)
        );
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains("0909"));
        assert_eq!(IdentityPublicKey::from_hex(&public.to_hex()), Ok(public));
        // The identity point (y = 1) has small order.
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            IdentityPublicKey::from_bytes(&one),
            Err(IdentityError::WeakPublicKey)
        );
    }
}
