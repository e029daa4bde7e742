//! Key synchronisation between the devices of one entity (protocol 13.4): what is shared, and
//! the three sealed forms it travels in.
//!
//! | form | carries | key | travels |
//! |---|---|---|---|
//! | `MMB1` backup blob | a [`KeyBundle`] | Argon2id(recovery secret, salt) | BACKUP-PUT / BACKUP-GET |
//! | `MML1` link transfer | a [`KeyBundle`] | HKDF(transfer key from `device add`) | SYNC-COPY, once, to a new device |
//! | `MMK1` session sync | one [`SharedSession`] | HKDF(identity seed) | SYNC-COPY after every handshake |
//!
//! The broker stores and forwards all three as opaque blobs and holds none of their keys: the
//! recovery secret and the transfer key never leave the user's devices (the transfer key is
//! printed next to the registration secret and typed on the new device), and the identity seed
//! is what the entity's devices share in the first place.
//!
//! Nothing here logs or prints key material; [`KeyBundle`]'s `Debug` shows counts only.

use std::collections::BTreeMap;
use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use micromsg_crypto::aead::{self, XNONCE_LEN};
use micromsg_crypto::{Secret32, kdf};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::p2p::StoredSession;
use crate::store::Contact;

/// Magic of the key backup blob (13.4).
pub const BACKUP_MAGIC: &[u8; 4] = b"MMB1";
/// Magic of a session sync item (13.4).
pub const SYNC_MAGIC: &[u8; 4] = b"MMK1";
/// Magic of a device link transfer (13.4).
pub const LINK_MAGIC: &[u8; 4] = b"MML1";
/// Argon2id salt length.
pub const SALT_LEN: usize = 16;
/// Argon2id memory in KiB (64 MiB).
pub const ARGON2_MEMORY_KIB: u32 = 65_536;
/// Argon2id passes.
pub const ARGON2_ITERATIONS: u32 = 3;
/// Argon2id lanes.
pub const ARGON2_PARALLELISM: u32 = 1;

const ENTITY_SYNC_LABEL: &[u8] = b"micromsg/entity-sync/v1";
const DEVICE_LINK_LABEL: &[u8] = b"micromsg/device-link/v1";
const BUNDLE_VERSION: u32 = 1;

/// Why sealed key material could not be made or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// Not this form (wrong magic or too short).
    #[error("not a {0} blob")]
    Malformed(&'static str),
    /// Authentication failed: a wrong recovery secret or transfer key, or a damaged blob.
    #[error("cannot open the {0}: wrong secret, or the data is damaged")]
    WrongKey(&'static str),
    /// The key derivation failed.
    #[error("key derivation: {0}")]
    Kdf(String),
    /// The plaintext is not what this client writes.
    #[error("unreadable {what}: {reason}")]
    Format {
        /// Which form.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The recovery secret is empty.
    #[error("the recovery secret is empty")]
    EmptySecret,
}

/// One session's keys as shared with the entity's other devices: they may open messages with
/// them (both directions) but never send with them (protocol 12.12).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedSession {
    /// The contact the session is with.
    pub peer: String,
    /// The device of this entity that set the session up (the only one that sends with it).
    pub device: u32,
    /// The keys and counters.
    pub session: StoredSession,
}

impl fmt::Debug for SharedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSession")
            .field("peer", &self.peer)
            .field("device", &self.device)
            .field("session", &self.session)
            .finish()
    }
}

/// Everything a new device of the entity needs: the identity key, the contacts with their
/// pinned keys, and the session keys for reading (the `MMB1` and `MML1` plaintext, as JSON).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBundle {
    /// Format version, 1.
    pub version: u32,
    /// The entity's number.
    pub number: String,
    /// The entity's Ed25519 identity seed, hex.
    pub identity_seed: String,
    /// Contacts with their pins.
    pub contacts: BTreeMap<String, Contact>,
    /// Session keys, newest per contact first.
    pub sessions: Vec<SharedSession>,
    /// When the bundle was made (Unix seconds).
    pub created: u64,
}

impl Drop for KeyBundle {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.identity_seed.zeroize();
    }
}

impl fmt::Debug for KeyBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBundle")
            .field("number", &self.number)
            .field("contacts", &self.contacts.len())
            .field("sessions", &self.sessions.len())
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl KeyBundle {
    /// A bundle of the given parts.
    pub fn new(
        number: &str,
        identity_seed: &Secret32,
        contacts: BTreeMap<String, Contact>,
        sessions: Vec<SharedSession>,
        created: u64,
    ) -> Self {
        Self {
            version: BUNDLE_VERSION,
            number: number.to_owned(),
            identity_seed: identity_seed.to_hex().to_string(),
            contacts,
            sessions,
            created,
        }
    }

    /// The identity seed.
    pub fn identity_seed(&self) -> Result<Secret32, KeysError> {
        Secret32::from_hex(&self.identity_seed).map_err(|e| KeysError::Format {
            what: "key bundle",
            reason: format!("identity_seed: {e}"),
        })
    }

    /// The JSON plaintext.
    pub fn to_json(&self) -> Result<Zeroizing<Vec<u8>>, KeysError> {
        serde_json::to_vec(self)
            .map(Zeroizing::new)
            .map_err(|e| KeysError::Format {
                what: "key bundle",
                reason: e.to_string(),
            })
    }

    /// Parses the JSON plaintext.
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeysError> {
        let bundle: Self = serde_json::from_slice(bytes).map_err(|e| KeysError::Format {
            what: "key bundle",
            reason: e.to_string(),
        })?;
        if bundle.version != BUNDLE_VERSION {
            return Err(KeysError::Format {
                what: "key bundle",
                reason: format!("unsupported version {}", bundle.version),
            });
        }
        Ok(bundle)
    }
}

/// Crockford's base32 alphabet: digits and upper-case letters without `I L O U`.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Characters of a generated recovery secret (200 bits), without separators.
const RECOVERY_CHARS: usize = 40;

/// A new recovery secret: 200 random bits as 40 characters of Crockford's base32, in 8 groups
/// of 5 (`7KQ2M-…`). It is read without ambiguity: case does not matter, `I` and `L` read as
/// `1`, `O` as `0`, and the hyphens and spaces may be left out ([`recovery_password`]).
pub fn new_recovery_secret() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; RECOVERY_CHARS]);
    OsRng.fill_bytes(&mut bytes[..]);
    let mut out = Zeroizing::new(String::with_capacity(RECOVERY_CHARS + 7));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 5 == 0 {
            out.push('-');
        }
        out.push(char::from(CROCKFORD[usize::from(b & 31)]));
    }
    out
}

/// The password a recovery secret gives Argon2id (protocol.md 13.4): when the secret, with
/// hyphens and white space left out, is 40 characters of Crockford's base32 (either case;
/// `i`/`l` read as `1`, `o` as `0`), those 40 characters in upper case with the look-alikes
/// replaced; any other secret (a passphrase the user chose) exactly as typed.
pub fn recovery_password(secret: &str) -> Zeroizing<String> {
    let mut canonical = Zeroizing::new(String::with_capacity(RECOVERY_CHARS));
    for c in secret.chars() {
        if c == '-' || c.is_whitespace() {
            continue;
        }
        let c = match c.to_ascii_uppercase() {
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        };
        if !c.is_ascii() || !CROCKFORD.contains(&(c as u8)) {
            return Zeroizing::new(secret.to_owned());
        }
        canonical.push(c);
    }
    if canonical.len() == RECOVERY_CHARS {
        canonical
    } else {
        Zeroizing::new(secret.to_owned())
    }
}

/// The backup key: Argon2id(recovery secret, salt), m = 64 MiB, t = 3, p = 1, 32 bytes.
pub fn backup_key(recovery: &str, salt: &[u8; SALT_LEN]) -> Result<Secret32, KeysError> {
    if recovery.is_empty() {
        return Err(KeysError::EmptySecret);
    }
    let params = Params::new(
        ARGON2_MEMORY_KIB,
        ARGON2_ITERATIONS,
        ARGON2_PARALLELISM,
        Some(32),
    )
    .map_err(|e| KeysError::Kdf(e.to_string()))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(recovery.as_bytes(), salt, &mut key[..])
        .map_err(|e| KeysError::Kdf(e.to_string()))?;
    Ok(Secret32::from_bytes(*key))
}

/// Seals `plaintext` as an `MMB1` blob with the given salt and nonce (tests and vectors); use
/// [`seal_backup`] otherwise.
pub fn seal_backup_with(
    recovery: &str,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; XNONCE_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, KeysError> {
    let key = backup_key(&recovery_password(recovery), salt)?;
    let mut aad = Vec::with_capacity(4 + SALT_LEN);
    aad.extend_from_slice(BACKUP_MAGIC);
    aad.extend_from_slice(salt);
    let mut blob = aad.clone();
    blob.extend_from_slice(nonce);
    aead::xseal_into(key.expose(), nonce, &aad, plaintext, &mut blob)
        .map_err(|_| KeysError::WrongKey("key backup"))?;
    Ok(blob)
}

/// Seals `plaintext` as an `MMB1` blob with a fresh random salt and nonce.
pub fn seal_backup(recovery: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeysError> {
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; XNONCE_LEN];
    OsRng.fill_bytes(&mut salt);
    OsRng.fill_bytes(&mut nonce);
    seal_backup_with(recovery, &salt, &nonce, plaintext)
}

/// Opens an `MMB1` blob.
pub fn open_backup(recovery: &str, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeysError> {
    let rest = blob
        .strip_prefix(BACKUP_MAGIC.as_slice())
        .ok_or(KeysError::Malformed("key backup (MMB1)"))?;
    if rest.len() < SALT_LEN + XNONCE_LEN + aead::TAG_LEN {
        return Err(KeysError::Malformed("key backup (MMB1)"));
    }
    let (salt, rest) = rest.split_at(SALT_LEN);
    let (nonce, ct) = rest.split_at(XNONCE_LEN);
    let salt: [u8; SALT_LEN] = core::array::from_fn(|i| salt[i]);
    let nonce: [u8; XNONCE_LEN] = core::array::from_fn(|i| nonce[i]);
    let aad = &blob[..4 + SALT_LEN];
    let password = recovery_password(recovery);
    let key = backup_key(&password, &salt)?;
    if let Ok(plain) = aead::xopen(key.expose(), &nonce, aad, ct) {
        return Ok(Zeroizing::new(plain));
    }
    // Secrets made before they were Crockford's base32 (lower case and `A`, `B`) were used as
    // typed: such a backup opens with the secret exactly as it was shown.
    if *password != recovery {
        let key = backup_key(recovery, &salt)?;
        if let Ok(plain) = aead::xopen(key.expose(), &nonce, aad, ct) {
            return Ok(Zeroizing::new(plain));
        }
    }
    Err(KeysError::WrongKey("key backup"))
}

/// The entity sync key: HKDF-SHA256(salt = empty, IKM = identity seed,
/// info = "micromsg/entity-sync/v1"). Every device holding the identity key has it.
pub fn entity_sync_key(identity_seed: &Secret32) -> Secret32 {
    let prk = kdf::extract(&[], identity_seed.expose());
    kdf::expand_secret(&prk, ENTITY_SYNC_LABEL)
}

/// The link transfer key: HKDF-SHA256(salt = empty, IKM = transfer key,
/// info = "micromsg/device-link/v1").
pub fn link_key(transfer_key: &Secret32) -> Secret32 {
    let prk = kdf::extract(&[], transfer_key.expose());
    kdf::expand_secret(&prk, DEVICE_LINK_LABEL)
}

fn seal_x(
    magic: &[u8; 4],
    key: &Secret32,
    aad_extra: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, KeysError> {
    let mut nonce = [0u8; XNONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let mut aad = magic.to_vec();
    aad.extend_from_slice(aad_extra);
    let mut out = magic.to_vec();
    out.extend_from_slice(&nonce);
    aead::xseal_into(key.expose(), &nonce, &aad, plaintext, &mut out)
        .map_err(|_| KeysError::WrongKey("sync item"))?;
    Ok(out)
}

fn open_x(
    magic: &[u8; 4],
    what: &'static str,
    key: &Secret32,
    aad_extra: &[u8],
    blob: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeysError> {
    let rest = blob
        .strip_prefix(magic.as_slice())
        .ok_or(KeysError::Malformed(what))?;
    if rest.len() < XNONCE_LEN + aead::TAG_LEN {
        return Err(KeysError::Malformed(what));
    }
    let (nonce, ct) = rest.split_at(XNONCE_LEN);
    let nonce: [u8; XNONCE_LEN] = core::array::from_fn(|i| nonce[i]);
    let mut aad = magic.to_vec();
    aad.extend_from_slice(aad_extra);
    aead::xopen(key.expose(), &nonce, &aad, ct)
        .map(Zeroizing::new)
        .map_err(|_| KeysError::WrongKey(what))
}

/// Seals one session for the entity's other devices: `"MMK1" || nonce(24) ||
/// XChaCha20-Poly1305(entity sync key, nonce, aad = "MMK1", JSON)`.
pub fn seal_session_sync(
    identity_seed: &Secret32,
    shared: &SharedSession,
) -> Result<Vec<u8>, KeysError> {
    let json = Zeroizing::new(serde_json::to_vec(shared).map_err(|e| KeysError::Format {
        what: "session sync item",
        reason: e.to_string(),
    })?);
    seal_x(SYNC_MAGIC, &entity_sync_key(identity_seed), &[], &json)
}

/// Opens an `MMK1` item.
pub fn open_session_sync(
    identity_seed: &Secret32,
    blob: &[u8],
) -> Result<SharedSession, KeysError> {
    let json = open_x(
        SYNC_MAGIC,
        "session sync item (MMK1)",
        &entity_sync_key(identity_seed),
        &[],
        blob,
    )?;
    serde_json::from_slice(&json).map_err(|e| KeysError::Format {
        what: "session sync item",
        reason: e.to_string(),
    })
}

/// Seals a bundle for the new device `device`: `"MML1" || nonce(24) ||
/// XChaCha20-Poly1305(link key, nonce, aad = "MML1" || u32be(device), JSON)`.
pub fn seal_link(
    transfer_key: &Secret32,
    device: u32,
    bundle: &KeyBundle,
) -> Result<Vec<u8>, KeysError> {
    let json = bundle.to_json()?;
    seal_x(
        LINK_MAGIC,
        &link_key(transfer_key),
        &device.to_be_bytes(),
        &json,
    )
}

/// Opens an `MML1` transfer addressed to `device`.
pub fn open_link(
    transfer_key: &Secret32,
    device: u32,
    blob: &[u8],
) -> Result<KeyBundle, KeysError> {
    let json = open_x(
        LINK_MAGIC,
        "device link transfer (MML1)",
        &link_key(transfer_key),
        &device.to_be_bytes(),
        blob,
    )?;
    KeyBundle::from_json(&json)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use micromsg_crypto::hex;

    /// The vector of protocol.md 15.2.
    #[test]
    fn backup_blob_matches_the_protocol_vector() {
        let salt: [u8; 16] = core::array::from_fn(|i| 0x10 + i as u8);
        let nonce: [u8; 24] = core::array::from_fn(|i| 0x20 + i as u8);
        let key = backup_key("correct horse battery staple", &salt).unwrap();
        assert_eq!(
            hex::encode(key.expose()),
            "1a563099620be88a73c7bd53da0b313e98060493b58ba22254a065c3d7db26c3"
        );
        let blob = seal_backup_with(
            "correct horse battery staple",
            &salt,
            &nonce,
            b"MicroMsg key backup example",
        )
        .unwrap();
        assert_eq!(
            hex::encode(&blob),
            "4d4d4231101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233343536371eed1e48000b1920f96368f303dc2f7eed5a665afb8e12e3aa19724d81d392e4dc72bf55abf13af98f9994"
        );
        let opened = open_backup("correct horse battery staple", &blob).unwrap();
        assert_eq!(&opened[..], b"MicroMsg key backup example");
        assert!(matches!(
            open_backup("wrong", &blob),
            Err(KeysError::WrongKey(_))
        ));
        let mut damaged = blob.clone();
        damaged[50] ^= 1;
        assert!(open_backup("correct horse battery staple", &damaged).is_err());
        assert!(matches!(
            open_backup("x", b"MMB0"),
            Err(KeysError::Malformed(_))
        ));
    }

    #[test]
    fn recovery_secrets_are_long_and_distinct() {
        let a = new_recovery_secret();
        let b = new_recovery_secret();
        assert_eq!(a.len(), 47);
        assert_eq!(a.matches('-').count(), 7);
        assert!(
            a.chars()
                .all(|c| c == '-' || CROCKFORD.contains(&(c as u8))),
            "{}",
            *a
        );
        assert_ne!(*a, *b);
    }

    #[test]
    fn a_recovery_secret_reads_the_same_however_it_is_typed() {
        let secret = "7KQ2M-0A1BC-DEFGH-JKMNP-QRSTV-WXYZ3-45678-9ABCD";
        let want = "7KQ2M0A1BCDEFGHJKMNPQRSTVWXYZ3456789ABCD";
        for typed in [
            secret,
            &secret.to_lowercase(),
            &secret.replace('-', ""),
            &secret.replace('-', " ").to_lowercase(),
            // The look-alikes: o for 0, i and l for 1.
            "7kq2m-oaibc-defgh-jkmnp-qrstv-wxyz3-45678-9abcd",
            "7KQ2M-OALBC-DEFGH-JKMNP-QRSTV-WXYZ3-45678-9ABCD",
        ] {
            assert_eq!(*recovery_password(typed), want, "{typed}");
        }
        // A passphrase the user chose is used as typed (the vectors in protocol.md).
        for own in ["correct horse battery staple", "short", "7KQ2M-0A1BC"] {
            assert_eq!(*recovery_password(own), own);
        }
    }

    #[test]
    fn a_backup_opens_with_the_secret_in_any_case_and_with_a_legacy_secret_as_typed() {
        let secret = new_recovery_secret();
        let blob = seal_backup(&secret, b"keys").unwrap();
        let lower = secret.to_lowercase().replace('-', "");
        assert_eq!(&open_backup(&lower, &blob).unwrap()[..], b"keys");
        // Before Crockford: lower case plus A and B, used as typed.
        let legacy = "abcde-fghjk-mnpqr-stvwx-yz234-56789-ABaaa-bbbbb";
        let salt = [1u8; SALT_LEN];
        let nonce = [2u8; XNONCE_LEN];
        let key = backup_key(legacy, &salt).unwrap();
        let mut aad = BACKUP_MAGIC.to_vec();
        aad.extend_from_slice(&salt);
        let mut old = aad.clone();
        old.extend_from_slice(&nonce);
        aead::xseal_into(key.expose(), &nonce, &aad, b"old keys", &mut old).unwrap();
        assert_eq!(&open_backup(legacy, &old).unwrap()[..], b"old keys");
        assert!(matches!(
            open_backup(&lower, &old),
            Err(KeysError::WrongKey(_))
        ));
    }

    #[test]
    fn link_and_sync_items_open_only_with_their_keys() {
        let seed = Secret32::from_bytes([9; 32]);
        let bundle = KeyBundle::new("5550001", &seed, BTreeMap::new(), Vec::new(), 5);
        let transfer = Secret32::from_bytes([4; 32]);
        let blob = seal_link(&transfer, 2, &bundle).unwrap();
        assert_eq!(&blob[..4], LINK_MAGIC);
        let back = open_link(&transfer, 2, &blob).unwrap();
        assert_eq!(back.identity_seed().unwrap(), seed);
        assert!(
            open_link(&transfer, 3, &blob).is_err(),
            "bound to the device"
        );
        assert!(open_link(&Secret32::from_bytes([5; 32]), 2, &blob).is_err());
        assert!(!format!("{back:?}").contains("0909"));
    }
}
