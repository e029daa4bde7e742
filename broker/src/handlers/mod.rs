//! Request handling as a dispatch table (after mini-redis `cmd/`): every request is a function
//! of its area's narrow context (each area's `Cx`: the store, the online registry, the
//! limiters, the settings and the federation handle that area uses, borrowed from [`Broker`]),
//! who is asking ([`Session`], and [`Login`] once logged in), the request's arguments and the
//! time ([`Now`]). Handlers do no I/O of their own beyond the store and the online registry,
//! and never read the clock.
//!
//! Being logged in is a type. [`Routed::from`] splits the wire's requests into the
//! [`Public`] ones (no login needed) and the [`Authenticated`] ones; the connection dispatches
//! an authenticated request only with the [`Login`] its LOGIN produced, so no handler checks
//! for it at run time.
//!
//! By area:
//! - [`account`]: REGISTER, DEVICE-JOIN, LOGIN, ACCOUNT-DELETE, FORWARD.
//! - [`devices`]: ADD-DEVICE, DEVICE-LIST, DEVICE-REVOKE.
//! - [`contacts`]: IS-NETWORKED, INITIATE-*, CONTACT-ANSWER, CONTACT-POLICY, BLOCK, UNBLOCK,
//!   BLOCK-LIST.
//! - [`inbox`]: DEPOSIT, SYNC-COPY, INBOX-FETCH, INBOX-ACK.
//! - [`backup`]: BACKUP-PUT, BACKUP-GET.
//! - [`port`]: PORT-OUT, PORT-IN (number portability inside a network).

pub mod account;
pub mod backup;
pub mod contacts;
pub mod devices;
pub mod inbox;
pub mod port;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Duration;

use micromsg_store::StoreError;
use micromsg_wire::message::request::{
    AccountDeleteArgs, AddDeviceArgs, BackupPutArgs, ContactAnswerArgs, ContactPolicyArgs,
    DepositArgs, DeviceJoinArgs, DeviceRevokeArgs, ForwardArgs, InboxAckArgs, InboxFetchArgs,
    InitiateNetworkedArgs, InitiateNewArgs, LoginArgs, PortInArgs, PortOutArgs, RegisterArgs,
    RelayArgs, SyncCopyArgs, TargetArgs,
};
use micromsg_wire::message::response::PingData;
use micromsg_wire::{DeviceId, ErrorBody, ErrorCode, Number, Request, ResponseData};
use tracing::warn;

use crate::broker::Broker;
use crate::clock::Now;
use crate::contacts::pending::InitiateKind;
use crate::online::Push;

/// Why a request failed: the code and message sent to the client.
#[derive(Debug)]
pub struct Refusal(pub ErrorBody);

impl Refusal {
    /// A refusal with `code` and a message for people.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorBody::new(code, message))
    }

    /// A refusal that tells the client when to try again (at least a second).
    pub fn retry(code: ErrorCode, message: impl Into<String>, after: Duration) -> Self {
        let secs = u32::try_from(after.as_secs().max(1)).unwrap_or(u32::MAX);
        Self(ErrorBody::new(code, message).retry_after(secs))
    }

    /// INTERNAL, for what should not happen; the details stay in the log.
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error")
    }
}

/// How long a client is told to wait after UNAVAILABLE.
pub(crate) const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        // The database error stays in the log; the peer learns only that it failed, and
        // whether waiting may help.
        warn!(
            error = %crate::telemetry::error_chain(&e),
            "store error while handling a request"
        );
        if e.is_unavailable() {
            return Refusal::retry(
                ErrorCode::Unavailable,
                "the broker's storage cannot take this now (full or unreachable); try again \
                 after RetryAfter",
                UNAVAILABLE_RETRY_AFTER,
            );
        }
        Refusal::new(ErrorCode::Internal, "internal error; try again")
    }
}

/// What a handler answers.
pub type Handled = Result<ResponseData, Refusal>;

/// Who is on the other end of a connection, before and after LOGIN.
#[derive(Debug, Clone)]
pub struct Session {
    /// The connection's id in the online registry.
    pub conn_id: u64,
    /// The client's address as seen by the broker (rate limits, address resolution).
    pub peer: SocketAddr,
    /// TLS exporter value binding login nonces to this connection.
    pub binding: [u8; 32],
    /// The connection's event queue (events for the logged-in device go here).
    pub queue: crate::event_queue::Sender<Push>,
}

/// The device a connection is logged in as: the proof that LOGIN succeeded.
#[derive(Debug, Clone)]
pub struct Login {
    /// The entity's number.
    pub number: Number,
    /// The device.
    pub device: DeviceId,
}

impl Login {
    /// The entity's number.
    pub fn number(&self) -> &Number {
        &self.number
    }
}

/// A request that needs no login.
#[derive(Debug)]
pub enum Public {
    /// BROKER-INFO.
    BrokerInfo,
    /// PING.
    Ping,
    /// REGISTER.
    Register(RegisterArgs),
    /// DEVICE-JOIN.
    DeviceJoin(DeviceJoinArgs),
    /// LOGIN.
    Login(LoginArgs),
    /// PORT-IN.
    PortIn(PortInArgs),
}

/// A request that only a logged-in connection may make.
#[derive(Debug)]
pub enum Authenticated {
    /// LOGOUT.
    Logout,
    /// ADD-DEVICE.
    AddDevice(AddDeviceArgs),
    /// DEVICE-LIST.
    DeviceList,
    /// DEVICE-REVOKE.
    DeviceRevoke(DeviceRevokeArgs),
    /// IS-NETWORKED.
    IsNetworked(TargetArgs),
    /// INITIATE-NEW.
    InitiateNew(InitiateNewArgs),
    /// INITIATE-EXISTING.
    InitiateExisting(TargetArgs),
    /// INITIATE-NEW-NETWORKED / INITIATE-EXISTING-NETWORKED.
    InitiateNetworked(InitiateNetworkedArgs, InitiateKind),
    /// CONTACT-ANSWER.
    ContactAnswer(ContactAnswerArgs),
    /// CONTACT-POLICY.
    ContactPolicy(ContactPolicyArgs),
    /// BLOCK.
    Block(TargetArgs),
    /// UNBLOCK.
    Unblock(TargetArgs),
    /// BLOCK-LIST.
    BlockList,
    /// DEPOSIT.
    Deposit(DepositArgs),
    /// SYNC-COPY.
    SyncCopy(SyncCopyArgs),
    /// INBOX-FETCH.
    InboxFetch(InboxFetchArgs),
    /// INBOX-ACK.
    InboxAck(InboxAckArgs),
    /// BACKUP-PUT.
    BackupPut(BackupPutArgs),
    /// BACKUP-GET.
    BackupGet,
    /// RELAY (the connection handles it: it stops carrying frames).
    Relay(RelayArgs),
    /// PORT-OUT.
    PortOut(PortOutArgs),
    /// ACCOUNT-DELETE (the connection closes after its answer).
    AccountDelete(AccountDeleteArgs),
    /// FORWARD.
    Forward(ForwardArgs),
}

/// A decoded request, split by whether it needs a login (protocol.md 6.0).
#[derive(Debug)]
pub enum Routed {
    /// Needs no login.
    Public(Public),
    /// Needs a logged-in connection.
    Authenticated(Authenticated),
}

impl From<Request> for Routed {
    fn from(request: Request) -> Self {
        use Authenticated as A;
        let authenticated = match request {
            Request::BrokerInfo => return Routed::Public(Public::BrokerInfo),
            Request::Ping => return Routed::Public(Public::Ping),
            Request::Register(a) => return Routed::Public(Public::Register(a)),
            Request::DeviceJoin(a) => return Routed::Public(Public::DeviceJoin(a)),
            Request::Login(a) => return Routed::Public(Public::Login(a)),
            Request::PortIn(a) => return Routed::Public(Public::PortIn(a)),
            Request::Logout => A::Logout,
            Request::AddDevice(a) => A::AddDevice(a),
            Request::DeviceList => A::DeviceList,
            Request::DeviceRevoke(a) => A::DeviceRevoke(a),
            Request::IsNetworked(a) => A::IsNetworked(a),
            Request::InitiateNew(a) => A::InitiateNew(a),
            Request::InitiateExisting(a) => A::InitiateExisting(a),
            Request::InitiateNewNetworked(a) => A::InitiateNetworked(a, InitiateKind::New),
            Request::InitiateExistingNetworked(a) => {
                A::InitiateNetworked(a, InitiateKind::Existing)
            }
            Request::ContactAnswer(a) => A::ContactAnswer(a),
            Request::ContactPolicy(a) => A::ContactPolicy(a),
            Request::Block(a) => A::Block(a),
            Request::Unblock(a) => A::Unblock(a),
            Request::BlockList => A::BlockList,
            Request::Deposit(a) => A::Deposit(a),
            Request::SyncCopy(a) => A::SyncCopy(a),
            Request::InboxFetch(a) => A::InboxFetch(a),
            Request::InboxAck(a) => A::InboxAck(a),
            Request::BackupPut(a) => A::BackupPut(a),
            Request::BackupGet => A::BackupGet,
            Request::Relay(a) => A::Relay(a),
            Request::PortOut(a) => A::PortOut(a),
            Request::AccountDelete(a) => A::AccountDelete(a),
            Request::Forward(a) => A::Forward(a),
        };
        Routed::Authenticated(authenticated)
    }
}

/// What a public request did: an answer, and for LOGIN the login to keep.
#[derive(Debug)]
pub enum PublicOutcome {
    /// Answer and carry on.
    Answer(ResponseData),
    /// LOGIN succeeded: answer, and the connection is now logged in as this device.
    LoggedIn(ResponseData, Login),
}

/// Handles a request that needs no login. LOGIN on a logged-in connection is refused by the
/// caller (the connection knows its state), never here.
pub async fn public(
    broker: &Broker,
    session: &Session,
    request: Public,
    now: Now,
) -> Result<PublicOutcome, Refusal> {
    let answer = match request {
        Public::BrokerInfo => ResponseData::BrokerInfo(broker.info(now.unix)),
        Public::Ping => ResponseData::Ping(PingData { time: now.unix }),
        Public::Register(args) => {
            account::register(account::Cx::of(broker), session, args, now).await?
        }
        Public::DeviceJoin(args) => {
            account::device_join(account::Cx::of(broker), session, args, now).await?
        }
        Public::Login(args) => {
            let (answer, login) =
                account::login(account::Cx::of(broker), session, args, now).await?;
            return Ok(PublicOutcome::LoggedIn(answer, login));
        }
        Public::PortIn(args) => port::port_in(port::Cx::of(broker), session, args, now).await?,
    };
    Ok(PublicOutcome::Answer(answer))
}

/// Handles a request of the logged-in device `login`.
pub async fn authenticated(
    broker: &Broker,
    session: &Session,
    login: &Login,
    request: Authenticated,
    now: Now,
) -> Handled {
    use Authenticated as A;
    let devices = || devices::Cx::of(broker);
    let contacts = || contacts::Cx::of(broker);
    let inbox = || inbox::Cx::of(broker);
    let backup = || backup::Cx::of(broker);
    match request {
        A::Logout => Ok(ResponseData::Logout),
        A::AddDevice(args) => devices::add(devices(), login, args, now).await,
        A::DeviceList => devices::list(devices(), login).await,
        A::DeviceRevoke(args) => devices::revoke(devices(), session, login, args, now).await,
        A::IsNetworked(args) => Ok(contacts::is_networked(contacts(), &args.target)),
        A::InitiateNew(args) => {
            if let Some(address) = &args.address {
                contacts::announce(contacts(), session, login, address);
            }
            contacts::initiate(
                contacts(),
                session,
                login,
                args.target,
                InitiateKind::New,
                now,
            )
        }
        A::InitiateExisting(args) => contacts::initiate(
            contacts(),
            session,
            login,
            args.target,
            InitiateKind::Existing,
            now,
        ),
        A::InitiateNetworked(args, kind) => {
            contacts::initiate_networked(contacts(), session, login, args, kind, now).await
        }
        A::ContactAnswer(args) => contacts::answer(contacts(), session, login, args, now).await,
        A::ContactPolicy(args) => contacts::policy(contacts(), session, login, args).await,
        A::Block(args) => contacts::block(contacts(), login, &args.target, now).await,
        A::Unblock(args) => contacts::unblock(contacts(), login, &args.target).await,
        A::BlockList => contacts::block_list(contacts(), login).await,
        A::Deposit(args) => inbox::deposit(inbox(), login, args, now).await,
        A::SyncCopy(args) => inbox::sync_copy(inbox(), login, args, now).await,
        A::InboxFetch(args) => inbox::fetch(inbox(), login, args, now).await,
        A::InboxAck(args) => inbox::ack(inbox(), login, args, now).await,
        A::BackupPut(args) => backup::put(backup(), login, args, now).await,
        A::BackupGet => backup::get(backup(), login).await,
        A::PortOut(args) => port::port_out(port::Cx::of(broker), login, args, now).await,
        // Only a connection can turn itself into a relay half (`connection.rs`).
        A::Relay(_) => Err(Refusal::internal()),
        A::AccountDelete(args) => {
            account::delete(account::Cx::of(broker), session, login, args, now).await
        }
        A::Forward(args) => account::forward(account::Cx::of(broker), login, args, now).await,
    }
}

/// Refuses a ciphertext or backup larger than the broker holds (`inbox.max_message_bytes`).
fn check_size(max: u32, field: &str, len: usize) -> Result<(), Refusal> {
    let max = max as usize;
    if len > max {
        return Err(Refusal::new(
            ErrorCode::BadArgs,
            format!("{field} is {len} bytes; this broker holds at most {max}"),
        ));
    }
    Ok(())
}

/// A stored number as a wire value (the store only holds valid ones).
fn wire_number(number: &str) -> Result<Number, Refusal> {
    Number::new(number).map_err(|_| Refusal::internal())
}
