//! The sealed address of a networked contact setup (protocol.md 11.4).
//!
//! The accepting target seals its `HOST:PORT` to the caller's broker-keypair public key, so
//! neither home broker nor any relay can read where the target listens. Both sides use a fresh
//! X25519 pair per request ([`EphemeralSecret`]), dropped (and zeroized) once the address is
//! sealed or opened.

use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::aead::{self, XNONCE_LEN};
use crate::agreement::{AgreementError, EphemeralSecret, PUBLIC_KEY_LEN};
use crate::kdf;
use crate::secret::Secret32;

/// HKDF `info` prefix; the sender's and then the recipient's public key follow.
pub const INFO_PREFIX: &[u8] = b"micromsg/sealed-address/v1";

/// Why a sealed address could not be made or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// The other side's public key has low order.
    #[error(transparent)]
    Agreement(#[from] AgreementError),
    /// Shorter than a nonce and a tag.
    #[error("sealed address too short")]
    TooShort,
    /// The tag does not verify: wrong key, or the blob was altered.
    #[error("sealed address does not open (wrong key or altered)")]
    Rejected,
}

/// Seals `address` with the sender's secret to `recipient`, drawing the nonce from `rng`.
/// Returns `nonce || ciphertext || tag`, the bytes of `SEALED-ADDRESS`.
pub fn seal<R: CryptoRngCore + ?Sized>(
    sender: &EphemeralSecret,
    recipient: &[u8; PUBLIC_KEY_LEN],
    address: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill_bytes(&mut nonce);
    seal_with_nonce(sender, recipient, &nonce, address)
}

/// [`seal`] with a given nonce (for known-answer vectors).
pub fn seal_with_nonce(
    sender: &EphemeralSecret,
    recipient: &[u8; PUBLIC_KEY_LEN],
    nonce: &[u8; XNONCE_LEN],
    address: &[u8],
) -> Result<Vec<u8>, SealError> {
    let key = key(sender, &sender.public_key(), recipient, recipient)?;
    let mut out = Vec::with_capacity(XNONCE_LEN + address.len() + aead::TAG_LEN);
    out.extend_from_slice(nonce);
    aead::xseal_into(key.expose(), nonce, b"", address, &mut out)
        .map_err(|_| SealError::Rejected)?;
    Ok(out)
}

/// Opens `sealed` (`nonce || ciphertext || tag`) with the recipient's secret and the sender's
/// public key. The caller still checks that the plaintext is a valid address.
pub fn open(
    recipient: &EphemeralSecret,
    sender: &[u8; PUBLIC_KEY_LEN],
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    if sealed.len() < XNONCE_LEN + aead::TAG_LEN {
        return Err(SealError::TooShort);
    }
    let key = key(recipient, sender, &recipient.public_key(), sender)?;
    let (nonce, ct) = sealed.split_at(XNONCE_LEN);
    let nonce: &[u8; XNONCE_LEN] = nonce.try_into().map_err(|_| SealError::TooShort)?;
    aead::xopen(key.expose(), nonce, b"", ct).map_err(|_| SealError::Rejected)
}

/// `HKDF-SHA256(salt = empty, IKM = X25519(own, other), info = prefix || pk_s || pk_r)`.
fn key(
    own: &EphemeralSecret,
    pk_sender: &[u8; PUBLIC_KEY_LEN],
    pk_recipient: &[u8; PUBLIC_KEY_LEN],
    other: &[u8; PUBLIC_KEY_LEN],
) -> Result<Secret32, SealError> {
    let shared = own.diffie_hellman(other)?;
    let mut info = Vec::with_capacity(INFO_PREFIX.len() + 2 * PUBLIC_KEY_LEN);
    info.extend_from_slice(INFO_PREFIX);
    info.extend_from_slice(pk_sender);
    info.extend_from_slice(pk_recipient);
    let mut key = [0u8; 32];
    kdf::hkdf(b"", shared.expose(), &info, &mut key).map_err(|_| SealError::Rejected)?;
    Ok(Secret32::from_bytes(key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hex;

    fn pair(byte: u8) -> EphemeralSecret {
        EphemeralSecret::from_secret(&Secret32::from_bytes([byte; 32]))
    }

    /// protocol.md 15.2, "Sealed address".
    #[test]
    fn known_answer_vector() {
        let (sender, recipient) = (pair(0x06), pair(0x05));
        assert_eq!(
            hex::encode(&recipient.public_key()),
            "50a61409b1ddd0325e9b16b700e719e9772c07000b1bd7786e907c653d20495d"
        );
        let nonce: [u8; 24] = core::array::from_fn(|i| 0xc0 + i as u8);
        let sealed = seal_with_nonce(
            &sender,
            &recipient.public_key(),
            &nonce,
            b"203.0.113.7:7001",
        )
        .unwrap();
        assert_eq!(
            hex::encode(&sealed),
            "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d768e48fd725dc5f7bd4d632bf14adbb77\
             2a0c2c248ba7e6f2e7d16afd676c1682"
        );
        let opened = open(&recipient, &sender.public_key(), &sealed).unwrap();
        assert_eq!(opened, b"203.0.113.7:7001");
    }

    #[test]
    fn only_the_recipient_opens_and_any_change_is_refused() {
        let (sender, recipient, other) = (pair(1), pair(2), pair(3));
        let mut rng = rand_core::OsRng;
        let sealed = seal(&sender, &recipient.public_key(), b"10.0.0.1:9", &mut rng).unwrap();
        assert_eq!(
            open(&other, &sender.public_key(), &sealed),
            Err(SealError::Rejected)
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(
                open(&recipient, &sender.public_key(), &bad),
                Err(SealError::Rejected)
            );
        }
        assert_eq!(
            open(&recipient, &sender.public_key(), &sealed[..39]),
            Err(SealError::TooShort)
        );
        // A low-order public key (here: zero) is refused on both sides.
        assert!(matches!(
            seal(&sender, &[0; 32], b"x:1", &mut rng),
            Err(SealError::Agreement(_))
        ));
        assert!(matches!(
            open(&recipient, &[0; 32], &sealed),
            Err(SealError::Agreement(_))
        ));
    }
}
