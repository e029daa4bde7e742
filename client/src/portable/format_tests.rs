#![allow(clippy::unwrap_used)]

use super::*;

/// Small parameters: the format is the same, the tests fast.
const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};

fn entry(path: &str, mode: u32, contents: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        mode,
        contents: Zeroizing::new(contents.to_vec()),
    }
}

fn snapshot() -> Snapshot {
    Snapshot {
        created: 1_765_000_000,
        entries: vec![
            entry("contacts.json", 0o600, b"{\"5550002\":{\"added_at\":1}}"),
            entry(
                "history/5550002.jsonl",
                0o600,
                b"{\"text\":\"hello bob\"}\n",
            ),
            entry("profile.toml", 0o644, b"number = \"5550001\"\n"),
            entry("secrets.toml", 0o600, b"identity_seed = \"00\"\n"),
        ],
    }
}

fn sealed() -> Vec<u8> {
    seal_with(
        &snapshot(),
        b"correct horse",
        FAST,
        [7; SALT_LEN],
        [9; NONCE_LEN],
    )
    .unwrap()
}

/// Recomputes the trailing digest after a deliberate change, so the change reaches the checks
/// behind it.
fn redigest(file: &mut Vec<u8>) {
    file.truncate(file.len() - DIGEST_LEN);
    let digest = kdf::sha256(&[file]);
    file.extend_from_slice(&digest);
}

#[test]
fn a_file_opens_with_its_passphrase_to_the_same_snapshot() {
    let file = sealed();
    assert_eq!(
        open(&file, b"correct horse", KdfLimits::default()).unwrap(),
        snapshot()
    );
    // A random salt and nonce every time: two exports of the same profile differ.
    let a = seal(&snapshot(), b"correct horse", FAST).unwrap();
    let b = seal(&snapshot(), b"correct horse", FAST).unwrap();
    assert_ne!(a, b);
    assert_eq!(
        open(&a, b"correct horse", KdfLimits::default()).unwrap(),
        snapshot()
    );
}

#[test]
fn the_file_holds_no_plaintext() {
    let file = sealed();
    for needle in [&b"5550002"[..], b"hello bob", b"history/", b"secrets.toml"] {
        assert!(
            !file.windows(needle.len()).any(|w| w == needle),
            "{:?} is in the file",
            String::from_utf8_lossy(needle)
        );
    }
}

#[test]
fn a_wrong_passphrase_is_told_apart_from_damage() {
    let file = sealed();
    assert!(matches!(
        open(&file, b"correct horsf", KdfLimits::default()),
        Err(ExportError::WrongPassphrase)
    ));
    assert!(matches!(
        open(&file, b"", KdfLimits::default()),
        Err(ExportError::EmptyPassphrase)
    ));
}

#[test]
fn any_flipped_byte_after_the_version_is_damage() {
    let file = sealed();
    for at in 6..file.len() {
        let mut bad = file.clone();
        bad[at] ^= 0x01;
        assert!(
            matches!(
                open(&bad, b"correct horse", KdfLimits::default()),
                Err(ExportError::Damaged(_))
            ),
            "byte {at}"
        );
    }
    let cut = &file[..file.len() - 1];
    assert!(matches!(
        open(cut, b"correct horse", KdfLimits::default()),
        Err(ExportError::Damaged(_))
    ));
}

#[test]
fn a_newer_version_and_a_stranger_file_have_their_own_errors() {
    let mut newer = sealed();
    newer[4..6].copy_from_slice(&2u16.to_be_bytes());
    assert!(matches!(
        open(&newer, b"correct horse", KdfLimits::default()),
        Err(ExportError::NewerVersion {
            found: 2,
            supported: 1
        })
    ));
    // Even a newer file cut short after its version is a newer file, not damage.
    assert!(matches!(
        read_header(&newer[..6]),
        Err(ExportError::NewerVersion { found: 2, .. })
    ));
    for other in [&b""[..], b"MMD", b"MMB1 a key backup", b"PK\x03\x04zip"] {
        assert!(matches!(read_header(other), Err(ExportError::NotAnExport)));
    }
}

#[test]
fn a_file_asking_for_too_much_work_is_refused_before_any_is_done() {
    let mut file = sealed();
    // 4 TiB of memory and a digest to match: refused on the header alone.
    file[7..11].copy_from_slice(&u32::MAX.to_be_bytes());
    redigest(&mut file);
    assert!(matches!(
        open(&file, b"correct horse", KdfLimits::default()),
        Err(ExportError::KdfTooCostly {
            asked: u32::MAX,
            ..
        })
    ));
    let mut file = sealed();
    file[11..15].copy_from_slice(&1000u32.to_be_bytes());
    redigest(&mut file);
    assert!(matches!(
        open(&file, b"correct horse", KdfLimits::default()),
        Err(ExportError::KdfTooCostly { asked: 1000, .. })
    ));
    // Parameters Argon2id refuses (no lanes) are damage, not a panic.
    let mut file = sealed();
    file[15..19].copy_from_slice(&0u32.to_be_bytes());
    redigest(&mut file);
    assert!(matches!(
        open(&file, b"correct horse", KdfLimits::default()),
        Err(ExportError::Damaged(_))
    ));
}

#[test]
fn a_forged_file_with_a_matching_digest_does_not_open() {
    let mut file = sealed();
    file[HEADER_LEN + 3] ^= 0x80;
    redigest(&mut file);
    assert!(matches!(
        open(&file, b"correct horse", KdfLimits::default()),
        Err(ExportError::Damaged(why)) if why.contains("authenticate")
    ));
}

#[test]
fn the_container_refuses_paths_that_leave_the_profile() {
    for bad in [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "./x",
        "a//b",
        "a/",
        ".hidden",
        "a\\b",
        "a\0b",
        "",
    ] {
        assert!(check_path(bad).is_err(), "{bad:?}");
    }
    assert!(check_path(&"a".repeat(MAX_PATH_LEN + 1)).is_err());
    for good in ["profile.toml", "history/groups/ab.jsonl", "chat.toml"] {
        assert!(check_path(good).is_ok(), "{good:?}");
    }
}

#[test]
fn the_container_refuses_what_a_writer_never_makes() {
    let encode = |entries: Vec<Entry>| {
        encode_container(&Snapshot {
            created: 0,
            entries,
        })
    };
    let base = || {
        vec![
            entry("profile.toml", 0o644, b""),
            entry("secrets.toml", 0o600, b""),
        ]
    };
    assert!(encode(base()).is_ok());
    let mut repeated = base();
    repeated.push(entry("secrets.toml", 0o600, b""));
    assert!(matches!(encode(repeated), Err(ExportError::Entry(_))));
    let mut both = base();
    both.insert(0, entry("history", 0o600, b""));
    both.insert(1, entry("history/5550002.jsonl", 0o600, b""));
    assert!(matches!(encode(both), Err(ExportError::Entry(why)) if why.contains("directory")));
    assert!(matches!(
        encode(vec![entry("profile.toml", 0o644, b"")]),
        Err(ExportError::Entry(why)) if why.contains("secrets.toml")
    ));
    let mut setuid = base();
    setuid[0].mode = 0o4755;
    assert!(encode(setuid).is_err());

    // The reader refuses the same, and lies about lengths, without allocating for them.
    let good = encode(base()).unwrap();
    assert_eq!(decode_container(&good).unwrap().entries, base());
    let mut trailing = good.to_vec();
    trailing.push(0);
    assert!(matches!(
        decode_container(&trailing),
        Err(ExportError::Damaged(_))
    ));
    let mut many = good.to_vec();
    many[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        decode_container(&many),
        Err(ExportError::Damaged(_))
    ));
    let mut long = good.to_vec();
    // The first entry's contents length (after count, path length, path, mode).
    let at = 12 + 2 + "profile.toml".len() + 4;
    long[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        decode_container(&long),
        Err(ExportError::Damaged(_))
    ));
    let mut traversal = good.to_vec();
    traversal[14..16].copy_from_slice(b"..");
    assert!(matches!(
        decode_container(&traversal),
        Err(ExportError::Damaged(_))
    ));
}

/// The vector of protocol.md 13.5: these inputs give exactly these bytes.
#[test]
fn the_export_file_matches_the_protocol_vector() {
    let snapshot = Snapshot {
        created: 1_765_000_000,
        entries: vec![
            entry("profile.toml", 0o644, b"number = \"5550001\"\n"),
            entry("secrets.toml", 0o600, b"identity_seed = \"00\"\n"),
        ],
    };
    let params = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let salt: [u8; SALT_LEN] = core::array::from_fn(|i| i as u8);
    let nonce: [u8; NONCE_LEN] = core::array::from_fn(|i| 0xa0 + i as u8);
    let file = seal_with(
        &snapshot,
        b"correct horse battery staple",
        params,
        salt,
        nonce,
    )
    .unwrap();
    let hex = micromsg_crypto::hex::encode(&file);
    assert_eq!(hex, VECTOR.replace(['\n', ' '], ""));
    assert_eq!(
        open(&file, b"correct horse battery staple", KdfLimits::default()).unwrap(),
        snapshot
    );
    // protocol.md 13.5 shows these very lines.
    let doc = include_str!("../../../docs/protocol.md");
    for line in VECTOR.lines() {
        assert!(doc.contains(line.trim()), "protocol.md lacks {line}");
    }
}

/// The file of the protocol vector: header (80 bytes), ciphertext and tag, digest; 64 hex
/// digits a line.
const VECTOR: &str = "\
    4d4d4458000101000000400000000100000001000102030405060708090a0b0c\n\
    0d0e0f01a0a1a2a3a4a5a6a7a8a9aaabb8345af7e90cbecd4e46e51b70afd776\n\
    e492eb382a5ed603637d05edef3461fd\n\
    c5cea2e090eedc72151f4a2347c6ecdc558e230f9310e0b18e1a52382c19c24d\n\
    26924edac196d63b930e42876a7f7d007589004d3c1c0f56005935f923f11fb0\n\
    bb799bfb0c8555b735011aa6ded40e4aec47f224f349c32e89bbf0954ee67394\n\
    ae762ee476a203e945e7936e60fd19fe0a02bdcdb7c98538\n\
    5cf55ce1e38174161796ba91ce727a349bc8b0d1677fa54ae35da12129a237cf";
