//! Generic HOTP (RFC 4226) and TOTP (RFC 6238) core.
//!
//! The login nonce ([`crate::nonce`]) uses only [`time_step`]; the code generator is here so the
//! time arithmetic is tested against the RFC 6238 Appendix B vectors.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use thiserror::Error;

/// Hash function under the HMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC-SHA1, the RFC 4226 default.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

/// Fewest digits a code may have (RFC 4226 §5.3 requires at least 6).
pub const MIN_DIGITS: u32 = 6;
/// Most digits a code may have; the 31-bit truncated value has at most 10.
pub const MAX_DIGITS: u32 = 10;

/// Errors of the TOTP core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TotpError {
    /// The step length is zero.
    #[error("TOTP step must be at least one second")]
    ZeroStep,
    /// The time is before the epoch `t0`.
    #[error("time {unix} is before the TOTP epoch {t0}")]
    BeforeEpoch {
        /// The time given.
        unix: u64,
        /// The epoch.
        t0: u64,
    },
    /// The number of digits is outside [`MIN_DIGITS`]..=[`MAX_DIGITS`].
    #[error("TOTP digits {0} outside {MIN_DIGITS}..={MAX_DIGITS}")]
    InvalidDigits(u32),
}

/// floor((unix - t0) / step).
pub fn time_step(unix_secs: u64, t0: u64, step_secs: u64) -> Result<u64, TotpError> {
    if step_secs == 0 {
        return Err(TotpError::ZeroStep);
    }
    let since = unix_secs.checked_sub(t0).ok_or(TotpError::BeforeEpoch {
        unix: unix_secs,
        t0,
    })?;
    Ok(since / step_secs)
}

fn mac<M: Mac + hmac::digest::KeyInit>(key: &[u8], counter: u64, out: &mut [u8; 64]) -> usize {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let Ok(mut m) = <M as Mac>::new_from_slice(key) else {
        unreachable!("HMAC takes keys of any length")
    };
    m.update(&counter.to_be_bytes());
    let tag = m.finalize().into_bytes();
    out[..tag.len()].copy_from_slice(&tag);
    tag.len()
}

/// RFC 4226 HOTP: dynamic truncation of HMAC-`alg`(key, u64be(counter)), mod 10^digits.
pub fn hotp(alg: Algorithm, key: &[u8], counter: u64, digits: u32) -> Result<u64, TotpError> {
    if !(MIN_DIGITS..=MAX_DIGITS).contains(&digits) {
        return Err(TotpError::InvalidDigits(digits));
    }
    let mut buf = [0u8; 64];
    let len = match alg {
        Algorithm::Sha1 => mac::<Hmac<Sha1>>(key, counter, &mut buf),
        Algorithm::Sha256 => mac::<Hmac<Sha256>>(key, counter, &mut buf),
        Algorithm::Sha512 => mac::<Hmac<Sha512>>(key, counter, &mut buf),
    };
    let offset = usize::from(buf[len - 1] & 0x0f);
    let bin = u32::from_be_bytes([
        buf[offset],
        buf[offset + 1],
        buf[offset + 2],
        buf[offset + 3],
    ]) & 0x7fff_ffff;
    Ok(u64::from(bin) % 10u64.pow(digits))
}

/// RFC 6238 TOTP: HOTP over [`time_step`]`(unix, t0, step)`.
pub fn totp(
    alg: Algorithm,
    key: &[u8],
    unix_secs: u64,
    t0: u64,
    step_secs: u64,
    digits: u32,
) -> Result<u64, TotpError> {
    hotp(alg, key, time_step(unix_secs, t0, step_secs)?, digits)
}

/// A code as shown to people: zero-padded to `digits`.
pub fn format_code(code: u64, digits: u32) -> String {
    format!("{code:0width$}", width = digits as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4226_appendix_d() {
        // RFC 4226 Appendix D, secret "12345678901234567890", counters 0..=9.
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (c, want) in expected.iter().enumerate() {
            assert_eq!(
                hotp(Algorithm::Sha1, b"12345678901234567890", c as u64, 6),
                Ok(*want)
            );
        }
    }

    #[test]
    fn errors() {
        assert_eq!(time_step(5, 0, 0), Err(TotpError::ZeroStep));
        assert_eq!(
            time_step(5, 6, 1),
            Err(TotpError::BeforeEpoch { unix: 5, t0: 6 })
        );
        assert_eq!(time_step(1_700_000_000, 0, 6), Ok(283_333_333));
        assert_eq!(
            hotp(Algorithm::Sha1, b"k", 0, 5),
            Err(TotpError::InvalidDigits(5))
        );
        assert_eq!(
            hotp(Algorithm::Sha1, b"k", 0, 11),
            Err(TotpError::InvalidDigits(11))
        );
        assert_eq!(format_code(42, 6), "000042");
    }
}
