//! The exact bytes the encoder writes for representative frames. These are
//! part of the protocol's look (and `Info`'s are signed): change them only
//! on purpose.

use micromsg_wire::message::event::*;
use micromsg_wire::message::request::*;
use micromsg_wire::message::response::*;
use micromsg_wire::*;

fn counting<const N: usize>(start: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

fn assert_encodes(message: Message, expected: &str) {
    assert_eq!(String::from_utf8(message.encode()).unwrap(), expected);
    assert_eq!(
        Message::decode(expected.as_bytes(), &Limits::default()),
        Ok(message)
    );
}

#[test]
fn login_request() {
    assert_encodes(
        Message::request(
            7,
            Request::Login(LoginArgs {
                entity: Number::new("5550001234").unwrap(),
                device: DeviceId::FIRST,
                secret: Hex32::from_bytes(counting(0x10)),
            }),
        ),
        "Request: LOGIN
Id: 7
Args:
  ENTITY: \"5550001234\"
  DEVICE: 1
  SECRET: \"101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f\"
",
    );
}

#[test]
fn request_without_args_omits_args() {
    assert_encodes(Message::request(8, Request::Ping), "Request: PING\nId: 8\n");
    assert_encodes(
        Message::request(9, Request::AddDevice(AddDeviceArgs { name: None })),
        "Request: ADD-DEVICE\nId: 9\n",
    );
}

/// The three shapes of CONTACT-ANSWER, as protocol.md 6.15 spells them.
#[test]
fn contact_answer_requests() {
    let request: Hex16 = "1f58b9145b24d108d7ac38887338b3ea".parse().unwrap();
    assert_encodes(
        Message::request(
            13,
            Request::ContactAnswer(ContactAnswerArgs {
                request,
                answer: Answer::Accept {
                    address: Address::new("203.0.113.7:7001").unwrap(),
                },
            }),
        ),
        "Request: CONTACT-ANSWER
Id: 13
Args:
  REQUEST: \"1f58b9145b24d108d7ac38887338b3ea\"
  ACCEPT: true
  ADDRESS: \"203.0.113.7:7001\"
",
    );
    assert_encodes(
        Message::request(
            13,
            Request::ContactAnswer(ContactAnswerArgs {
                request: "2acb6cabafe2f9237ab835b382057c9b".parse().unwrap(),
                answer: Answer::AcceptNetworked {
                    pubkey: "f5b2d6e60f9477e310c2982daaa6c9136c108a1777c5947e448fa37d68174557"
                        .parse()
                        .unwrap(),
                    sealed_address:
                        "wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbXaOSP1yXcX3vU1jK/FK27dyoMLCSLp+by59Fq/WdsFoI="
                            .parse()
                            .unwrap(),
                },
            }),
        ),
        "Request: CONTACT-ANSWER
Id: 13
Args:
  REQUEST: \"2acb6cabafe2f9237ab835b382057c9b\"
  ACCEPT: true
  PUBKEY: \"f5b2d6e60f9477e310c2982daaa6c9136c108a1777c5947e448fa37d68174557\"
  SEALED-ADDRESS: \"wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbXaOSP1yXcX3vU1jK/FK27dyoMLCSLp+by59Fq/WdsFoI=\"
",
    );
    assert_encodes(
        Message::request(
            13,
            Request::ContactAnswer(ContactAnswerArgs {
                request,
                answer: Answer::Decline,
            }),
        ),
        "Request: CONTACT-ANSWER
Id: 13
Args:
  REQUEST: \"1f58b9145b24d108d7ac38887338b3ea\"
  ACCEPT: false
",
    );
}

#[test]
fn login_ok_response() {
    assert_encodes(
        Message::Response(Response::ok(
            7,
            ResponseData::Login(LoginData {
                proof: Hex32::from_bytes(counting(0xa0)),
                step: 56_666_666,
                session: SessionCounts { inbox: 3 },
                client_ip: Some("203.0.113.50".into()),
            }),
        )),
        "Response: LOGIN
Id: 7
Status: OK
Data:
  PROOF: \"a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf\"
  STEP: 56666666
  SESSION:
    INBOX: 3
  CLIENT-IP: \"203.0.113.50\"
",
    );
}

#[test]
fn error_responses() {
    assert_encodes(
        Message::Response(Response::error(
            7,
            Some(RequestKind::Login),
            ErrorBody::new(ErrorCode::AuthFailed, "login failed"),
        )),
        "Response: LOGIN
Id: 7
Status: ERROR
Error:
  Code: AUTH-FAILED
  Message: \"login failed\"
",
    );
    assert_encodes(
        Message::Response(Response::error(
            0,
            None,
            ErrorBody::new(ErrorCode::RateLimited, "slow \"down\"\n").retry_after(6),
        )),
        "Response: ERROR
Id: 0
Status: ERROR
Error:
  Code: RATE-LIMITED
  Message: \"slow \\\"down\\\"\\n\"
  RetryAfter: 6
",
    );
}

#[test]
fn empty_data_is_written_as_empty_mapping() {
    assert_encodes(
        Message::Response(Response::ok(3, ResponseData::Logout)),
        "Response: LOGOUT\nId: 3\nStatus: OK\nData: {}\n",
    );
}

#[test]
fn contact_request_event() {
    assert_encodes(
        Message::Event(Event::ContactRequest(ContactRequest {
            request: Hex16::from_bytes(counting(1)),
            from: Number::new("5550009999").unwrap(),
            kind: ContactKind::New,
            networked: false,
            pubkey: None,
        })),
        "Event: CONTACT-REQUEST
Data:
  REQUEST: \"0102030405060708090a0b0c0d0e0f10\"
  FROM: \"5550009999\"
  KIND: NEW
  NETWORKED: false
",
    );
}

#[test]
fn lists_of_mappings_and_nulls() {
    assert_encodes(
        Message::Response(Response::ok(
            4,
            ResponseData::DeviceList(DeviceListData {
                devices: vec![
                    DeviceInfo {
                        id: DeviceId::FIRST,
                        name: Some(DeviceName::new("phone").unwrap()),
                        created: 1_700_000_000,
                        last_seen: None,
                        current: true,
                    },
                    DeviceInfo {
                        id: DeviceId::new(2).unwrap(),
                        name: None,
                        created: 1_700_000_100,
                        last_seen: Some(1_700_000_200),
                        current: false,
                    },
                ],
            }),
        )),
        "Response: DEVICE-LIST
Id: 4
Status: OK
Data:
  DEVICES:
    - ID: 1
      NAME: \"phone\"
      CREATED: 1700000000
      LAST-SEEN: null
      CURRENT: true
    - ID: 2
      NAME: null
      CREATED: 1700000100
      LAST-SEEN: 1700000200
      CURRENT: false
",
    );
}

pub(crate) fn sample_info() -> Info {
    Info {
        protocol: 1,
        broker_id: "mm1.example".into(),
        inbox_mode: InboxMode::Entity,
        registration: Registration::Open,
        nonce_step: 30,
        nonce_skew: 1,
        nonce_algorithm: NonceAlgorithm::MmNonce1,
        key_storage: vec![KeyStorage::BrokerBackup, KeyStorage::DeviceToDevice],
        network: Network {
            name: None,
            peers: vec![Peer {
                id: "mm2.example".into(),
                prefixes: vec![NumberPrefix::new("556").unwrap()],
            }],
        },
        prefixes: vec![NumberPrefix::new("555").unwrap()],
        limits: InfoLimits {
            max_frame: 65536,
            max_devices: 8,
            inbox_quota: 10_000,
            message_max: 32_768,
            message_ttl: 1_209_600,
        },
        time: 1_700_000_000,
    }
}

#[test]
fn canonical_info() {
    let expected = "PROTOCOL: 1
BROKER-ID: \"mm1.example\"
INBOX-MODE: ENTITY
REGISTRATION: OPEN
NONCE-STEP: 30
NONCE-SKEW: 1
NONCE-ALGORITHM: MM-NONCE-1
KEY-STORAGE:
  - BROKER-BACKUP
  - DEVICE-TO-DEVICE
NETWORK:
  NAME: null
  PEERS:
    - ID: \"mm2.example\"
      PREFIXES:
        - \"556\"
PREFIXES:
  - \"555\"
LIMITS:
  MAX-FRAME: 65536
  MAX-DEVICES: 8
  INBOX-QUOTA: 10000
  MESSAGE-MAX: 32768
  MESSAGE-TTL: 1209600
TIME: 1700000000
";
    assert_eq!(
        String::from_utf8(encode_info_canonical(&sample_info())).unwrap(),
        expected
    );
    // Embedded in BROKER-INFO it is the same text, indented.
    let response = Response::ok(
        1,
        ResponseData::BrokerInfo(BrokerInfoData {
            info: sample_info(),
            signature: Hex64::from_bytes([0xab; 64]),
            identity_key: Hex32::from_bytes([0xcd; 32]),
        }),
    );
    let body = String::from_utf8(response.encode()).unwrap();
    let indented: String = expected.lines().map(|l| format!("    {l}\n")).collect();
    assert!(body.contains(&indented), "{body}");
    assert!(body.starts_with("Response: BROKER-INFO\nId: 1\nStatus: OK\nData:\n  Info:\n"));
}

#[test]
fn hand_written_yaml_in_other_styles_decodes() {
    // Flow style, comments, a leading `---`, keys in any order, optional
    // quoting of words, `Args: {}` and `Args: null` for no-arg requests.
    let limits = Limits::default();
    for text in [
        "---\n# keep-alive\nId: 3\nRequest: PING\n",
        "{Request: PING, Id: 3, Args: {}}",
        "Request: \"PING\"\nId: 3\nArgs:\n",
    ] {
        assert_eq!(
            Message::decode(text.as_bytes(), &limits),
            Ok(Message::request(3, Request::Ping)),
            "{text}"
        );
    }
}

#[test]
fn relay_request_and_its_events() {
    assert_encodes(
        Message::request(
            21,
            Request::Relay(RelayArgs {
                relay: Hex16::from_bytes(counting::<16>(0x30)),
            }),
        ),
        "Request: RELAY
Id: 21
Args:
  RELAY: \"303132333435363738393a3b3c3d3e3f\"
",
    );
    assert_encodes(
        Message::Response(Response::ok(21, ResponseData::Relay)),
        "Response: RELAY
Id: 21
Status: OK
Data: {}
",
    );
    assert_encodes(
        Message::Event(Event::RelayWaiting(RelayWaiting {
            relay: Hex16::from_bytes(counting::<16>(0x30)),
            from: Number::new("5550001234").unwrap(),
        })),
        "Event: RELAY-WAITING
Data:
  RELAY: \"303132333435363738393a3b3c3d3e3f\"
  FROM: \"5550001234\"
",
    );
    assert_encodes(
        Message::Event(Event::RelayClosed(RelayClosed {
            relay: Hex16::from_bytes(counting::<16>(0x30)),
            reason: "nothing was relayed for 120 s (relay.idle_timeout_secs)".into(),
        })),
        "Event: RELAY-CLOSED
Data:
  RELAY: \"303132333435363738393a3b3c3d3e3f\"
  REASON: \"nothing was relayed for 120 s (relay.idle_timeout_secs)\"
",
    );
}

/// PORT-OUT and PORT-IN as protocol.md 6.27 and 6.28 spell them.
#[test]
fn port_requests_and_answers() {
    let identity_key = Hex32::from_bytes(counting(0x40));
    let token = Hex32::from_bytes(counting(0x80));
    assert_encodes(
        Message::request(
            31,
            Request::PortOut(PortOutArgs {
                to: "broker-y".into(),
                identity_key,
            }),
        ),
        "Request: PORT-OUT
Id: 31
Args:
  TO: \"broker-y\"
  IDENTITY-KEY: \"404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f\"
",
    );
    assert_encodes(
        Message::Response(Response::ok(
            31,
            ResponseData::PortOut(PortOutData {
                token,
                expires: 1_767_225_600,
            }),
        )),
        "Response: PORT-OUT
Id: 31
Status: OK
Data:
  TOKEN: \"808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f\"
  EXPIRES: 1767225600
",
    );
    assert_encodes(
        Message::request(
            32,
            Request::PortIn(PortInArgs {
                number: Number::new("5550001234").unwrap(),
                from: "broker-x".into(),
                token,
                identity_key,
                time: 1_767_225_000,
                signature: Hex64::from_bytes(counting(0xa0)),
                server_secret: Hex32::from_bytes(counting(0x20)),
            }),
        ),
        "Request: PORT-IN
Id: 32
Args:
  NUMBER: \"5550001234\"
  FROM: \"broker-x\"
  TOKEN: \"808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f\"
  IDENTITY-KEY: \"404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f\"
  TIME: 1767225000
  SIGNATURE: \"a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf\"
  SERVER-SECRET: \"202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\"
",
    );
    assert_encodes(
        Message::Response(Response::ok(
            32,
            ResponseData::PortIn(PortInData {
                entity: Number::new("5550001234").unwrap(),
                device: DeviceId::FIRST,
                client_secret: Hex32::from_bytes(counting(0x00)),
                nonce_step: 6,
                nonce_algorithm: NonceAlgorithm::MmNonce1,
                seq: 1,
            }),
        )),
        "Response: PORT-IN
Id: 32
Status: OK
Data:
  ENTITY: \"5550001234\"
  DEVICE: 1
  CLIENT-SECRET: \"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"
  NONCE-STEP: 6
  NONCE-ALGORITHM: MM-NONCE-1
  SEQ: 1
",
    );
    assert_encodes(
        Message::Response(Response::error(
            33,
            Some(RequestKind::Login),
            ErrorBody::new(
                ErrorCode::Ported,
                "this number was ported to broker broker-y; log in there (micromsg move --keep-number)",
            ),
        )),
        "Response: LOGIN
Id: 33
Status: ERROR
Error:
  Code: PORTED
  Message: \"this number was ported to broker broker-y; log in there (micromsg move --keep-number)\"
",
    );
}

#[test]
fn account_delete_request_and_answer() {
    assert_encodes(
        Message::request(
            22,
            Request::AccountDelete(AccountDeleteArgs {
                confirm: Number::new("5550001234").unwrap(),
            }),
        ),
        "Request: ACCOUNT-DELETE
Id: 22
Args:
  CONFIRM: \"5550001234\"
",
    );
    assert_encodes(
        Message::Response(Response::ok(22, ResponseData::AccountDelete)),
        "Response: ACCOUNT-DELETE
Id: 22
Status: OK
Data: {}
",
    );
}

#[test]
fn forward_request_answer_and_event() {
    let notice = Blob::from(b"notice".to_vec());
    assert_encodes(
        Message::request(
            23,
            Request::Forward(ForwardArgs {
                notice: notice.clone(),
                days: 30,
            }),
        ),
        "Request: FORWARD
Id: 23
Args:
  NOTICE: \"bm90aWNl\"
  DAYS: 30
",
    );
    assert_encodes(
        Message::Response(Response::ok(
            23,
            ResponseData::Forward(ForwardData {
                expires: 1_702_592_000,
            }),
        )),
        "Response: FORWARD
Id: 23
Status: OK
Data:
  EXPIRES: 1702592000
",
    );
    assert_encodes(
        Message::Event(Event::Forwarded(Forwarded {
            request: Hex16::from_bytes(counting::<16>(0x40)),
            target: Number::new("5550001234").unwrap(),
            notice,
            expires: 1_702_592_000,
        })),
        "Event: FORWARDED
Data:
  REQUEST: \"404142434445464748494a4b4c4d4e4f\"
  TARGET: \"5550001234\"
  NOTICE: \"bm90aWNl\"
  EXPIRES: 1702592000
",
    );
}
