//! Proptest strategies producing every valid value of every protocol type.

use micromsg_wire::message::event::*;
use micromsg_wire::message::request::*;
use micromsg_wire::message::response::*;
use micromsg_wire::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

pub(crate) fn number() -> impl Strategy<Value = Number> {
    "[0-9]{4,15}".prop_map(|s| Number::new(s).unwrap())
}

pub(crate) fn prefix() -> impl Strategy<Value = NumberPrefix> {
    "[0-9]{1,15}".prop_map(|s| NumberPrefix::new(s).unwrap())
}

pub(crate) fn device() -> impl Strategy<Value = DeviceId> {
    prop_oneof![Just(1u32), 1u32..=u32::MAX].prop_map(|id| DeviceId::new(id).unwrap())
}

pub(crate) fn hex16() -> impl Strategy<Value = Hex16> {
    any::<[u8; 16]>().prop_map(Hex16::from_bytes)
}

pub(crate) fn hex32() -> impl Strategy<Value = Hex32> {
    any::<[u8; 32]>().prop_map(Hex32::from_bytes)
}

pub(crate) fn hex64() -> impl Strategy<Value = Hex64> {
    vec(any::<u8>(), 64).prop_map(|v| Hex64::from_bytes(v.try_into().unwrap()))
}

pub(crate) fn blob() -> impl Strategy<Value = Blob> {
    vec(any::<u8>(), 0..200).prop_map(Blob::new)
}

/// Any text, including quotes, control characters, line breaks and
/// non-BMP characters: the emitter must quote and escape all of it.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
        "[ -~]{0,40}",
        Just(String::new()),
        Just("null".to_owned()),
        Just("12".to_owned()),
        Just("true".to_owned()),
        Just("- a: [b]".to_owned()),
    ]
}

pub(crate) fn device_name() -> impl Strategy<Value = DeviceName> {
    text().prop_map(|s| DeviceName::new(s.chars().take(64).collect::<String>()).unwrap())
}

pub(crate) fn address() -> impl Strategy<Value = Address> {
    let label = "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?";
    let host = prop_oneof![
        any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
        any::<[u16; 8]>().prop_map(|s| format!("[{}]", Ipv6Addr::from(s))),
        vec(label, 1..4).prop_map(|labels| labels.join(".")),
        Just("localhost".to_owned()),
    ];
    (host, 1u16..=u16::MAX).prop_map(|(host, port)| Address::new(format!("{host}:{port}")).unwrap())
}

pub(crate) fn u32_any() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()]
}

pub(crate) fn u64_any() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]
}

// ---------------------------------------------------------------------------
// Requests

pub(crate) fn target_args() -> impl Strategy<Value = TargetArgs> {
    number().prop_map(|target| TargetArgs { target })
}

pub(crate) fn initiate_networked_args() -> impl Strategy<Value = InitiateNetworkedArgs> {
    (number(), hex32()).prop_map(|(target, pubkey)| InitiateNetworkedArgs { target, pubkey })
}

/// A sealed address of every length the codec accepts.
pub(crate) fn sealed_address() -> impl Strategy<Value = Blob> {
    prop_oneof![
        Just(SEALED_ADDRESS_MIN),
        Just(SEALED_ADDRESS_MAX),
        SEALED_ADDRESS_MIN..=SEALED_ADDRESS_MAX,
    ]
    .prop_flat_map(|len| vec(any::<u8>(), len))
    .prop_map(Blob::new)
}

/// Every shape of a CONTACT-ANSWER.
pub(crate) fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        Just(Answer::Decline),
        address().prop_map(|address| Answer::Accept { address }),
        (hex32(), sealed_address()).prop_map(|(pubkey, sealed_address)| {
            Answer::AcceptNetworked {
                pubkey,
                sealed_address,
            }
        }),
    ]
}

/// One strategy per request name, so every variant is exercised.
pub(crate) fn requests() -> Vec<(RequestKind, BoxedStrategy<Request>)> {
    use RequestKind as K;
    vec![
        (K::BrokerInfo, Just(Request::BrokerInfo).boxed()),
        (
            K::Register,
            (option::of(text()), hex32())
                .prop_map(|(token, server_secret)| {
                    Request::Register(RegisterArgs {
                        token,
                        server_secret,
                    })
                })
                .boxed(),
        ),
        (
            K::DeviceJoin,
            (number(), hex32(), hex32())
                .prop_map(|(entity, secret, server_secret)| {
                    Request::DeviceJoin(DeviceJoinArgs {
                        entity,
                        secret,
                        server_secret,
                    })
                })
                .boxed(),
        ),
        (
            K::Login,
            (number(), device(), hex32())
                .prop_map(|(entity, device, secret)| {
                    Request::Login(LoginArgs {
                        entity,
                        device,
                        secret,
                    })
                })
                .boxed(),
        ),
        (K::Ping, Just(Request::Ping).boxed()),
        (K::Logout, Just(Request::Logout).boxed()),
        (
            K::AddDevice,
            option::of(device_name())
                .prop_map(|name| Request::AddDevice(AddDeviceArgs { name }))
                .boxed(),
        ),
        (K::DeviceList, Just(Request::DeviceList).boxed()),
        (
            K::DeviceRevoke,
            device()
                .prop_map(|device| Request::DeviceRevoke(DeviceRevokeArgs { device }))
                .boxed(),
        ),
        (
            K::IsNetworked,
            target_args().prop_map(Request::IsNetworked).boxed(),
        ),
        (
            K::InitiateNew,
            (number(), option::of(address()))
                .prop_map(|(target, address)| {
                    Request::InitiateNew(InitiateNewArgs { target, address })
                })
                .boxed(),
        ),
        (
            K::InitiateExisting,
            target_args().prop_map(Request::InitiateExisting).boxed(),
        ),
        (
            K::InitiateNewNetworked,
            initiate_networked_args()
                .prop_map(Request::InitiateNewNetworked)
                .boxed(),
        ),
        (
            K::InitiateExistingNetworked,
            initiate_networked_args()
                .prop_map(Request::InitiateExistingNetworked)
                .boxed(),
        ),
        (
            K::ContactAnswer,
            (hex16(), answer())
                .prop_map(|(request, answer)| {
                    Request::ContactAnswer(ContactAnswerArgs { request, answer })
                })
                .boxed(),
        ),
        (
            K::ContactPolicy,
            (any::<bool>(), proptest::option::of(address()))
                .prop_map(|(auto_existing, address)| {
                    Request::ContactPolicy(ContactPolicyArgs {
                        auto_existing,
                        address,
                    })
                })
                .boxed(),
        ),
        (K::Block, target_args().prop_map(Request::Block).boxed()),
        (K::Unblock, target_args().prop_map(Request::Unblock).boxed()),
        (K::BlockList, Just(Request::BlockList).boxed()),
        (
            K::Deposit,
            (number(), hex16(), blob())
                .prop_map(|(target, id, body)| Request::Deposit(DepositArgs { target, id, body }))
                .boxed(),
        ),
        (
            K::InboxFetch,
            (option::of(1u32..=1000), option::of(hex16()))
                .prop_map(|(limit, after)| Request::InboxFetch(InboxFetchArgs { limit, after }))
                .boxed(),
        ),
        (
            K::InboxAck,
            vec(hex16(), 0..20)
                .prop_map(|ids| Request::InboxAck(InboxAckArgs { ids }))
                .boxed(),
        ),
        (
            K::BackupPut,
            (blob(), u64_any())
                .prop_map(|(blob, version)| Request::BackupPut(BackupPutArgs { blob, version }))
                .boxed(),
        ),
        (K::BackupGet, Just(Request::BackupGet).boxed()),
        (
            K::SyncCopy,
            (hex16(), blob(), number())
                .prop_map(|(id, body, peer)| Request::SyncCopy(SyncCopyArgs { id, body, peer }))
                .boxed(),
        ),
        (
            K::Relay,
            hex16()
                .prop_map(|relay| Request::Relay(RelayArgs { relay }))
                .boxed(),
        ),
        (
            K::PortOut,
            (text(), hex32())
                .prop_map(|(to, identity_key)| Request::PortOut(PortOutArgs { to, identity_key }))
                .boxed(),
        ),
        (
            K::PortIn,
            (
                number(),
                text(),
                hex32(),
                hex32(),
                u64_any(),
                hex64(),
                hex32(),
            )
                .prop_map(
                    |(number, from, token, identity_key, time, signature, server_secret)| {
                        Request::PortIn(PortInArgs {
                            number,
                            from,
                            token,
                            identity_key,
                            time,
                            signature,
                            server_secret,
                        })
                    },
                )
                .boxed(),
        ),
        (
            K::AccountDelete,
            number()
                .prop_map(|confirm| Request::AccountDelete(AccountDeleteArgs { confirm }))
                .boxed(),
        ),
        (
            K::Forward,
            (blob(), u64_any())
                .prop_map(|(notice, days)| Request::Forward(ForwardArgs { notice, days }))
                .boxed(),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Responses

pub(crate) fn info() -> impl Strategy<Value = Info> {
    let network = (
        option::of(text()),
        vec(
            (text(), vec(prefix(), 0..4)).prop_map(|(id, prefixes)| Peer { id, prefixes }),
            0..4,
        ),
    )
        .prop_map(|(name, peers)| Network { name, peers });
    let limits = (u32_any(), u32_any(), u32_any(), u32_any(), u64_any()).prop_map(
        |(max_frame, max_devices, inbox_quota, message_max, message_ttl)| InfoLimits {
            max_frame,
            max_devices,
            inbox_quota,
            message_max,
            message_ttl,
        },
    );
    (
        (
            u32_any(),
            text(),
            prop::sample::select(InboxMode::ALL),
            prop::sample::select(Registration::ALL),
        ),
        (
            u32_any(),
            u32_any(),
            vec(prop::sample::select(KeyStorage::ALL), 0..3),
        ),
        (network, vec(prefix(), 0..4), limits, u64_any()),
    )
        .prop_map(
            |(
                (protocol, broker_id, inbox_mode, registration),
                (nonce_step, nonce_skew, key_storage),
                (network, prefixes, limits, time),
            )| Info {
                protocol,
                broker_id,
                inbox_mode,
                registration,
                nonce_step,
                nonce_skew,
                nonce_algorithm: NonceAlgorithm::MmNonce1,
                key_storage,
                network,
                prefixes,
                limits,
                time,
            },
        )
}

pub(crate) fn initiate_data() -> impl Strategy<Value = InitiateData> {
    hex16().prop_map(|request| InitiateData { request })
}

/// One strategy per request name for the `Data` of its OK response.
pub(crate) fn response_data() -> Vec<(RequestKind, BoxedStrategy<ResponseData>)> {
    use RequestKind as K;
    vec![
        (
            K::BrokerInfo,
            (info(), hex64(), hex32())
                .prop_map(|(info, signature, identity_key)| {
                    ResponseData::BrokerInfo(BrokerInfoData {
                        info,
                        signature,
                        identity_key,
                    })
                })
                .boxed(),
        ),
        (
            K::Register,
            (number(), device(), hex32(), u32_any())
                .prop_map(|(entity, device, client_secret, nonce_step)| {
                    ResponseData::Register(RegisterData {
                        entity,
                        device,
                        client_secret,
                        nonce_step,
                        nonce_algorithm: NonceAlgorithm::MmNonce1,
                    })
                })
                .boxed(),
        ),
        (
            K::DeviceJoin,
            (device(), hex32(), u32_any())
                .prop_map(|(device, client_secret, nonce_step)| {
                    ResponseData::DeviceJoin(DeviceJoinData {
                        device,
                        client_secret,
                        nonce_step,
                        nonce_algorithm: NonceAlgorithm::MmNonce1,
                    })
                })
                .boxed(),
        ),
        (
            K::Login,
            (hex32(), u64_any(), u32_any(), option::of("[0-9.]{7,15}"))
                .prop_map(|(proof, step, inbox, client_ip)| {
                    ResponseData::Login(LoginData {
                        proof,
                        step,
                        session: SessionCounts { inbox },
                        client_ip,
                    })
                })
                .boxed(),
        ),
        (
            K::Ping,
            u64_any()
                .prop_map(|time| ResponseData::Ping(PingData { time }))
                .boxed(),
        ),
        (K::Logout, Just(ResponseData::Logout).boxed()),
        (
            K::AddDevice,
            (hex32(), u64_any())
                .prop_map(|(secret, expires)| {
                    ResponseData::AddDevice(AddDeviceData { secret, expires })
                })
                .boxed(),
        ),
        (
            K::DeviceList,
            vec(
                (
                    device(),
                    option::of(device_name()),
                    u64_any(),
                    option::of(u64_any()),
                    any::<bool>(),
                )
                    .prop_map(|(id, name, created, last_seen, current)| {
                        DeviceInfo {
                            id,
                            name,
                            created,
                            last_seen,
                            current,
                        }
                    }),
                0..5,
            )
            .prop_map(|devices| ResponseData::DeviceList(DeviceListData { devices }))
            .boxed(),
        ),
        (K::DeviceRevoke, Just(ResponseData::DeviceRevoke).boxed()),
        (
            K::IsNetworked,
            (
                any::<bool>(),
                prop::sample::select(Home::ALL),
                option::of(text()),
            )
                .prop_map(|(networked, home, broker)| {
                    ResponseData::IsNetworked(IsNetworkedData {
                        networked,
                        home,
                        broker,
                    })
                })
                .boxed(),
        ),
        (
            K::InitiateNew,
            initiate_data().prop_map(ResponseData::InitiateNew).boxed(),
        ),
        (
            K::InitiateExisting,
            initiate_data()
                .prop_map(ResponseData::InitiateExisting)
                .boxed(),
        ),
        (
            K::InitiateNewNetworked,
            initiate_data()
                .prop_map(ResponseData::InitiateNewNetworked)
                .boxed(),
        ),
        (
            K::InitiateExistingNetworked,
            initiate_data()
                .prop_map(ResponseData::InitiateExistingNetworked)
                .boxed(),
        ),
        (K::ContactAnswer, Just(ResponseData::ContactAnswer).boxed()),
        (K::ContactPolicy, Just(ResponseData::ContactPolicy).boxed()),
        (K::Block, Just(ResponseData::Block).boxed()),
        (K::Unblock, Just(ResponseData::Unblock).boxed()),
        (
            K::BlockList,
            vec(number(), 0..10)
                .prop_map(|numbers| ResponseData::BlockList(BlockListData { numbers }))
                .boxed(),
        ),
        (
            K::Deposit,
            (hex16(), u64_any())
                .prop_map(|(id, expires)| ResponseData::Deposit(DepositData { id, expires }))
                .boxed(),
        ),
        (
            K::InboxFetch,
            (
                vec(
                    (hex16(), number(), device(), u64_any(), u64_any(), blob()).prop_map(
                        |(id, from, from_device, time, expires, body)| InboxMessage {
                            id,
                            from,
                            from_device,
                            time,
                            expires,
                            body,
                        },
                    ),
                    0..5,
                ),
                any::<bool>(),
            )
                .prop_map(|(messages, more)| {
                    ResponseData::InboxFetch(InboxFetchData { messages, more })
                })
                .boxed(),
        ),
        (
            K::InboxAck,
            u32_any()
                .prop_map(|removed| ResponseData::InboxAck(InboxAckData { removed }))
                .boxed(),
        ),
        (K::BackupPut, Just(ResponseData::BackupPut).boxed()),
        (
            K::BackupGet,
            (option::of(blob()), u64_any())
                .prop_map(|(blob, version)| {
                    ResponseData::BackupGet(BackupGetData { blob, version })
                })
                .boxed(),
        ),
        (
            K::SyncCopy,
            hex16()
                .prop_map(|id| ResponseData::SyncCopy(SyncCopyData { id }))
                .boxed(),
        ),
        (K::Relay, Just(ResponseData::Relay).boxed()),
        (
            K::PortOut,
            (hex32(), u64_any())
                .prop_map(|(token, expires)| ResponseData::PortOut(PortOutData { token, expires }))
                .boxed(),
        ),
        (
            K::PortIn,
            (number(), device(), hex32(), u32_any(), u64_any())
                .prop_map(|(entity, device, client_secret, nonce_step, seq)| {
                    ResponseData::PortIn(PortInData {
                        entity,
                        device,
                        client_secret,
                        nonce_step,
                        nonce_algorithm: NonceAlgorithm::MmNonce1,
                        seq,
                    })
                })
                .boxed(),
        ),
        (K::AccountDelete, Just(ResponseData::AccountDelete).boxed()),
        (
            K::Forward,
            u64_any()
                .prop_map(|expires| ResponseData::Forward(ForwardData { expires }))
                .boxed(),
        ),
    ]
}

pub(crate) fn error_body() -> impl Strategy<Value = ErrorBody> {
    (
        prop::sample::select(ErrorCode::ALL),
        text(),
        option::of(u32_any()),
    )
        .prop_map(|(code, message, retry_after)| ErrorBody {
            code,
            message,
            retry_after,
        })
}

/// Error responses, addressed to a known request or to `ERROR`.
pub(crate) fn error_response() -> impl Strategy<Value = Response> {
    (
        u32_any(),
        option::of(prop::sample::select(RequestKind::ALL)),
        error_body(),
    )
        .prop_map(|(id, request, error)| Response::error(id, request, error))
}

// ---------------------------------------------------------------------------
// Events

/// One strategy per event name.
pub(crate) fn events() -> Vec<(EventKind, BoxedStrategy<Event>)> {
    use EventKind as K;
    vec![
        (
            K::ContactRequest,
            (
                hex16(),
                number(),
                prop::sample::select(ContactKind::ALL),
                any::<bool>(),
                option::of(hex32()),
            )
                .prop_map(|(request, from, kind, networked, pubkey)| {
                    Event::ContactRequest(ContactRequest {
                        request,
                        from,
                        kind,
                        networked,
                        pubkey,
                    })
                })
                .boxed(),
        ),
        (
            K::ContactAccepted,
            (
                hex16(),
                number(),
                option::of(address()),
                option::of(blob()),
                hex32(),
                option::of(hex32()),
                option::of(hex16()),
            )
                .prop_map(
                    |(request, target, address, sealed_address, token, pubkey, relay)| {
                        Event::ContactAccepted(ContactAccepted {
                            request,
                            target,
                            address,
                            sealed_address,
                            token,
                            pubkey,
                            relay,
                        })
                    },
                )
                .boxed(),
        ),
        (
            K::ContactConnecting,
            (hex16(), number(), hex32(), option::of(hex16()))
                .prop_map(|(request, from, token, relay)| {
                    Event::ContactConnecting(ContactConnecting {
                        request,
                        from,
                        token,
                        relay,
                    })
                })
                .boxed(),
        ),
        (
            K::PubkeyRequest,
            (hex16(), number())
                .prop_map(|(request, peer)| Event::PubkeyRequest(PubkeyRequest { request, peer }))
                .boxed(),
        ),
        (
            K::Inbox,
            u32_any()
                .prop_map(|count| Event::Inbox(InboxNotice { count }))
                .boxed(),
        ),
        (
            K::DeviceRevoked,
            device()
                .prop_map(|device| Event::DeviceRevoked(DeviceRevoked { device }))
                .boxed(),
        ),
        (
            K::Shutdown,
            u32_any()
                .prop_map(|reconnect_after| Event::Shutdown(Shutdown { reconnect_after }))
                .boxed(),
        ),
        (
            K::RelayWaiting,
            (hex16(), number())
                .prop_map(|(relay, from)| Event::RelayWaiting(RelayWaiting { relay, from }))
                .boxed(),
        ),
        (
            K::RelayClosed,
            (hex16(), "[ -~]{0,60}")
                .prop_map(|(relay, reason)| Event::RelayClosed(RelayClosed { relay, reason }))
                .boxed(),
        ),
        (
            K::Forwarded,
            (hex16(), number(), blob(), u64_any())
                .prop_map(|(request, target, notice, expires)| {
                    Event::Forwarded(Forwarded {
                        request,
                        target,
                        notice,
                        expires,
                    })
                })
                .boxed(),
        ),
    ]
}

/// Any message at all.
pub(crate) fn message() -> BoxedStrategy<Message> {
    let requests = requests()
        .into_iter()
        .map(|(_, s)| (1, s))
        .collect::<Vec<_>>();
    let data = response_data()
        .into_iter()
        .map(|(_, s)| (1, s))
        .collect::<Vec<_>>();
    let events = events()
        .into_iter()
        .map(|(_, s)| (1, s))
        .collect::<Vec<_>>();
    prop_oneof![
        (u32_any(), prop::strategy::Union::new_weighted(requests))
            .prop_map(|(id, request)| Message::request(id, request)),
        (u32_any(), prop::strategy::Union::new_weighted(data))
            .prop_map(|(id, data)| Message::Response(Response::ok(id, data))),
        error_response().prop_map(Message::Response),
        prop::strategy::Union::new_weighted(events).prop_map(Message::Event),
    ]
    .boxed()
}
