//! Hashing, HMAC-SHA256 and HKDF-SHA256 (RFC 5869) wrappers.
//!
//! The wrappers take byte slices and write into caller buffers, so the hot path (one
//! [`expand_multi`] per message) allocates nothing. Invalid lengths are errors, never panics.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::secret::Secret32;

/// Output length of SHA-256 and HMAC-SHA256.
pub const HASH_LEN: usize = 32;
/// Largest HKDF-SHA256 output, 255 blocks (RFC 5869 §2.3).
pub const MAX_OKM_LEN: usize = 255 * HASH_LEN;
/// Shortest truncated HMAC tag [`hmac_sha256_verify`] accepts: half the output, the floor that
/// RFC 2104 §5 recommends.
pub const MIN_TAG_LEN: usize = HASH_LEN / 2;

/// Errors of the key-derivation and MAC wrappers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KdfError {
    /// HKDF-Expand was asked for more than [`MAX_OKM_LEN`] bytes.
    #[error("HKDF output length {0} exceeds {MAX_OKM_LEN}")]
    OutputTooLong(usize),
    /// A PRK shorter than the hash output was given to HKDF-Expand.
    #[error("HKDF PRK of {0} bytes is shorter than {HASH_LEN}")]
    PrkTooShort(usize),
    /// An HMAC tag is shorter than [`MIN_TAG_LEN`] or longer than [`HASH_LEN`].
    #[error("HMAC tag length {0} is outside {MIN_TAG_LEN}..={HASH_LEN}")]
    InvalidTagLength(usize),
    /// An HMAC tag does not match.
    #[error("HMAC tag mismatch")]
    TagMismatch,
}

/// SHA-256 over the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hmac_keyed(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of every length (long keys are hashed, RFC 2104 §2), so this cannot fail.
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// HMAC-SHA256(key, concatenation of `parts`).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut mac = hmac_keyed(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Checks an HMAC-SHA256 tag in constant time. `tag` may be truncated (its leftmost bytes,
/// RFC 2104 §5) down to [`MIN_TAG_LEN`] bytes.
pub fn hmac_sha256_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> Result<(), KdfError> {
    if !(MIN_TAG_LEN..=HASH_LEN).contains(&tag.len()) {
        return Err(KdfError::InvalidTagLength(tag.len()));
    }
    let mut mac = hmac_keyed(key);
    for p in parts {
        mac.update(p);
    }
    mac.verify_truncated_left(tag)
        .map_err(|_| KdfError::TagMismatch)
}

/// HKDF-Extract(salt, ikm). An empty salt means 32 zero bytes (RFC 5869 §2.2).
pub fn extract(salt: &[u8], ikm: &[u8]) -> Secret32 {
    extract_multi(salt, &[ikm])
}

/// HKDF-Extract with the IKM given as the concatenation of `ikm_parts`, so secrets need not be
/// copied into a temporary buffer first.
pub fn extract_multi(salt: &[u8], ikm_parts: &[&[u8]]) -> Secret32 {
    // Extract is one HMAC keyed by the salt; the `hkdf` crate would need a contiguous IKM.
    Secret32::from_bytes(hmac_sha256(salt, ikm_parts))
}

/// HKDF-Expand(prk, info, out.len()) into `out`.
pub fn expand(prk: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), KdfError> {
    expand_multi(prk, &[info], out)
}

/// HKDF-Expand with `info` given as the concatenation of `info_parts` (no allocation).
pub fn expand_multi(prk: &[u8], info_parts: &[&[u8]], out: &mut [u8]) -> Result<(), KdfError> {
    if out.len() > MAX_OKM_LEN {
        return Err(KdfError::OutputTooLong(out.len()));
    }
    let hk = Hkdf::<Sha256>::from_prk(prk).map_err(|_| KdfError::PrkTooShort(prk.len()))?;
    hk.expand_multi_info(info_parts, out)
        .map_err(|_| KdfError::OutputTooLong(out.len()))
}

/// HKDF-Expand of exactly 32 bytes into a [`Secret32`].
pub fn expand_secret(prk: &Secret32, info: &[u8]) -> Secret32 {
    let mut out = Secret32::zero();
    // A 32-byte PRK and a 32-byte output are always within HKDF's limits.
    if expand(prk.expose(), info, out.expose_mut()).is_err() {
        unreachable!("32-byte HKDF expand from a 32-byte PRK cannot fail");
    }
    out
}

/// Full HKDF (extract then expand) into `out`.
pub fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), KdfError> {
    let prk = extract(salt, ikm);
    expand(prk.expose(), info, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_lengths() {
        let mut big = vec![0u8; MAX_OKM_LEN + 1];
        assert_eq!(
            expand(&[0u8; 32], b"", &mut big),
            Err(KdfError::OutputTooLong(MAX_OKM_LEN + 1))
        );
        assert_eq!(
            expand(&[0u8; 31], b"", &mut [0u8; 4]),
            Err(KdfError::PrkTooShort(31))
        );
        let mut max = vec![0u8; MAX_OKM_LEN];
        assert_eq!(expand(&[0u8; 32], b"", &mut max), Ok(()));
        assert_eq!(
            hmac_sha256_verify(b"k", &[b"m"], &[0u8; 15]),
            Err(KdfError::InvalidTagLength(15))
        );
    }

    #[test]
    fn multi_part_matches_contiguous() {
        let tag = hmac_sha256(b"key", &[b"ab", b"cd"]);
        assert_eq!(tag, hmac_sha256(b"key", &[b"abcd"]));
        assert_eq!(hmac_sha256_verify(b"key", &[b"abcd"], &tag[..16]), Ok(()));
        let mut a = [0u8; 44];
        let mut b = [0u8; 44];
        assert_eq!(expand_multi(&[7u8; 32], &[b"x", b"yz"], &mut a), Ok(()));
        assert_eq!(expand(&[7u8; 32], b"xyz", &mut b), Ok(()));
        assert_eq!(a, b);
    }
}
