//! Generates MicroMsg's known-answer vectors from fixed inputs.
//!
//! ```text
//! cargo run -p micromsg-crypto --example vectors -- json     > crypto/tests/vectors/micromsg.json
//! cargo run -p micromsg-crypto --example vectors -- markdown   # the section for docs/protocol.md
//! ```
//!
//! Without an argument it prints both. The JSON is committed and `tests/it/micromsg_vectors.rs`
//! checks the code against it, so any change to the bytes on the wire fails a test; regenerate
//! only for a deliberate protocol change (and bump the labels' version).

#![allow(clippy::unwrap_used)] // a generator: a failure is a bug to see at once

use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::handshake::{self, Accept, Init, KeySchedule, Role};
use micromsg_crypto::hex::encode as hex;
use micromsg_crypto::message::{self, HeaderString, Kind, OfflineEnvelope};
use micromsg_crypto::nonce::{self, Direction, NonceContext};
use micromsg_crypto::safety::{Party, safety_number};
use micromsg_crypto::{IdentityKey, Initiator, Responder, Secret32, totp};
use serde_json::json;

fn counting(start: u8) -> [u8; 32] {
    core::array::from_fn(|i| start + i as u8)
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();

    // (a) Login nonce.
    let client_secret = Secret32::from_bytes(counting(0x00));
    let server_secret = Secret32::from_bytes(counting(0x20));
    let binding = counting(0x40);
    let entity = "5550001234";
    let device = 1u32;
    let unix = 1_700_000_000u64;
    let step = 6u64;
    let ctx = NonceContext {
        entity,
        device,
        binding: &binding,
    };
    let t = totp::time_step(unix, 0, step).unwrap();
    let c2b = nonce::compute(&client_secret, Direction::ClientToBroker, &ctx, t).unwrap();
    let b2c = nonce::compute(&server_secret, Direction::BrokerToClient, &ctx, t).unwrap();

    // (b) P2P handshake and key schedule.
    let token = Secret32::from_bytes(counting(0x60));
    let nonce_i = counting(0x80);
    let nonce_r = counting(0xa0);
    let seed_i = Secret32::from_bytes([0x01; 32]);
    let seed_r = Secret32::from_bytes([0x02; 32]);
    let eph_secret_i = Secret32::from_bytes([0x03; 32]);
    let eph_secret_r = Secret32::from_bytes([0x04; 32]);
    let id_i = IdentityKey::from_seed(&seed_i);
    let id_r = IdentityKey::from_seed(&seed_r);

    let (initiator, init_bytes) = Initiator::from_parts(
        &id_i,
        &token,
        nonce_i,
        EphemeralSecret::from_secret(&eph_secret_i),
    );
    let (responder, accept_bytes) = Responder::handle_init_with(
        &id_r,
        &init_bytes,
        |_| Some(token.clone()),
        nonce_r,
        EphemeralSecret::from_secret(&eph_secret_r),
    )
    .unwrap();
    let outcome = initiator.handle_accept(&accept_bytes).unwrap();
    let keys_r = responder.handle_finish(&outcome.finish).unwrap();

    let init = Init::decode(&init_bytes).unwrap();
    let accept = Accept::decode(&accept_bytes).unwrap();
    let h = handshake::transcript_hash(&init, &accept);
    let shared = EphemeralSecret::from_secret(&eph_secret_i)
        .diffie_hellman(&accept.eph_r)
        .unwrap();
    let ks = KeySchedule::derive(&shared, &token, &h);
    assert_eq!(ks.session_keys(Role::Initiator), outcome.keys);
    assert_eq!(ks.session_keys(Role::Responder), keys_r);
    let sig_i = &outcome.finish[1..];

    // (c) One DATA frame, initiator to responder.
    let hs = HeaderString::new(0, unix);
    let mk = message::message_key_material(&ks.seed_i2r, hs.as_bytes());
    let frame = outcome
        .keys
        .send
        .seal(0, unix, Kind::Text, b"hello")
        .unwrap();
    let envelope = OfflineEnvelope {
        session_id: ks.session_id,
        frame: &frame,
    }
    .encode();

    // (d) Safety number.
    let pub_i = id_i.public_key();
    let pub_r = id_r.public_key();
    let safety = safety_number(
        Party {
            number: "5550001234",
            identity: &pub_i,
        },
        Party {
            number: "5550009876",
            identity: &pub_r,
        },
    )
    .unwrap();

    let s = |x: &Secret32| x.to_hex().to_string();
    // Each section lists inputs first, then outputs in the order they are derived; the
    // Markdown keeps that order (the JSON object sorts its keys).
    let sections: Vec<Section> = vec![
        Section {
            key: "login_nonce",
            title: "Login nonce (MM-NONCE-1)",
            intro: "client_to_broker is keyed by the client secret (direction 0x01), \
                    broker_to_client by the server secret (direction 0x02), both for the same T.",
            fields: vec![
                ("client_secret", json!(s(&client_secret))),
                ("server_secret", json!(s(&server_secret))),
                ("entity", json!(entity)),
                ("device", json!(device)),
                ("binding", json!(hex(&binding))),
                ("unix", json!(unix)),
                ("step_secs", json!(step)),
                ("t", json!(t)),
                ("client_to_broker", json!(hex(&c2b))),
                ("broker_to_client", json!(hex(&b2c))),
            ],
        },
        Section {
            key: "p2p",
            title: "P2P handshake and key schedule",
            intro: "Identity seeds are Ed25519 secret keys; eph secrets are X25519 scalars \
                    (clamped by X25519). init, accept and finish are the frame bodies.",
            fields: vec![
                ("token", json!(s(&token))),
                ("nonce_i", json!(hex(&nonce_i))),
                ("nonce_r", json!(hex(&nonce_r))),
                ("identity_seed_i", json!(s(&seed_i))),
                ("identity_seed_r", json!(s(&seed_r))),
                ("eph_secret_i", json!(s(&eph_secret_i))),
                ("eph_secret_r", json!(s(&eph_secret_r))),
                ("id_i", json!(hex(&init.id_i))),
                ("id_r", json!(hex(&accept.id_r))),
                ("eph_i", json!(hex(&init.eph_i))),
                ("eph_r", json!(hex(&accept.eph_r))),
                ("token_id", json!(hex(&init.token_id))),
                ("proof_i", json!(hex(&init.proof_i))),
                ("proof_r", json!(hex(&accept.proof_r))),
                ("transcript_hash", json!(hex(&h))),
                ("sig_r", json!(hex(&accept.sig_r))),
                ("sig_i", json!(hex(sig_i))),
                ("shared", json!(s(&shared))),
                ("prk", json!(s(&ks.prk))),
                ("ts_key_i2r", json!(s(&ks.ts_key_i2r))),
                ("ts_key_r2i", json!(s(&ks.ts_key_r2i))),
                ("seed_i2r", json!(s(&ks.seed_i2r))),
                ("seed_r2i", json!(s(&ks.seed_r2i))),
                ("session_id", json!(hex(&ks.session_id))),
                ("init", json!(hex(&init_bytes))),
                ("accept", json!(hex(&accept_bytes))),
                ("finish", json!(hex(&outcome.finish))),
            ],
        },
        Section {
            key: "data_frame",
            title: "DATA frame",
            intro: "Sealed by the initiator with ts_key_i2r and seed_i2r above; the offline \
                    envelope wraps the same frame with the session id.",
            fields: vec![
                ("direction", json!("i2r")),
                ("counter", json!(0)),
                ("unix", json!(unix)),
                ("kind", json!(Kind::Text as u8)),
                ("payload", json!("hello")),
                ("header_string", json!(hs.as_str())),
                ("header_nonce", json!(hex(&message::header_nonce(0)))),
                ("message_key", json!(hex(mk.key()))),
                ("message_nonce", json!(hex(mk.nonce()))),
                ("frame", json!(hex(&frame))),
                ("offline_envelope", json!(hex(&envelope))),
            ],
        },
        Section {
            key: "safety_number",
            title: "Safety number",
            intro: "The two identity keys above, with their numbers.",
            fields: vec![
                ("number_a", json!("5550001234")),
                ("id_a", json!(pub_i.to_hex())),
                ("number_b", json!("5550009876")),
                ("id_b", json!(pub_r.to_hex())),
                ("value", json!(safety)),
            ],
        },
    ];

    if mode != "markdown" {
        let mut doc = serde_json::Map::new();
        doc.insert(
            "about".into(),
            json!(
                "MicroMsg known-answer vectors, generated by crypto/examples/vectors.rs; \
                 binary values are lowercase hex"
            ),
        );
        for sec in &sections {
            let obj: serde_json::Map<String, serde_json::Value> = sec
                .fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            doc.insert(sec.key.into(), obj.into());
        }
        println!("{}", serde_json::to_string_pretty(&doc).unwrap());
    }
    if mode.is_empty() {
        println!();
    }
    if mode != "json" {
        print_markdown(&sections);
    }
}

struct Section {
    key: &'static str,
    title: &'static str,
    intro: &'static str,
    fields: Vec<(&'static str, serde_json::Value)>,
}

fn print_markdown(sections: &[Section]) {
    println!("### Known-answer vectors\n");
    println!(
        "Generated by `cargo run -p micromsg-crypto --example vectors -- markdown`; the same \
         values are in `crypto/tests/vectors/micromsg.json`, which the crypto tests check. \
         Binary values are lowercase hex. Fixed inputs: client secret 00..1f, server secret \
         20..3f, binding 40..5f, token 60..7f, nonce_i 80..9f, nonce_r a0..bf (bytes counting \
         up), Ed25519 seeds 01 x 32 (I) and 02 x 32 (R), X25519 secrets 03 x 32 (I) and \
         04 x 32 (R).\n"
    );
    for sec in sections {
        println!("#### {}\n\n{}\n\n```text", sec.title, sec.intro);
        let width = sec.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &sec.fields {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:width$} = {v}");
        }
        println!("```\n");
    }
}
