//! DATA frames: round trips, tamper detection, header strings, replay guard, offline envelope.

use micromsg_crypto::aead;
use micromsg_crypto::message::{
    self, Body, HeaderString, Kind, MessageError, OfflineEnvelope, Opened, PREFIX_LEN, ReplayGuard,
    Sender, TYPE_DATA,
};
use micromsg_crypto::{DirectionKeys, Secret32};
use proptest::prelude::*;

fn keys(a: u8, b: u8) -> DirectionKeys {
    DirectionKeys {
        ts_key: Secret32::from_bytes([a; 32]),
        seed: Secret32::from_bytes([b; 32]),
    }
}

/// Opens `frame` both ways, [`DirectionKeys::open`] (a copy) and [`DirectionKeys::open_owned`]
/// (in place), and checks that they agree on the result, errors included.
fn open(k: &DirectionKeys, frame: &[u8]) -> Result<Opened, MessageError> {
    let copied = k.open(frame);
    let owned = k.open_owned(frame.to_vec()).map(|(h, body)| Opened {
        counter: h.counter,
        unix_secs: h.unix_secs,
        kind: h.kind,
        payload: match body {
            Body::Text(text) => {
                assert!(matches!(h.kind, Kind::Text | Kind::Disconnect));
                text.into_bytes()
            }
            Body::Bytes(bytes) => bytes,
        },
    });
    assert_eq!(copied, owned, "open and open_owned disagree");
    copied
}

fn kind_and_payload() -> impl Strategy<Value = (Kind, Vec<u8>)> {
    prop_oneof![
        Just((Kind::Heartbeat, Vec::new())),
        ".{0,300}".prop_map(|s| (Kind::Text, s.into_bytes())),
        ".{0,40}".prop_map(|s| (Kind::Disconnect, s.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|p| (Kind::Group, p)),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|p| (Kind::Sync, p)),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|p| (Kind::Moved, p)),
    ]
}

/// Builds a frame by hand from the spec, with free choice of the kind byte and of the
/// counter in the prefix versus in the header string.
fn handmade_frame(
    k: &DirectionKeys,
    prefix_counter: u64,
    hs: &str,
    kind: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![TYPE_DATA];
    out.extend(prefix_counter.to_be_bytes());
    out.push((hs.len() + 16) as u8);
    let prefix = out.clone();
    aead::seal_into(
        k.ts_key.expose(),
        &message::header_nonce(prefix_counter),
        &prefix,
        hs.as_bytes(),
        &mut out,
    )
    .unwrap();
    let mk = message::message_key_material(&k.seed, hs.as_bytes());
    let mut body = vec![kind];
    body.extend(payload);
    let aad = out.clone();
    aead::seal_into(mk.key(), mk.nonce(), &aad, &body, &mut out).unwrap();
    out
}

proptest! {
    #[test]
    fn seal_open_round_trip(
        counter in any::<u64>(),
        unix in any::<u64>(),
        (kind, payload) in kind_and_payload(),
    ) {
        let k = keys(1, 2);
        let mut frame = b"prefix kept".to_vec();
        k.seal_into(counter, unix, kind, &payload, &mut frame).unwrap();
        let frame = &frame[11..];
        prop_assert_eq!(message::frame_counter(frame), Ok(counter));
        let mut out = b"kept".to_vec();
        let h = k.open_into(frame, &mut out).unwrap();
        prop_assert_eq!((h.counter, h.unix_secs, h.kind), (counter, unix, kind));
        prop_assert_eq!(&out[..4], b"kept");
        prop_assert_eq!(&out[4..], payload.as_slice());
        prop_assert_eq!(open(&k, frame).unwrap().payload, payload);
        // Another direction's keys refuse it.
        prop_assert_eq!(open(&keys(2, 1), frame), Err(MessageError::Tampered));
    }

    #[test]
    fn any_single_bit_flip_is_refused(
        counter in any::<u64>(),
        unix in any::<u64>(),
        (kind, payload) in kind_and_payload(),
        pick in any::<proptest::sample::Index>(),
        bit in 0u8..8,
    ) {
        let k = keys(3, 4);
        let mut frame = k.seal(counter, unix, kind, &payload).unwrap();
        let i = pick.index(frame.len());
        frame[i] ^= 1 << bit;
        let mut out = Vec::new();
        prop_assert!(k.open_into(&frame, &mut out).is_err());
        prop_assert!(out.is_empty());
        prop_assert!(open(&k, &frame).is_err());
    }

    #[test]
    fn truncated_or_extended_frames_are_refused(
        (kind, payload) in kind_and_payload(),
        cut in any::<proptest::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..20),
    ) {
        let k = keys(5, 6);
        let frame = k.seal(7, 8, kind, &payload).unwrap();
        let n = cut.index(frame.len());
        prop_assert!(open(&k, &frame[..n]).is_err());
        let mut longer = frame.clone();
        longer.extend(extra);
        prop_assert!(open(&k, &longer).is_err());
    }

    #[test]
    fn header_string_round_trip(counter in any::<u64>(), unix in any::<u64>()) {
        let hs = HeaderString::new(counter, unix);
        prop_assert_eq!(hs.as_str(), format!("{counter}-{unix}"));
        prop_assert_eq!(HeaderString::parse(hs.as_bytes()), Ok((counter, unix)));
    }

    /// Whatever the input, parse accepts exactly the canonical strings.
    #[test]
    fn header_string_parse_is_strict(s in "[0-9+ -]{0,45}|[0-9]{1,3}-[0-9]{1,3}|.{0,45}") {
        match HeaderString::parse(s.as_bytes()) {
            Ok((c, u)) => {
                let canonical = HeaderString::new(c, u);
                prop_assert_eq!(canonical.as_str(), s.as_str());
            }
            Err(e) => prop_assert_eq!(e, MessageError::InvalidHeaderString),
        }
    }

    #[test]
    fn malformed_header_strings_are_refused(
        counter in any::<u64>(),
        unix in any::<u64>(),
        zeros in 1usize..3,
        which in 0u8..6,
    ) {
        let pad = "0".repeat(zeros);
        let bad = match which {
            0 => format!("{pad}{counter}-{unix}"),
            1 => format!("{counter}-{pad}{unix}"),
            2 => format!("{counter}--{unix}"),
            3 => format!("{counter}-{unix}-"),
            4 => format!("{counter}-{unix}{}", "9".repeat(20)),
            _ => format!("{counter} -{unix}"),
        };
        prop_assert_eq!(HeaderString::parse(bad.as_bytes()), Err(MessageError::InvalidHeaderString));
    }
}

#[test]
fn every_bit_of_one_frame_matters() {
    let k = keys(7, 8);
    let frame = k.seal(3, 1_700_000_000, Kind::Text, b"hello").unwrap();
    for i in 0..frame.len() {
        for bit in 0..8 {
            let mut bad = frame.clone();
            bad[i] ^= 1 << bit;
            let err = open(&k, &bad).unwrap_err();
            let expected = if i == 0 || i == PREFIX_LEN - 1 {
                // The type byte and hlen are layout: a change there is malformed or, when the
                // new hlen still fits, fails authentication.
                matches!(err, MessageError::Malformed | MessageError::Tampered)
            } else {
                err == MessageError::Tampered
            };
            assert!(expected, "byte {i} bit {bit}: {err:?}");
        }
    }
}

#[test]
fn payloads_of_every_size_class_round_trip_both_ways() {
    let k = keys(13, 14);
    for len in [0usize, 1, 63, 64, 65, 4095, 4096, 4097, 65_536, 1 << 20] {
        let text: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let frame = k.seal(len as u64, 9, Kind::Text, text.as_bytes()).unwrap();
        assert_eq!(
            open(&k, &frame).unwrap().payload,
            text.as_bytes(),
            "text of {len}"
        );
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let mut frame = k.seal(len as u64, 9, Kind::Group, &bytes).unwrap();
        assert_eq!(open(&k, &frame).unwrap().payload, bytes, "group of {len}");
        // The last ciphertext byte before the tag, which only the body's tag covers.
        let last = frame.len() - 17;
        frame[last] ^= 0x80;
        assert_eq!(
            open(&k, &frame),
            Err(MessageError::Tampered),
            "flip in {len}"
        );
    }
}

#[test]
fn authentic_but_inconsistent_frames() {
    let k = keys(9, 10);
    // The hand-built frame matches the library's.
    assert_eq!(
        handmade_frame(&k, 5, "5-100", Kind::Text as u8, b"x"),
        k.seal(5, 100, Kind::Text, b"x").unwrap()
    );
    // Unknown kind (0x05 is MOVED, protocol 12.13; 0x06 on are unknown).
    let f = handmade_frame(&k, 5, "5-100", 0x06, b"x");
    assert_eq!(open(&k, &f), Err(MessageError::UnknownKind(0x06)));
    // Header counter differs from the prefix counter.
    let f = handmade_frame(&k, 5, "6-100", Kind::Text as u8, b"x");
    assert_eq!(open(&k, &f), Err(MessageError::Tampered));
    // Non-canonical header string.
    let f = handmade_frame(&k, 5, "05-100", Kind::Text as u8, b"x");
    assert_eq!(open(&k, &f), Err(MessageError::Tampered));
    // Payloads that do not fit their kind.
    let f = handmade_frame(&k, 5, "5-100", Kind::Heartbeat as u8, b"x");
    assert_eq!(
        open(&k, &f),
        Err(MessageError::InvalidPayload(Kind::Heartbeat))
    );
    let f = handmade_frame(&k, 5, "5-100", Kind::Text as u8, &[0xc3]);
    assert_eq!(open(&k, &f), Err(MessageError::InvalidPayload(Kind::Text)));
    assert_eq!(Kind::from_byte(0x05), Some(Kind::Moved));
    assert_eq!(Kind::from_byte(0x06), None);
}

#[test]
fn sender_counts_and_guard_refuses_replays() {
    let k = keys(11, 12);
    let mut sender = Sender::new(k.clone(), 0);
    let mut guard = ReplayGuard::new();
    let mut frames = Vec::new();
    for i in 0..5u64 {
        let mut f = Vec::new();
        assert_eq!(
            sender.seal_into(1_700_000_000, Kind::Text, b"m", &mut f),
            Ok(i)
        );
        frames.push(f);
    }
    assert_eq!(sender.next_counter(), Some(5));
    for f in &frames {
        let h = open(&k, f).unwrap();
        guard.accept_next(h.counter).unwrap();
    }
    assert_eq!(guard.last(), Some(4));
    // Replaying any earlier frame: it opens, but the guard refuses it.
    let h = open(&k, &frames[2]).unwrap();
    assert_eq!(
        guard.accept(h.counter),
        Err(MessageError::Replay {
            counter: 2,
            last: 4
        })
    );
    // Offline: a gap is fine for `accept`, not for `accept_next`.
    let mut offline = ReplayGuard::after(4);
    assert_eq!(
        offline.clone().accept_next(6),
        Err(MessageError::OutOfOrder {
            counter: 6,
            expected: 5
        })
    );
    assert_eq!(offline.accept(6), Ok(()));
    assert_eq!(
        offline.check(6),
        Err(MessageError::Replay {
            counter: 6,
            last: 6
        })
    );
}

#[test]
fn offline_envelope() {
    let k = keys(13, 14);
    let frame = k.seal(0, 1, Kind::Text, b"later").unwrap();
    let env = OfflineEnvelope {
        session_id: [0xaa; 16],
        frame: &frame,
    };
    let bytes = env.encode();
    assert_eq!(&bytes[..4], b"MMO1");
    assert_eq!(bytes.len(), 4 + 16 + frame.len());
    let back = OfflineEnvelope::decode(&bytes).unwrap();
    assert_eq!(back, env);
    assert_eq!(open(&k, back.frame).unwrap().payload, b"later");

    assert_eq!(
        OfflineEnvelope::decode(b"MMO2"),
        Err(MessageError::Malformed)
    );
    assert_eq!(
        OfflineEnvelope::decode(&bytes[..20]),
        Err(MessageError::Malformed)
    );
    let mut wrong_type = bytes.clone();
    wrong_type[20] = 0x01;
    assert_eq!(
        OfflineEnvelope::decode(&wrong_type),
        Err(MessageError::Malformed)
    );
}

#[test]
fn sealing_a_str_gives_the_same_frame_as_sealing_its_bytes() {
    let k = keys(21, 22);
    for (kind, text) in [
        (Kind::Text, "héllo, wörld ✓"),
        (Kind::Text, ""),
        (Kind::Disconnect, "bye"),
        (Kind::Group, "any bytes"),
        (Kind::Heartbeat, ""),
    ] {
        let mut by_bytes = vec![0xaa];
        k.seal_into(7, 1_700_000_000, kind, text.as_bytes(), &mut by_bytes)
            .unwrap();
        let mut by_str = vec![0xaa];
        k.seal_str_into(7, 1_700_000_000, kind, text, &mut by_str)
            .unwrap();
        assert_eq!(by_str, by_bytes, "{kind:?}");
    }
    // The kind's other rules still hold: a heartbeat carries nothing, and `out` is untouched.
    let mut out = vec![1, 2, 3];
    assert_eq!(
        k.seal_str_into(7, 1_700_000_000, Kind::Heartbeat, "x", &mut out),
        Err(MessageError::InvalidPayload(Kind::Heartbeat))
    );
    assert_eq!(out, [1, 2, 3]);
    // The sender counts str seals like byte seals.
    let mut sender = Sender::new(k.clone(), 3);
    let mut f = Vec::new();
    assert_eq!(
        sender.seal_str_into(1_700_000_000, Kind::Text, "m", &mut f),
        Ok(3)
    );
    assert_eq!(sender.next_counter(), Some(4));
    assert_eq!(open(&k, &f).unwrap().counter, 3);
}
