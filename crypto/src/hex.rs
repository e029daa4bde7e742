//! Lowercase hexadecimal, the encoding of every binary value on the YAML wire.
//!
//! A few lines here spare the crate a dependency. Decoding accepts both cases (a human may paste
//! an upper-case fingerprint); encoding always produces lowercase, the one canonical form.

use thiserror::Error;

/// Why a hex string could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HexError {
    /// The string has an odd number of characters.
    #[error("hex string has odd length {0}")]
    OddLength(usize),
    /// A character is not a hex digit.
    #[error("invalid hex character at position {0}")]
    InvalidChar(usize),
    /// The decoded value has the wrong length for its type.
    #[error("hex value has {got} bytes, expected {expected}")]
    WrongLength {
        /// Bytes the type needs.
        expected: usize,
        /// Bytes the string holds.
        got: usize,
    },
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Encodes `bytes` as lowercase hex.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    encode_into(bytes, &mut out);
    out
}

/// Appends the lowercase hex of `bytes` to `out` (lets callers encode into a zeroizing buffer).
pub fn encode_into(bytes: &[u8], out: &mut String) {
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

fn nibble(c: u8, pos: usize) -> Result<u8, HexError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(HexError::InvalidChar(pos)),
    }
}

/// Decodes hex into `out`, which must be exactly half as long as `s`.
pub fn decode_to_slice(s: &str, out: &mut [u8]) -> Result<(), HexError> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(HexError::OddLength(s.len()));
    }
    if s.len() / 2 != out.len() {
        return Err(HexError::WrongLength {
            expected: out.len(),
            got: s.len() / 2,
        });
    }
    for (i, (pair, byte)) in s.chunks_exact(2).zip(out.iter_mut()).enumerate() {
        *byte = (nibble(pair[0], 2 * i)? << 4) | nibble(pair[1], 2 * i + 1)?;
    }
    Ok(())
}

/// Decodes a hex string of any even length.
pub fn decode(s: &str) -> Result<Vec<u8>, HexError> {
    if !s.len().is_multiple_of(2) {
        return Err(HexError::OddLength(s.len()));
    }
    let mut out = vec![0u8; s.len() / 2];
    decode_to_slice(s, &mut out)?;
    Ok(out)
}

/// Decodes a hex string of exactly `N` bytes.
pub fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let mut out = [0u8; N];
    decode_to_slice(s, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        let s = encode(&bytes);
        assert_eq!(&s[..8], "00010203");
        assert_eq!(decode(&s), Ok(bytes));
        assert_eq!(decode("ABcd"), Ok(vec![0xab, 0xcd]));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("abc"), Err(HexError::OddLength(3)));
        assert_eq!(decode("0g"), Err(HexError::InvalidChar(1)));
        assert_eq!(
            decode_array::<2>("00"),
            Err(HexError::WrongLength {
                expected: 2,
                got: 1
            })
        );
    }
}
