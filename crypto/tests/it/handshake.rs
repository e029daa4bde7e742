//! The P2P handshake state machines: success, and each way a peer can fail it.

use micromsg_crypto::agreement::{AgreementError, EphemeralSecret};
use micromsg_crypto::handshake::{
    self, ACCEPT_LEN, AbortReason, Accept, FINISH_LEN, Finish, HandshakeError, INIT_LEN, Init,
    Role, SessionKeys,
};
use micromsg_crypto::identity::IdentityError;
use micromsg_crypto::message::Kind;
use micromsg_crypto::{IdentityKey, Initiator, Responder, Secret32};

use crate::common::{TestRng, arr};

/// Low-order Curve25519 u-coordinates: 0, 1 and a point of order 8.
const LOW_ORDER: [&str; 3] = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
];

struct Setup {
    rng: TestRng,
    id_i: IdentityKey,
    id_r: IdentityKey,
    token: Secret32,
}

fn setup(seed: u64) -> Setup {
    let mut rng = TestRng(seed);
    let id_i = IdentityKey::generate(&mut rng);
    let id_r = IdentityKey::generate(&mut rng);
    let token = Secret32::generate(&mut rng);
    Setup {
        rng,
        id_i,
        id_r,
        token,
    }
}

fn lookup(token: &Secret32) -> impl FnOnce(&[u8; 16]) -> Option<Secret32> + '_ {
    move |id| (*id == handshake::token_id(token)).then(|| token.clone())
}

fn run(s: &mut Setup) -> (SessionKeys, SessionKeys) {
    let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
    assert_eq!(init.len(), INIT_LEN);
    let (responder, accept) =
        Responder::handle_init(&mut s.rng, &s.id_r, &init, lookup(&s.token)).unwrap();
    assert_eq!(accept.len(), ACCEPT_LEN);
    assert_eq!(*responder.peer_identity(), s.id_i.public_key());
    let outcome = initiator.handle_accept(&accept).unwrap();
    assert_eq!(outcome.finish.len(), FINISH_LEN);
    assert_eq!(outcome.peer_identity, s.id_r.public_key());
    let keys_r = responder.handle_finish(&outcome.finish).unwrap();
    (outcome.keys, keys_r)
}

#[test]
fn full_run_gives_mirrored_keys() {
    let mut s = setup(1);
    let (ki, kr) = run(&mut s);
    assert_eq!(ki.session_id, kr.session_id);
    assert_eq!(ki.send, kr.recv);
    assert_eq!(ki.recv, kr.send);
    assert_ne!(ki.send, ki.recv);

    let frame = ki.send.seal(0, 1_700_000_000, Kind::Text, b"hi R").unwrap();
    assert_eq!(kr.recv.open(&frame).unwrap().payload, b"hi R");
    let frame = kr.send.seal(0, 1_700_000_001, Kind::Text, b"hi I").unwrap();
    assert_eq!(ki.recv.open(&frame).unwrap().payload, b"hi I");
    // A frame is not accepted in the other direction.
    assert!(
        ki.recv
            .open(&ki.send.seal(1, 0, Kind::Heartbeat, b"").unwrap())
            .is_err()
    );

    // A second run has fresh keys.
    let (ki2, _) = run(&mut s);
    assert_ne!(ki2.session_id, ki.session_id);
    assert_ne!(ki2.send, ki.send);

    // Debug never shows key bytes.
    let shown = format!("{ki:?}");
    assert!(shown.contains("redacted"));
    assert!(!shown.contains(ki.send.ts_key.to_hex().as_str()));
}

#[test]
fn wrong_or_unknown_token_refused() {
    let mut s = setup(2);
    let (_, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);

    let other = Secret32::generate(&mut s.rng);
    let err =
        Responder::handle_init(&mut s.rng, &s.id_r, &init, |_| Some(other.clone())).unwrap_err();
    assert_eq!(err, HandshakeError::BadProof);
    assert_eq!(err.abort_reason(), Some(AbortReason::BadToken));

    let err = Responder::handle_init(&mut s.rng, &s.id_r, &init, |_| None).unwrap_err();
    assert_eq!(err, HandshakeError::UnknownToken);
    assert_eq!(err.abort_reason(), Some(AbortReason::BadToken));

    // The responder knows another token than the initiator: the initiator refuses its proof.
    let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
    let (_, accept) =
        Responder::handle_init(&mut s.rng, &s.id_r, &init, |_| Some(s.token.clone())).unwrap();
    let mut forged = Accept::decode(&accept).unwrap();
    forged.proof_r = handshake::responder_proof(
        &other,
        &Init::decode(&init).unwrap().nonce_i,
        &forged.nonce_r,
    );
    assert_eq!(
        initiator.handle_accept(&forged.encode()).unwrap_err(),
        HandshakeError::BadProof
    );
}

#[test]
fn tampered_accept_refused() {
    let mut s = setup(3);
    // One INIT, answered once; the initiator is rebuilt from the same nonce and ephemeral
    // secret for each attempt, since handling ACCEPT consumes it.
    let eph_secret = Secret32::generate(&mut s.rng);
    let nonce_i = [9u8; 32];
    let initiator = || {
        Initiator::from_parts(
            &s.id_i,
            &s.token,
            nonce_i,
            EphemeralSecret::from_secret(&eph_secret),
        )
    };
    let (_, init) = initiator();
    let (_, accept) = Responder::handle_init(&mut s.rng, &s.id_r, &init, lookup(&s.token)).unwrap();
    assert!(initiator().0.handle_accept(&accept).is_ok());
    // Every single-bit change anywhere in ACCEPT is refused.
    for byte in 0..ACCEPT_LEN {
        for bit in 0..8 {
            let mut bad = accept;
            bad[byte] ^= 1 << bit;
            assert!(
                initiator().0.handle_accept(&bad).is_err(),
                "byte {byte} bit {bit}"
            );
        }
    }

    // Specifically: a bad signature is reported as such.
    let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
    let (_, accept) = Responder::handle_init(&mut s.rng, &s.id_r, &init, lookup(&s.token)).unwrap();
    let mut bad = Accept::decode(&accept).unwrap();
    bad.sig_r[10] ^= 0x40;
    let err = initiator.handle_accept(&bad.encode()).unwrap_err();
    assert_eq!(err, HandshakeError::BadSignature);
    assert_eq!(err.abort_reason(), Some(AbortReason::BadSignature));

    // A valid signature by another identity (a relay swapping in its own key but keeping
    // id_r) fails too.
    let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
    let (_, accept) = Responder::handle_init(&mut s.rng, &s.id_r, &init, lookup(&s.token)).unwrap();
    let mallory = IdentityKey::generate(&mut s.rng);
    let mut bad = Accept::decode(&accept).unwrap();
    let h = handshake::transcript_hash(&Init::decode(&init).unwrap(), &bad);
    bad.sig_r = mallory.sign(&handshake::signed_message(Role::Responder, &h));
    assert_eq!(
        initiator.handle_accept(&bad.encode()).unwrap_err(),
        HandshakeError::BadSignature
    );
}

#[test]
fn low_order_ephemeral_refused() {
    let mut s = setup(4);
    for point in LOW_ORDER {
        // Responder side: an INIT with a valid proof but a low-order eph_i.
        let (_, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
        let mut init = Init::decode(&init).unwrap();
        init.eph_i = arr(point);
        let err = Responder::handle_init(&mut s.rng, &s.id_r, &init.encode(), lookup(&s.token))
            .unwrap_err();
        assert_eq!(
            err,
            HandshakeError::Agreement(AgreementError::LowOrderPoint)
        );
        assert_eq!(err.abort_reason(), Some(AbortReason::ProtocolError));

        // Initiator side: an ACCEPT with a low-order eph_r, correctly proven and signed.
        let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
        let init = Init::decode(&init).unwrap();
        let nonce_r = [7u8; 32];
        let mut accept = Accept {
            nonce_r,
            proof_r: handshake::responder_proof(&s.token, &init.nonce_i, &nonce_r),
            id_r: *s.id_r.public_key().as_bytes(),
            eph_r: arr(point),
            sig_r: [0; 64],
        };
        let h = handshake::transcript_hash(&init, &accept);
        accept.sig_r = s.id_r.sign(&handshake::signed_message(Role::Responder, &h));
        assert_eq!(
            initiator.handle_accept(&accept.encode()).unwrap_err(),
            HandshakeError::Agreement(AgreementError::LowOrderPoint)
        );
    }
}

#[test]
fn finish_from_another_identity_refused() {
    let mut s = setup(5);
    let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);
    let init_fields = Init::decode(&init).unwrap();
    let (responder, accept) =
        Responder::handle_init(&mut s.rng, &s.id_r, &init, lookup(&s.token)).unwrap();
    let h = handshake::transcript_hash(&init_fields, &Accept::decode(&accept).unwrap());

    // Mallory signs the right transcript with her own key.
    let mallory = IdentityKey::generate(&mut s.rng);
    let forged = Finish {
        sig_i: mallory.sign(&handshake::signed_message(Role::Initiator, &h)),
    };
    let err = responder.handle_finish(&forged.encode()).unwrap_err();
    assert_eq!(err, HandshakeError::BadSignature);

    // The real initiator's FINISH, but for another transcript (the same INIT answered again
    // with another ephemeral key), is refused; so is the responder's own signature reflected
    // back (role byte 0x02 instead of 0x01).
    let outcome = initiator.handle_accept(&accept).unwrap();
    let (responder, accept2) = Responder::handle_init_with(
        &s.id_r,
        &init,
        lookup(&s.token),
        Accept::decode(&accept).unwrap().nonce_r,
        EphemeralSecret::generate(&mut TestRng(99)),
    )
    .unwrap();
    assert_ne!(
        accept2, accept,
        "different ephemeral key, different transcript"
    );
    // FINISH for the first transcript does not verify against the second.
    assert_eq!(
        responder.handle_finish(&outcome.finish).unwrap_err(),
        HandshakeError::BadSignature
    );
    let (responder, accept3) =
        Responder::handle_init(&mut s.rng, &s.id_r, &init, lookup(&s.token)).unwrap();
    let reflected = Finish {
        sig_i: Accept::decode(&accept3).unwrap().sig_r,
    };
    assert_eq!(
        responder.handle_finish(&reflected.encode()).unwrap_err(),
        HandshakeError::BadSignature
    );
}

#[test]
fn malformed_versions_and_aborts() {
    let mut s = setup(6);
    let (initiator, init) = Initiator::new(&mut s.rng, &s.id_i, &s.token);

    let mut v2 = init;
    v2[1] = 2;
    let err = Responder::handle_init(&mut s.rng, &s.id_r, &v2, lookup(&s.token)).unwrap_err();
    assert_eq!(err, HandshakeError::UnsupportedVersion(2));
    assert_eq!(err.abort_reason(), Some(AbortReason::UnsupportedVersion));
    // Another version may be longer: the version is judged before the length.
    let mut v2_long = v2.to_vec();
    v2_long.push(0);
    assert_eq!(
        Responder::handle_init(&mut s.rng, &s.id_r, &v2_long, lookup(&s.token)).unwrap_err(),
        HandshakeError::UnsupportedVersion(2)
    );

    for bad in [&init[..INIT_LEN - 1], &[], &[0x02; INIT_LEN][..]] {
        let err = Responder::handle_init(&mut s.rng, &s.id_r, bad, lookup(&s.token)).unwrap_err();
        assert!(matches!(err, HandshakeError::Malformed(_)), "{err:?}");
        assert_eq!(err.abort_reason(), Some(AbortReason::ProtocolError));
    }

    // A weak identity key in INIT is refused.
    let mut weak = Init::decode(&init).unwrap();
    weak.id_i = arr(LOW_ORDER[1]);
    assert_eq!(
        Responder::handle_init(&mut s.rng, &s.id_r, &weak.encode(), lookup(&s.token)).unwrap_err(),
        HandshakeError::InvalidIdentity(IdentityError::WeakPublicKey)
    );

    // An ABORT in place of ACCEPT.
    assert_eq!(AbortReason::BadToken.encode(), [0x7f, 0x01]);
    assert_eq!(
        initiator
            .handle_accept(&AbortReason::BadToken.encode())
            .unwrap_err(),
        HandshakeError::PeerAborted(AbortReason::BadToken)
    );
    assert_eq!(AbortReason::from_byte(0xee), AbortReason::ProtocolError);
    assert!(matches!(
        Finish::decode(&[0x03; FINISH_LEN - 1]),
        Err(HandshakeError::Malformed(_))
    ));
}
