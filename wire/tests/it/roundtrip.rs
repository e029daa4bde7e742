//! Every message type round-trips: encode, then decode, gives the same value;
//! and encoding is deterministic.

use crate::strategies;
use micromsg_wire::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::BTreeSet;

const CASES_PER_VARIANT: u32 = 48;

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES_PER_VARIANT,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Encode, decode (body and framed), compare; encode twice, compare bytes.
pub(crate) fn assert_round_trip(message: &Message) -> Result<(), TestCaseError> {
    let limits = Limits::default();
    let body = message.encode();
    prop_assert_eq!(&message.encode(), &body, "encoding is not deterministic");
    let decoded = Message::decode(&body, &limits);
    prop_assert_eq!(
        decoded.as_ref(),
        Ok(message),
        "body:\n{}",
        String::from_utf8_lossy(&body)
    );
    let frame = message.encode_frame(&limits).unwrap();
    prop_assert_eq!(&frame[4..], &body[..]);
    let framed = decode_framed(&frame, &limits);
    prop_assert_eq!(framed.as_ref(), Ok(message));
    Ok(())
}

#[test]
fn every_request_variant_round_trips() {
    let strategies = strategies::requests();
    let kinds: BTreeSet<_> = strategies.iter().map(|(k, _)| k.as_str()).collect();
    let all: BTreeSet<_> = RequestKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, all, "a request has no strategy");
    for (kind, strategy) in strategies {
        runner()
            .run(&(any::<u32>(), strategy), |(id, request)| {
                prop_assert_eq!(request.kind(), kind);
                assert_round_trip(&Message::request(id, request.clone()))?;
                // The broker's entry point agrees with the generic one.
                let decoded = decode_request(&request.encode(id), &Limits::default());
                prop_assert_eq!(decoded, Ok((id, request)));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

#[test]
fn every_response_variant_round_trips() {
    let strategies = strategies::response_data();
    let kinds: BTreeSet<_> = strategies.iter().map(|(k, _)| k.as_str()).collect();
    let all: BTreeSet<_> = RequestKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, all, "a response has no strategy");
    for (kind, strategy) in strategies {
        runner()
            .run(&(any::<u32>(), strategy), |(id, data)| {
                prop_assert_eq!(data.kind(), kind);
                assert_round_trip(&Message::Response(Response::ok(id, data)))
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

#[test]
fn error_responses_round_trip() {
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategies::error_response(), |response| {
            assert_round_trip(&Message::Response(response))
        })
        .unwrap();
}

#[test]
fn every_event_variant_round_trips() {
    let strategies = strategies::events();
    let kinds: BTreeSet<_> = strategies.iter().map(|(k, _)| k.as_str()).collect();
    let all: BTreeSet<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, all, "an event has no strategy");
    for (kind, strategy) in strategies {
        runner()
            .run(&strategy, |event| {
                prop_assert_eq!(event.kind(), kind);
                assert_round_trip(&Message::Event(event))
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    /// The signed bytes of `Info` survive a decode/re-encode by the client.
    #[test]
    fn canonical_info_is_reproducible_after_decoding(info in strategies::info(), sig in strategies::hex64(), key in strategies::hex32()) {
        use micromsg_wire::message::response::BrokerInfoData;
        let signed = encode_info_canonical(&info);
        let response = Response::ok(1, ResponseData::BrokerInfo(BrokerInfoData { info, signature: sig, identity_key: key }));
        let Ok(Message::Response(Response { result: Ok(ResponseData::BrokerInfo(data)), .. })) =
            Message::decode(&response.encode(), &Limits::default()) else {
            panic!("BROKER-INFO did not decode");
        };
        prop_assert_eq!(encode_info_canonical(&data.info), signed);
    }
}
