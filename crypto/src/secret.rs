//! [`Secret32`]: the one container for 32-byte secrets (client and server secrets, connect
//! tokens, PRKs, derived keys, shared secrets).
//!
//! It zeroizes on drop, never prints its bytes, and compares in constant time, so a secret can
//! be passed around, logged by accident and checked without leaking.

use core::fmt;

use rand_core::CryptoRngCore;
use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::hex::{self, HexError};

/// Length in bytes of a [`Secret32`].
pub const SECRET_LEN: usize = 32;

/// 32 secret bytes: zeroized on drop, redacted in `Debug`, compared in constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; SECRET_LEN]);

impl Secret32 {
    /// Wraps `bytes`. The caller's copy is not wiped; prefer [`Secret32::from_slice`] or
    /// [`Secret32::generate`] when the source is a buffer you still own.
    pub const fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// Copies a secret out of a slice, which must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut out = [0u8; SECRET_LEN];
        if bytes.len() != SECRET_LEN {
            return None;
        }
        out.copy_from_slice(bytes);
        Some(Self(out))
    }

    /// Draws a fresh secret from `rng` (the caller passes `OsRng` in production).
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        let mut out = Self([0u8; SECRET_LEN]);
        rng.fill_bytes(&mut out.0);
        out
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self, HexError> {
        let mut out = Self([0u8; SECRET_LEN]);
        hex::decode_to_slice(s, &mut out.0)?;
        Ok(out)
    }

    /// The lowercase hex form, in a buffer that is wiped when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(2 * SECRET_LEN));
        hex::encode_into(&self.0, &mut out);
        out
    }

    /// The secret bytes. Named so that every use is easy to find in review.
    pub fn expose(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// All zero, to be filled in place by this crate's derivations (no stray copies).
    pub(crate) const fn zero() -> Self {
        Self([0u8; SECRET_LEN])
    }

    /// Mutable access for in-place derivation inside this crate.
    pub(crate) fn expose_mut(&mut self) -> &mut [u8; SECRET_LEN] {
        &mut self.0
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

impl ConstantTimeEq for Secret32 {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for Secret32 {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for Secret32 {}

impl From<[u8; SECRET_LEN]> for Secret32 {
    fn from(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let s = Secret32::from_bytes([0xab; 32]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn hex_round_trip_and_eq() {
        let s = Secret32::from_bytes(core::array::from_fn(|i| i as u8));
        let h = s.to_hex();
        assert_eq!(&h[..6], "000102");
        assert_eq!(Secret32::from_hex(&h), Ok(s.clone()));
        assert_ne!(s, Secret32::from_bytes([0; 32]));
        assert!(Secret32::from_hex("00").is_err());
        assert!(Secret32::from_slice(&[0; 31]).is_none());
    }
}
