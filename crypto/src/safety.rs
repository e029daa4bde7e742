//! Safety numbers: a fingerprint of both parties' numbers and identity keys that two people
//! compare out of band (read aloud or side by side) to rule out a key substitution.
//!
//! ```text
//! order the parties by (number, key) bytewise ascending
//! digest = SHA-512("micromsg/safety/v1" || u8 len(num_a) || num_a || id_a || u8 len(num_b) || num_b || id_b)
//! 12 groups: u40be(digest[5g..5g+5]) mod 100000, five digits each, separated by one space
//! ```

use core::fmt::Write as _;

use sha2::{Digest, Sha512};
use thiserror::Error;

use crate::identity::IdentityPublicKey;
use crate::nonce::is_valid_number;

const LABEL: &[u8] = b"micromsg/safety/v1";
/// Number of five-digit groups.
pub const GROUPS: usize = 12;

/// Errors of the safety number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SafetyError {
    /// A number is empty, longer than 255 bytes, or not all ASCII digits.
    #[error("number must be 1..=255 ASCII digits")]
    InvalidNumber,
}

/// One party: its number and identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party<'a> {
    /// The entity number, ASCII digits.
    pub number: &'a str,
    /// The identity key.
    pub identity: &'a IdentityPublicKey,
}

impl Party<'_> {
    fn sort_key(&self) -> (&[u8], &[u8; 32]) {
        (self.number.as_bytes(), self.identity.as_bytes())
    }
}

/// The safety number of two parties, the same whichever order they are given in:
/// 12 groups of 5 digits, e.g. `"01234 56789 ..."`.
pub fn safety_number(a: Party<'_>, b: Party<'_>) -> Result<String, SafetyError> {
    if !is_valid_number(a.number) || !is_valid_number(b.number) {
        return Err(SafetyError::InvalidNumber);
    }
    let (first, second) = if a.sort_key() <= b.sort_key() {
        (a, b)
    } else {
        (b, a)
    };
    let mut h = Sha512::new();
    h.update(LABEL);
    for p in [first, second] {
        h.update([p.number.len() as u8]); // checked <= 255 above
        h.update(p.number.as_bytes());
        h.update(p.identity.as_bytes());
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(GROUPS * 6 - 1);
    for (g, chunk) in digest.chunks_exact(5).take(GROUPS).enumerate() {
        let value = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)) % 100_000;
        if g > 0 {
            out.push(' ');
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "{value:05}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKey;
    use crate::secret::Secret32;

    #[test]
    fn symmetric_and_shaped() {
        let ka = IdentityKey::from_seed(&Secret32::from_bytes([1; 32])).public_key();
        let kb = IdentityKey::from_seed(&Secret32::from_bytes([2; 32])).public_key();
        let a = Party {
            number: "5550001234",
            identity: &ka,
        };
        let b = Party {
            number: "5550009876",
            identity: &kb,
        };
        let ab = safety_number(a, b);
        assert_eq!(ab, safety_number(b, a));
        let Ok(ab) = ab else { panic!("{ab:?}") };
        assert_eq!(ab.len(), 71);
        assert!(ab.split(' ').all(|g| g.len() == 5));
        let same_number = Party {
            number: "5550001234",
            identity: &kb,
        };
        assert_eq!(safety_number(a, same_number), safety_number(same_number, a));
        let bad = Party {
            number: "",
            identity: &ka,
        };
        assert_eq!(safety_number(a, bad), Err(SafetyError::InvalidNumber));
    }
}
