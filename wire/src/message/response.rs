//! Responses (broker to client): exactly one per request, with the same
//! `Id`; `Data` typed per request name, or an error body.

use crate::codec::{Fields, Path, WireValue, bad_value, wire_enum, wire_struct, wrong_type};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::message::request::RequestKind;
use crate::value::{
    Blob, DeviceId, DeviceName, Hex16, Hex32, Hex64, Number, NumberPrefix, RequestId,
};
use crate::yaml::Node;

/// A response frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's `Id` (0 when the request was unreadable).
    pub id: RequestId,
    /// `Status: OK` with `Data`, or `Status: ERROR` with `Error`.
    pub result: Result<ResponseData, ErrorResponse>,
}

/// The error side of a [`Response`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    /// The request answered; `None` is written as `Response: ERROR` (the
    /// frame could not be parsed far enough to know the name).
    pub request: Option<RequestKind>,
    /// The `Error` mapping.
    pub error: ErrorBody,
}

impl Response {
    /// A successful response; the name is taken from `data`.
    pub fn ok(id: RequestId, data: ResponseData) -> Self {
        Self {
            id,
            result: Ok(data),
        }
    }

    /// An error response to `request` (`None`: `Response: ERROR`).
    pub fn error(id: RequestId, request: Option<RequestKind>, error: ErrorBody) -> Self {
        Self {
            id,
            result: Err(ErrorResponse { request, error }),
        }
    }

    /// The name written after `Response:`.
    pub fn name(&self) -> &'static str {
        match &self.result {
            Ok(data) => data.kind().as_str(),
            Err(ErrorResponse {
                request: Some(kind),
                ..
            }) => kind.as_str(),
            Err(ErrorResponse { request: None, .. }) => ERROR_NAME,
        }
    }
}

/// `Response: ERROR`: the answer to a frame whose request name is unknown.
pub(crate) const ERROR_NAME: &str = "ERROR";

wire_enum! {
    /// `Status` of a response.
    pub enum Status {
        /// With `Data`.
        Ok = "OK",
        /// With `Error`.
        Error = "ERROR",
    }
}

wire_struct! {
    /// The `Error` mapping of an error response.
    pub struct ErrorBody {
        /// Stable code.
        req "Code" code: ErrorCode,
        /// Human text, never secret.
        req "Message" message: String,
        /// Seconds to wait (`LOCKED`, `RATE-LIMITED`).
        opt "RetryAfter" retry_after: Option<u32>,
    }
}

impl ErrorBody {
    /// A body without `RetryAfter`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Set `RetryAfter`.
    #[must_use]
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl WireValue for ErrorCode {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        match node {
            Node::Str(s) => s
                .parse()
                .map_err(|_| bad_value(path, "not a known error code")),
            _ => Err(wrong_type(path, "string")),
        }
    }
    fn encode(&self) -> Node {
        Node::Str(self.as_str().to_owned())
    }
}

/// `Data` of a successful response, one variant per request.
///
/// Requests whose answer is `{}` have a unit variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseData {
    /// `BROKER-INFO`.
    BrokerInfo(BrokerInfoData),
    /// `REGISTER`.
    Register(RegisterData),
    /// `DEVICE-JOIN`.
    DeviceJoin(DeviceJoinData),
    /// `LOGIN`.
    Login(LoginData),
    /// `PING`.
    Ping(PingData),
    /// `LOGOUT`: `{}`; the broker closes after it.
    Logout,
    /// `ADD-DEVICE`.
    AddDevice(AddDeviceData),
    /// `DEVICE-LIST`.
    DeviceList(DeviceListData),
    /// `DEVICE-REVOKE`: `{}`.
    DeviceRevoke,
    /// `IS-NETWORKED`.
    IsNetworked(IsNetworkedData),
    /// `INITIATE-NEW`: always the same ack.
    InitiateNew(InitiateData),
    /// `INITIATE-EXISTING`.
    InitiateExisting(InitiateData),
    /// `INITIATE-NEW-NETWORKED`.
    InitiateNewNetworked(InitiateData),
    /// `INITIATE-EXISTING-NETWORKED`.
    InitiateExistingNetworked(InitiateData),
    /// `CONTACT-ANSWER`: `{}`.
    ContactAnswer,
    /// `CONTACT-POLICY`: `{}`.
    ContactPolicy,
    /// `BLOCK`: `{}`.
    Block,
    /// `UNBLOCK`: `{}`.
    Unblock,
    /// `BLOCK-LIST`.
    BlockList(BlockListData),
    /// `DEPOSIT`.
    Deposit(DepositData),
    /// `INBOX-FETCH`.
    InboxFetch(InboxFetchData),
    /// `INBOX-ACK`.
    InboxAck(InboxAckData),
    /// `BACKUP-PUT`: `{}`.
    BackupPut,
    /// `BACKUP-GET`.
    BackupGet(BackupGetData),
    /// `SYNC-COPY`.
    SyncCopy(SyncCopyData),
    /// `RELAY`: `{}`; the relayed bytes follow the response's frame.
    Relay,
    /// `PORT-OUT`.
    PortOut(PortOutData),
    /// `PORT-IN`.
    PortIn(PortInData),
    /// `ACCOUNT-DELETE`: `{}`; the broker closes the entity's connections after it.
    AccountDelete,
    /// `FORWARD`.
    Forward(ForwardData),
}

impl ResponseData {
    /// The request this answers.
    pub fn kind(&self) -> RequestKind {
        use RequestKind as K;
        match self {
            ResponseData::BrokerInfo(_) => K::BrokerInfo,
            ResponseData::Register(_) => K::Register,
            ResponseData::DeviceJoin(_) => K::DeviceJoin,
            ResponseData::Login(_) => K::Login,
            ResponseData::Ping(_) => K::Ping,
            ResponseData::Logout => K::Logout,
            ResponseData::AddDevice(_) => K::AddDevice,
            ResponseData::DeviceList(_) => K::DeviceList,
            ResponseData::DeviceRevoke => K::DeviceRevoke,
            ResponseData::IsNetworked(_) => K::IsNetworked,
            ResponseData::InitiateNew(_) => K::InitiateNew,
            ResponseData::InitiateExisting(_) => K::InitiateExisting,
            ResponseData::InitiateNewNetworked(_) => K::InitiateNewNetworked,
            ResponseData::InitiateExistingNetworked(_) => K::InitiateExistingNetworked,
            ResponseData::ContactAnswer => K::ContactAnswer,
            ResponseData::ContactPolicy => K::ContactPolicy,
            ResponseData::Block => K::Block,
            ResponseData::Unblock => K::Unblock,
            ResponseData::BlockList(_) => K::BlockList,
            ResponseData::Deposit(_) => K::Deposit,
            ResponseData::InboxFetch(_) => K::InboxFetch,
            ResponseData::InboxAck(_) => K::InboxAck,
            ResponseData::BackupPut => K::BackupPut,
            ResponseData::BackupGet(_) => K::BackupGet,
            ResponseData::SyncCopy(_) => K::SyncCopy,
            ResponseData::Relay => K::Relay,
            ResponseData::PortOut(_) => K::PortOut,
            ResponseData::PortIn(_) => K::PortIn,
            ResponseData::AccountDelete => K::AccountDelete,
            ResponseData::Forward(_) => K::Forward,
        }
    }

    pub(crate) fn decode(
        kind: RequestKind,
        data: Node,
        path: &Path<'_>,
    ) -> Result<ResponseData, DecodeError> {
        use RequestKind as K;
        let empty = |data: Node| -> Result<(), DecodeError> {
            Fields::new(data, path, false)?.deny_unknown(&[])
        };
        Ok(match kind {
            K::BrokerInfo => ResponseData::BrokerInfo(WireValue::decode(data, path)?),
            K::Register => ResponseData::Register(WireValue::decode(data, path)?),
            K::DeviceJoin => ResponseData::DeviceJoin(WireValue::decode(data, path)?),
            K::Login => ResponseData::Login(WireValue::decode(data, path)?),
            K::Ping => ResponseData::Ping(WireValue::decode(data, path)?),
            K::Logout => empty(data).map(|()| ResponseData::Logout)?,
            K::AddDevice => ResponseData::AddDevice(WireValue::decode(data, path)?),
            K::DeviceList => ResponseData::DeviceList(WireValue::decode(data, path)?),
            K::DeviceRevoke => empty(data).map(|()| ResponseData::DeviceRevoke)?,
            K::IsNetworked => ResponseData::IsNetworked(WireValue::decode(data, path)?),
            K::InitiateNew => ResponseData::InitiateNew(WireValue::decode(data, path)?),
            K::InitiateExisting => ResponseData::InitiateExisting(WireValue::decode(data, path)?),
            K::InitiateNewNetworked => {
                ResponseData::InitiateNewNetworked(WireValue::decode(data, path)?)
            }
            K::InitiateExistingNetworked => {
                ResponseData::InitiateExistingNetworked(WireValue::decode(data, path)?)
            }
            K::ContactAnswer => empty(data).map(|()| ResponseData::ContactAnswer)?,
            K::ContactPolicy => empty(data).map(|()| ResponseData::ContactPolicy)?,
            K::Block => empty(data).map(|()| ResponseData::Block)?,
            K::Unblock => empty(data).map(|()| ResponseData::Unblock)?,
            K::BlockList => ResponseData::BlockList(WireValue::decode(data, path)?),
            K::Deposit => ResponseData::Deposit(WireValue::decode(data, path)?),
            K::InboxFetch => ResponseData::InboxFetch(WireValue::decode(data, path)?),
            K::InboxAck => ResponseData::InboxAck(WireValue::decode(data, path)?),
            K::BackupPut => empty(data).map(|()| ResponseData::BackupPut)?,
            K::BackupGet => ResponseData::BackupGet(WireValue::decode(data, path)?),
            K::SyncCopy => ResponseData::SyncCopy(WireValue::decode(data, path)?),
            K::Relay => empty(data).map(|()| ResponseData::Relay)?,
            K::PortOut => ResponseData::PortOut(WireValue::decode(data, path)?),
            K::PortIn => ResponseData::PortIn(WireValue::decode(data, path)?),
            K::AccountDelete => empty(data).map(|()| ResponseData::AccountDelete)?,
            K::Forward => ResponseData::Forward(WireValue::decode(data, path)?),
        })
    }

    pub(crate) fn encode(&self) -> Node {
        match self {
            ResponseData::Logout
            | ResponseData::DeviceRevoke
            | ResponseData::ContactAnswer
            | ResponseData::ContactPolicy
            | ResponseData::Block
            | ResponseData::Unblock
            | ResponseData::BackupPut
            | ResponseData::Relay
            | ResponseData::AccountDelete => Node::Map(Vec::new()),
            ResponseData::BrokerInfo(data) => data.encode(),
            ResponseData::Register(data) => data.encode(),
            ResponseData::DeviceJoin(data) => data.encode(),
            ResponseData::Login(data) => data.encode(),
            ResponseData::Ping(data) => data.encode(),
            ResponseData::AddDevice(data) => data.encode(),
            ResponseData::DeviceList(data) => data.encode(),
            ResponseData::IsNetworked(data) => data.encode(),
            ResponseData::InitiateNew(data)
            | ResponseData::InitiateExisting(data)
            | ResponseData::InitiateNewNetworked(data)
            | ResponseData::InitiateExistingNetworked(data) => data.encode(),
            ResponseData::BlockList(data) => data.encode(),
            ResponseData::Deposit(data) => data.encode(),
            ResponseData::InboxFetch(data) => data.encode(),
            ResponseData::InboxAck(data) => data.encode(),
            ResponseData::BackupGet(data) => data.encode(),
            ResponseData::SyncCopy(data) => data.encode(),
            ResponseData::PortOut(data) => data.encode(),
            ResponseData::PortIn(data) => data.encode(),
            ResponseData::Forward(data) => data.encode(),
        }
    }
}

// ---------------------------------------------------------------------------
// BROKER-INFO

wire_struct! {
    /// `Data` of `BROKER-INFO`: the signed broker description.
    ///
    /// The keys of this mapping are `Info`, `Signature` and `IdentityKey`,
    /// spelled as in the protocol text.
    pub struct BrokerInfoData {
        /// What is signed.
        req "Info" info: Info,
        /// Ed25519 signature by the broker identity key over
        /// [`crate::encode_info_canonical`] of `info`.
        req "Signature" signature: Hex64,
        /// The broker's Ed25519 identity public key.
        req "IdentityKey" identity_key: Hex32,
    }
}

wire_enum! {
    /// `INBOX-MODE`: how inboxes are addressed.
    pub enum InboxMode {
        /// One inbox per entity.
        Entity = "ENTITY",
        /// One inbox per number.
        Number = "NUMBER",
    }
}

wire_enum! {
    /// `REGISTRATION` policy.
    pub enum Registration {
        /// Anyone may register.
        Open = "OPEN",
        /// A token is required.
        Token = "TOKEN",
        /// No registrations.
        Closed = "CLOSED",
    }
}

wire_enum! {
    /// `NONCE-ALGORITHM`.
    pub enum NonceAlgorithm {
        /// The only algorithm of protocol 1.
        MmNonce1 = "MM-NONCE-1",
    }
}

wire_enum! {
    /// An entry of `KEY-STORAGE`.
    pub enum KeyStorage {
        /// Encrypted key backup on the broker (`BACKUP-PUT`/`BACKUP-GET`).
        BrokerBackup = "BROKER-BACKUP",
        /// Keys move between devices directly.
        DeviceToDevice = "DEVICE-TO-DEVICE",
    }
}

wire_struct! {
    /// The broker description signed in `BROKER-INFO`.
    pub struct Info {
        /// Protocol version (1).
        req "PROTOCOL" protocol: u32,
        /// This broker's id.
        req "BROKER-ID" broker_id: String,
        /// Inbox addressing.
        req "INBOX-MODE" inbox_mode: InboxMode,
        /// Registration policy.
        req "REGISTRATION" registration: Registration,
        /// Login nonce time step, seconds.
        req "NONCE-STEP" nonce_step: u32,
        /// Accepted clock skew, in steps.
        req "NONCE-SKEW" nonce_skew: u32,
        /// Login nonce algorithm.
        req "NONCE-ALGORITHM" nonce_algorithm: NonceAlgorithm,
        /// Supported key storage modes.
        req "KEY-STORAGE" key_storage: Vec<KeyStorage>,
        /// The broker network this broker belongs to.
        req "NETWORK" network: Network,
        /// Number prefixes this broker serves.
        req "PREFIXES" prefixes: Vec<NumberPrefix>,
        /// Limits clients must respect.
        req "LIMITS" limits: InfoLimits,
        /// Broker clock, unix seconds.
        req "TIME" time: u64,
    }
}

wire_struct! {
    /// `NETWORK` of [`Info`].
    pub struct Network {
        /// Network name, or `null` when the broker is not networked.
        null "NAME" name: Option<String>,
        /// Peer brokers.
        req "PEERS" peers: Vec<Peer>,
    }
}

wire_struct! {
    /// A peer broker of the network.
    pub struct Peer {
        /// The peer's broker id.
        req "ID" id: String,
        /// Number prefixes the peer serves.
        req "PREFIXES" prefixes: Vec<NumberPrefix>,
    }
}

wire_struct! {
    /// `LIMITS` of [`Info`].
    pub struct InfoLimits {
        /// Largest frame body the broker accepts, bytes.
        req "MAX-FRAME" max_frame: u32,
        /// Most devices per entity.
        req "MAX-DEVICES" max_devices: u32,
        /// Most messages waiting in one inbox.
        req "INBOX-QUOTA" inbox_quota: u32,
        /// Largest message body, bytes.
        req "MESSAGE-MAX" message_max: u32,
        /// Message time to live, seconds.
        req "MESSAGE-TTL" message_ttl: u64,
    }
}

// ---------------------------------------------------------------------------
// Other data

wire_struct! {
    /// `Data` of `REGISTER`.
    pub struct RegisterData {
        /// The new entity's number.
        req "ENTITY" entity: Number,
        /// The first device (always 1).
        req "DEVICE" device: DeviceId,
        /// The secret the client must later prove.
        req "CLIENT-SECRET" client_secret: Hex32,
        /// Login nonce time step, seconds.
        req "NONCE-STEP" nonce_step: u32,
        /// Login nonce algorithm.
        req "NONCE-ALGORITHM" nonce_algorithm: NonceAlgorithm,
    }
}

wire_struct! {
    /// `Data` of `DEVICE-JOIN`.
    pub struct DeviceJoinData {
        /// The new device.
        req "DEVICE" device: DeviceId,
        /// The secret the client must later prove.
        req "CLIENT-SECRET" client_secret: Hex32,
        /// Login nonce time step, seconds.
        req "NONCE-STEP" nonce_step: u32,
        /// Login nonce algorithm.
        req "NONCE-ALGORITHM" nonce_algorithm: NonceAlgorithm,
    }
}

wire_struct! {
    /// `Data` of `LOGIN`.
    pub struct LoginData {
        /// The broker nonce (direction 0x02, same step).
        req "PROOF" proof: Hex32,
        /// The matched time step T.
        req "STEP" step: u64,
        /// Pending counts.
        req "SESSION" session: SessionCounts,
        /// The client's IP address as the broker sees it on this connection (after any NAT),
        /// so a client can tell whether it is behind one (section 6.26).
        opt "CLIENT-IP" client_ip: Option<String>,
    }
}

wire_struct! {
    /// `SESSION` of [`LoginData`].
    pub struct SessionCounts {
        /// Messages waiting in the inbox.
        req "INBOX" inbox: u32,
    }
}

wire_struct! {
    /// `Data` of `PING`.
    pub struct PingData {
        /// Broker clock, unix seconds.
        req "TIME" time: u64,
    }
}

wire_struct! {
    /// `Data` of `ADD-DEVICE`.
    pub struct AddDeviceData {
        /// Registration secret for `DEVICE-JOIN`.
        req "SECRET" secret: Hex32,
        /// When it expires, unix seconds.
        req "EXPIRES" expires: u64,
    }
}

wire_struct! {
    /// `Data` of `DEVICE-LIST`.
    pub struct DeviceListData {
        /// The entity's devices.
        req "DEVICES" devices: Vec<DeviceInfo>,
    }
}

wire_struct! {
    /// One device in [`DeviceListData`].
    pub struct DeviceInfo {
        /// Device id.
        req "ID" id: DeviceId,
        /// Name, if one was given.
        null "NAME" name: Option<DeviceName>,
        /// Creation time, unix seconds.
        req "CREATED" created: u64,
        /// Last login, unix seconds, `null` if never.
        null "LAST-SEEN" last_seen: Option<u64>,
        /// Whether this is the asking device.
        req "CURRENT" current: bool,
    }
}

wire_enum! {
    /// `HOME` of [`IsNetworkedData`].
    pub enum Home {
        /// The number is served by this broker.
        Own = "OWN",
        /// The number is served by a peer broker.
        Peer = "PEER",
        /// No broker of the network serves it.
        None = "NONE",
    }
}

wire_struct! {
    /// `Data` of `IS-NETWORKED`.
    pub struct IsNetworkedData {
        /// The number is in a peer broker's share.
        req "NETWORKED" networked: bool,
        /// Who serves the number.
        req "HOME" home: Home,
        /// The serving broker's id, if any.
        null "BROKER" broker: Option<String>,
    }
}

wire_struct! {
    /// `Data` of the four `INITIATE-*` requests.
    pub struct InitiateData {
        /// The contact request id.
        req "REQUEST" request: Hex16,
    }
}

wire_struct! {
    /// `Data` of `BLOCK-LIST`.
    pub struct BlockListData {
        /// Blocked numbers.
        req "NUMBERS" numbers: Vec<Number>,
    }
}

wire_struct! {
    /// `Data` of `DEPOSIT`.
    pub struct DepositData {
        /// The message id.
        req "ID" id: Hex16,
        /// When it expires, unix seconds.
        req "EXPIRES" expires: u64,
    }
}

wire_struct! {
    /// `Data` of `INBOX-FETCH`.
    ///
    /// The broker must size the batch so the frame fits the client's
    /// [`crate::Limits`]: each message costs 14 parser events and its body's
    /// base64 in bytes, so the default 4,096 events allow about 290 messages.
    /// [`Response::encode_frame`] reports a batch that does not fit.
    pub struct InboxFetchData {
        /// Messages, oldest first.
        req "MESSAGES" messages: Vec<InboxMessage>,
        /// Whether more are waiting.
        req "MORE" more: bool,
    }
}

wire_struct! {
    /// One message of [`InboxFetchData`].
    pub struct InboxMessage {
        /// Message id.
        req "ID" id: Hex16,
        /// Sender.
        req "FROM" from: Number,
        /// Sender's device.
        req "FROM-DEVICE" from_device: DeviceId,
        /// Deposit time, unix seconds.
        req "TIME" time: u64,
        /// Expiry, unix seconds.
        req "EXPIRES" expires: u64,
        /// Ciphertext.
        req "BODY" body: Blob,
    }
}

wire_struct! {
    /// `Data` of `INBOX-ACK`.
    pub struct InboxAckData {
        /// How many messages were removed.
        req "REMOVED" removed: u32,
    }
}

wire_struct! {
    /// `Data` of `BACKUP-GET`.
    pub struct BackupGetData {
        /// The backup, `null` if none.
        null "BLOB" blob: Option<Blob>,
        /// Its version (0 if none).
        req "VERSION" version: u64,
    }
}

wire_struct! {
    /// `Data` of `SYNC-COPY`.
    pub struct SyncCopyData {
        /// The copied message's id.
        req "ID" id: Hex16,
    }
}

wire_struct! {
    /// `Data` of `PORT-OUT`.
    pub struct PortOutData {
        /// The single-use port token, for PORT-IN at the broker named in `TO`.
        req "TOKEN" token: Hex32,
        /// Until when it can be used, unix seconds.
        req "EXPIRES" expires: u64,
    }
}

wire_struct! {
    /// `Data` of `PORT-IN`: the entity as REGISTER answers it, and the entry's sequence.
    pub struct PortInData {
        /// The ported number, now served here.
        req "ENTITY" entity: Number,
        /// The new device's id (1).
        req "DEVICE" device: DeviceId,
        /// The secret the device proves at LOGIN.
        req "CLIENT-SECRET" client_secret: Hex32,
        /// Login nonce time step, seconds.
        req "NONCE-STEP" nonce_step: u32,
        /// Login nonce algorithm.
        req "NONCE-ALGORITHM" nonce_algorithm: NonceAlgorithm,
        /// The ported-number entry's sequence (1 for the number's first port).
        req "SEQ" seq: u64,
    }
}

wire_struct! {
    /// `Data` of `FORWARD`.
    pub struct ForwardData {
        /// Unix seconds when the broker drops the forward.
        req "EXPIRES" expires: u64,
    }
}
