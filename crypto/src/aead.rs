//! ChaCha20-Poly1305 (RFC 8439) and XChaCha20-Poly1305 seal/open wrappers.
//!
//! Keys and nonces are fixed-size arrays, so a wrong-sized nonce cannot be expressed. The
//! `*_into` functions append to a caller's `Vec` so a long-lived buffer can be reused for every
//! message; the `*_in_place_detached` functions work on a slice with a separate tag.
//!
//! ChaCha20-Poly1305 runs on `ring` (already in the tree through rustls), whose assembly seals
//! and opens large messages 1.25 to 1.9 times faster per core than the RustCrypto crate on this
//! project's machines (docs/performance.md). The `chacha20poly1305` crate, the design's choice,
//! stays for XChaCha20-Poly1305 (which `ring` does not have) and as the cross-check: the tests
//! below compare the two on every RFC vector and on random inputs, byte for byte.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::consts::U16;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce as RingNonce, UnboundKey};
use thiserror::Error;

/// Key length of both AEADs.
pub const KEY_LEN: usize = 32;
/// Nonce length of ChaCha20-Poly1305.
pub const NONCE_LEN: usize = 12;
/// Nonce length of XChaCha20-Poly1305.
pub const XNONCE_LEN: usize = 24;
/// Length of the Poly1305 tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// Errors of the AEAD wrappers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AeadError {
    /// The ciphertext, the tag or the associated data were altered, or the key is wrong.
    #[error("authentication failed")]
    Authentication,
    /// The sealed input is shorter than a tag.
    #[error("ciphertext shorter than the {TAG_LEN}-byte tag")]
    TooShort,
    /// The plaintext exceeds the cipher's limit (about 256 GiB).
    #[error("plaintext too long for the cipher")]
    TooLong,
}

fn seal_detached<C: AeadInPlace<TagSize = U16>>(
    cipher: &C,
    nonce: &chacha20poly1305::aead::Nonce<C>,
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadError> {
    let tag = cipher
        .encrypt_in_place_detached(nonce, aad, buf)
        .map_err(|_| AeadError::TooLong)?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&tag);
    Ok(out)
}

fn open_detached<C: AeadInPlace<TagSize = U16>>(
    cipher: &C,
    nonce: &chacha20poly1305::aead::Nonce<C>,
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadError> {
    cipher
        .decrypt_in_place_detached(nonce, aad, buf, Tag::from_slice(tag))
        .map_err(|_| AeadError::Authentication)
}

/// Appends `plaintext` to `out`, seals it there with `seal_in_place` and appends the tag;
/// `out` is left as it was on error. Shared by both ciphers.
fn append_sealed(
    plaintext: &[u8],
    out: &mut Vec<u8>,
    seal_in_place: impl FnOnce(&mut [u8]) -> Result<[u8; TAG_LEN], AeadError>,
) -> Result<(), AeadError> {
    let start = out.len();
    out.reserve(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    match seal_in_place(&mut out[start..]) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Splits `sealed = ciphertext || tag`, appends the ciphertext to `out` and opens it there
/// with `open_in_place`; nothing is appended on error. Shared by both ciphers.
fn append_opened(
    sealed: &[u8],
    out: &mut Vec<u8>,
    open_in_place: impl FnOnce(&mut [u8], &[u8; TAG_LEN]) -> Result<(), AeadError>,
) -> Result<(), AeadError> {
    let Some(ct_len) = sealed.len().checked_sub(TAG_LEN) else {
        return Err(AeadError::TooShort);
    };
    let (ct, tag) = sealed.split_at(ct_len);
    let tag: [u8; TAG_LEN] = core::array::from_fn(|i| tag[i]);
    let start = out.len();
    out.extend_from_slice(ct);
    let result = open_in_place(&mut out[start..], &tag);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// The `ring` key for `key`. A 32-byte key is always a valid ChaCha20-Poly1305 key, so the
/// error is never taken; it maps to `or` rather than a panic.
fn ring_key(key: &[u8; KEY_LEN], or: AeadError) -> Result<LessSafeKey, AeadError> {
    UnboundKey::new(&CHACHA20_POLY1305, key)
        .map(LessSafeKey::new)
        .map_err(|_| or)
}

/// ChaCha20-Poly1305: appends `ciphertext || tag` to `out`. `out` is left as it was on error.
pub fn seal_into(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), AeadError> {
    append_sealed(plaintext, out, |buf| {
        seal_in_place_detached(key, nonce, aad, buf)
    })
}

/// ChaCha20-Poly1305: returns `ciphertext || tag`.
pub fn seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, AeadError> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    seal_into(key, nonce, aad, plaintext, &mut out)?;
    Ok(out)
}

/// ChaCha20-Poly1305: checks `sealed = ciphertext || tag` and appends the plaintext to `out`.
/// Nothing is appended on error.
pub fn open_into(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), AeadError> {
    append_opened(sealed, out, |buf, tag| {
        open_in_place_detached(key, nonce, aad, buf, tag)
    })
}

/// ChaCha20-Poly1305: checks `sealed = ciphertext || tag` and returns the plaintext.
pub fn open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, AeadError> {
    let mut out = Vec::with_capacity(sealed.len().saturating_sub(TAG_LEN));
    open_into(key, nonce, aad, sealed, &mut out)?;
    Ok(out)
}

/// ChaCha20-Poly1305: encrypts `buf` in place and returns the tag.
pub fn seal_in_place_detached(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadError> {
    let tag = ring_key(key, AeadError::TooLong)?
        .seal_in_place_separate_tag(
            RingNonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            buf,
        )
        .map_err(|_| AeadError::TooLong)?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    Ok(out)
}

/// ChaCha20-Poly1305: checks `tag` and decrypts `buf` in place. On error `buf` holds no
/// plaintext: it is zeroed (`ring` authenticates while it decrypts, and wipes what it
/// decrypted when the tag does not match).
pub fn open_in_place_detached(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadError> {
    let tag = ring::aead::Tag::from(*tag);
    ring_key(key, AeadError::Authentication)?
        .open_in_place_separate_tag(
            RingNonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            tag,
            buf,
            0..,
        )
        .map(|_| ())
        .map_err(|_| AeadError::Authentication)
}

/// XChaCha20-Poly1305: appends `ciphertext || tag` to `out`. The 24-byte nonce is long enough to
/// be drawn at random.
pub fn xseal_into(
    key: &[u8; KEY_LEN],
    nonce: &[u8; XNONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), AeadError> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    append_sealed(plaintext, out, |buf| {
        seal_detached(&cipher, XNonce::from_slice(nonce), aad, buf)
    })
}

/// XChaCha20-Poly1305: returns `ciphertext || tag`.
pub fn xseal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; XNONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, AeadError> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    xseal_into(key, nonce, aad, plaintext, &mut out)?;
    Ok(out)
}

/// XChaCha20-Poly1305: checks `sealed` and appends the plaintext to `out` (nothing on error).
pub fn xopen_into(
    key: &[u8; KEY_LEN],
    nonce: &[u8; XNONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), AeadError> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    append_opened(sealed, out, |buf, tag| {
        open_detached(&cipher, XNonce::from_slice(nonce), aad, buf, tag)
    })
}

/// XChaCha20-Poly1305: checks `sealed` and returns the plaintext.
pub fn xopen(
    key: &[u8; KEY_LEN],
    nonce: &[u8; XNONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, AeadError> {
    let mut out = Vec::with_capacity(sealed.len().saturating_sub(TAG_LEN));
    xopen_into(key, nonce, aad, sealed, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_failure_leaves_buffer() {
        let key = [1u8; KEY_LEN];
        let nonce = [2u8; NONCE_LEN];
        let sealed = seal(&key, &nonce, b"aad", b"hello").unwrap_or_default();
        assert_eq!(sealed.len(), 5 + TAG_LEN);
        assert_eq!(open(&key, &nonce, b"aad", &sealed), Ok(b"hello".to_vec()));
        let mut out = b"keep".to_vec();
        assert_eq!(
            open_into(&key, &nonce, b"other", &sealed, &mut out),
            Err(AeadError::Authentication)
        );
        assert_eq!(out, b"keep");
        assert_eq!(
            open(&key, &nonce, b"", &[0u8; 15]),
            Err(AeadError::TooShort)
        );

        let xnonce = [3u8; XNONCE_LEN];
        let xs = xseal(&key, &xnonce, b"", b"x").unwrap_or_default();
        assert_eq!(xopen(&key, &xnonce, b"", &xs), Ok(b"x".to_vec()));
    }

    /// The design's `chacha20poly1305` crate, sealing `plaintext` as the reference.
    fn reference_seal(
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Vec<u8> {
        use chacha20poly1305::aead::Aead;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(Key::from_slice(key));
        cipher
            .encrypt(
                chacha20poly1305::Nonce::from_slice(nonce),
                chacha20poly1305::aead::Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .unwrap_or_default()
    }

    proptest::proptest! {
        /// `ring` (the hot path) and the `chacha20poly1305` crate agree byte for byte, and each
        /// opens what the other sealed; lengths cross the 64-byte block and the 16-byte
        /// Poly1305 block boundaries.
        #[test]
        fn ring_and_the_reference_crate_agree(
            key in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            nonce in proptest::array::uniform12(proptest::prelude::any::<u8>()),
            aad in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            plaintext in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1100),
        ) {
            let ours = seal(&key, &nonce, &aad, &plaintext).unwrap_or_default();
            let reference = reference_seal(&key, &nonce, &aad, &plaintext);
            proptest::prop_assert_eq!(&ours, &reference);
            proptest::prop_assert_eq!(open(&key, &nonce, &aad, &reference), Ok(plaintext.clone()));
            let mut buf = plaintext.clone();
            let tag = seal_in_place_detached(&key, &nonce, &aad, &mut buf).unwrap_or_default();
            proptest::prop_assert_eq!(&[&buf[..], &tag[..]].concat(), &reference);
            proptest::prop_assert_eq!(open_in_place_detached(&key, &nonce, &aad, &mut buf, &tag), Ok(()));
            proptest::prop_assert_eq!(&buf, &plaintext);
        }
    }

    #[test]
    fn ring_and_the_reference_crate_agree_on_64_kib() {
        let key = [7u8; KEY_LEN];
        let nonce = [9u8; NONCE_LEN];
        let plaintext: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let ours = seal(&key, &nonce, b"header", &plaintext).unwrap_or_default();
        assert_eq!(ours, reference_seal(&key, &nonce, b"header", &plaintext));
        // A flipped bit anywhere is refused, and the buffer holds no plaintext afterwards.
        let mut tampered = ours.clone();
        tampered[30_000] ^= 1;
        let (body, tag) = tampered.split_at_mut(plaintext.len());
        let tag: [u8; TAG_LEN] = core::array::from_fn(|i| tag[i]);
        assert_eq!(
            open_in_place_detached(&key, &nonce, b"header", body, &tag),
            Err(AeadError::Authentication)
        );
        assert!(body.iter().all(|&b| b == 0));
    }
}
