//! Test vectors typed in from the RFC texts.

use micromsg_crypto::aead;
use micromsg_crypto::agreement;
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::kdf;
use micromsg_crypto::secret::Secret32;
use micromsg_crypto::totp::{self, Algorithm};

use crate::common::{arr, unhex};

/// RFC 6238 Appendix B: 8 digits, 30-second step, T0 = 0; the seeds of the reference code.
#[test]
fn rfc6238_appendix_b() {
    let sha1 = b"12345678901234567890".as_slice();
    let sha256 = b"12345678901234567890123456789012".as_slice();
    let sha512 = b"1234567890123456789012345678901234567890123456789012345678901234".as_slice();
    // (time, T, SHA1, SHA256, SHA512)
    let table: [(u64, u64, u64, u64, u64); 6] = [
        (59, 0x1, 94287082, 46119246, 90693936),
        (1111111109, 0x023523EC, 7081804, 68084774, 25091201),
        (1111111111, 0x023523ED, 14050471, 67062674, 99943326),
        (1234567890, 0x0273EF07, 89005924, 91819424, 93441116),
        (2000000000, 0x03F940AA, 69279037, 90698825, 38618901),
        (20000000000, 0x27BC86AA, 65353130, 77737706, 47863826),
    ];
    let mut checked = 0;
    for (time, t, c1, c256, c512) in table {
        assert_eq!(totp::time_step(time, 0, 30), Ok(t));
        for (alg, key, code) in [
            (Algorithm::Sha1, sha1, c1),
            (Algorithm::Sha256, sha256, c256),
            (Algorithm::Sha512, sha512, c512),
        ] {
            assert_eq!(
                totp::totp(alg, key, time, 0, 30, 8),
                Ok(code),
                "{alg:?} at {time}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
    assert_eq!(totp::format_code(7081804, 8), "07081804");
}

/// RFC 5869 Appendix A, the SHA-256 cases A.1 to A.3 (A.4 to A.7 are HKDF-SHA1, not used).
#[test]
fn rfc5869_sha256() {
    let cases = [
        (
            unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"),
            unhex("000102030405060708090a0b0c"),
            unhex("f0f1f2f3f4f5f6f7f8f9"),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            (0x00..=0x4f).collect(),
            (0x60..=0xaf).collect(),
            (0xb0..=0xff).collect(),
            "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
             cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"),
            Vec::new(),
            Vec::new(),
            "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (n, (ikm, salt, info, prk, okm)) in cases.into_iter().enumerate() {
        let got_prk = kdf::extract(&salt, &ikm);
        assert_eq!(got_prk.expose(), &arr::<32>(prk), "A.{}", n + 1);
        let want = unhex(okm);
        let mut out = vec![0u8; want.len()];
        assert_eq!(kdf::expand(got_prk.expose(), &info, &mut out), Ok(()));
        assert_eq!(out, want, "A.{}", n + 1);
    }
}

/// RFC 8439 §2.8.2, the AEAD_CHACHA20_POLY1305 example.
#[test]
fn rfc8439_aead_example() {
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one \
                      tip for the future, sunscreen would be it.";
    let aad = unhex("50515253c0c1c2c3c4c5c6c7");
    let key: [u8; 32] = arr("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    // 32-bit constant 07 00 00 00, then IV 40..47.
    let nonce: [u8; 12] = arr("070000004041424344454647");
    let ciphertext = unhex(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
         3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
         92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
         3ff4def08e4b7a9de576d26586cec64b6116",
    );
    let tag = unhex("1ae10b594f09e26a7e902ecbd0600691");
    let mut expected = ciphertext;
    expected.extend(&tag);
    assert_eq!(
        aead::seal(&key, &nonce, &aad, plaintext),
        Ok(expected.clone())
    );
    assert_eq!(
        aead::open(&key, &nonce, &aad, &expected),
        Ok(plaintext.to_vec())
    );
}

/// RFC 7748 §5.2: the two scalar-multiplication vectors and the iterated function after 1 and
/// 1,000 iterations. The 1,000,000-iteration value is skipped: it takes minutes in a debug
/// build and tests nothing the 1,000 iterations do not.
#[test]
fn rfc7748_x25519() {
    let vectors = [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ];
    for (scalar, u, out) in vectors {
        let got = agreement::x25519(&Secret32::from_bytes(arr(scalar)), &arr(u)).unwrap();
        assert_eq!(got.expose(), &arr::<32>(out));
    }

    let mut k = [0u8; 32];
    k[0] = 9;
    let mut u = k;
    for i in 1..=1000 {
        let r = *agreement::x25519(&Secret32::from_bytes(k), &u)
            .unwrap()
            .expose();
        u = k;
        k = r;
        if i == 1 {
            assert_eq!(
                k,
                arr::<32>("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
            );
        }
    }
    assert_eq!(
        k,
        arr::<32>("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")
    );
}

/// RFC 8032 §7.1: TEST 1, TEST 2, TEST 3 and TEST SHA(abc).
#[test]
fn rfc8032_ed25519() {
    let sha_abc = unhex(
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
         2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
    );
    let cases: [(&str, &str, Vec<u8>, &str); 4] = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            Vec::new(),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            unhex("72"),
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            unhex("af82"),
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac\
             18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
        (
            "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
            "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
            sha_abc.clone(),
            "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589\
             09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
        ),
    ];
    assert_eq!(
        micromsg_crypto::hex::encode(&sha2_512(b"abc")),
        micromsg_crypto::hex::encode(&sha_abc)
    );
    for (secret, public, msg, sig) in cases {
        let key = IdentityKey::from_seed(&Secret32::from_bytes(arr(secret)));
        let pk = key.public_key();
        assert_eq!(pk.as_bytes(), &arr::<32>(public));
        let want: [u8; 64] = arr(sig);
        assert_eq!(key.sign(&msg), want);
        assert_eq!(pk.verify(&msg, &want), Ok(()));
        let mut flipped = want;
        flipped[63] ^= 0x01;
        assert!(pk.verify(&msg, &flipped).is_err());
    }
}

fn sha2_512(data: &[u8]) -> [u8; 64] {
    use sha2::{Digest, Sha512};
    Sha512::digest(data).into()
}
