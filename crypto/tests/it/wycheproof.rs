//! Project Wycheproof vectors (github.com/C2SP/wycheproof, commit dac1dd4, `testvectors_v1/`,
//! Apache-2.0), read from the in-project copies under `tests/vectors/wycheproof/`.

use micromsg_crypto::aead::{self, AeadError};
use micromsg_crypto::agreement::{self, AgreementError};
use micromsg_crypto::identity::{IdentityError, IdentityPublicKey, Signature};
use micromsg_crypto::kdf::{self, KdfError};
use micromsg_crypto::secret::Secret32;
use serde_json::Value;

use crate::common::{arr, field, load_json, str_field, unhex};

/// Every test case of a file, with its group.
fn cases(file: &str) -> Vec<(Value, Value)> {
    let doc = load_json(&format!("wycheproof/{file}"));
    let declared = doc["numberOfTests"].as_u64().unwrap();
    let mut out = Vec::new();
    for group in doc["testGroups"].as_array().unwrap() {
        for test in group["tests"].as_array().unwrap() {
            out.push((group.clone(), test.clone()));
        }
    }
    assert_eq!(out.len() as u64, declared, "{file}: case count");
    out
}

fn result(test: &Value) -> &str {
    str_field(test, "result")
}

fn has_flag(test: &Value, flag: &str) -> bool {
    test["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f.as_str() == Some(flag))
}

fn id(test: &Value) -> u64 {
    test["tcId"].as_u64().unwrap()
}

/// The shape of `aead::{seal, open, xseal, xopen}`: key, nonce, aad, input.
type AeadFn<const N: usize> = fn(&[u8; 32], &[u8; N], &[u8], &[u8]) -> Result<Vec<u8>, AeadError>;

/// Shared by both AEADs: `N` is the nonce length our typed API accepts.
fn check_aead<const N: usize>(file: &str, seal: AeadFn<N>, open: AeadFn<N>) {
    let (mut valid, mut invalid) = (0, 0);
    for (_, t) in cases(file) {
        let tc = id(&t);
        let key: [u8; 32] = arr(str_field(&t, "key"));
        let iv = field(&t, "iv");
        let aad = field(&t, "aad");
        let msg = field(&t, "msg");
        let mut sealed = field(&t, "ct");
        sealed.extend(field(&t, "tag"));
        let Ok(nonce) = <[u8; N]>::try_from(iv.as_slice()) else {
            // Our API types the nonce as [u8; N]: a nonce of another size cannot be passed
            // at all, which is how these cases are refused.
            assert!(has_flag(&t, "InvalidNonceSize"), "{file} tc {tc}");
            assert_eq!(result(&t), "invalid", "{file} tc {tc}");
            invalid += 1;
            continue;
        };
        match result(&t) {
            "valid" => {
                assert_eq!(
                    open(&key, &nonce, &aad, &sealed),
                    Ok(msg.clone()),
                    "{file} tc {tc}"
                );
                assert_eq!(seal(&key, &nonce, &aad, &msg), Ok(sealed), "{file} tc {tc}");
                valid += 1;
            }
            "invalid" => {
                assert!(open(&key, &nonce, &aad, &sealed).is_err(), "{file} tc {tc}");
                invalid += 1;
            }
            other => panic!("{file} tc {tc}: unexpected result {other}"),
        }
    }
    assert!(
        valid > 200 && invalid > 60,
        "{file}: {valid} valid, {invalid} invalid"
    );
}

#[test]
fn chacha20_poly1305() {
    check_aead::<12>("chacha20_poly1305_test.json", aead::seal, aead::open);
}

#[test]
fn xchacha20_poly1305() {
    check_aead::<24>("xchacha20_poly1305_test.json", aead::xseal, aead::xopen);
}

#[test]
fn x25519() {
    let mut rejected = 0;
    for (_, t) in cases("x25519_test.json") {
        let tc = id(&t);
        let scalar = Secret32::from_bytes(arr(str_field(&t, "private")));
        let public: [u8; 32] = arr(str_field(&t, "public"));
        let shared: [u8; 32] = arr(str_field(&t, "shared"));
        // The file has no "invalid" cases: "acceptable" ones (twist points, non-canonical
        // encodings, low-order points) have a well-defined RFC 7748 result.
        assert!(matches!(result(&t), "valid" | "acceptable"), "tc {tc}");
        let got = agreement::x25519(&scalar, &public);
        if shared == [0u8; 32] {
            // Low-order public keys: our wrapper refuses the all-zero secret, as the spec wants.
            assert!(has_flag(&t, "ZeroSharedSecret"), "tc {tc}");
            assert_eq!(got, Err(AgreementError::LowOrderPoint), "tc {tc}");
            rejected += 1;
        } else {
            assert!(!has_flag(&t, "ZeroSharedSecret"), "tc {tc}");
            assert_eq!(got.map(|s| *s.expose()), Ok(shared), "tc {tc}");
        }
    }
    assert_eq!(rejected, 31, "every ZeroSharedSecret case is refused");
}

/// "valid" cases our strict verification refuses by design, each with its reason. The list is
/// checked exactly: a case may neither be refused without being listed nor be listed and pass.
const ED25519_STRICT_EXCEPTIONS: &[(u64, &str)] = &[];

#[test]
fn ed25519_strict() {
    let (mut accepted, mut refused) = (0, 0);
    let mut exceptions_seen = Vec::new();
    for (group, t) in cases("ed25519_test.json") {
        let tc = id(&t);
        let pk: [u8; 32] = arr(str_field(&group["publicKey"], "pk"));
        let msg = field(&t, "msg");
        let sig = field(&t, "sig");
        let outcome = match (
            IdentityPublicKey::from_bytes(&pk),
            Signature::try_from(sig.as_slice()),
        ) {
            (Ok(key), Ok(sig)) => key.verify(&msg, &sig),
            (Err(e), _) => Err(e),
            // Signatures of another length cannot be expressed in our API.
            (Ok(_), Err(_)) => Err(IdentityError::BadSignature),
        };
        match (result(&t), outcome) {
            ("valid", Ok(())) => accepted += 1,
            ("invalid", Err(_)) => refused += 1,
            ("valid", Err(e)) => {
                assert!(
                    ED25519_STRICT_EXCEPTIONS.iter().any(|(id, _)| *id == tc),
                    "tc {tc} is valid but strict verify refused it ({e}); document it"
                );
                exceptions_seen.push(tc);
            }
            (r, o) => panic!("tc {tc}: expected {r}, got {o:?}"),
        }
    }
    let listed: Vec<u64> = ED25519_STRICT_EXCEPTIONS
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(exceptions_seen, listed);
    assert_eq!(accepted + refused + listed.len(), 151);
}

#[test]
fn hkdf_sha256() {
    let mut invalid = 0;
    for (_, t) in cases("hkdf_sha256_test.json") {
        let tc = id(&t);
        let ikm = field(&t, "ikm");
        let salt = field(&t, "salt");
        let info = field(&t, "info");
        let size = t["size"].as_u64().unwrap() as usize;
        let mut out = vec![0u8; size];
        let got = kdf::hkdf(&salt, &ikm, &info, &mut out);
        match result(&t) {
            "valid" => {
                assert_eq!(got, Ok(()), "tc {tc}");
                assert_eq!(out, field(&t, "okm"), "tc {tc}");
                // The two-step form gives the same bytes.
                let prk = kdf::extract(&salt, &ikm);
                let mut again = vec![0u8; size];
                assert_eq!(kdf::expand(prk.expose(), &info, &mut again), Ok(()));
                assert_eq!(again, out, "tc {tc}");
            }
            "invalid" => {
                assert!(has_flag(&t, "SizeTooLarge"), "tc {tc}");
                assert_eq!(got, Err(KdfError::OutputTooLong(size)), "tc {tc}");
                invalid += 1;
            }
            other => panic!("tc {tc}: unexpected result {other}"),
        }
    }
    assert_eq!(invalid, 3);
}

#[test]
fn hmac_sha256() {
    let mut truncated = 0;
    for (group, t) in cases("hmac_sha256_test.json") {
        let tc = id(&t);
        let tag_len = group["tagSize"].as_u64().unwrap() as usize / 8;
        let key = field(&t, "key");
        let msg = field(&t, "msg");
        let tag = field(&t, "tag");
        assert_eq!(tag.len(), tag_len, "tc {tc}");
        let full = kdf::hmac_sha256(&key, &[&msg]);
        let verified = kdf::hmac_sha256_verify(&key, &[&msg], &tag);
        match result(&t) {
            "valid" => {
                // 128-bit groups carry the leftmost half of the tag (RFC 2104 §5).
                assert_eq!(&full[..tag_len], tag.as_slice(), "tc {tc}");
                assert_eq!(verified, Ok(()), "tc {tc}");
            }
            "invalid" => {
                assert_ne!(&full[..tag_len], tag.as_slice(), "tc {tc}");
                assert_eq!(verified, Err(KdfError::TagMismatch), "tc {tc}");
            }
            other => panic!("tc {tc}: unexpected result {other}"),
        }
        if tag_len < 32 {
            truncated += 1;
        }
    }
    assert_eq!(truncated, 87);
    // Shorter than half a tag is refused before any comparison.
    assert_eq!(
        kdf::hmac_sha256_verify(b"k", &[b"m"], &unhex("00")),
        Err(KdfError::InvalidTagLength(1))
    );
}
