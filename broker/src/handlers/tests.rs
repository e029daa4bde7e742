//! Handler unit tests (issue 17, item 5): the handlers called as functions of a [`Broker`] over
//! a temporary SQLite store, a [`Session`] whose event queue the test holds, and a fixed
//! [`Now`]. No TLS, no sockets, no sleeps: time moves only when a test advances its `Now`.
//!
//! The INITIATE handler spawns its routing. So that a test sees the routing's effects when it
//! chooses, and exactly once, the handler runs with a parked runtime entered (it spawns the
//! routing there, where it never runs), and the test awaits [`route_initiate`] itself with the
//! same request.
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use micromsg_crypto::Secret32;
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::nonce::{self, Direction, NonceContext};
use micromsg_store::{NewDevice, Store};
use micromsg_wire::message::event::{
    ContactKind, ContactRequest, DeviceRevoked, Forwarded, InboxNotice,
};
use micromsg_wire::message::request::{
    AccountDeleteArgs, AddDeviceArgs, DepositArgs, DeviceJoinArgs, DeviceRevokeArgs, ForwardArgs,
    InboxAckArgs, InboxFetchArgs, InitiateNewArgs, LoginArgs, RegisterArgs, SyncCopyArgs,
    TargetArgs,
};
use micromsg_wire::message::response::{
    AddDeviceData, DepositData, DeviceJoinData, ForwardData, InboxAckData, InboxFetchData,
    InboxMessage, InitiateData, LoginData, NonceAlgorithm, RegisterData,
};
use micromsg_wire::{
    Blob, DeviceId, DeviceName, ErrorBody, ErrorCode, Event, Hex16, Hex32, Limits, Number,
    Response, ResponseData, decode_request,
};
use rand_core::OsRng;

use super::{Authenticated, Handled, Login, Public, PublicOutcome, Refusal, Routed, Session};
use crate::broker::Broker;
use crate::clock::Now;
use crate::config::{Config, RegistrationPolicy};
use crate::contacts::pending::{Initiate, InitiateKind, Origin};
use crate::contacts::routing::route_initiate;
use crate::online::Push;

/// The wall clock of every test: a fixed Unix time (a multiple of the 6 s nonce step).
const T0: u64 = 1_700_000_000;
/// The address clients connect from unless a test says otherwise.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

// ------------------------------------------------------------------------------------------
// Fixture
// ------------------------------------------------------------------------------------------

/// A broker over a fresh SQLite file, with a clock that only moves when the test says so.
struct Fixture {
    broker: Arc<Broker>,
    now: Now,
    /// Where INITIATE's spawned routing goes: a runtime that is never driven.
    parked: Parked,
    _dir: tempfile::TempDir,
}

/// A current-thread runtime that nobody drives; shut down without blocking when dropped (the
/// test drops it inside its own runtime, where a blocking shutdown would panic).
struct Parked(Option<tokio::runtime::Runtime>);

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One client connection: its session and the receiving end of its event queue.
struct Conn {
    session: Session,
    events: crate::event_queue::Receiver<Push>,
}

/// What a client keeps about one of its devices after REGISTER or DEVICE-JOIN.
#[derive(Clone)]
struct Device {
    number: Number,
    device: DeviceId,
    client_secret: [u8; 32],
    server_secret: [u8; 32],
}

impl Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("number", &self.number)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// A logged-in device: its connection and the login the handlers take.
struct Online {
    conn: Conn,
    login: Login,
}

impl Fixture {
    /// A broker with the default configuration changed by `adjust`.
    async fn new(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = temp_dir();
        let mut store = Store::open_sqlite(dir.path().join("broker.db"))
            .await
            .unwrap();
        // LOGIN's reads as a broker runs them by default: on a login reader.
        store
            .start_login_readers(
                Config::default().database.login_readers,
                Config::default().database.timeout(),
            )
            .await
            .unwrap();
        let parked = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Self {
            broker: Arc::new(broker(store, adjust)),
            now: Now {
                unix: T0,
                instant: Instant::now(),
            },
            parked: Parked(Some(parked)),
            _dir: dir,
        }
    }

    /// A broker restart with another configuration over the same store (the online registry
    /// and the in-memory limiters start empty, as after a real restart).
    fn restart(&mut self, adjust: impl FnOnce(&mut Config)) {
        self.broker = Arc::new(broker(self.broker.store.clone(), adjust));
    }

    /// Moves both clocks forward.
    fn advance(&mut self, by: Duration) {
        self.now.unix += by.as_secs();
        self.now.instant += by;
    }

    /// A new connection from `ip`, with a binding of its own (as each TLS connection has):
    /// fixed, made from the connection id.
    fn conn_from(&self, ip: IpAddr) -> Conn {
        self.conn_with(ip, |conn_id| {
            let mut binding = [0xb1; 32];
            binding[..8].copy_from_slice(&conn_id.to_le_bytes());
            binding
        })
    }

    /// A new connection from the usual client address.
    fn conn(&self) -> Conn {
        self.conn_from(CLIENT_IP)
    }

    /// A new connection from `ip` whose binding `binding` makes from the connection id.
    fn conn_with(&self, ip: IpAddr, binding: impl FnOnce(u64) -> [u8; 32]) -> Conn {
        let conn_id = self.broker.online.next_conn_id();
        let (queue, events) = crate::event_queue::channel(self.broker.config.limits.event_queue);
        Conn {
            session: Session {
                conn_id,
                peer: SocketAddr::new(ip, 40_000),
                binding: binding(conn_id),
                queue,
            },
            events,
        }
    }

    async fn public(&self, conn: &Conn, request: Public) -> Result<PublicOutcome, Refusal> {
        super::public(&self.broker, &conn.session, request, self.now).await
    }

    async fn call(&self, online: &Online, request: Authenticated) -> Handled {
        super::authenticated(
            &self.broker,
            &online.conn.session,
            &online.login,
            request,
            self.now,
        )
        .await
    }

    /// REGISTER on `conn` with a fresh server secret.
    async fn try_register(&self, conn: &Conn, token: Option<&str>) -> Result<Device, Refusal> {
        let server_secret = *Secret32::generate(&mut OsRng).expose();
        let args = RegisterArgs {
            token: token.map(str::to_owned),
            server_secret: Hex32::from_bytes(server_secret),
        };
        let data = match self.public(conn, Public::Register(args)).await? {
            PublicOutcome::Answer(ResponseData::Register(data)) => data,
            other => panic!("REGISTER answered {other:?}"),
        };
        let RegisterData {
            entity,
            device,
            client_secret,
            nonce_step,
            nonce_algorithm,
        } = data;
        assert_eq!(device.get(), 1, "REGISTER makes device 1");
        assert_eq!(nonce_step, self.broker.config.auth.nonce_step_secs);
        assert_eq!(nonce_algorithm, NonceAlgorithm::MmNonce1);
        Ok(Device {
            number: entity,
            device,
            client_secret: *client_secret.as_bytes(),
            server_secret,
        })
    }

    /// REGISTER that must succeed, from a connection of its own.
    async fn register(&self) -> Device {
        self.try_register(&self.conn(), None).await.unwrap()
    }

    /// DEVICE-JOIN of `number` with the registration secret `secret`, from `conn`.
    async fn try_join(
        &self,
        conn: &Conn,
        number: &Number,
        secret: Hex32,
    ) -> Result<Device, Refusal> {
        let server_secret = *Secret32::generate(&mut OsRng).expose();
        let args = DeviceJoinArgs {
            entity: number.clone(),
            secret,
            server_secret: Hex32::from_bytes(server_secret),
        };
        let data = match self.public(conn, Public::DeviceJoin(args)).await? {
            PublicOutcome::Answer(ResponseData::DeviceJoin(data)) => data,
            other => panic!("DEVICE-JOIN answered {other:?}"),
        };
        let DeviceJoinData {
            device,
            client_secret,
            nonce_step,
            nonce_algorithm,
        } = data;
        assert_eq!(nonce_step, self.broker.config.auth.nonce_step_secs);
        assert_eq!(nonce_algorithm, NonceAlgorithm::MmNonce1);
        Ok(Device {
            number: number.clone(),
            device,
            client_secret: *client_secret.as_bytes(),
            server_secret,
        })
    }

    /// The client nonce of `device` on a connection with `binding`, at the current time.
    fn nonce(&self, device: &Device, binding: &[u8; 32]) -> Hex32 {
        let step = self.now.unix / u64::from(self.broker.config.auth.nonce_step_secs);
        Hex32::from_bytes(
            nonce::compute(
                &Secret32::from_bytes(device.client_secret),
                Direction::ClientToBroker,
                &context(device, binding),
                step,
            )
            .unwrap(),
        )
    }

    /// LOGIN of `device` on `conn` presenting `secret`.
    async fn try_login_with(
        &self,
        conn: &Conn,
        device: &Device,
        secret: Hex32,
    ) -> Result<(LoginData, Login), Refusal> {
        let args = LoginArgs {
            entity: device.number.clone(),
            device: device.device,
            secret,
        };
        match self.public(conn, Public::Login(args)).await? {
            PublicOutcome::LoggedIn(ResponseData::Login(data), login) => Ok((data, login)),
            other => panic!("LOGIN answered {other:?}"),
        }
    }

    /// LOGIN of `device` on `conn` with the right nonce; checks the broker's proof when it
    /// succeeds, as a client must.
    async fn try_login(&self, conn: &Conn, device: &Device) -> Result<(LoginData, Login), Refusal> {
        let secret = self.nonce(device, &conn.session.binding);
        let (data, login) = self.try_login_with(conn, device, secret).await?;
        let step = self.now.unix / u64::from(self.broker.config.auth.nonce_step_secs);
        assert_eq!(data.step, step, "the broker answers for the client's step");
        let proof = nonce::compute(
            &Secret32::from_bytes(device.server_secret),
            Direction::BrokerToClient,
            &context(device, &conn.session.binding),
            step,
        )
        .unwrap();
        assert_eq!(
            data.proof.as_bytes(),
            &proof,
            "the broker proves the server secret"
        );
        assert_eq!(login.number, device.number);
        assert_eq!(login.device, device.device);
        Ok((data, login))
    }

    /// Logs `device` in on a new connection.
    async fn login(&self, device: &Device) -> Online {
        let conn = self.conn();
        let (_, login) = self.try_login(&conn, device).await.unwrap();
        Online { conn, login }
    }

    /// ADD-DEVICE as `online`.
    async fn add_device(&self, online: &Online, name: Option<&str>) -> Handled {
        let args = AddDeviceArgs {
            name: name.map(|n| DeviceName::new(n).unwrap()),
        };
        self.call(online, Authenticated::AddDevice(args)).await
    }

    /// INITIATE-NEW through [`super::authenticated`], with the routing it spawns parked: the
    /// answer must be ready at the first poll (decided before any lookup, protocol.md 10.2).
    fn initiate_new(&self, caller: &Online, target: &Number) -> Handled {
        let _parked = self.parked.0.as_ref().unwrap().enter();
        let args = InitiateNewArgs {
            target: target.clone(),
            address: None,
        };
        first_poll(self.call(caller, Authenticated::InitiateNew(args)))
    }

    /// What the spawned routing of an acknowledged INITIATE-NEW does, run here to completion.
    async fn route_new(&self, caller: &Online, target: &Number, ack: &ResponseData) {
        let ResponseData::InitiateNew(InitiateData { request }) = ack else {
            panic!("not an INITIATE-NEW ack: {ack:?}");
        };
        route_initiate(
            self.broker.router.clone(),
            Initiate {
                request: *request.as_bytes(),
                caller: caller.login.number().to_owned(),
                origin: Origin::Local {
                    caller_conn: caller.conn.session.conn_id,
                },
                target: target.clone(),
                kind: InitiateKind::New,
            },
            self.now,
        )
        .await;
    }

    /// DEPOSIT of `body` to `target` with message id `id`.
    async fn deposit(&self, sender: &Online, target: &Number, id: u8, body: &[u8]) -> Handled {
        let args = DepositArgs {
            target: target.clone(),
            id: Hex16::from_bytes([id; 16]),
            body: Blob::new(body.to_vec()),
        };
        self.call(sender, Authenticated::Deposit(args)).await
    }

    /// INBOX-FETCH as `online` (one page, the default limit).
    async fn fetch(&self, online: &Online) -> InboxFetchData {
        let args = InboxFetchArgs {
            limit: None,
            after: None,
        };
        match self.call(online, Authenticated::InboxFetch(args)).await {
            Ok(ResponseData::InboxFetch(data)) => data,
            other => panic!("INBOX-FETCH answered {other:?}"),
        }
    }

    /// Makes `a` and `b` a contact pair directly in the store.
    async fn pair(&self, a: &Number, b: &Number) {
        let store = &self.broker.store;
        let now = self.now.unix_i64();
        assert!(store.add_contact(a, b, now).await.unwrap());
        assert!(store.add_contact(b, a, now).await.unwrap());
    }
}

/// A directory for the store: on a tmpfs where there is one (a commit's fsync costs nothing
/// there, and durability is not what these tests are about), else the usual temporary
/// directory.
fn temp_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

fn broker(store: Store, adjust: impl FnOnce(&mut Config)) -> Broker {
    let mut config = Config::default();
    adjust(&mut config);
    config.validate().unwrap();
    Broker::new(config, store, IdentityKey::generate(&mut OsRng))
}

fn context<'a>(device: &'a Device, binding: &'a [u8; 32]) -> NonceContext<'a> {
    NonceContext {
        entity: device.number.as_str(),
        device: device.device.get(),
        binding,
    }
}

/// Polls `future` once; it must be ready.
fn first_poll<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the handler waited before answering"),
    }
}

/// The error a handler refused with.
fn refused<T: Debug>(result: Result<T, Refusal>) -> ErrorBody {
    match result {
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
        Err(Refusal(body)) => body,
    }
}

impl Online {
    fn events(&mut self) -> Vec<Event> {
        self.conn.events()
    }
}

impl Conn {
    /// Everything queued for this connection so far.
    fn pushes(&mut self) -> Vec<Push> {
        let mut out = Vec::new();
        while let Some(push) = self.events.try_recv() {
            out.push(push);
        }
        out
    }

    /// The events queued so far (none of them closing the connection).
    fn events(&mut self) -> Vec<Event> {
        self.pushes()
            .into_iter()
            .map(|push| match push {
                Push::Event(event) => *event,
                Push::Close(event) => panic!("unexpected close with {event:?}"),
            })
            .collect()
    }
}

/// CONTACT-ANSWER declining `request`, decoded from its wire form (which is stable, where
/// the shape of its Rust args may change).
fn decline(request: Hex16) -> Authenticated {
    let yaml = format!(
        "Request: CONTACT-ANSWER\nId: 1\nArgs:\n  REQUEST: \"{}\"\n  ACCEPT: false\n",
        request.to_hex()
    );
    let (_, request) = decode_request(yaml.as_bytes(), &Limits::default()).unwrap();
    match Routed::from(request) {
        Routed::Authenticated(request) => request,
        Routed::Public(request) => panic!("CONTACT-ANSWER routed as public: {request:?}"),
    }
}

fn number(digits: &str) -> Number {
    Number::new(digits).unwrap()
}

fn device_id(id: u32) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn add_device_secret(answer: Handled) -> AddDeviceData {
    match answer {
        Ok(ResponseData::AddDevice(data)) => data,
        other => panic!("ADD-DEVICE answered {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// The silent drop (protocol.md 10.2)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn initiate_answers_alike_and_only_an_online_willing_target_is_asked() {
    let fx = Fixture::new(|_| {}).await;
    let a = fx.register().await;
    let offline = fx.register().await;
    let blocker = fx.register().await;
    let rejecter = fx.register().await;
    let willing = fx.register().await;
    let unknown = number("5550000000");
    assert!(!fx.broker.store.entity_exists(&unknown).await.unwrap());

    let mut caller = fx.login(&a).await;
    let mut blocking = fx.login(&blocker).await;
    let mut rejecting = fx.login(&rejecter).await;
    let mut target = fx.login(&willing).await;

    // The blocker blocks the caller.
    let blocked = fx
        .call(
            &blocking,
            Authenticated::Block(TargetArgs {
                target: a.number.clone(),
            }),
        )
        .await;
    assert_eq!(blocked.unwrap(), ResponseData::Block);

    // The rejecter is asked once and declines, which puts the caller on its block list.
    let first = fx.initiate_new(&caller, &rejecter.number).unwrap();
    fx.route_new(&caller, &rejecter.number, &first).await;
    let asked = rejecting.events();
    let [Event::ContactRequest(request)] = asked.as_slice() else {
        panic!("the rejecter was not asked: {asked:?}");
    };
    let declined = fx.call(&rejecting, decline(request.request)).await;
    assert_eq!(declined.unwrap(), ResponseData::ContactAnswer);
    assert!(
        fx.broker
            .store
            .is_blocked(&rejecter.number, &a.number)
            .await
            .unwrap(),
        "a decline blocks the caller"
    );
    assert!(caller.events().is_empty(), "the caller is told nothing");

    // Now the same request to each kind of target; the willing one last is the control.
    let targets = [
        ("unknown", &unknown),
        ("offline", &offline.number),
        ("blocking", &blocker.number),
        ("rejecting", &rejecter.number),
        ("self", &a.number),
        ("willing", &willing.number),
    ];
    let acks: Vec<ResponseData> = targets
        .iter()
        .map(|(_, number)| fx.initiate_new(&caller, number).unwrap())
        .collect();

    // The same answer in every case: the same variant and the same frame but for a fresh id.
    let frame = |ack: &ResponseData| {
        let ResponseData::InitiateNew(InitiateData { request }) = ack else {
            panic!("not an INITIATE-NEW ack: {ack:?}");
        };
        let text = String::from_utf8(Response::ok(9, ack.clone()).encode()).unwrap();
        assert!(text.contains(&request.to_hex()));
        (request.to_hex(), text.replace(&request.to_hex(), "<id>"))
    };
    let frames: Vec<_> = acks.iter().map(frame).collect();
    let (_, willing_frame) = frames.last().unwrap();
    for ((name, _), (_, text)) in targets.iter().zip(&frames) {
        assert_eq!(text, willing_frame, "the ack for the {name} target differs");
    }
    let mut ids: Vec<_> = frames.iter().map(|(id, _)| id.clone()).collect();
    ids.push(frame(&first).0);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), targets.len() + 1, "every ack has a fresh id");

    // Nothing moved before the routing.
    assert!(caller.events().is_empty());
    assert!(blocking.events().is_empty());
    assert!(rejecting.events().is_empty());
    assert!(target.events().is_empty());

    for ((_, number), ack) in targets.iter().zip(&acks) {
        fx.route_new(&caller, number, ack).await;
    }

    // Only the request to the willing target waits for an answer; none is kept for later.
    for ((name, number), ack) in targets.iter().zip(&acks) {
        let ResponseData::InitiateNew(InitiateData { request }) = ack else {
            unreachable!()
        };
        let pending = fx
            .broker
            .router
            .pending
            .peek(request.as_bytes(), number, fx.now.instant);
        assert_eq!(pending.is_some(), *name == "willing", "{name}");
    }
    let mut offline = fx.login(&offline).await;
    assert!(offline.events().is_empty(), "the offline target was asked");

    // Only the willing target is asked, once, with the request its caller was given.
    assert!(blocking.events().is_empty(), "the blocker was asked");
    assert!(
        rejecting.events().is_empty(),
        "the rejecter was asked again"
    );
    assert!(caller.events().is_empty(), "the caller heard something");
    let ResponseData::InitiateNew(InitiateData { request }) = acks.last().unwrap() else {
        unreachable!()
    };
    assert_eq!(
        target.events(),
        vec![Event::ContactRequest(ContactRequest {
            request: *request,
            from: a.number.clone(),
            kind: ContactKind::New,
            networked: false,
            pubkey: None,
        })]
    );
    // The probe of the unknown number is remembered (10.4): at once in memory, but not
    // written on the way (a write there slowed the prober's next request, telling it the
    // number was free); the background flush writes it. Nothing else was stored.
    let store = &fx.broker.store;
    let probes = &fx.broker.router.probes;
    assert!(probes.contains(&a.number, &unknown));
    assert!(!store.is_poisoned(&a.number, &unknown).await.unwrap());
    probes.flush(store, fx.now.unix_i64()).await;
    assert!(store.is_poisoned(&a.number, &unknown).await.unwrap());
    assert!(!probes.contains(&a.number, &unknown));
    assert!(!store.entity_exists(&unknown).await.unwrap());
    assert_eq!(
        store.blocked_by(&blocker.number).await.unwrap(),
        vec![a.number.clone()]
    );
}

#[tokio::test]
async fn a_number_probed_before_it_existed_stays_unreachable_for_the_prober() {
    let fx = Fixture::new(|_| {}).await;
    let prober = fx.register().await;
    let other = fx.register().await;
    let prober = fx.login(&prober).await;
    let other = fx.login(&other).await;
    let late = number("5550000001");

    let probe = fx.initiate_new(&prober, &late).unwrap();
    fx.route_new(&prober, &late, &probe).await;
    // The noted probe is not written yet when the number is given out: it holds anyway.

    // The number is given out later.
    let client_secret = *Secret32::generate(&mut OsRng).expose();
    let server_secret = *Secret32::generate(&mut OsRng).expose();
    let new_device = NewDevice {
        client_secret,
        server_secret,
        name: None,
    };
    let store = &fx.broker.store;
    let id = store
        .create_entity(&late, &new_device, fx.now.unix_i64())
        .await
        .unwrap();
    let mut newcomer = fx
        .login(&Device {
            number: late.clone(),
            device: id,
            client_secret,
            server_secret,
        })
        .await;

    let ack = fx.initiate_new(&prober, &late).unwrap();
    fx.route_new(&prober, &late, &ack).await;
    assert!(
        newcomer.events().is_empty(),
        "the prober reached the number"
    );

    // Anyone else reaches it (the control).
    let ack = fx.initiate_new(&other, &late).unwrap();
    fx.route_new(&other, &late, &ack).await;
    let events = newcomer.events();
    assert!(
        matches!(events.as_slice(), [Event::ContactRequest(r)] if r.from == other.login.number),
        "{events:?}"
    );
    // The record is internal: not on the newcomer's block list.
    assert!(store.blocked_by(&late).await.unwrap().is_empty());
}

// ------------------------------------------------------------------------------------------
// LOGIN: lockout, replay, unknown and revoked devices (protocol.md 9.2, 9.3, 9.5)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn login_locks_after_max_failures_until_the_lock_time_has_passed() {
    let mut fx = Fixture::new(|c| {
        c.auth.max_login_failures = 3;
        c.auth.lock_secs = 60;
    })
    .await;
    let x = fx.register().await;
    let conn = fx.conn();
    let wrong = Hex32::from_bytes([7; 32]);

    for attempt in 1..=3 {
        let body = refused(fx.try_login_with(&conn, &x, wrong).await);
        assert_eq!(body.code, ErrorCode::AuthFailed, "attempt {attempt}");
        assert_eq!(body.retry_after, None);
    }
    // Locked: even the right nonce is answered LOCKED, with the seconds left.
    let body = refused(fx.try_login(&conn, &x).await);
    assert_eq!(body.code, ErrorCode::Locked);
    assert_eq!(body.retry_after, Some(60));
    fx.advance(Duration::from_secs(45));
    let body = refused(fx.try_login(&conn, &x).await);
    assert_eq!(body.code, ErrorCode::Locked);
    assert_eq!(body.retry_after, Some(15));
    assert!(!fx.broker.online.is_online(x.number.as_str()));

    // RetryAfter seconds later the right nonce logs in.
    fx.advance(Duration::from_secs(15));
    let (data, login) = fx.try_login(&conn, &x).await.unwrap();
    assert_eq!(data.session.inbox, 0);
    assert_eq!(login.number, x.number);
    assert!(fx.broker.online.is_online(x.number.as_str()));

    // Success reset the count: two more failures do not lock.
    let conn = fx.conn();
    for _ in 0..2 {
        let body = refused(fx.try_login_with(&conn, &x, wrong).await);
        assert_eq!(body.code, ErrorCode::AuthFailed);
    }
    fx.try_login(&conn, &x).await.unwrap();
}

#[tokio::test]
async fn wrong_logins_from_one_address_do_not_lock_the_owner_out_from_another() {
    let fx = Fixture::new(|c| {
        c.auth.max_login_failures = 10;
        c.auth.lock_secs = 300;
    })
    .await;
    let victim = fx.register().await;
    let attacker = fx.conn_from(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66)));
    let wrong = Hex32::from_bytes([7; 32]);
    for _ in 0..10 {
        let body = refused(fx.try_login_with(&attacker, &victim, wrong).await);
        assert_eq!(body.code, ErrorCode::AuthFailed);
    }
    // The attacker's address is locked out of this entity...
    let body = refused(fx.try_login_with(&attacker, &victim, wrong).await);
    assert_eq!(body.code, ErrorCode::Locked);
    // ...and the owner, from its own address, logs in at once (before: LOCKED for 300 s).
    let owner = fx.conn();
    fx.try_login(&owner, &victim).await.unwrap();
    // Its success does not lift the lock on the attacker's address.
    let body = refused(fx.try_login_with(&attacker, &victim, wrong).await);
    assert_eq!(body.code, ErrorCode::Locked);
}

#[tokio::test]
async fn an_address_that_fails_logins_for_many_entities_is_throttled() {
    let fx = Fixture::new(|c| {
        c.auth.max_login_failures = 10;
        c.auth.max_failures_per_source = 5;
    })
    .await;
    // IPv6: the whole /64 is one source.
    let prefix =
        |host: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, 7, 0, 0, 0, host));
    let wrong = Hex32::from_bytes([7; 32]);
    for i in 0..5u16 {
        let ghost = Device {
            number: number(&format!("55500001{i:02}")),
            device: device_id(1),
            client_secret: [1; 32],
            server_secret: [2; 32],
        };
        let conn = fx.conn_from(prefix(i + 1));
        let body = refused(fx.try_login_with(&conn, &ghost, wrong).await);
        assert_eq!(body.code, ErrorCode::AuthFailed);
    }
    let someone = fx.register().await;
    let body = refused(fx.try_login(&fx.conn_from(prefix(99)), &someone).await);
    assert_eq!(body.code, ErrorCode::RateLimited, "{body:?}");
    assert!(body.retry_after.is_some());
    // Another /64 is not affected.
    let other = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, 8, 0, 0, 0, 1));
    fx.try_login(&fx.conn_from(other), &someone).await.unwrap();
}

#[tokio::test]
async fn login_failures_lock_a_number_that_does_not_exist_too() {
    let fx = Fixture::new(|c| {
        c.auth.max_login_failures = 2;
        c.auth.lock_secs = 300;
    })
    .await;
    let conn = fx.conn();
    let ghost = Device {
        number: number("5550000002"),
        device: device_id(1),
        client_secret: [1; 32],
        server_secret: [2; 32],
    };
    let nonce = fx.nonce(&ghost, &conn.session.binding);
    for _ in 0..2 {
        let body = refused(fx.try_login_with(&conn, &ghost, nonce).await);
        assert_eq!(body.code, ErrorCode::AuthFailed);
    }
    let body = refused(fx.try_login_with(&conn, &ghost, nonce).await);
    assert_eq!(body.code, ErrorCode::Locked);
    assert_eq!(body.retry_after, Some(300));
}

#[tokio::test]
async fn a_login_nonce_is_accepted_once_even_on_another_session_with_the_same_binding() {
    let mut fx = Fixture::new(|_| {}).await;
    let x = fx.register().await;
    let first = fx.conn();
    let nonce = fx.nonce(&x, &first.session.binding);
    fx.try_login(&first, &x).await.unwrap();

    let binding = first.session.binding;
    let replay = fx.conn_with(CLIENT_IP, |_| binding);
    let body = refused(fx.try_login_with(&replay, &x, nonce).await);
    assert_eq!(body.code, ErrorCode::AuthFailed);
    let body = refused(fx.try_login_with(&first, &x, nonce).await);
    assert_eq!(body.code, ErrorCode::AuthFailed);

    // Another connection (another binding) logs the same device in within the same step: its
    // nonce is another value (protocol.md 9.2).
    let other = fx.conn();
    fx.try_login(&other, &x).await.unwrap();

    // A step later the nonce would still verify (skew 1): refused as a replay, not a mismatch.
    fx.advance(Duration::from_secs(6));
    let body = refused(fx.try_login_with(&replay, &x, nonce).await);
    assert_eq!(body.code, ErrorCode::AuthFailed);
    // The right nonce of the new step logs in on that session.
    fx.try_login(&replay, &x).await.unwrap();
}

#[tokio::test]
async fn unknown_and_revoked_devices_fail_exactly_like_a_wrong_nonce() {
    let fx = Fixture::new(|_| {}).await;
    let x = fx.register().await;
    let first = fx.login(&x).await;
    let secret = add_device_secret(fx.add_device(&first, Some("tablet")).await).secret;
    let second = fx.try_join(&fx.conn(), &x.number, secret).await.unwrap();
    assert_eq!(second.device.get(), 2);
    let mut second_online = fx.login(&second).await;

    let revoke = DeviceRevokeArgs {
        device: second.device,
    };
    let revoked = fx.call(&first, Authenticated::DeviceRevoke(revoke)).await;
    assert_eq!(revoked.unwrap(), ResponseData::DeviceRevoke);
    let pushes = second_online.conn.pushes();
    assert!(
        matches!(
            pushes.as_slice(),
            [Push::Close(e)] if **e == Event::DeviceRevoked(DeviceRevoked { device: second.device })
        ),
        "{pushes:?}"
    );

    let conn = fx.conn();
    let wrong_nonce = refused(
        fx.try_login_with(&conn, &x, Hex32::from_bytes([9; 32]))
            .await,
    );
    assert_eq!(wrong_nonce.code, ErrorCode::AuthFailed);
    assert_eq!(wrong_nonce.retry_after, None);

    let unknown_device = Device {
        device: device_id(7),
        ..x.clone()
    };
    let revoked_device = second.clone();
    let unknown_entity = Device {
        number: number("5550000003"),
        ..x.clone()
    };
    for (name, device) in [
        ("unknown device", &unknown_device),
        ("revoked device", &revoked_device),
        ("unknown entity", &unknown_entity),
    ] {
        let conn = fx.conn();
        let nonce = fx.nonce(device, &conn.session.binding);
        let body = refused(fx.try_login_with(&conn, device, nonce).await);
        assert_eq!(body, wrong_nonce, "{name}");
    }
    // The device that is still active logs in.
    fx.login(&x).await;
}

// ------------------------------------------------------------------------------------------
// REGISTER: policy, token, rate limit (protocol.md 6.2, 9.1)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn registration_with_the_token_policy_needs_a_configured_token() {
    let fx = Fixture::new(|c| {
        c.registration.policy = RegistrationPolicy::Token;
        c.registration.tokens = vec!["alpha-1".into(), "beta-2".into()];
    })
    .await;
    let conn = fx.conn();
    for token in [None, Some(""), Some("gamma"), Some("beta"), Some("beta-22")] {
        let body = refused(fx.try_register(&conn, token).await);
        assert_eq!(body.code, ErrorCode::BadToken, "token {token:?}");
    }
    let store = &fx.broker.store;
    assert_eq!(store.entity_count().await.unwrap(), 0);

    let x = fx.try_register(&conn, Some("beta-2")).await.unwrap();
    let y = fx.try_register(&conn, Some("alpha-1")).await.unwrap();
    assert_ne!(x.number, y.number);
    for d in [&x, &y] {
        let digits = d.number.as_str();
        assert!(digits.starts_with("555") && digits.len() == 10, "{digits}");
        let record = store
            .device(&d.number, DeviceId::FIRST)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.client_secret, d.client_secret);
        assert_eq!(record.server_secret, d.server_secret);
    }
    assert_eq!(store.entity_count().await.unwrap(), 2);
    fx.login(&x).await;
}

#[tokio::test]
async fn registration_closed_refuses_with_or_without_a_token() {
    let fx = Fixture::new(|c| {
        c.registration.policy = RegistrationPolicy::Closed;
        c.registration.tokens = vec!["alpha-1".into()];
    })
    .await;
    let conn = fx.conn();
    for token in [None, Some("alpha-1")] {
        let body = refused(fx.try_register(&conn, token).await);
        assert_eq!(body.code, ErrorCode::RegistrationClosed);
    }
    assert_eq!(fx.broker.store.entity_count().await.unwrap(), 0);
}

#[tokio::test]
async fn registrations_and_device_joins_are_rate_limited_per_ip() {
    let mut fx = Fixture::new(|c| c.registration.per_ip_per_hour = 2).await;
    let here = fx.conn();
    let there = fx.conn_from(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 4)));
    let x = fx.try_register(&here, None).await.unwrap();
    fx.try_register(&here, None).await.unwrap();
    let body = refused(fx.try_register(&here, None).await);
    assert_eq!(body.code, ErrorCode::RateLimited);
    assert_eq!(body.retry_after, Some(3600));
    assert_eq!(fx.broker.store.entity_count().await.unwrap(), 2);

    // Another address has its own budget.
    fx.try_register(&there, None).await.unwrap();

    fx.advance(Duration::from_secs(1000));
    let body = refused(fx.try_register(&here, None).await);
    assert_eq!(body.code, ErrorCode::RateLimited);
    assert_eq!(body.retry_after, Some(2600));
    // DEVICE-JOIN draws on the same budget, before the secret is looked at.
    let online = fx.login(&x).await;
    let secret = add_device_secret(fx.add_device(&online, None).await).secret;
    let body = refused(fx.try_join(&here, &x.number, secret).await);
    assert_eq!(body.code, ErrorCode::RateLimited);
    assert_eq!(body.retry_after, Some(2600));

    // The refused join did not spend the secret: another address redeems it.
    let joined = fx.try_join(&there, &x.number, secret).await.unwrap();
    assert_eq!(joined.device.get(), 2);

    // When the hour is over, the address may register again.
    fx.advance(Duration::from_secs(2600));
    fx.try_register(&here, None).await.unwrap();
    assert_eq!(fx.broker.store.entity_count().await.unwrap(), 4);
}

// ------------------------------------------------------------------------------------------
// The device cap (protocol.md 6.7, 9.4)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn add_device_counts_pending_secrets_toward_the_device_cap() {
    let mut fx = Fixture::new(|c| c.limits.max_devices = 3).await;
    let x = fx.register().await;
    let first = fx.login(&x).await;
    let conn = fx.conn();

    let s1 = add_device_secret(fx.add_device(&first, Some("phone")).await);
    assert_eq!(s1.expires, T0 + 600);
    let s2 = add_device_secret(fx.add_device(&first, None).await);
    assert_ne!(s1.secret, s2.secret);
    // One device and two unused secrets: full.
    let body = refused(fx.add_device(&first, None).await);
    assert_eq!(body.code, ErrorCode::DeviceLimit);

    let phone = fx.try_join(&conn, &x.number, s1.secret).await.unwrap();
    assert_eq!(phone.device.get(), 2);
    let record = fx
        .broker
        .store
        .device(&x.number, device_id(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.name.as_deref(), Some("phone"));
    assert_eq!(record.server_secret, phone.server_secret);
    // Two devices and one unused secret: still full.
    let body = refused(fx.add_device(&first, None).await);
    assert_eq!(body.code, ErrorCode::DeviceLimit);
    // A spent secret is refused.
    let body = refused(fx.try_join(&conn, &x.number, s1.secret).await);
    assert_eq!(body.code, ErrorCode::BadSecret);

    // An expired secret no longer holds a place, and can no longer be redeemed.
    fx.advance(Duration::from_secs(601));
    let s3 = add_device_secret(fx.add_device(&first, None).await);
    let body = refused(fx.try_join(&conn, &x.number, s2.secret).await);
    assert_eq!(body.code, ErrorCode::BadSecret);
    let third = fx.try_join(&conn, &x.number, s3.secret).await.unwrap();
    assert_eq!(third.device.get(), 3);
    let body = refused(fx.add_device(&first, None).await);
    assert_eq!(body.code, ErrorCode::DeviceLimit);

    let listed = fx.call(&first, Authenticated::DeviceList).await;
    let Ok(ResponseData::DeviceList(list)) = listed else {
        panic!("DEVICE-LIST answered {listed:?}");
    };
    let ids: Vec<(u32, bool)> = list
        .devices
        .iter()
        .map(|d| (d.id.get(), d.current))
        .collect();
    assert_eq!(ids, vec![(1, true), (2, false), (3, false)]);
    fx.login(&third).await;
}

#[tokio::test]
async fn device_join_past_the_cap_is_refused_and_the_secret_stays_usable() {
    // A secret issued under a cap of 3 is redeemed after a restart with a cap of 2.
    let mut fx = Fixture::new(|c| c.limits.max_devices = 3).await;
    let x = fx.register().await;
    let first = fx.login(&x).await;
    let s1 = add_device_secret(fx.add_device(&first, None).await).secret;
    let s2 = add_device_secret(fx.add_device(&first, None).await).secret;
    fx.restart(|c| c.limits.max_devices = 2);
    let conn = fx.conn();

    let second = fx.try_join(&conn, &x.number, s1).await.unwrap();
    assert_eq!(second.device.get(), 2);
    let body = refused(fx.try_join(&conn, &x.number, s2).await);
    assert_eq!(body.code, ErrorCode::DeviceLimit);
    let store = &fx.broker.store;
    assert_eq!(store.active_device_count(&x.number).await.unwrap(), 2);

    // Once a device is revoked the refused secret still works; ids are never reused.
    let first = fx.login(&x).await;
    let revoke = DeviceRevokeArgs {
        device: second.device,
    };
    let revoked = fx.call(&first, Authenticated::DeviceRevoke(revoke)).await;
    assert_eq!(revoked.unwrap(), ResponseData::DeviceRevoke);
    let third = fx.try_join(&conn, &x.number, s2).await.unwrap();
    assert_eq!(third.device.get(), 3);
    assert_eq!(store.active_device_count(&x.number).await.unwrap(), 2);
}

// ------------------------------------------------------------------------------------------
// DEPOSIT: quota, idempotency, contact pair and block list (protocol.md 6.20, 10.3)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_deposit_past_the_inbox_quota_is_refused_and_what_was_stored_is_intact() {
    let fx = Fixture::new(|c| c.inbox.quota_per_device = 3).await;
    let s = fx.register().await;
    let r = fx.register().await;
    fx.pair(&s.number, &r.number).await;
    let sender = fx.login(&s).await;
    let mut recipient = fx.login(&r).await;
    let expires = T0 + fx.broker.config.inbox.ttl_secs;

    for id in 1..=3u8 {
        let answer = fx.deposit(&sender, &r.number, id, &[id; 40]).await;
        assert_eq!(
            answer.unwrap(),
            ResponseData::Deposit(DepositData {
                id: Hex16::from_bytes([id; 16]),
                expires,
            })
        );
    }
    let body = refused(fx.deposit(&sender, &r.number, 4, &[4; 40]).await);
    assert_eq!(body.code, ErrorCode::QuotaExceeded);

    // One INBOX notice per stored message, none for the refused one.
    assert_eq!(
        recipient.events(),
        vec![Event::Inbox(InboxNotice { count: 1 }); 3]
    );
    let message = |id: u8| InboxMessage {
        id: Hex16::from_bytes([id; 16]),
        from: s.number.clone(),
        from_device: s.device,
        time: T0,
        expires,
        body: Blob::new(vec![id; 40]),
    };
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages, vec![message(1), message(2), message(3)]);
    assert!(!page.more);

    // Acknowledging one makes room for the refused message.
    let ack = InboxAckArgs {
        ids: vec![Hex16::from_bytes([1; 16])],
    };
    let acked = fx.call(&recipient, Authenticated::InboxAck(ack)).await;
    assert_eq!(
        acked.unwrap(),
        ResponseData::InboxAck(InboxAckData { removed: 1 })
    );
    fx.deposit(&sender, &r.number, 4, &[4; 40]).await.unwrap();
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages, vec![message(2), message(3), message(4)]);
}

#[tokio::test]
async fn a_repeated_deposit_stores_one_message_and_answers_alike() {
    let fx = Fixture::new(|_| {}).await;
    let s = fx.register().await;
    let r = fx.register().await;
    fx.pair(&s.number, &r.number).await;
    let sender = fx.login(&s).await;

    let first = fx.deposit(&sender, &r.number, 0x42, b"ciphertext").await;
    let again = fx.deposit(&sender, &r.number, 0x42, b"ciphertext").await;
    let first = first.unwrap();
    assert_eq!(
        first,
        ResponseData::Deposit(DepositData {
            id: Hex16::from_bytes([0x42; 16]),
            expires: T0 + fx.broker.config.inbox.ttl_secs,
        })
    );
    assert_eq!(again.unwrap(), first);

    let recipient = fx.login(&r).await;
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages.len(), 1, "{:?}", page.messages);
    assert_eq!(page.messages[0].id, Hex16::from_bytes([0x42; 16]));
    assert_eq!(page.messages[0].body, Blob::new(b"ciphertext".to_vec()));
    // Another id is another message (the control).
    fx.deposit(&sender, &r.number, 0x43, b"ciphertext")
        .await
        .unwrap();
    assert_eq!(fx.fetch(&recipient).await.messages.len(), 2);
}

#[tokio::test]
async fn a_repeated_deposit_tells_the_recipient_nothing_new() {
    let fx = Fixture::new(|_| {}).await;
    let s = fx.register().await;
    let r = fx.register().await;
    fx.pair(&s.number, &r.number).await;
    let sender = fx.login(&s).await;
    let mut recipient = fx.login(&r).await;
    recipient.events();
    fx.deposit(&sender, &r.number, 0x61, b"once").await.unwrap();
    fx.deposit(&sender, &r.number, 0x61, b"once").await.unwrap();
    let inbox_events = recipient
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Inbox(_)))
        .count();
    assert_eq!(
        inbox_events, 1,
        "one message stored, one INBOX event (protocol.md 7.5)"
    );
}

#[tokio::test]
async fn a_deposit_id_another_sender_used_in_that_inbox_is_a_final_conflict() {
    let fx = Fixture::new(|_| {}).await;
    let first = fx.register().await;
    let second = fx.register().await;
    let r = fx.register().await;
    fx.pair(&first.number, &r.number).await;
    fx.pair(&second.number, &r.number).await;
    let first = fx.login(&first).await;
    let second = fx.login(&second).await;
    fx.deposit(&first, &r.number, 0x51, b"one").await.unwrap();
    let refusal = fx
        .deposit(&second, &r.number, 0x51, b"two")
        .await
        .expect_err("the ID is taken in that inbox");
    assert_eq!(refusal.0.code, ErrorCode::Conflict, "{refusal:?}");
    // Final, not "internal, may be retried": the same request is refused the same way.
    let again = fx
        .deposit(&second, &r.number, 0x51, b"two")
        .await
        .expect_err("still taken");
    assert_eq!(again.0.code, ErrorCode::Conflict);
    let recipient = fx.login(&r).await;
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages.len(), 1, "the first sender's message is kept");
    assert_eq!(page.messages[0].body.as_bytes(), b"one");
}

#[tokio::test]
async fn a_deposit_retried_later_answers_with_the_stored_expiry() {
    let mut fx = Fixture::new(|_| {}).await;
    let s = fx.register().await;
    let r = fx.register().await;
    fx.pair(&s.number, &r.number).await;
    let sender = fx.login(&s).await;

    let first = fx.deposit(&sender, &r.number, 0x42, b"ciphertext").await;
    // The response was lost; the client retries ten seconds later (protocol.md 6.20: "returns
    // the same result").
    fx.advance(Duration::from_secs(10));
    let again = fx.deposit(&sender, &r.number, 0x42, b"ciphertext").await;
    let recipient = fx.login(&r).await;
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages.len(), 1);
    let stored = page.messages[0].expires;
    assert_eq!(stored, T0 + fx.broker.config.inbox.ttl_secs);
    let first = first.unwrap();
    assert_eq!(
        first,
        ResponseData::Deposit(DepositData {
            id: Hex16::from_bytes([0x42; 16]),
            expires: stored,
        })
    );
    // Not EXPIRES = T0 + 10 + TTL: a message that does not exist.
    assert_eq!(again.unwrap(), first);
}

#[tokio::test]
async fn a_deposit_or_sync_copy_reusing_an_id_with_another_body_is_a_conflict() {
    let fx = Fixture::new(|_| {}).await;
    let s = fx.register().await;
    let r = fx.register().await;
    fx.pair(&s.number, &r.number).await;
    let sender = fx.login(&s).await;
    fx.deposit(&sender, &r.number, 0x71, b"the first body")
        .await
        .unwrap();
    let refusal = fx
        .deposit(&sender, &r.number, 0x71, b"a second body")
        .await
        .expect_err("another body under a used ID");
    assert_eq!(refusal.0.code, ErrorCode::Conflict, "{refusal:?}");
    let recipient = fx.login(&r).await;
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].body.as_bytes(), b"the first body");

    // SYNC-COPY: the same rule for the copies to the entity's other devices (6.25).
    let secret = add_device_secret(fx.add_device(&sender, None).await).secret;
    let second_device = fx.try_join(&fx.conn(), &s.number, secret).await.unwrap();
    let copy = |body: &'static [u8]| {
        Authenticated::SyncCopy(SyncCopyArgs {
            id: Hex16::from_bytes([0x72; 16]),
            body: Blob::new(body.to_vec()),
            peer: r.number.clone(),
        })
    };
    fx.call(&sender, copy(b"copy one")).await.unwrap();
    fx.call(&sender, copy(b"copy one")).await.unwrap();
    let refusal = fx
        .call(&sender, copy(b"copy two"))
        .await
        .expect_err("another body under a used ID");
    assert_eq!(refusal.0.code, ErrorCode::Conflict, "{refusal:?}");
    let other = fx.login(&second_device).await;
    let page = fx.fetch(&other).await;
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].body.as_bytes(), b"copy one");
}

/// A blocked sender that retries a deposit later, or reuses its ID with another body, gets the
/// answers a kept deposit's sender gets (6.20): the first EXPIRES, and CONFLICT. Before, the
/// retry of a discarded deposit answered a new EXPIRES, which told the sender it was blocked.
#[tokio::test]
async fn a_blocked_senders_retries_are_answered_like_a_kept_deposits() {
    let mut fx = Fixture::new(|_| {}).await;
    let s = fx.register().await;
    let kept = fx.register().await;
    let blocker = fx.register().await;
    fx.pair(&s.number, &kept.number).await;
    fx.pair(&s.number, &blocker.number).await;
    let sender = fx.login(&s).await;
    let blocking = fx.login(&blocker).await;
    fx.call(
        &blocking,
        Authenticated::Block(TargetArgs {
            target: s.number.clone(),
        }),
    )
    .await
    .unwrap();
    let first = [
        fx.deposit(&sender, &kept.number, 0x31, b"body")
            .await
            .unwrap(),
        fx.deposit(&sender, &blocker.number, 0x31, b"body")
            .await
            .unwrap(),
    ];
    fx.advance(Duration::from_secs(10));
    for (i, target) in [&kept.number, &blocker.number].into_iter().enumerate() {
        let again = fx.deposit(&sender, target, 0x31, b"body").await.unwrap();
        assert_eq!(again, first[i], "a retry's answer, target {i}");
        let other = fx
            .deposit(&sender, target, 0x31, b"another body")
            .await
            .expect_err("another body under a used ID");
        assert_eq!(other.0.code, ErrorCode::Conflict, "target {i}");
    }
}

#[tokio::test]
async fn a_deposit_needs_a_contact_pair_and_a_blocking_target_drops_it_silently() {
    let fx = Fixture::new(|_| {}).await;
    let s = fx.register().await;
    let r = fx.register().await;
    let sender = fx.login(&s).await;
    let mut recipient = fx.login(&r).await;

    let body = refused(fx.deposit(&sender, &r.number, 1, b"hello").await);
    assert_eq!(body.code, ErrorCode::NotFound);

    fx.pair(&s.number, &r.number).await;
    let blocked = fx
        .call(
            &recipient,
            Authenticated::Block(TargetArgs {
                target: s.number.clone(),
            }),
        )
        .await;
    assert_eq!(blocked.unwrap(), ResponseData::Block);
    let expires = T0 + fx.broker.config.inbox.ttl_secs;
    let acked = fx.deposit(&sender, &r.number, 2, b"hello").await;
    assert_eq!(
        acked.unwrap(),
        ResponseData::Deposit(DepositData {
            id: Hex16::from_bytes([2; 16]),
            expires,
        })
    );
    assert!(fx.fetch(&recipient).await.messages.is_empty());
    assert!(recipient.events().is_empty());

    // Unblocked, the next deposit is stored (the control).
    let unblocked = fx
        .call(
            &recipient,
            Authenticated::Unblock(TargetArgs {
                target: s.number.clone(),
            }),
        )
        .await;
    assert_eq!(unblocked.unwrap(), ResponseData::Unblock);
    fx.deposit(&sender, &r.number, 3, b"hello").await.unwrap();
    let page = fx.fetch(&recipient).await;
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].id, Hex16::from_bytes([3; 16]));
    assert_eq!(
        recipient.events(),
        vec![Event::Inbox(InboxNotice { count: 1 })]
    );
}

#[tokio::test]
async fn a_standalone_broker_neither_ports_out_nor_in() {
    use micromsg_wire::message::request::{PortInArgs, PortOutArgs};
    let fx = Fixture::new(|_| {}).await;
    let a = fx.register().await;
    let online = fx.login(&a).await;
    let refused = fx
        .call(
            &online,
            Authenticated::PortOut(PortOutArgs {
                to: "y".into(),
                identity_key: Hex32::from_bytes([1; 32]),
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.0.code, ErrorCode::NotNetworked);
    let conn = fx.conn();
    let refused = fx
        .public(
            &conn,
            Public::PortIn(PortInArgs {
                number: number("5561234567"),
                from: "y".into(),
                token: Hex32::from_bytes([2; 32]),
                identity_key: Hex32::from_bytes([3; 32]),
                time: 0,
                signature: micromsg_wire::Hex64::from_bytes([4; 64]),
                server_secret: Hex32::from_bytes([5; 32]),
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.0.code, ErrorCode::NotNetworked);
    assert!(
        !fx.broker
            .store
            .entity_exists(&number("5561234567"))
            .await
            .unwrap()
    );
}

// ------------------------------------------------------------------------------------------
// Number portability on a networked broker (protocol.md 6.27, 6.28; docs/federation.md 12)
// ------------------------------------------------------------------------------------------

/// A fixture whose broker is `x` (prefix 555) of a network with `y` (556), which listens
/// nowhere: every rule up to the call to the peer is checked here, and the losing broker's
/// side (`PortOut`) is called directly as `y` would.
async fn networked_fixture() -> (Fixture, tempfile::TempDir) {
    use crate::federation::Federation;
    use crate::federation::network::{InitBroker, init};
    let net = temp_dir();
    let specs =
        [("x", "555", "127.0.0.1:1"), ("y", "556", "127.0.0.1:2")].map(|(id, prefix, endpoint)| {
            InitBroker {
                id: id.to_owned(),
                prefixes: vec![prefix.to_owned()],
                endpoint: endpoint.to_owned(),
            }
        });
    let report = init(&net.path().join("network"), "test-net", &specs).unwrap();
    let mut fx = Fixture::new(|_| {}).await;
    let mut config = Config::default();
    config.server.broker_id = "x".into();
    config.numbers.prefixes = vec!["555".into()];
    config.federation.network_file = Some(report.network_file);
    config.federation.connect_timeout_ms = 100;
    config.federation.request_timeout_ms = 300;
    config.validate().unwrap();
    let federation = Federation::load(&config.federation, "x").unwrap().unwrap();
    fx.broker = Arc::new(Broker::with_federation(
        config,
        fx.broker.store.clone(),
        IdentityKey::generate(&mut OsRng),
        Some(federation),
    ));
    (fx, net)
}

fn port_out_args(to: &str, key: &IdentityKey) -> Authenticated {
    Authenticated::PortOut(micromsg_wire::message::request::PortOutArgs {
        to: to.into(),
        identity_key: Hex32::from_bytes(*key.public_key().as_bytes()),
    })
}

/// `y`'s `PortOut` for `number`, signed by `key` at `time`.
fn port_out_call(
    number: &Number,
    token: &[u8; 32],
    key: &IdentityKey,
    time: u64,
) -> crate::federation::proto::PortOutRequest {
    crate::federation::proto::PortOutRequest {
        number: number.as_str().into(),
        token: token.to_vec(),
        identity_key: key.public_key().as_bytes().to_vec(),
        time,
        signature: key
            .sign(&micromsg_wire::port_statement(
                number.as_str(),
                "x",
                "y",
                time,
            ))
            .to_vec(),
    }
}

#[tokio::test]
async fn port_out_issues_a_token_only_for_another_broker_of_the_network() {
    let (fx, _net) = networked_fixture().await;
    let a = fx.register().await;
    let online = fx.login(&a).await;
    let key = IdentityKey::generate(&mut OsRng);
    for to in ["x", "q"] {
        let refused = fx.call(&online, port_out_args(to, &key)).await.unwrap_err();
        assert_eq!(refused.0.code, ErrorCode::BadArgs, "{to}");
    }
    let ResponseData::PortOut(data) = fx.call(&online, port_out_args("y", &key)).await.unwrap()
    else {
        panic!("PORT-OUT answered otherwise")
    };
    assert_eq!(data.expires, T0 + 600, "federation.port_token_ttl_secs");
}

#[tokio::test]
async fn port_in_checks_home_clock_and_signature_before_asking_the_losing_broker() {
    use micromsg_wire::message::request::PortInArgs;
    let (fx, _net) = networked_fixture().await;
    let key = IdentityKey::generate(&mut OsRng);
    let port_in = |digits: &str, from: &str, time: u64, signer: &IdentityKey| {
        let to = "x";
        Public::PortIn(PortInArgs {
            number: number(digits),
            from: from.into(),
            token: Hex32::from_bytes([9; 32]),
            identity_key: Hex32::from_bytes(*key.public_key().as_bytes()),
            time,
            signature: micromsg_wire::Hex64::from_bytes(
                signer.sign(&micromsg_wire::port_statement(digits, from, to, time)),
            ),
            server_secret: Hex32::from_bytes([5; 32]),
        })
    };
    let code = |r: Result<PublicOutcome, Refusal>| r.map(|_| ()).unwrap_err().0.code;
    let conn = fx.conn();
    // x serves 555… itself; 556… is y's, not "z"'s.
    assert_eq!(
        code(fx.public(&conn, port_in("5551234567", "y", T0, &key)).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(fx.public(&conn, port_in("5561234567", "z", T0, &key)).await),
        ErrorCode::NotNetworked
    );
    // The statement's time: 300 s away is accepted, 301 s is not.
    assert_eq!(
        code(
            fx.public(&conn, port_in("5561234567", "y", T0 - 301, &key))
                .await
        ),
        ErrorCode::BadArgs
    );
    assert_eq!(
        code(
            fx.public(&conn, port_in("5561234567", "y", T0 + 301, &key))
                .await
        ),
        ErrorCode::BadArgs
    );
    // Signed by another key than IDENTITY-KEY.
    let other = IdentityKey::generate(&mut OsRng);
    assert_eq!(
        code(
            fx.public(&conn, port_in("5561234567", "y", T0 - 300, &other))
                .await
        ),
        ErrorCode::AuthFailed
    );
    // All well: y is asked, cannot be reached, and nothing was created.
    assert_eq!(
        code(
            fx.public(&conn, port_in("5561234567", "y", T0 + 300, &key))
                .await
        ),
        ErrorCode::PeerUnavailable
    );
    assert!(
        !fx.broker
            .store
            .entity_exists(&number("5561234567"))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn the_losing_broker_agrees_once_moves_the_inbox_and_stops_serving_the_number() {
    use crate::federation::porting::receive_port_out;
    use micromsg_store::NewInboxItem;
    let (fx, _net) = networked_fixture().await;
    let a = fx.register().await;
    let b = fx.register().await;
    let mut online = fx.login(&a).await;
    // One message waits for A.
    fx.broker
        .store
        .deposit_batch(
            &[NewInboxItem {
                id: [7; 16],
                recipient_number: a.number.clone(),
                recipient_device: Some(a.device),
                sender_number: b.number.clone(),
                sender_device: DeviceId::FIRST,
                created_at: T0 as i64,
                expires_at: T0 as i64 + 3600,
                body: b"waiting".to_vec(),
            }],
            100,
        )
        .await
        .unwrap();
    let key = IdentityKey::generate(&mut OsRng);
    let ResponseData::PortOut(data) = fx.call(&online, port_out_args("y", &key)).await.unwrap()
    else {
        panic!("PORT-OUT answered otherwise")
    };
    let token = *data.token.as_bytes();
    let broker = &fx.broker;

    // Refusals change nothing: another token, another key than the one named, another caller.
    let status = receive_port_out(
        broker,
        "y",
        port_out_call(&a.number, &[1; 32], &key, T0),
        T0,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let mallory = IdentityKey::generate(&mut OsRng);
    let status = receive_port_out(
        broker,
        "y",
        port_out_call(&a.number, &token, &mallory, T0),
        T0,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // (Signed for y, presented by z: the statement names y.)
    let status = receive_port_out(broker, "z", port_out_call(&a.number, &token, &key, T0), T0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(broker.store.outbox_depth().await.unwrap(), 0);

    // The port: agreed once.
    let answer = receive_port_out(broker, "y", port_out_call(&a.number, &token, &key, T0), T0)
        .await
        .unwrap();
    assert_eq!(answer.seq, 1);
    // A's connection is told and closed; its logins are refused with PORTED.
    match online.conn.events.try_recv() {
        Some(Push::Close(event)) => assert!(matches!(*event, Event::DeviceRevoked(_))),
        other => panic!("expected DEVICE-REVOKED and close, got {other:?}"),
    }
    let refused = fx.try_login(&fx.conn(), &a).await.unwrap_err();
    assert_eq!(refused.0.code, ErrorCode::Ported);
    assert!(
        refused.0.message.contains("broker y"),
        "{}",
        refused.0.message
    );
    // The waiting message left the inbox for the outbox, towards y.
    assert_eq!(
        broker.store.outbox_depth_by_peer().await.unwrap(),
        [("y".to_owned(), 1)]
    );
    assert_eq!(broker.store.inbox_depth().await.unwrap(), 0);
    // Routing: A lives at y now, for B's IS-NETWORKED too.
    let b_online = fx.login(&b).await;
    let ResponseData::IsNetworked(home) = fx
        .call(
            &b_online,
            Authenticated::IsNetworked(TargetArgs {
                target: a.number.clone(),
            }),
        )
        .await
        .unwrap()
    else {
        panic!("IS-NETWORKED answered otherwise")
    };
    assert_eq!(home.broker.as_deref(), Some("y"));
    // The same statement again (y lost the answer): the same answer; any other: refused.
    let again = receive_port_out(broker, "y", port_out_call(&a.number, &token, &key, T0), T0)
        .await
        .unwrap();
    assert_eq!(again.seq, 1);
    let status = receive_port_out(
        broker,
        "y",
        port_out_call(&a.number, &token, &key, T0 + 1),
        T0,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

// ------------------------------------------------------------------------------------------
// ACCOUNT-DELETE (protocol.md 6.27)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn account_delete_needs_the_own_number_as_confirmation() {
    let fx = Fixture::new(|_| {}).await;
    let x = fx.register().await;
    let y = fx.register().await;
    let first = fx.login(&x).await;
    for confirm in [y.number.clone(), number("5550000003")] {
        let body = refused(
            fx.call(
                &first,
                Authenticated::AccountDelete(AccountDeleteArgs { confirm }),
            )
            .await,
        );
        assert_eq!(body.code, ErrorCode::BadArgs);
    }
    // Nothing was deleted: neither X nor Y.
    assert!(fx.broker.store.entity_exists(&x.number).await.unwrap());
    assert!(fx.broker.store.entity_exists(&y.number).await.unwrap());
    fx.login(&x).await;
}

#[tokio::test]
async fn account_delete_ends_every_session_and_logins_fail_like_an_unknown_device() {
    let fx = Fixture::new(|_| {}).await;
    let x = fx.register().await;
    let mut first = fx.login(&x).await;
    let secret = add_device_secret(fx.add_device(&first, Some("tablet")).await).secret;
    let second = fx.try_join(&fx.conn(), &x.number, secret).await.unwrap();
    let mut second_online = fx.login(&second).await;

    let conn = fx.conn();
    let wrong_nonce = refused(
        fx.try_login_with(&conn, &x, Hex32::from_bytes([9; 32]))
            .await,
    );

    let deleted = fx
        .call(
            &first,
            Authenticated::AccountDelete(AccountDeleteArgs {
                confirm: x.number.clone(),
            }),
        )
        .await;
    assert_eq!(deleted.unwrap(), ResponseData::AccountDelete);
    for (online, device) in [(&mut first, x.device), (&mut second_online, second.device)] {
        let pushes = online.conn.pushes();
        assert!(
            matches!(
                pushes.as_slice(),
                [Push::Close(e)] if **e == Event::DeviceRevoked(DeviceRevoked { device })
            ),
            "{pushes:?}"
        );
    }
    for device in [&x, &second] {
        let conn = fx.conn();
        let nonce = fx.nonce(device, &conn.session.binding);
        let body = refused(fx.try_login_with(&conn, device, nonce).await);
        assert_eq!(body, wrong_nonce, "a deleted entity's device");
    }
    assert!(!fx.broker.store.entity_exists(&x.number).await.unwrap());
    assert!(fx.broker.store.number_retired(&x.number).await.unwrap());
    // A second delete (another connection still in flight) finds nothing to delete.
    let again = refused(
        fx.call(
            &second_online,
            Authenticated::AccountDelete(AccountDeleteArgs {
                confirm: x.number.clone(),
            }),
        )
        .await,
    );
    assert_eq!(again.code, ErrorCode::NotFound);
}

// ------------------------------------------------------------------------------------------
// FORWARD (protocol.md 6.28, 10.2)
// ------------------------------------------------------------------------------------------

fn forward(notice: &[u8], days: u64) -> Authenticated {
    Authenticated::Forward(ForwardArgs {
        notice: Blob::from(notice.to_vec()),
        days,
    })
}

#[tokio::test]
async fn forward_days_and_notice_size_are_bounded_by_the_broker() {
    let fx = Fixture::new(|c| c.contacts.forward_max_days = 10).await;
    let x = fx.register().await;
    let x = fx.login(&x).await;
    let too_big = vec![7; super::account::MAX_FORWARD_NOTICE + 1];
    for (notice, days) in [
        (&b"n"[..], 0),
        (&b"n"[..], 11),
        (&b""[..], 5),
        (&too_big[..], 5),
    ] {
        let body = refused(fx.call(&x, forward(notice, days)).await);
        assert_eq!(
            body.code,
            ErrorCode::BadArgs,
            "{} bytes, {days} days",
            notice.len()
        );
    }
    let answer = fx.call(&x, forward(b"notice", 10)).await.unwrap();
    assert_eq!(
        answer,
        ResponseData::Forward(ForwardData {
            expires: T0 + 10 * 86_400
        })
    );

    let fx = Fixture::new(|c| c.contacts.forward_max_days = 0).await;
    let y = fx.register().await;
    let y = fx.login(&y).await;
    let body = refused(fx.call(&y, forward(b"notice", 1)).await);
    assert_eq!(body.code, ErrorCode::BadArgs);
}

#[tokio::test]
async fn an_initiate_to_a_forwarded_number_gets_the_notice_unless_the_caller_is_blocked() {
    let mut fx = Fixture::new(|_| {}).await;
    let mover = fx.register().await;
    let caller = fx.register().await;
    let blocked = fx.register().await;
    let mover = fx.login(&mover).await;
    let mut caller = fx.login(&caller).await;
    let mut blocked = fx.login(&blocked).await;
    let old = mover.login.number.clone();
    let block = Authenticated::Block(TargetArgs {
        target: blocked.login.number.clone(),
    });
    fx.call(&mover, block).await.unwrap();
    fx.call(&mover, forward(b"signed notice", 2)).await.unwrap();
    let expires = T0 + 2 * 86_400;
    let expected = |ack: &ResponseData| {
        let ResponseData::InitiateNew(InitiateData { request }) = ack else {
            panic!("{ack:?}");
        };
        Event::Forwarded(Forwarded {
            request: *request,
            target: old.clone(),
            notice: Blob::from(b"signed notice".to_vec()),
            expires,
        })
    };

    // Still there, and after the old account is deleted: the same acknowledgement, then the
    // forward for the caller, and for the blocked caller what an unknown number gives.
    let unknown = number("5550000009");
    for deleted in [false, true] {
        if deleted {
            let confirm = AccountDeleteArgs {
                confirm: old.clone(),
            };
            fx.call(&mover, Authenticated::AccountDelete(confirm))
                .await
                .unwrap();
        }
        let ack = fx.initiate_new(&caller, &old).unwrap();
        fx.route_new(&caller, &old, &ack).await;
        assert_eq!(caller.events(), [expected(&ack)], "deleted: {deleted}");

        let ack_blocked = fx.initiate_new(&blocked, &old).unwrap();
        let ack_unknown = fx.initiate_new(&blocked, &unknown).unwrap();
        assert_eq!(
            std::mem::discriminant(&ack_blocked),
            std::mem::discriminant(&ack_unknown)
        );
        fx.route_new(&blocked, &old, &ack_blocked).await;
        fx.route_new(&blocked, &unknown, &ack_unknown).await;
        assert!(blocked.events().is_empty(), "deleted: {deleted}");
    }

    // Expired: silence for everyone.
    fx.advance(Duration::from_secs(2 * 86_400));
    let ack = fx.initiate_new(&caller, &old).unwrap();
    fx.route_new(&caller, &old, &ack).await;
    assert!(caller.events().is_empty());
}
