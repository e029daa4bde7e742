//! The signed bytes of number portability (protocol.md 6.28, docs/federation.md 12.3): the
//! user's port statement and the gaining broker's ported-number entry. Both are
//! domain-separated, length-unambiguous (numbers and broker ids never contain a NUL byte) and
//! fixed-order, so signer and verifier build the same bytes.

/// Domain of the user's statement.
pub const PORT_STATEMENT_DOMAIN: &[u8] = b"micromsg/port/v1";
/// Domain of the gaining broker's entry.
pub const PORTED_ENTRY_DOMAIN: &[u8] = b"micromsg/ported/v1";

/// The statement the user signs with the identity key to move `number` from broker `from` to
/// broker `to` at `time` (unix seconds):
/// `"micromsg/port/v1" 0x00 number 0x00 from 0x00 to 0x00 time(u64 big-endian)`.
pub fn port_statement(number: &str, from: &str, to: &str, time: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for part in [
        PORT_STATEMENT_DOMAIN,
        number.as_bytes(),
        from.as_bytes(),
        to.as_bytes(),
    ] {
        out.extend_from_slice(part);
        out.push(0);
    }
    out.extend_from_slice(&time.to_be_bytes());
    out
}

/// The bytes the gaining broker signs with its identity key:
/// `"micromsg/ported/v1" 0x00 number 0x00 from 0x00 to 0x00 seq(u64 BE) time(u64 BE)
/// identity_key(32) user_signature(64)`.
pub fn ported_entry_bytes(
    number: &str,
    from: &str,
    to: &str,
    seq: u64,
    time: u64,
    identity_key: &[u8; 32],
    user_signature: &[u8; 64],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    for part in [
        PORTED_ENTRY_DOMAIN,
        number.as_bytes(),
        from.as_bytes(),
        to.as_bytes(),
    ] {
        out.extend_from_slice(part);
        out.push(0);
    }
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&time.to_be_bytes());
    out.extend_from_slice(identity_key);
    out.extend_from_slice(user_signature);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_bytes_are_exact() {
        let s = port_statement("5551234567", "x", "y", 0x0102);
        let mut want = b"micromsg/port/v1\x005551234567\x00x\x00y\x00".to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(s, want);
    }

    /// The example of protocol.md 6.28.
    #[test]
    fn the_documented_statement() {
        let s = port_statement("5550001234", "broker-x", "broker-y", 1_767_225_000);
        assert_eq!(s.len(), 54);
        assert_eq!(
            &s[..46],
            b"micromsg/port/v1\x005550001234\x00broker-x\x00broker-y\x00"
        );
        assert_eq!(&s[46..], &[0, 0, 0, 0, 0x69, 0x55, 0xb6, 0xa8]);
    }

    #[test]
    fn entry_bytes_are_exact() {
        let e = ported_entry_bytes("5551234567", "x", "y", 1, 2, &[7; 32], &[9; 64]);
        let head = b"micromsg/ported/v1\x005551234567\x00x\x00y\x00";
        assert_eq!(&e[..head.len()], head);
        assert_eq!(
            &e[head.len()..head.len() + 16],
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        assert_eq!(e.len(), head.len() + 16 + 32 + 64);
    }
}
