//! The decoder never panics, whatever the input: random bytes, mutated valid
//! frames and mutated corpus files (the same job as the fuzz target, on a
//! stable toolchain).

use crate::strategies;
use micromsg_wire::{FrameDecoder, Limits, Message, decode_framed, decode_request};
use proptest::prelude::*;
use std::path::Path;

/// Feed `input` through every decoding entry point.
fn decode_everything(input: &[u8]) {
    let limits = Limits::default();
    let _ = decode_framed(input, &limits);
    let _ = Message::decode(input, &limits);
    if let Err(error) = decode_request(input, &limits) {
        // Answering must never fail either.
        let _ = error.to_response().encode();
        let _ = error.error.error_code();
    }
    let mut decoder = FrameDecoder::new(limits.max_frame_len);
    decoder.push(input);
    while let Ok(Some(body)) = decoder.next_frame() {
        let _ = Message::decode(body, &limits);
    }
}

/// YAML-ish fragments that make random inputs reach deeper parser states.
const TOKENS: &[&str] = &[
    "Request: ",
    "Response: ",
    "Event: ",
    "Id: ",
    "Args:",
    "Data:",
    "Status: ",
    "OK",
    "ERROR",
    "LOGIN",
    "INBOX",
    "\n",
    "\n  ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    ": ",
    "\"",
    "'",
    "&a ",
    "*a",
    "!!str ",
    "---\n",
    "...\n",
    "#",
    "|\n",
    ">\n",
    "? ",
    "ENTITY",
    "\"5550001234\"",
    "1",
    "-1",
    "null",
    "true",
    "\\",
    "\t",
    "\u{feff}",
    "\u{0}",
    "é",
];

fn yamlish() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::sample::select(TOKENS), 0..80)
        .prop_map(|tokens| tokens.concat().into_bytes())
}

/// A valid encoded frame with a few bytes overwritten, inserted or removed.
fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        strategies::message(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(|(message, edits)| {
            let mut bytes = message.encode_frame(&Limits::default()).unwrap();
            for (at, byte, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&input);
    }

    #[test]
    fn random_yaml_never_panics(body in yamlish()) {
        decode_everything(&body);
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        decode_everything(&framed);
    }

    #[test]
    fn mutated_frames_never_panic(input in mutated_frame()) {
        decode_everything(&input);
        if input.len() > 4 {
            decode_everything(&input[4..]);
        }
    }
}

#[test]
fn mutated_corpus_never_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/malformed");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // Deterministic mutations: every file, with its body cut short and with
    // single bytes flipped at a few positions.
    for path in files {
        let input = std::fs::read(&path).unwrap();
        decode_everything(&input);
        if input.len() > 4 {
            decode_everything(&input[4..]);
        }
        for cut in [input.len() / 2, input.len().saturating_sub(1)] {
            decode_everything(&input[..cut]);
        }
        for at in [4, 7, input.len() / 3, input.len() / 2] {
            if at < input.len() {
                let mut flipped = input.clone();
                flipped[at] ^= 0x20;
                decode_everything(&flipped);
            }
        }
    }
}
