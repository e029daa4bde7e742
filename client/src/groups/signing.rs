//! The bytes a control op's author signs, and the group id a `create` derives
//! (docs/groups.md section 2.1). Both are byte-exact, domain-separated encodings of the op's
//! fields, never the JSON text, so another implementation signs and checks the same bytes
//! whatever its JSON writer does.
//!
//! ```text
//! field(x)  = u32 big-endian length of x || x
//! signed    = field("micromsg group op v2") || field(group) || field(id)
//!             || u64 big-endian lamport || field(author) || field(op) || body
//! body      create: field(name) || u32 BE count || count × (field(number) || field(key))
//!           add:    field(member) || field(key)      remove: field(member)
//!           leave:  (nothing)                         rename: field(name)
//!           move:   field(new number)
//! group id  = hex(SHA-256(field("micromsg group id v2") || field(creator) || field(key)
//!             || field(create id))[..16])
//! ```
//!
//! `group`, `id` are the 32 lowercase hex digits as ASCII, numbers their ASCII digits, keys the
//! 32-byte Ed25519 encodings, names their UTF-8 bytes.

use micromsg_crypto::hex;
use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey, Signature};
use micromsg_crypto::kdf::sha256;

use super::{Change, Op};

/// The context string of an op signature.
pub const OP_CONTEXT: &[u8] = b"micromsg group op v2";
/// The context string of a group id.
pub const ID_CONTEXT: &[u8] = b"micromsg group id v2";

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every field is bounded far below 4 GiB (a frame is at most the session's text limit).
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The op's name on the wire, also signed.
pub(super) fn op_name(change: &Change) -> &'static str {
    match change {
        Change::Create { .. } => "create",
        Change::Add(_) => "add",
        Change::Remove(_) => "remove",
        Change::Leave => "leave",
        Change::Rename(_) => "rename",
        Change::Move(_) => "move",
    }
}

/// The bytes the author of `op` signs for the group `group`.
pub fn signed_bytes(group: &str, op: &Op) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    field(&mut out, OP_CONTEXT);
    field(&mut out, group.as_bytes());
    field(&mut out, op.id.as_bytes());
    out.extend_from_slice(&op.lamport.to_be_bytes());
    field(&mut out, op.author.as_bytes());
    field(&mut out, op_name(&op.change).as_bytes());
    match &op.change {
        Change::Create { name, members } => {
            field(&mut out, name.as_bytes());
            let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_be_bytes());
            for m in members {
                field(&mut out, m.number.as_bytes());
                field(&mut out, m.key.as_bytes());
            }
        }
        Change::Add(m) => {
            field(&mut out, m.number.as_bytes());
            field(&mut out, m.key.as_bytes());
        }
        Change::Remove(number) => field(&mut out, number.as_bytes()),
        Change::Leave => {}
        Change::Rename(name) => field(&mut out, name.as_bytes()),
        Change::Move(new) => field(&mut out, new.as_bytes()),
    }
    out
}

/// Signs `op` for `group` with the author's key.
pub fn sign(key: &IdentityKey, group: &str, op: &Op) -> Signature {
    key.sign(&signed_bytes(group, op))
}

/// Whether `op`'s signature verifies under `key` (strict Ed25519).
pub fn verifies(key: &IdentityPublicKey, group: &str, op: &Op) -> bool {
    key.verify(&signed_bytes(group, op), &op.sig).is_ok()
}

/// The group id a `create` with id `create_id` by `creator` (with `key`) names: a group id is
/// bound to its creator's key, so nobody else can make a `create` for it.
pub fn group_id(creator: &str, key: &IdentityPublicKey, create_id: &str) -> String {
    let mut input = Vec::with_capacity(128);
    field(&mut input, ID_CONTEXT);
    field(&mut input, creator.as_bytes());
    field(&mut input, key.as_bytes());
    field(&mut input, create_id.as_bytes());
    let digest = sha256(&[&input]);
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::Member;
    use micromsg_crypto::Secret32;

    fn key(seed: u8) -> IdentityKey {
        IdentityKey::from_seed(&Secret32::from_bytes([seed; 32]))
    }

    /// The encoding, pinned byte for byte (docs/groups.md 2.1): a change here is a format
    /// change.
    #[test]
    fn the_signed_bytes_are_pinned() {
        let op = Op {
            id: "00112233445566778899aabbccddeeff".into(),
            lamport: 2,
            author: "1001".into(),
            change: Change::Add(Member {
                number: "1004".into(),
                key: key(4).public_key(),
            }),
            sig: [0; 64],
        };
        let group = "ffeeddccbbaa99887766554433221100";
        let bytes = signed_bytes(group, &op);
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0, 0, 0, 20]);
        expected.extend_from_slice(b"micromsg group op v2");
        expected.extend_from_slice(&[0, 0, 0, 32]);
        expected.extend_from_slice(group.as_bytes());
        expected.extend_from_slice(&[0, 0, 0, 32]);
        expected.extend_from_slice(op.id.as_bytes());
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"1001");
        expected.extend_from_slice(&[0, 0, 0, 3]);
        expected.extend_from_slice(b"add");
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"1004");
        expected.extend_from_slice(&[0, 0, 0, 32]);
        expected.extend_from_slice(key(4).public_key().as_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_signature_covers_the_group_and_every_field() {
        let k = key(1);
        let group = "ffeeddccbbaa99887766554433221100";
        let mut op = Op {
            id: "00112233445566778899aabbccddeeff".into(),
            lamport: 3,
            author: "1001".into(),
            change: Change::Rename("x".into()),
            sig: [0; 64],
        };
        op.sig = sign(&k, group, &op);
        assert!(verifies(&k.public_key(), group, &op));
        assert!(!verifies(&key(2).public_key(), group, &op));
        assert!(!verifies(
            &k.public_key(),
            "00000000000000000000000000000000",
            &op
        ));
        let mut renamed = op.clone();
        renamed.change = Change::Rename("y".into());
        assert!(!verifies(&k.public_key(), group, &renamed));
        let mut later = op.clone();
        later.lamport = 4;
        assert!(!verifies(&k.public_key(), group, &later));
        let mut other = op;
        other.change = Change::Remove("x".into());
        assert!(!verifies(&k.public_key(), group, &other));
    }

    #[test]
    fn the_group_id_depends_on_creator_key_and_create() {
        let id = group_id(
            "1001",
            &key(1).public_key(),
            "00112233445566778899aabbccddeeff",
        );
        assert_eq!(id.len(), 32);
        assert_ne!(
            id,
            group_id(
                "1001",
                &key(2).public_key(),
                "00112233445566778899aabbccddeeff"
            )
        );
        assert_ne!(
            id,
            group_id(
                "1002",
                &key(1).public_key(),
                "00112233445566778899aabbccddeeff"
            )
        );
        assert_ne!(
            id,
            group_id(
                "1001",
                &key(1).public_key(),
                "00112233445566778899aabbccddeefe"
            )
        );
    }
}
