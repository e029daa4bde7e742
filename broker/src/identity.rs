//! The broker's long-term Ed25519 identity key: it signs BROKER-INFO so a client can check
//! later what the broker promised. Kept in `DATA_DIR/identity.key` (hex seed, mode 0600),
//! created on first start.

use std::path::Path;

use micromsg_crypto::Secret32;
use micromsg_crypto::identity::IdentityKey;
use rand_core::OsRng;

use crate::tls::{TlsError, write_file};

/// Loads the identity key from `path`, or creates it there.
pub fn load_or_create(path: &Path) -> Result<IdentityKey, TlsError> {
    if path.exists() {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            TlsError::Io {
                path: path.to_owned(),
                source,
            }
        })?);
        let seed = Secret32::from_hex(text.trim()).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a 64-digit hex identity seed: {e}"),
        })?;
        return Ok(IdentityKey::from_seed(&seed));
    }
    let key = IdentityKey::generate(&mut OsRng);
    let mut text = key.seed().to_hex();
    text.push('\n');
    write_file(path, text.as_bytes(), true)?;
    Ok(key)
}
