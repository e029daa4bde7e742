//! Strong value types: each one is validated when it is parsed, so a value
//! that exists is a valid value.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::codec::{Path, WireValue, bad_value, wrong_type};
use crate::error::DecodeError;
use crate::yaml::Node;

/// A value failed validation; the text says which rule it broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub &'static str);

/// Request id chosen by the client and echoed in the response.
pub type RequestId = u32;

/// Decode a string-typed node with a `FromStr<Err = ValueError>` type.
fn decode_str<T: FromStr<Err = ValueError>>(node: Node, path: &Path<'_>) -> Result<T, DecodeError> {
    match node {
        Node::Str(s) => s
            .parse()
            .map_err(|ValueError(reason)| bad_value(path, reason)),
        _ => Err(wrong_type(path, "string")),
    }
}

// ---------------------------------------------------------------------------

/// An entity number: 4 to 15 ASCII digits, always a YAML string on the wire
/// (an unquoted `5550001234` is an integer and is refused, since leading
/// zeros would be lost).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Number(String);

impl Number {
    /// Shortest valid number.
    pub const MIN_LEN: usize = 4;
    /// Longest valid number.
    pub const MAX_LEN: usize = 15;

    /// Validate `digits`.
    pub fn new(digits: impl Into<String>) -> Result<Self, ValueError> {
        let digits = digits.into();
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValueError("number must be ASCII digits"));
        }
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&digits.len()) {
            return Err(ValueError("number must have 4 to 15 digits"));
        }
        Ok(Self(digits))
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this number starts with `prefix`.
    pub fn has_prefix(&self, prefix: &NumberPrefix) -> bool {
        self.0.starts_with(prefix.as_str())
    }
}

impl FromStr for Number {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Number({})", self.0)
    }
}

impl WireValue for Number {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        decode_str(node, path)
    }
    fn encode(&self) -> Node {
        Node::Str(self.0.clone())
    }
}

/// A number prefix a broker serves: 1 to 15 ASCII digits (a YAML string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NumberPrefix(String);

impl NumberPrefix {
    /// Validate `digits`.
    pub fn new(digits: impl Into<String>) -> Result<Self, ValueError> {
        let digits = digits.into();
        if digits.is_empty() || digits.len() > Number::MAX_LEN {
            return Err(ValueError("prefix must have 1 to 15 digits"));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValueError("prefix must be ASCII digits"));
        }
        Ok(Self(digits))
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NumberPrefix {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for NumberPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NumberPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NumberPrefix({})", self.0)
    }
}

impl WireValue for NumberPrefix {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        decode_str(node, path)
    }
    fn encode(&self) -> Node {
        Node::Str(self.0.clone())
    }
}

// ---------------------------------------------------------------------------

/// A device of an entity: an integer `>= 1` (the first device is 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(NonZeroU32);

impl DeviceId {
    /// The first device of every entity.
    pub const FIRST: DeviceId = DeviceId(NonZeroU32::MIN);

    /// Validate `id`.
    pub fn new(id: u32) -> Result<Self, ValueError> {
        NonZeroU32::new(id)
            .map(Self)
            .ok_or(ValueError("device id must be at least 1"))
    }

    /// The id.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl WireValue for DeviceId {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        let id = u32::decode(node, path)?;
        DeviceId::new(id).map_err(|ValueError(reason)| bad_value(path, reason))
    }
    fn encode(&self) -> Node {
        Node::Int(i128::from(self.get()))
    }
}

// ---------------------------------------------------------------------------

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Parse exactly `2 * N` lowercase hex digits.
fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ValueError> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return Err(match N {
            16 => ValueError("expected 32 lowercase hex digits"),
            32 => ValueError("expected 64 lowercase hex digits"),
            _ => ValueError("expected 128 lowercase hex digits"),
        });
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        match (hex_digit(pair[0]), hex_digit(pair[1])) {
            (Some(hi), Some(lo)) => *byte = (hi << 4) | lo,
            _ => return Err(ValueError("hex digits must be 0-9 or a-f (lowercase)")),
        }
    }
    Ok(out)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

macro_rules! hex_type {
    ($(#[$doc:meta])* $name:ident, $n:literal, $digits:literal, redacted: $redacted:tt) => {
        $(#[$doc])*
        ///
        /// On the wire: exactly
        #[doc = concat!($digits, " lowercase hex digits")]
        /// as a YAML string. Upper-case digits are refused so that every
        /// value has exactly one spelling.
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name([u8; $n]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $n;

            /// Wrap raw bytes.
            pub const fn from_bytes(bytes: [u8; $n]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $n] {
                &self.0
            }

            /// The raw bytes, by value.
            pub const fn into_bytes(self) -> [u8; $n] {
                self.0
            }

            /// The lowercase hex spelling.
            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }
        }

        impl From<[u8; $n]> for $name {
            fn from(bytes: [u8; $n]) -> Self {
                Self(bytes)
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<$n>(s).map(Self)
            }
        }

        impl WireValue for $name {
            fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
                decode_str(node, path)
            }
            fn encode(&self) -> Node {
                Node::Str(self.to_hex())
            }
        }

        hex_type!(@fmt $name, $redacted);
    };
    (@fmt $name:ident, true) => {
        /// Redacted: the value may be a secret (login nonce, registration
        /// secret, token). Use [`Self::to_hex`] to show it deliberately.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
    (@fmt $name:ident, false) => {
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

hex_type!(
    /// A 16-byte identifier (request id, message id, cursor). Not secret:
    /// `Debug` and `Display` show it.
    Hex16, 16, "32", redacted: false
);
hex_type!(
    /// A 32-byte value: secret, nonce, token or public key. `Debug` is
    /// redacted and there is no `Display`, because many of these are secrets.
    /// Equality is not constant-time: compare secrets with the crypto crate.
    Hex32, 32, "64", redacted: true
);
hex_type!(
    /// A 64-byte value: an Ed25519 signature. Not secret.
    Hex64, 64, "128", redacted: false
);

// ---------------------------------------------------------------------------

/// Opaque bytes (ciphertext, key backup, sealed address), standard base64
/// with padding on the wire. No whitespace, no URL alphabet, canonical
/// padding only. The length is bounded by the frame limit; size policy
/// (e.g. `LIMITS.MESSAGE-MAX`) is the broker's to check.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Blob(Vec<u8>);

impl Blob {
    /// Wrap bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, by value.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }

    /// Length in bytes (decoded).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The base64 spelling.
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.0)
    }
}

impl FromStr for Blob {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BASE64
            .decode(s)
            .map(Self)
            .map_err(|_| ValueError("expected standard base64 with padding"))
    }
}

impl From<Vec<u8>> for Blob {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl WireValue for Blob {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        decode_str(node, path)
    }
    fn encode(&self) -> Node {
        Node::Str(self.to_base64())
    }
}

// ---------------------------------------------------------------------------

/// A `host:port` network address, at most 255 characters. The host is an
/// IPv4 address, a bracketed IPv6 address (`[::1]:7000`) or a DNS name
/// (letters, digits, `-` and `.`; labels of 1 to 63 characters). The port is
/// 1 to 65535. The text is kept exactly as given.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Address(String);

impl Address {
    /// Longest valid address.
    pub const MAX_LEN: usize = 255;

    /// Validate `text`.
    pub fn new(text: impl Into<String>) -> Result<Self, ValueError> {
        let text = text.into();
        if text.len() > Self::MAX_LEN {
            return Err(ValueError("address must be at most 255 characters"));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or(ValueError("address must be host:port"))?;
        if port.is_empty()
            || port.len() > 5
            || !port.bytes().all(|b| b.is_ascii_digit())
            || !matches!(port.parse::<u16>(), Ok(1..))
        {
            return Err(ValueError("port must be 1 to 65535"));
        }
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or(ValueError("bad IPv6 address"))?;
            inner
                .parse::<Ipv6Addr>()
                .map_err(|_| ValueError("bad IPv6 address"))?;
        } else if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
            return Err(ValueError(
                "host must be an IPv4 address, [IPv6] or DNS name",
            ));
        }
        Ok(Self(text))
    }

    /// The address text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part (brackets kept for IPv6).
    pub fn host(&self) -> &str {
        self.0.rsplit_once(':').map_or("", |(host, _)| host)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.0
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(0)
    }
}

fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl FromStr for Address {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.0)
    }
}

impl WireValue for Address {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        decode_str(node, path)
    }
    fn encode(&self) -> Node {
        Node::Str(self.0.clone())
    }
}

// ---------------------------------------------------------------------------

/// A device name: any string of at most 64 characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DeviceName(String);

impl DeviceName {
    /// Longest valid name, in characters (Unicode scalar values).
    pub const MAX_CHARS: usize = 64;

    /// Validate `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, ValueError> {
        let name = name.into();
        if name.chars().count() > Self::MAX_CHARS {
            return Err(ValueError("device name must be at most 64 characters"));
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceName {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl WireValue for DeviceName {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        decode_str(node, path)
    }
    fn encode(&self) -> Node {
        Node::Str(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn numbers() {
        assert!(Number::new("5550001234").is_ok());
        assert!(Number::new("0000").is_ok());
        assert!(Number::new("123").is_err());
        assert!(Number::new("1234567890123456").is_err());
        assert!(Number::new("12a4").is_err());
        assert!(Number::new("１２３４").is_err());
    }

    #[test]
    fn hex_is_lowercase_and_fixed_length() {
        let ok = "00112233445566778899aabbccddeeff";
        let id: Hex16 = ok.parse().unwrap();
        assert_eq!(id.to_hex(), ok);
        assert!(ok.to_uppercase().parse::<Hex16>().is_err());
        assert!(ok[..30].parse::<Hex16>().is_err());
        assert!(format!("{ok}00").parse::<Hex16>().is_err());
        assert!("zz".repeat(16).parse::<Hex16>().is_err());
        let secret = Hex32::from_bytes([7; 32]);
        assert_eq!(format!("{secret:?}"), "Hex32(<redacted>)");
    }

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:1",
            "[::1]:7000",
            "host.example:65535",
            "a-b.c:80",
        ] {
            assert!(Address::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "host",
            "host:0",
            "host:65536",
            "host:",
            ":80",
            "::1:80",
            "[::1:80",
            "-a.b:80",
            "a b:80",
            "a..b:80",
            "host:+80",
        ] {
            assert!(Address::new(bad).is_err(), "{bad}");
        }
        let long = format!("{}:1", "a.".repeat(130));
        assert!(Address::new(long).is_err());
    }

    #[test]
    fn blobs_are_canonical_base64() {
        assert_eq!("aGk=".parse::<Blob>().unwrap().as_bytes(), b"hi");
        assert!("aGk".parse::<Blob>().is_err());
        assert!("aGl=".parse::<Blob>().is_err());
        assert!("aG k=".parse::<Blob>().is_err());
        assert!("aGk=\n".parse::<Blob>().is_err());
    }
}
