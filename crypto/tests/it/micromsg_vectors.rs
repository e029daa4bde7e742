//! MicroMsg's known-answer vectors, `tests/vectors/micromsg.json`, generated once by
//! `examples/vectors.rs` (and cross-checked then against an independent implementation of the
//! spec). Any change to the bytes on the wire fails here.

use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::handshake::{self, Accept, Init, KeySchedule, Role};
use micromsg_crypto::message::{self, HeaderString, Kind, OfflineEnvelope};
use micromsg_crypto::nonce::{self, Direction, NonceContext, NoncePolicy};
use micromsg_crypto::safety::{Party, safety_number};
use micromsg_crypto::{IdentityKey, IdentityPublicKey, Initiator, Responder, Secret32, totp};
use serde_json::Value;

use crate::common::{arr, counting, field, load_json, str_field};

fn vectors() -> Value {
    load_json("micromsg.json")
}

fn secret(v: &Value, name: &str) -> Secret32 {
    Secret32::from_bytes(arr(str_field(v, name)))
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

#[test]
fn inputs_are_the_documented_ones() {
    let v = vectors();
    let ln = &v["login_nonce"];
    assert_eq!(field(ln, "client_secret"), counting(0x00));
    assert_eq!(field(ln, "server_secret"), counting(0x20));
    assert_eq!(field(ln, "binding"), counting(0x40));
    let p = &v["p2p"];
    assert_eq!(field(p, "token"), counting(0x60));
    assert_eq!(field(p, "nonce_i"), counting(0x80));
    assert_eq!(field(p, "nonce_r"), counting(0xa0));
    assert_eq!(field(p, "identity_seed_i"), [0x01; 32]);
    assert_eq!(field(p, "identity_seed_r"), [0x02; 32]);
    assert_eq!(field(p, "eph_secret_i"), [0x03; 32]);
    assert_eq!(field(p, "eph_secret_r"), [0x04; 32]);
}

#[test]
fn login_nonce() {
    let v = vectors();
    let ln = &v["login_nonce"];
    let binding: [u8; 32] = arr(str_field(ln, "binding"));
    let ctx = NonceContext {
        entity: str_field(ln, "entity"),
        device: ln["device"].as_u64().unwrap() as u32,
        binding: &binding,
    };
    let unix = ln["unix"].as_u64().unwrap();
    let step = ln["step_secs"].as_u64().unwrap();
    let t = ln["t"].as_u64().unwrap();
    assert_eq!(totp::time_step(unix, 0, step), Ok(t));
    assert_eq!(t, 283_333_333);

    let client = secret(ln, "client_secret");
    let server = secret(ln, "server_secret");
    let c2b = nonce::compute(&client, Direction::ClientToBroker, &ctx, t).unwrap();
    let b2c = nonce::compute(&server, Direction::BrokerToClient, &ctx, t).unwrap();
    assert_eq!(hex_of(&c2b), str_field(ln, "client_to_broker"));
    assert_eq!(hex_of(&b2c), str_field(ln, "broker_to_client"));

    // The broker's view: verify the client's nonce, answer for the matched T.
    let policy = NoncePolicy::default();
    let matched = nonce::verify(
        &client,
        Direction::ClientToBroker,
        &ctx,
        &policy,
        unix + 5,
        &c2b,
    );
    assert_eq!(matched, Ok(t));
    assert_eq!(
        nonce::verify(
            &server,
            Direction::BrokerToClient,
            &ctx,
            &policy,
            unix,
            &b2c
        ),
        Ok(t)
    );
}

#[test]
fn p2p_key_schedule() {
    let v = vectors();
    let p = &v["p2p"];
    let token = secret(p, "token");
    let id_i = IdentityKey::from_seed(&secret(p, "identity_seed_i"));
    let id_r = IdentityKey::from_seed(&secret(p, "identity_seed_r"));
    let eph_i = || EphemeralSecret::from_secret(&secret(p, "eph_secret_i"));
    let eph_r = || EphemeralSecret::from_secret(&secret(p, "eph_secret_r"));

    assert_eq!(id_i.public_key().to_hex(), str_field(p, "id_i"));
    assert_eq!(id_r.public_key().to_hex(), str_field(p, "id_r"));
    assert_eq!(hex_of(&eph_i().public_key()), str_field(p, "eph_i"));
    assert_eq!(hex_of(&eph_r().public_key()), str_field(p, "eph_r"));
    assert_eq!(
        hex_of(&handshake::token_id(&token)),
        str_field(p, "token_id")
    );

    // The state machines on both sides produce the frames byte for byte.
    let (initiator, init_bytes) =
        Initiator::from_parts(&id_i, &token, arr(str_field(p, "nonce_i")), eph_i());
    assert_eq!(hex_of(&init_bytes), str_field(p, "init"));
    let (responder, accept_bytes) = Responder::handle_init_with(
        &id_r,
        &init_bytes,
        |tid| (*tid == handshake::token_id(&token)).then(|| token.clone()),
        arr(str_field(p, "nonce_r")),
        eph_r(),
    )
    .unwrap();
    assert_eq!(hex_of(&accept_bytes), str_field(p, "accept"));
    let outcome = initiator.handle_accept(&accept_bytes).unwrap();
    assert_eq!(hex_of(&outcome.finish), str_field(p, "finish"));
    assert_eq!(outcome.peer_identity, id_r.public_key());
    let keys_r = responder.handle_finish(&outcome.finish).unwrap();

    // Every intermediate value.
    let init = Init::decode(&init_bytes).unwrap();
    let accept = Accept::decode(&accept_bytes).unwrap();
    assert_eq!(hex_of(&init.proof_i), str_field(p, "proof_i"));
    assert_eq!(hex_of(&accept.proof_r), str_field(p, "proof_r"));
    let h = handshake::transcript_hash(&init, &accept);
    assert_eq!(hex_of(&h), str_field(p, "transcript_hash"));
    assert_eq!(hex_of(&accept.sig_r), str_field(p, "sig_r"));
    assert_eq!(hex_of(&outcome.finish[1..]), str_field(p, "sig_i"));
    let pub_r = IdentityPublicKey::from_hex(str_field(p, "id_r")).unwrap();
    assert_eq!(
        pub_r.verify(
            &handshake::signed_message(Role::Responder, &h),
            &accept.sig_r
        ),
        Ok(())
    );

    let shared = eph_i().diffie_hellman(&accept.eph_r).unwrap();
    assert_eq!(shared, eph_r().diffie_hellman(&init.eph_i).unwrap());
    assert_eq!(shared.to_hex().as_str(), str_field(p, "shared"));
    let ks = KeySchedule::derive(&shared, &token, &h);
    assert_eq!(ks.prk.to_hex().as_str(), str_field(p, "prk"));
    assert_eq!(ks.ts_key_i2r.to_hex().as_str(), str_field(p, "ts_key_i2r"));
    assert_eq!(ks.ts_key_r2i.to_hex().as_str(), str_field(p, "ts_key_r2i"));
    assert_eq!(ks.seed_i2r.to_hex().as_str(), str_field(p, "seed_i2r"));
    assert_eq!(ks.seed_r2i.to_hex().as_str(), str_field(p, "seed_r2i"));
    assert_eq!(hex_of(&ks.session_id), str_field(p, "session_id"));

    // Directions: I sends with i2r and receives with r2i; R the opposite.
    assert_eq!(outcome.keys, ks.session_keys(Role::Initiator));
    assert_eq!(keys_r, ks.session_keys(Role::Responder));
    assert_eq!(outcome.keys.send.ts_key, ks.ts_key_i2r);
    assert_eq!(outcome.keys.send.seed, ks.seed_i2r);
    assert_eq!(keys_r.send.ts_key, ks.ts_key_r2i);
    assert_eq!(keys_r.send.seed, ks.seed_r2i);
}

#[test]
fn data_frame() {
    let v = vectors();
    let p = &v["p2p"];
    let d = &v["data_frame"];
    assert_eq!(str_field(d, "direction"), "i2r");
    let keys = micromsg_crypto::DirectionKeys {
        ts_key: secret(p, "ts_key_i2r"),
        seed: secret(p, "seed_i2r"),
    };
    let counter = d["counter"].as_u64().unwrap();
    let unix = d["unix"].as_u64().unwrap();
    assert_eq!((counter, unix), (0, 1_700_000_000));
    let kind = Kind::from_byte(d["kind"].as_u64().unwrap() as u8).unwrap();
    assert_eq!(kind, Kind::Text);
    let payload = str_field(d, "payload").as_bytes();

    let hs = HeaderString::new(counter, unix);
    assert_eq!(hs.as_str(), str_field(d, "header_string"));
    assert_eq!(
        hex_of(&message::header_nonce(counter)),
        str_field(d, "header_nonce")
    );
    let mk = message::message_key_material(&keys.seed, hs.as_bytes());
    assert_eq!(hex_of(mk.key()), str_field(d, "message_key"));
    assert_eq!(hex_of(mk.nonce()), str_field(d, "message_nonce"));

    let frame = keys.seal(counter, unix, kind, payload).unwrap();
    assert_eq!(hex_of(&frame), str_field(d, "frame"));
    let opened = keys.open(&field(d, "frame")).unwrap();
    assert_eq!(
        (
            opened.counter,
            opened.unix_secs,
            opened.kind,
            opened.payload.as_slice()
        ),
        (counter, unix, kind, payload)
    );

    let envelope = OfflineEnvelope {
        session_id: arr(str_field(p, "session_id")),
        frame: &frame,
    };
    assert_eq!(hex_of(&envelope.encode()), str_field(d, "offline_envelope"));
    let bytes = field(d, "offline_envelope");
    assert_eq!(OfflineEnvelope::decode(&bytes), Ok(envelope));
}

#[test]
fn safety_number_vector() {
    let v = vectors();
    let s = &v["safety_number"];
    let a = IdentityPublicKey::from_hex(str_field(s, "id_a")).unwrap();
    let b = IdentityPublicKey::from_hex(str_field(s, "id_b")).unwrap();
    assert_eq!(str_field(s, "id_a"), str_field(&v["p2p"], "id_i"));
    assert_eq!(str_field(s, "id_b"), str_field(&v["p2p"], "id_r"));
    let pa = Party {
        number: str_field(s, "number_a"),
        identity: &a,
    };
    let pb = Party {
        number: str_field(s, "number_b"),
        identity: &b,
    };
    assert_eq!(safety_number(pa, pb).unwrap(), str_field(s, "value"));
    assert_eq!(safety_number(pb, pa).unwrap(), str_field(s, "value"));
}
