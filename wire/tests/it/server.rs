//! The broker's path: a bad request is answered at its Id and name when
//! those were readable, with the right code.

use micromsg_wire::*;

fn answer(text: &str) -> (RequestError, String) {
    let error = decode_request(text.as_bytes(), &Limits::default()).unwrap_err();
    let reply = String::from_utf8(error.to_response().encode()).unwrap();
    (error, reply)
}

#[test]
fn bad_args_are_answered_at_the_request() {
    let (error, reply) =
        answer("Request: LOGIN\nId: 7\nArgs:\n  ENTITY: \"5550001234\"\n  DEVICE: 1\n");
    assert_eq!(error.id, 7);
    assert_eq!(error.request, Some(RequestKind::Login));
    assert_eq!(error.error.error_code(), ErrorCode::BadArgs);
    assert!(!error.closes_connection());
    assert_eq!(
        reply,
        "Response: LOGIN\nId: 7\nStatus: ERROR\nError:\n  Code: BAD-ARGS\n  Message: \"missing field Args.SECRET\"\n"
    );
}

#[test]
fn contact_answer_of_no_valid_shape_is_answered_at_the_request() {
    let (error, reply) = answer(
        "Request: CONTACT-ANSWER\nId: 5\nArgs:\n  REQUEST: \"00112233445566778899aabbccddeeff\"\n  ACCEPT: false\n  ADDRESS: \"127.0.0.1:7000\"\n",
    );
    assert_eq!(
        (error.id, error.request),
        (5, Some(RequestKind::ContactAnswer))
    );
    assert_eq!(error.error.kind(), "BadValue");
    assert_eq!(error.error.error_code(), ErrorCode::BadArgs);
    assert!(!error.closes_connection());
    assert_eq!(
        reply,
        "Response: CONTACT-ANSWER\nId: 5\nStatus: ERROR\nError:\n  Code: BAD-ARGS\n  Message: \"field Args.ADDRESS: a declining answer (ACCEPT: false) carries no ADDRESS, PUBKEY or SEALED-ADDRESS\"\n"
    );
    let (error, _) = answer(
        "Request: CONTACT-ANSWER\nId: 6\nArgs:\n  REQUEST: \"00112233445566778899aabbccddeeff\"\n  ACCEPT: true\n  PUBKEY: \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\n",
    );
    assert_eq!(error.error.to_string(), "missing field Args.SEALED-ADDRESS");
    assert_eq!(error.error.error_code(), ErrorCode::BadArgs);
}

#[test]
fn contact_answer_reads_null_fields_as_absent() {
    use micromsg_wire::message::request::{Answer, ContactAnswerArgs};
    let text = "Request: CONTACT-ANSWER\nId: 5\nArgs:\n  REQUEST: \"00112233445566778899aabbccddeeff\"\n  ACCEPT: false\n  ADDRESS: null\n  PUBKEY: null\n  SEALED-ADDRESS: null\n";
    assert_eq!(
        decode_request(text.as_bytes(), &Limits::default()),
        Ok((
            5,
            Request::ContactAnswer(ContactAnswerArgs {
                request: "00112233445566778899aabbccddeeff".parse().unwrap(),
                answer: Answer::Decline,
            })
        ))
    );
}

#[test]
fn unknown_request_is_answered_as_error_with_the_id() {
    let (error, reply) = answer("Request: LOGON\nId: 9\n");
    assert_eq!((error.id, error.request), (9, None));
    assert_eq!(error.error, DecodeError::UnknownRequest("LOGON".into()));
    assert!(
        reply.starts_with(
            "Response: ERROR\nId: 9\nStatus: ERROR\nError:\n  Code: UNKNOWN-REQUEST\n"
        )
    );
}

#[test]
fn unparseable_frames_are_answered_at_id_zero() {
    let (error, reply) = answer("Request: [unclosed\n");
    assert_eq!((error.id, error.request), (0, None));
    assert_eq!(error.error.error_code(), ErrorCode::BadYaml);
    assert!(reply.starts_with("Response: ERROR\nId: 0\nStatus: ERROR\nError:\n  Code: BAD-YAML\n"));
}

#[test]
fn envelope_errors_keep_what_was_readable() {
    let (error, _) = answer("Request: PING\nId: 4\nColor: blue\n");
    assert_eq!((error.id, error.request), (4, Some(RequestKind::Ping)));
    assert_eq!(error.error.kind(), "UnknownField");
    assert_eq!(error.error.error_code(), ErrorCode::BadYaml);
}

#[test]
fn frames_of_the_wrong_kind_are_refused() {
    let (error, _) = answer("Event: INBOX\nData: {COUNT: 1}\n");
    assert_eq!(
        error.error,
        DecodeError::UnexpectedKind {
            expected: "Request",
            found: "Event"
        }
    );
}

#[test]
fn framing_errors_close_the_connection() {
    let error = RequestError::from_frame_error(FrameError::TooLarge {
        len: 70000,
        max: 65536,
    });
    assert!(error.closes_connection());
    let reply = String::from_utf8(error.to_response().encode()).unwrap();
    assert!(
        reply.starts_with(
            "Response: ERROR\nId: 0\nStatus: ERROR\nError:\n  Code: FRAME-TOO-LARGE\n"
        )
    );
    assert!(RequestError::from_frame_error(FrameError::Empty).closes_connection());
}

#[test]
fn login_requirement_is_known_per_request() {
    let public: Vec<_> = RequestKind::ALL
        .iter()
        .filter(|k| !k.requires_login())
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        public,
        [
            "BROKER-INFO",
            "REGISTER",
            "DEVICE-JOIN",
            "LOGIN",
            "PING",
            "PORT-IN"
        ]
    );
}

#[test]
fn secrets_are_redacted_in_debug_output() {
    use micromsg_wire::message::request::LoginArgs;
    let request = Request::Login(LoginArgs {
        entity: Number::new("5550001234").unwrap(),
        device: DeviceId::FIRST,
        secret: Hex32::from_bytes([0x5a; 32]),
    });
    let debug = format!("{request:?}");
    assert!(debug.contains("Hex32(<redacted>)"), "{debug}");
    assert!(!debug.contains("5a5a"), "{debug}");
}

#[test]
fn a_frame_the_yaml_reader_refuses_is_answered_at_id_zero_even_with_a_plain_id() {
    // protocol.md 4.4: nothing of such a frame is read, so its Id is not echoed.
    for text in [
        "Request: PING\nId: 5\nX: &a 1\n",
        "Request: PING\nId: 5\nId: 6\n",
    ] {
        let (error, reply) = answer(text);
        assert_eq!(error.id, 0, "{text:?}");
        assert_eq!(error.error.error_code(), ErrorCode::BadYaml, "{text:?}");
        assert!(reply.starts_with("Response: ERROR\nId: 0\n"), "{reply}");
    }
}
