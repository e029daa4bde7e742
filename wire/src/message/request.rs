//! Requests (client to broker): one [`Request`] variant per request name,
//! each with a struct of its `Args`.

use crate::codec::{Fields, MapBuilder, Path, WireValue, bad_value, wire_enum, wire_struct};
use crate::error::DecodeError;
use crate::value::{Address, Blob, DeviceId, DeviceName, Hex16, Hex32, Hex64, Number};
use crate::yaml::Node;

wire_enum! {
    /// The name of a request, as written after `Request:` (and after
    /// `Response:` in its answer).
    pub enum RequestKind {
        /// Public.
        BrokerInfo = "BROKER-INFO",
        /// Public.
        Register = "REGISTER",
        /// Public.
        DeviceJoin = "DEVICE-JOIN",
        /// Public.
        Login = "LOGIN",
        /// Public (also the keep-alive after login).
        Ping = "PING",
        /// Authenticated.
        Logout = "LOGOUT",
        /// Authenticated.
        AddDevice = "ADD-DEVICE",
        /// Authenticated.
        DeviceList = "DEVICE-LIST",
        /// Authenticated.
        DeviceRevoke = "DEVICE-REVOKE",
        /// Authenticated.
        IsNetworked = "IS-NETWORKED",
        /// Authenticated.
        InitiateNew = "INITIATE-NEW",
        /// Authenticated.
        InitiateExisting = "INITIATE-EXISTING",
        /// Authenticated.
        InitiateNewNetworked = "INITIATE-NEW-NETWORKED",
        /// Authenticated.
        InitiateExistingNetworked = "INITIATE-EXISTING-NETWORKED",
        /// Authenticated.
        ContactAnswer = "CONTACT-ANSWER",
        /// Authenticated.
        ContactPolicy = "CONTACT-POLICY",
        /// Authenticated.
        Block = "BLOCK",
        /// Authenticated.
        Unblock = "UNBLOCK",
        /// Authenticated.
        BlockList = "BLOCK-LIST",
        /// Authenticated.
        Deposit = "DEPOSIT",
        /// Authenticated.
        InboxFetch = "INBOX-FETCH",
        /// Authenticated.
        InboxAck = "INBOX-ACK",
        /// Authenticated.
        BackupPut = "BACKUP-PUT",
        /// Authenticated.
        BackupGet = "BACKUP-GET",
        /// Authenticated.
        SyncCopy = "SYNC-COPY",
        /// Authenticated: turns the connection into one half of a relay (section 6.26).
        Relay = "RELAY",
        /// Authenticated: the losing broker's agreement to port the number (section 6.27).
        PortOut = "PORT-OUT",
        /// Public: the gaining broker takes a ported number (section 6.28).
        PortIn = "PORT-IN",
        /// Authenticated: deletes the entity at this broker (section 6.27).
        AccountDelete = "ACCOUNT-DELETE",
        /// Authenticated: publishes a signed moved notice for callers of this number (6.28).
        Forward = "FORWARD",
    }
}

impl RequestKind {
    /// Whether the request needs a logged-in connection (else the broker
    /// answers `NOT-LOGGED-IN`).
    pub const fn requires_login(self) -> bool {
        !matches!(
            self,
            RequestKind::BrokerInfo
                | RequestKind::Register
                | RequestKind::DeviceJoin
                | RequestKind::Login
                | RequestKind::Ping
                | RequestKind::PortIn
        )
    }
}

/// A request and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `BROKER-INFO`: no args.
    BrokerInfo,
    /// `REGISTER`.
    Register(RegisterArgs),
    /// `DEVICE-JOIN`.
    DeviceJoin(DeviceJoinArgs),
    /// `LOGIN`.
    Login(LoginArgs),
    /// `PING`: no args.
    Ping,
    /// `LOGOUT`: no args.
    Logout,
    /// `ADD-DEVICE`.
    AddDevice(AddDeviceArgs),
    /// `DEVICE-LIST`: no args.
    DeviceList,
    /// `DEVICE-REVOKE`.
    DeviceRevoke(DeviceRevokeArgs),
    /// `IS-NETWORKED`.
    IsNetworked(TargetArgs),
    /// `INITIATE-NEW`.
    InitiateNew(InitiateNewArgs),
    /// `INITIATE-EXISTING`.
    InitiateExisting(TargetArgs),
    /// `INITIATE-NEW-NETWORKED`.
    InitiateNewNetworked(InitiateNetworkedArgs),
    /// `INITIATE-EXISTING-NETWORKED`.
    InitiateExistingNetworked(InitiateNetworkedArgs),
    /// `CONTACT-ANSWER`.
    ContactAnswer(ContactAnswerArgs),
    /// `CONTACT-POLICY`.
    ContactPolicy(ContactPolicyArgs),
    /// `BLOCK`.
    Block(TargetArgs),
    /// `UNBLOCK`.
    Unblock(TargetArgs),
    /// `BLOCK-LIST`: no args.
    BlockList,
    /// `DEPOSIT`.
    Deposit(DepositArgs),
    /// `INBOX-FETCH`.
    InboxFetch(InboxFetchArgs),
    /// `INBOX-ACK`.
    InboxAck(InboxAckArgs),
    /// `BACKUP-PUT`.
    BackupPut(BackupPutArgs),
    /// `BACKUP-GET`: no args.
    BackupGet,
    /// `SYNC-COPY`.
    SyncCopy(SyncCopyArgs),
    /// `RELAY`.
    Relay(RelayArgs),
    /// `PORT-OUT`.
    PortOut(PortOutArgs),
    /// `PORT-IN`.
    PortIn(PortInArgs),
    /// `ACCOUNT-DELETE`.
    AccountDelete(AccountDeleteArgs),
    /// `FORWARD`.
    Forward(ForwardArgs),
}

impl Request {
    /// The request's name.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::BrokerInfo => RequestKind::BrokerInfo,
            Request::Register(_) => RequestKind::Register,
            Request::DeviceJoin(_) => RequestKind::DeviceJoin,
            Request::Login(_) => RequestKind::Login,
            Request::Ping => RequestKind::Ping,
            Request::Logout => RequestKind::Logout,
            Request::AddDevice(_) => RequestKind::AddDevice,
            Request::DeviceList => RequestKind::DeviceList,
            Request::DeviceRevoke(_) => RequestKind::DeviceRevoke,
            Request::IsNetworked(_) => RequestKind::IsNetworked,
            Request::InitiateNew(_) => RequestKind::InitiateNew,
            Request::InitiateExisting(_) => RequestKind::InitiateExisting,
            Request::InitiateNewNetworked(_) => RequestKind::InitiateNewNetworked,
            Request::InitiateExistingNetworked(_) => RequestKind::InitiateExistingNetworked,
            Request::ContactAnswer(_) => RequestKind::ContactAnswer,
            Request::ContactPolicy(_) => RequestKind::ContactPolicy,
            Request::Block(_) => RequestKind::Block,
            Request::Unblock(_) => RequestKind::Unblock,
            Request::BlockList => RequestKind::BlockList,
            Request::Deposit(_) => RequestKind::Deposit,
            Request::InboxFetch(_) => RequestKind::InboxFetch,
            Request::InboxAck(_) => RequestKind::InboxAck,
            Request::BackupPut(_) => RequestKind::BackupPut,
            Request::BackupGet => RequestKind::BackupGet,
            Request::SyncCopy(_) => RequestKind::SyncCopy,
            Request::Relay(_) => RequestKind::Relay,
            Request::PortOut(_) => RequestKind::PortOut,
            Request::PortIn(_) => RequestKind::PortIn,
            Request::AccountDelete(_) => RequestKind::AccountDelete,
            Request::Forward(_) => RequestKind::Forward,
        }
    }

    /// Decode `Args` (absent is passed as `Node::Null`) for `kind`.
    pub(crate) fn decode_args(
        kind: RequestKind,
        args: Node,
        path: &Path<'_>,
    ) -> Result<Request, DecodeError> {
        use RequestKind as K;
        let none = |args: Node| -> Result<(), DecodeError> {
            let fields = Fields::new(args, path, true)?;
            fields.deny_unknown(&[])
        };
        // `Args: null` and an absent `Args` read as `{}`.
        let args = match args {
            Node::Null => Node::Map(Vec::new()),
            other => other,
        };
        Ok(match kind {
            K::BrokerInfo => none(args).map(|()| Request::BrokerInfo)?,
            K::Register => Request::Register(WireValue::decode(args, path)?),
            K::DeviceJoin => Request::DeviceJoin(WireValue::decode(args, path)?),
            K::Login => Request::Login(WireValue::decode(args, path)?),
            K::Ping => none(args).map(|()| Request::Ping)?,
            K::Logout => none(args).map(|()| Request::Logout)?,
            K::AddDevice => Request::AddDevice(WireValue::decode(args, path)?),
            K::DeviceList => none(args).map(|()| Request::DeviceList)?,
            K::DeviceRevoke => Request::DeviceRevoke(WireValue::decode(args, path)?),
            K::IsNetworked => Request::IsNetworked(WireValue::decode(args, path)?),
            K::InitiateNew => Request::InitiateNew(WireValue::decode(args, path)?),
            K::InitiateExisting => Request::InitiateExisting(WireValue::decode(args, path)?),
            K::InitiateNewNetworked => {
                Request::InitiateNewNetworked(WireValue::decode(args, path)?)
            }
            K::InitiateExistingNetworked => {
                Request::InitiateExistingNetworked(WireValue::decode(args, path)?)
            }
            K::ContactAnswer => Request::ContactAnswer(WireValue::decode(args, path)?),
            K::ContactPolicy => Request::ContactPolicy(WireValue::decode(args, path)?),
            K::Block => Request::Block(WireValue::decode(args, path)?),
            K::Unblock => Request::Unblock(WireValue::decode(args, path)?),
            K::BlockList => none(args).map(|()| Request::BlockList)?,
            K::Deposit => Request::Deposit(WireValue::decode(args, path)?),
            K::InboxFetch => Request::InboxFetch(WireValue::decode(args, path)?),
            K::InboxAck => Request::InboxAck(WireValue::decode(args, path)?),
            K::BackupPut => Request::BackupPut(WireValue::decode(args, path)?),
            K::BackupGet => none(args).map(|()| Request::BackupGet)?,
            K::SyncCopy => Request::SyncCopy(WireValue::decode(args, path)?),
            K::Relay => Request::Relay(WireValue::decode(args, path)?),
            K::PortOut => Request::PortOut(WireValue::decode(args, path)?),
            K::PortIn => Request::PortIn(WireValue::decode(args, path)?),
            K::AccountDelete => Request::AccountDelete(WireValue::decode(args, path)?),
            K::Forward => Request::Forward(WireValue::decode(args, path)?),
        })
    }

    /// The `Args` mapping (empty for requests without args).
    pub(crate) fn encode_args(&self) -> Node {
        match self {
            Request::BrokerInfo
            | Request::Ping
            | Request::Logout
            | Request::DeviceList
            | Request::BlockList
            | Request::BackupGet => Node::Map(Vec::new()),
            Request::Register(args) => args.encode(),
            Request::DeviceJoin(args) => args.encode(),
            Request::Login(args) => args.encode(),
            Request::AddDevice(args) => args.encode(),
            Request::DeviceRevoke(args) => args.encode(),
            Request::IsNetworked(args)
            | Request::InitiateExisting(args)
            | Request::Block(args)
            | Request::Unblock(args) => args.encode(),
            Request::InitiateNew(args) => args.encode(),
            Request::InitiateNewNetworked(args) | Request::InitiateExistingNetworked(args) => {
                args.encode()
            }
            Request::ContactAnswer(args) => args.encode(),
            Request::ContactPolicy(args) => args.encode(),
            Request::Deposit(args) => args.encode(),
            Request::InboxFetch(args) => args.encode(),
            Request::InboxAck(args) => args.encode(),
            Request::BackupPut(args) => args.encode(),
            Request::SyncCopy(args) => args.encode(),
            Request::Relay(args) => args.encode(),
            Request::PortOut(args) => args.encode(),
            Request::PortIn(args) => args.encode(),
            Request::AccountDelete(args) => args.encode(),
            Request::Forward(args) => args.encode(),
        }
    }
}

wire_struct! {
    /// Args of `REGISTER`.
    pub struct RegisterArgs {
        /// Registration token, when the broker's registration is `TOKEN`.
        opt "TOKEN" token: Option<String>,
        /// The client's secret that the broker must later prove knowledge
        /// of; sent here so registration is one atomic write.
        req "SERVER-SECRET" server_secret: Hex32,
    }
}

wire_struct! {
    /// Args of `DEVICE-JOIN`.
    pub struct DeviceJoinArgs {
        /// The entity to join.
        req "ENTITY" entity: Number,
        /// The registration secret from `ADD-DEVICE`.
        req "SECRET" secret: Hex32,
        /// The new device's server secret.
        req "SERVER-SECRET" server_secret: Hex32,
    }
}

wire_struct! {
    /// Args of `LOGIN`.
    pub struct LoginArgs {
        /// The entity logging in.
        req "ENTITY" entity: Number,
        /// The device logging in.
        req "DEVICE" device: DeviceId,
        /// The client nonce (MM-NONCE-1, direction 0x01).
        req "SECRET" secret: Hex32,
    }
}

wire_struct! {
    /// Args of `ADD-DEVICE`.
    pub struct AddDeviceArgs {
        /// A name for the new device.
        opt "NAME" name: Option<DeviceName>,
    }
}

wire_struct! {
    /// Args of `DEVICE-REVOKE`.
    pub struct DeviceRevokeArgs {
        /// The device to revoke (not the current one).
        req "DEVICE" device: DeviceId,
    }
}

wire_struct! {
    /// Args of `ACCOUNT-DELETE`.
    pub struct AccountDeleteArgs {
        /// The logged-in entity's own number, repeated: a request without it (or with
        /// another number) deletes nothing.
        req "CONFIRM" confirm: Number,
    }
}

wire_struct! {
    /// Args of `FORWARD`.
    pub struct ForwardArgs {
        /// The signed moved notice (protocol.md 12.13), as the mover's client made it; the
        /// broker keeps it opaque and hands it to callers of this number.
        req "NOTICE" notice: Blob,
        /// How many days to keep it (at most the broker's `contacts.forward_max_days`).
        req "DAYS" days: u64,
    }
}

wire_struct! {
    /// Args naming one other entity: `IS-NETWORKED`, `INITIATE-EXISTING`,
    /// `BLOCK`, `UNBLOCK`.
    pub struct TargetArgs {
        /// The other entity.
        req "TARGET" target: Number,
    }
}

wire_struct! {
    /// Args of `INITIATE-NEW`.
    pub struct InitiateNewArgs {
        /// The entity to contact.
        req "TARGET" target: Number,
        /// Where the caller listens.
        opt "ADDRESS" address: Option<Address>,
    }
}

wire_struct! {
    /// Args of `INITIATE-NEW-NETWORKED` and `INITIATE-EXISTING-NETWORKED`.
    pub struct InitiateNetworkedArgs {
        /// The entity to contact.
        req "TARGET" target: Number,
        /// The caller's X25519 public key for the sealed address handoff.
        req "PUBKEY" pubkey: Hex32,
    }
}

/// Smallest `SEALED-ADDRESS` of an accepting networked `CONTACT-ANSWER`, in bytes: the 24-byte
/// nonce, an [`Address`] of at least one byte and the 16-byte tag (protocol.md 11.4).
pub const SEALED_ADDRESS_MIN: usize = 24 + 1 + 16;
/// Largest `SEALED-ADDRESS`: the nonce, an [`Address`] of [`Address::MAX_LEN`] bytes, the tag.
pub const SEALED_ADDRESS_MAX: usize = 24 + Address::MAX_LEN + 16;

/// The text of the length rule below; it names the bounds, so they must not drift.
const SEALED_ADDRESS_LEN_RULE: &str = "must decode to 41..=295 bytes (nonce, sealed Address, tag)";
const _: () = assert!(SEALED_ADDRESS_MIN == 41 && SEALED_ADDRESS_MAX == 295);

/// Args of `CONTACT-ANSWER`: the contact request answered, and the answer.
///
/// On the wire the answer is `ACCEPT` and the fields that go with it. Decoding refuses, with a
/// field error under `Args` (`BAD-ARGS`), every combination that is not one of the three
/// shapes of [`Answer`], and a `SEALED-ADDRESS` outside
/// [`SEALED_ADDRESS_MIN`]`..=`[`SEALED_ADDRESS_MAX`] bytes. Whether the shape fits the request
/// (same broker or networked) is the broker's to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactAnswerArgs {
    /// The contact request being answered.
    ///
    /// Wire key: `REQUEST`.
    pub request: Hex16,
    /// Decline, or accept with what the request's origin needs.
    ///
    /// Wire keys: `ACCEPT`, `ADDRESS`, `PUBKEY`, `SEALED-ADDRESS`.
    pub answer: Answer,
}

/// The answer of a `CONTACT-ANSWER`: exactly the field combinations protocol.md 6.15 allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `ACCEPT: false`, with none of `ADDRESS`, `PUBKEY`, `SEALED-ADDRESS`.
    Decline,
    /// `ACCEPT: true` with `ADDRESS` only: the answer to a request from the same broker
    /// (`NETWORKED: false`).
    Accept {
        /// Where the target listens for the caller's connection.
        ///
        /// Wire key: `ADDRESS`.
        address: Address,
    },
    /// `ACCEPT: true` with `PUBKEY` and `SEALED-ADDRESS` only: the answer to a networked
    /// request (`NETWORKED: true`); the plain address must not reach the caller's broker.
    AcceptNetworked {
        /// The target's X25519 public key for this request.
        ///
        /// Wire key: `PUBKEY`.
        pubkey: Hex32,
        /// The target's address sealed to the caller's key (protocol.md 11.4),
        /// [`SEALED_ADDRESS_MIN`]`..=`[`SEALED_ADDRESS_MAX`] bytes when decoded.
        ///
        /// Wire key: `SEALED-ADDRESS`.
        sealed_address: Blob,
    },
}

impl Answer {
    /// `ACCEPT`: whether this answer accepts the request.
    pub fn accepts(&self) -> bool {
        !matches!(self, Answer::Decline)
    }

    /// The answer the decoded fields spell, or the field error of a combination that is not
    /// one of the three shapes. Every check is on the fields' presence, in a fixed order, so
    /// the error reported is deterministic.
    fn from_fields(
        accept: bool,
        address: Option<Address>,
        pubkey: Option<Hex32>,
        sealed_address: Option<Blob>,
        path: &Path<'_>,
    ) -> Result<Answer, DecodeError> {
        match (accept, address, pubkey, sealed_address) {
            (false, None, None, None) => Ok(Answer::Decline),
            (true, Some(address), None, None) => Ok(Answer::Accept { address }),
            (true, None, Some(pubkey), Some(sealed_address)) => {
                if (SEALED_ADDRESS_MIN..=SEALED_ADDRESS_MAX).contains(&sealed_address.len()) {
                    Ok(Answer::AcceptNetworked {
                        pubkey,
                        sealed_address,
                    })
                } else {
                    Err(bad_value(
                        &path.key("SEALED-ADDRESS"),
                        SEALED_ADDRESS_LEN_RULE,
                    ))
                }
            }
            (false, address, pubkey, _) => {
                let key = if address.is_some() {
                    "ADDRESS"
                } else if pubkey.is_some() {
                    "PUBKEY"
                } else {
                    "SEALED-ADDRESS"
                };
                Err(bad_value(
                    &path.key(key),
                    "a declining answer (ACCEPT: false) carries no ADDRESS, PUBKEY or \
                     SEALED-ADDRESS",
                ))
            }
            (true, None, None, None) => Err(bad_value(
                &path.key("ACCEPT"),
                "ACCEPT: true needs ADDRESS, or PUBKEY and SEALED-ADDRESS",
            )),
            (true, Some(_), pubkey, _) => Err(bad_value(
                &path.key(if pubkey.is_some() {
                    "PUBKEY"
                } else {
                    "SEALED-ADDRESS"
                }),
                "an accepting answer carries ADDRESS (same broker) or PUBKEY and \
                 SEALED-ADDRESS (networked), not both",
            )),
            (true, None, Some(_), None) => Err(DecodeError::MissingField(
                path.key("SEALED-ADDRESS").render(),
            )),
            (true, None, None, Some(_)) => {
                Err(DecodeError::MissingField(path.key("PUBKEY").render()))
            }
        }
    }
}

impl ContactAnswerArgs {
    /// Wire keys, in encoding order.
    const KEYS: &'static [&'static str] =
        &["REQUEST", "ACCEPT", "ADDRESS", "PUBKEY", "SEALED-ADDRESS"];
}

impl WireValue for ContactAnswerArgs {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        let mut fields = Fields::new(node, path, false)?;
        fields.deny_unknown(Self::KEYS)?;
        // Each field is decoded first, in key order (as `wire_struct!` does), so a field's own
        // error comes before the combination is judged.
        let request = fields.required("REQUEST")?;
        let accept = fields.required("ACCEPT")?;
        let address = fields.optional("ADDRESS")?;
        let pubkey = fields.optional("PUBKEY")?;
        let sealed_address = fields.optional("SEALED-ADDRESS")?;
        let answer = Answer::from_fields(accept, address, pubkey, sealed_address, path)?;
        Ok(Self { request, answer })
    }

    fn encode(&self) -> Node {
        let mut map = MapBuilder::default();
        map.field("REQUEST", &self.request);
        map.field("ACCEPT", &self.answer.accepts());
        match &self.answer {
            Answer::Decline => {}
            Answer::Accept { address } => map.field("ADDRESS", address),
            Answer::AcceptNetworked {
                pubkey,
                sealed_address,
            } => {
                map.field("PUBKEY", pubkey);
                map.field("SEALED-ADDRESS", sealed_address);
            }
        }
        map.finish()
    }
}

wire_struct! {
    /// Args of `CONTACT-POLICY`.
    pub struct ContactPolicyArgs {
        /// Hand my address to existing contacts without asking.
        req "AUTO-EXISTING" auto_existing: bool,
        opt "ADDRESS" address: Option<Address>,
    }
}

wire_struct! {
    /// Args of `DEPOSIT`.
    pub struct DepositArgs {
        /// Recipient.
        req "TARGET" target: Number,
        /// Client-chosen message id (idempotency key).
        req "ID" id: Hex16,
        /// Ciphertext.
        req "BODY" body: Blob,
    }
}

/// Default of `INBOX-FETCH` `LIMIT`.
pub const INBOX_FETCH_DEFAULT_LIMIT: u32 = 100;
/// Largest `INBOX-FETCH` `LIMIT`.
pub const INBOX_FETCH_MAX_LIMIT: u32 = 1000;
/// Most ids in one `INBOX-ACK`.
pub const INBOX_ACK_MAX_IDS: usize = 1000;

wire_struct! {
    /// Args of `INBOX-FETCH`. `LIMIT` is 1 to 1000 when present.
    pub struct InboxFetchArgs {
        /// Most messages to return (default 100).
        opt "LIMIT" limit: Option<u32>,
        /// Return messages after this cursor.
        opt "AFTER" after: Option<Hex16>,
    }
    validate(args, path) {
        match args.limit {
            Some(limit) if !(1..=INBOX_FETCH_MAX_LIMIT).contains(&limit) => {
                Err(bad_value(&path.key("LIMIT"), "LIMIT must be 1 to 1000"))
            }
            _ => Ok(()),
        }
    }
}

impl InboxFetchArgs {
    /// `LIMIT`, or its default.
    pub fn limit_or_default(&self) -> u32 {
        self.limit.unwrap_or(INBOX_FETCH_DEFAULT_LIMIT)
    }
}

wire_struct! {
    /// Args of `INBOX-ACK`: at most 1000 ids.
    pub struct InboxAckArgs {
        /// Messages to remove.
        req "IDS" ids: Vec<Hex16>,
    }
    validate(args, path) {
        if args.ids.len() > INBOX_ACK_MAX_IDS {
            Err(bad_value(&path.key("IDS"), "at most 1000 ids"))
        } else {
            Ok(())
        }
    }
}

wire_struct! {
    /// Args of `BACKUP-PUT`.
    pub struct BackupPutArgs {
        /// The encrypted key backup.
        req "BLOB" blob: Blob,
        /// Must be the stored version + 1 (else `CONFLICT`).
        req "VERSION" version: u64,
    }
}

wire_struct! {
    /// Args of `RELAY`.
    pub struct RelayArgs {
        /// The relay id of the contact request (CONTACT-ACCEPTED or CONTACT-CONNECTING).
        req "RELAY" relay: Hex16,
    }
}

wire_struct! {
    /// Args of `SYNC-COPY`.
    pub struct SyncCopyArgs {
        /// Id of the message this device sent.
        req "ID" id: Hex16,
        /// Its ciphertext, for the entity's other devices.
        req "BODY" body: Blob,
        /// The entity the message was sent to.
        req "PEER" peer: Number,
    }
}

wire_struct! {
    /// Args of `PORT-OUT`.
    pub struct PortOutArgs {
        /// The id of the broker of the network the number is to move to.
        req "TO" to: String,
        /// The identity public key that will sign the PORT-IN statement: the token is good
        /// only with a statement signed by this key.
        req "IDENTITY-KEY" identity_key: Hex32,
    }
}

wire_struct! {
    /// Args of `PORT-IN`: the number, the losing broker's token, and the user's signed
    /// statement (see [`crate::port_statement`]).
    pub struct PortInArgs {
        /// The number to take over.
        req "NUMBER" number: Number,
        /// The id of the broker that serves it now.
        req "FROM" from: String,
        /// The token PORT-OUT returned at `FROM`.
        req "TOKEN" token: Hex32,
        /// The user's Ed25519 identity public key.
        req "IDENTITY-KEY" identity_key: Hex32,
        /// When the statement was made, unix seconds.
        req "TIME" time: u64,
        /// Ed25519 signature by `IDENTITY-KEY` over the port statement.
        req "SIGNATURE" signature: Hex64,
        /// The new device's server secret (as REGISTER).
        req "SERVER-SECRET" server_secret: Hex32,
    }
}
