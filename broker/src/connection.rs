//! One client connection after the TLS handshake: the frame loop and the request handlers.
//!
//! The loop owns the socket, one read buffer and a bounded event queue; it answers each
//! request before reading the next (a client pipelines by sending several; answers come in
//! order). A malformed request gets a typed error frame and the connection goes on; a framing
//! violation gets an error frame and closes this connection only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use micromsg_crypto::nonce::{self, Direction, NonceContext, NoncePolicy};
use micromsg_crypto::{Secret32, kdf};
use micromsg_wire::message::event::{DeviceRevoked, InboxNotice, Shutdown};
use micromsg_wire::message::request::{
    AddDeviceArgs, BackupPutArgs, ContactAnswerArgs, ContactPolicyArgs, DepositArgs,
    DeviceJoinArgs, DeviceRevokeArgs, InboxAckArgs, InboxFetchArgs, InitiateNetworkedArgs,
    LoginArgs, RegisterArgs, SyncCopyArgs,
};
use micromsg_wire::message::response::{
    AddDeviceData, BackupGetData, BlockListData, DepositData, DeviceInfo, DeviceJoinData,
    DeviceListData, Home, InboxAckData, InboxFetchData, InboxMessage, InitiateData,
    IsNetworkedData, LoginData, NonceAlgorithm, PingData, RegisterData, SessionCounts,
    SyncCopyData,
};
use micromsg_wire::{
    Address, Blob, DeviceId, DeviceName, ErrorBody, ErrorCode, Event, Hex16, Hex32, Number,
    Request, Response, ResponseData, decode_request,
};
use rand_core::OsRng;
use subtle::ConstantTimeEq;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info, warn};

use crate::broker::{Broker, unix_now};
use crate::config::{InboxMode, RegistrationPolicy};
use crate::contacts::{
    Initiate, InitiateKind, Origin, hand_out, new_request_id, resolve_address, route_initiate,
};
use crate::federation::contact::{Acceptance, ForwardRefusal, SEALED_MAX, SEALED_MIN};
use crate::federation::outbox::PeerDeposit;
use crate::limits::TokenBucket;
use crate::online::Push;
use micromsg_store::{NewDevice, NewInboxItem, StoreError};
use micromsg_wire::io::{FrameReadError, FrameReader, write_frame};

type Stream = TlsStream<TcpStream>;

/// How stale a device's `last_seen` may get before a login writes it again.
const LAST_SEEN_GRANULARITY_SECS: i64 = 60;

/// Who is logged in on this connection.
#[derive(Debug, Clone)]
struct LoggedIn {
    number: String,
    device: u32,
}

/// Per-connection state.
#[derive(Debug)]
struct Conn {
    broker: Arc<Broker>,
    peer: SocketAddr,
    conn_id: u64,
    /// TLS exporter value binding login nonces to this connection.
    binding: [u8; 32],
    login: Option<LoggedIn>,
    queue: mpsc::Sender<Push>,
    requests: TokenBucket,
    close_after_reply: bool,
}

/// Why a request failed: the code and message sent to the client.
#[derive(Debug)]
struct Refusal(ErrorBody);

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorBody::new(code, message))
    }

    fn retry(code: ErrorCode, message: impl Into<String>, after: Duration) -> Self {
        let secs = u32::try_from(after.as_secs().max(1)).unwrap_or(u32::MAX);
        Self(ErrorBody::new(code, message).retry_after(secs))
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        // The database error stays in the log; the peer learns only that it failed.
        warn!(error = %e, "store error while handling a request");
        Refusal::new(ErrorCode::Internal, "internal error; try again")
    }
}

type Handled = Result<ResponseData, Refusal>;

/// Runs the connection until the client leaves, misbehaves, idles out or the broker stops.
pub(crate) async fn run(
    broker: Arc<Broker>,
    tls: Stream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut binding = [0u8; 32];
    if let Err(e) =
        tls.get_ref()
            .1
            .export_keying_material(&mut binding, nonce::TLS_EXPORTER_LABEL, None)
    {
        warn!(error = %e, "TLS exporter unavailable; closing");
        return;
    }
    let limits = broker.config.limits.clone();
    let (read, mut write): (ReadHalf<Stream>, WriteHalf<Stream>) = tokio::io::split(tls);
    // Most connections are idle most of the time: keep a small read buffer between frames.
    let mut reader = FrameReader::new(read, limits.max_frame_len).idle_capacity(256);
    let (queue, mut events) = mpsc::channel(limits.event_queue.max(1));
    let conn_id = broker.online.next_conn_id();
    let mut conn = Conn {
        requests: TokenBucket::new(
            limits.requests_per_sec,
            limits.requests_burst,
            Instant::now(),
        ),
        broker: Arc::clone(&broker),
        peer,
        conn_id,
        binding,
        login: None,
        queue,
        close_after_reply: false,
    };
    let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
    let write_timeout = idle;
    debug!(conn = conn_id, "connection open");

    loop {
        tokio::select! {
            biased;
            () = crate::server::stopped(&mut shutdown) => {
                let event = Event::Shutdown(Shutdown { reconnect_after: 5 });
                let _ = send(&mut write, &broker, &event.encode(), write_timeout).await;
                break;
            }
            push = events.recv() => {
                let Some(push) = push else { break };
                let (event, close) = match push {
                    Push::Event(e) => (*e, false),
                    Push::Close(e) => (*e, true),
                };
                if send(&mut write, &broker, &event.encode(), write_timeout).await.is_err() || close {
                    break;
                }
            }
            frame = tokio::time::timeout(idle, reader.next_frame()) => {
                let body = match frame {
                    Err(_) => {
                        debug!(conn = conn_id, "idle timeout");
                        break;
                    }
                    Ok(Ok(Some(body))) => body,
                    Ok(Ok(None)) => break,
                    Ok(Err(FrameReadError::BadLength { len, max })) => {
                        let reply = Response::error(0, None, ErrorBody::new(
                            if len == 0 { ErrorCode::BadFrame } else { ErrorCode::FrameTooLarge },
                            format!("frame length {len} outside 1..={max}; closing"),
                        ));
                        let _ = send(&mut write, &broker, &reply.encode(), write_timeout).await;
                        break;
                    }
                    Ok(Err(e)) => {
                        debug!(conn = conn_id, error = %e, "read failed");
                        break;
                    }
                };
                let reply = conn.handle_frame(&body).await;
                if send(&mut write, &broker, &reply.encode(), write_timeout).await.is_err() {
                    break;
                }
                if conn.close_after_reply {
                    break;
                }
            }
        }
    }

    if let Some(login) = &conn.login {
        broker.online.remove(&login.number, conn_id);
    }
    debug!(conn = conn_id, "connection closed");
}

async fn send(
    write: &mut WriteHalf<Stream>,
    _broker: &Broker,
    body: &[u8],
    timeout: Duration,
) -> Result<(), ()> {
    match tokio::time::timeout(timeout, write_frame(write, body)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

impl Conn {
    async fn handle_frame(&mut self, body: &[u8]) -> Response {
        let (id, request) = match decode_request(body, &self.broker.wire_limits) {
            Ok(decoded) => decoded,
            Err(bad) => {
                debug!(
                    conn = self.conn_id,
                    kind = bad.error.kind(),
                    "malformed request"
                );
                if bad.closes_connection() {
                    self.close_after_reply = true;
                }
                return bad.to_response();
            }
        };
        let kind = request.kind();
        if let Err(wait) = self.requests.take(Instant::now()) {
            return Response::error(
                id,
                Some(kind),
                Refusal::retry(ErrorCode::RateLimited, "too many requests", wait).0,
            );
        }
        let result = if kind.requires_login() && self.login.is_none() {
            Err(Refusal::new(
                ErrorCode::NotLoggedIn,
                format!(
                    "{} needs a logged-in connection; send LOGIN first",
                    kind.as_str()
                ),
            ))
        } else {
            if let Some(login) = &self.login {
                self.broker
                    .online
                    .touch(&login.number, self.conn_id, Instant::now());
            }
            self.dispatch(request).await
        };
        match result {
            Ok(data) => Response::ok(id, data),
            Err(Refusal(error)) => Response::error(id, Some(kind), error),
        }
    }

    async fn dispatch(&mut self, request: Request) -> Handled {
        match request {
            Request::BrokerInfo => Ok(ResponseData::BrokerInfo(self.broker.info(unix_now()))),
            Request::Ping => Ok(ResponseData::Ping(PingData { time: unix_now() })),
            Request::Register(args) => self.register(args).await,
            Request::DeviceJoin(args) => self.device_join(args).await,
            Request::Login(args) => self.login(args).await,
            Request::Logout => {
                self.close_after_reply = true;
                Ok(ResponseData::Logout)
            }
            Request::AddDevice(args) => self.add_device(args).await,
            Request::DeviceList => self.device_list().await,
            Request::DeviceRevoke(args) => self.device_revoke(args).await,
            Request::IsNetworked(args) => self.is_networked(&args.target),
            Request::InitiateNew(args) => {
                if let Some(address) = &args.address {
                    self.announce(address);
                }
                self.initiate(args.target, InitiateKind::New)
            }
            Request::InitiateExisting(args) => self.initiate(args.target, InitiateKind::Existing),
            Request::InitiateNewNetworked(args) => self.initiate_networked(args, InitiateKind::New),
            Request::InitiateExistingNetworked(args) => {
                self.initiate_networked(args, InitiateKind::Existing)
            }
            Request::ContactAnswer(args) => self.contact_answer(args).await,
            Request::ContactPolicy(args) => self.contact_policy(args).await,
            Request::Block(args) => {
                let login = self.logged_in()?.clone();
                self.broker
                    .store
                    .block(&login.number, args.target.as_str(), unix_now() as i64)
                    .await?;
                Ok(ResponseData::Block)
            }
            Request::Unblock(args) => {
                let login = self.logged_in()?.clone();
                self.broker
                    .store
                    .unblock(&login.number, args.target.as_str())
                    .await?;
                Ok(ResponseData::Unblock)
            }
            Request::Deposit(args) => self.deposit(args).await,
            Request::SyncCopy(args) => self.sync_copy(args).await,
            Request::InboxFetch(args) => self.inbox_fetch(args).await,
            Request::InboxAck(args) => self.inbox_ack(args).await,
            Request::BackupPut(args) => self.backup_put(args).await,
            Request::BackupGet => self.backup_get().await,
            Request::BlockList => {
                let login = self.logged_in()?.clone();
                let numbers = self
                    .broker
                    .store
                    .blocked_by(&login.number)
                    .await?
                    .into_iter()
                    .filter_map(|n| Number::new(n).ok())
                    .collect();
                Ok(ResponseData::BlockList(BlockListData { numbers }))
            }
        }
    }

    fn logged_in(&self) -> Result<&LoggedIn, Refusal> {
        self.login
            .as_ref()
            .ok_or_else(|| Refusal::new(ErrorCode::NotLoggedIn, "send LOGIN first"))
    }

    fn check_registration_rate(&self) -> Result<(), Refusal> {
        self.broker
            .registrations
            .hit(&self.peer.ip(), Instant::now())
            .map_err(|wait| {
                Refusal::retry(
                    ErrorCode::RateLimited,
                    "too many registrations from this address",
                    wait,
                )
            })
    }

    async fn register(&mut self, args: RegisterArgs) -> Handled {
        let config = &self.broker.config;
        match config.registration.policy {
            RegistrationPolicy::Closed => {
                return Err(Refusal::new(
                    ErrorCode::RegistrationClosed,
                    "this broker does not accept registrations",
                ));
            }
            RegistrationPolicy::Token => {
                let offered = args.token.as_deref().unwrap_or("").as_bytes();
                let mut ok = subtle::Choice::from(0);
                for token in &config.registration.tokens {
                    ok |= token.as_bytes().ct_eq(offered);
                }
                if !bool::from(ok) {
                    return Err(Refusal::new(
                        ErrorCode::BadToken,
                        "a valid registration TOKEN is required",
                    ));
                }
            }
            RegistrationPolicy::Open => {}
        }
        self.check_registration_rate()?;
        let client_secret = Secret32::generate(&mut OsRng);
        let device = NewDevice {
            client_secret: *client_secret.expose(),
            server_secret: *args.server_secret.as_bytes(),
            name: None,
        };
        let now = unix_now() as i64;
        // A collision is unlikely (random numbers in a large space); a few draws make it
        // vanishingly so, and the unique key keeps it correct either way.
        for _ in 0..16 {
            let number = self.broker.numbers.draw(&mut OsRng);
            match self.broker.store.create_entity(&number, &device, now).await {
                Ok(device_id) => {
                    info!(conn = self.conn_id, "entity registered");
                    return Ok(ResponseData::Register(RegisterData {
                        entity: wire_number(&number)?,
                        device: wire_device(device_id)?,
                        client_secret: Hex32::from_bytes(*client_secret.expose()),
                        nonce_step: config.auth.nonce_step_secs,
                        nonce_algorithm: NonceAlgorithm::MmNonce1,
                    }));
                }
                Err(StoreError::NumberTaken) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        warn!("number space crowded: 16 random draws collided");
        Err(Refusal::new(
            ErrorCode::Internal,
            "could not allocate a number; try again",
        ))
    }

    async fn device_join(&mut self, args: DeviceJoinArgs) -> Handled {
        self.check_registration_rate()?;
        let hash = kdf::sha256(&[args.secret.as_bytes()]);
        let client_secret = Secret32::generate(&mut OsRng);
        let device = NewDevice {
            client_secret: *client_secret.expose(),
            server_secret: *args.server_secret.as_bytes(),
            name: None,
        };
        let number = args.entity.as_str();
        let result = self
            .broker
            .store
            .redeem_registration_secret(
                number,
                &hash,
                &device,
                unix_now() as i64,
                self.broker.config.limits.max_devices,
            )
            .await;
        match result {
            Ok(device_id) => {
                info!(conn = self.conn_id, device = device_id, "device joined");
                Ok(ResponseData::DeviceJoin(DeviceJoinData {
                    device: wire_device(device_id)?,
                    client_secret: Hex32::from_bytes(*client_secret.expose()),
                    nonce_step: self.broker.config.auth.nonce_step_secs,
                    nonce_algorithm: NonceAlgorithm::MmNonce1,
                }))
            }
            Err(StoreError::BadSecret) => Err(Refusal::new(
                ErrorCode::BadSecret,
                "registration secret unknown, expired or already used",
            )),
            Err(StoreError::DeviceLimit) => Err(Refusal::new(
                ErrorCode::DeviceLimit,
                "the entity has reached its device limit",
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn login(&mut self, args: LoginArgs) -> Handled {
        if self.login.is_some() {
            return Err(Refusal::new(
                ErrorCode::AlreadyLoggedIn,
                "this connection is already logged in",
            ));
        }
        let number = args.entity.as_str().to_owned();
        let device_id = args.device.get();
        let now_instant = Instant::now();
        if let Err(wait) = self.broker.login_failures.check(&number, now_instant) {
            return Err(Refusal::retry(
                ErrorCode::Locked,
                "too many failed logins; the entity is locked for a while",
                wait,
            ));
        }
        let record = self.broker.store.device(&number, device_id).await?;
        let auth = &self.broker.config.auth;
        let policy = NoncePolicy {
            step_secs: u64::from(auth.nonce_step_secs),
            skew_steps: u64::from(auth.nonce_skew_steps),
        };
        let ctx = NonceContext {
            entity: &number,
            device: device_id,
            binding: &self.binding,
        };
        let now = unix_now();
        // Unknown and revoked devices run the same verification against a throwaway secret,
        // so the answer and its timing do not tell which numbers and devices exist.
        let (client_secret, server_secret, usable) = match &record {
            Some(r) if !r.is_revoked() => (
                Secret32::from_bytes(r.client_secret),
                Secret32::from_bytes(r.server_secret),
                true,
            ),
            _ => (
                Secret32::generate(&mut OsRng),
                Secret32::generate(&mut OsRng),
                false,
            ),
        };
        let verified = nonce::verify(
            &client_secret,
            Direction::ClientToBroker,
            &ctx,
            &policy,
            now,
            args.secret.as_bytes(),
        );
        let step = match verified {
            Ok(step)
                if usable
                    && self
                        .broker
                        .replay
                        .first_use(*args.secret.as_bytes(), now_instant) =>
            {
                step
            }
            _ => {
                if self.broker.login_failures.fail(&number, now_instant) {
                    warn!(
                        conn = self.conn_id,
                        "entity locked after repeated login failures"
                    );
                }
                debug!(conn = self.conn_id, "login refused");
                return Err(Refusal::new(
                    ErrorCode::AuthFailed,
                    "login failed: unknown entity or device, or the nonce did not verify",
                ));
            }
        };
        let proof = nonce::compute(&server_secret, Direction::BrokerToClient, &ctx, step)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "internal error"))?;
        self.broker.login_failures.succeed(&number);
        // `last_seen` is for people (DEVICE-LIST), so minute precision will do: a device that
        // logs in again and again (one-shot commands, reconnects) costs no write each time.
        let last_seen = record.as_ref().and_then(|r| r.last_seen).unwrap_or(0);
        if (now as i64).saturating_sub(last_seen) >= LAST_SEEN_GRANULARITY_SECS {
            self.broker
                .store
                .touch_device(&number, device_id, now as i64)
                .await?;
        }
        let inbox = self
            .broker
            .store
            .inbox_count(&number, device_id, now as i64)
            .await
            .unwrap_or(0);
        self.broker.online.insert(
            &number,
            device_id,
            self.conn_id,
            self.queue.clone(),
            now_instant,
        );
        info!(conn = self.conn_id, device = device_id, "logged in");
        self.login = Some(LoggedIn {
            number,
            device: device_id,
        });
        Ok(ResponseData::Login(LoginData {
            proof: Hex32::from_bytes(proof),
            step,
            session: SessionCounts {
                inbox: u32::try_from(inbox).unwrap_or(u32::MAX),
            },
        }))
    }

    async fn add_device(&mut self, args: AddDeviceArgs) -> Handled {
        let login = self.logged_in()?.clone();
        let secret = Secret32::generate(&mut OsRng);
        let hash = kdf::sha256(&[secret.expose()]);
        let now = unix_now();
        let expires = now + self.broker.config.limits.device_secret_ttl_secs;
        let name = args.name.as_ref().map(DeviceName::as_str);
        match self
            .broker
            .store
            .create_registration_secret(
                &login.number,
                &hash,
                name,
                now as i64,
                expires as i64,
                self.broker.config.limits.max_devices,
            )
            .await
        {
            Ok(()) => Ok(ResponseData::AddDevice(AddDeviceData {
                secret: Hex32::from_bytes(*secret.expose()),
                expires,
            })),
            Err(StoreError::DeviceLimit) => Err(Refusal::new(
                ErrorCode::DeviceLimit,
                "the entity has reached its device limit (pending registrations count)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn device_list(&mut self) -> Handled {
        let login = self.logged_in()?.clone();
        let devices = self.broker.store.list_devices(&login.number).await?;
        let devices = devices
            .into_iter()
            .filter(|d| d.revoked_at.is_none())
            .map(|d| {
                Ok(DeviceInfo {
                    id: wire_device(d.device_id)?,
                    name: d.name.and_then(|n| DeviceName::new(n).ok()),
                    created: d.created_at.max(0) as u64,
                    last_seen: d.last_seen.map(|t| t.max(0) as u64),
                    current: d.device_id == login.device,
                })
            })
            .collect::<Result<Vec<_>, Refusal>>()?;
        Ok(ResponseData::DeviceList(DeviceListData { devices }))
    }

    async fn device_revoke(&mut self, args: DeviceRevokeArgs) -> Handled {
        let login = self.logged_in()?.clone();
        let target = args.device.get();
        if target == login.device {
            return Err(Refusal::new(
                ErrorCode::BadArgs,
                "a device cannot revoke itself; revoke it from another device",
            ));
        }
        let revoked = self
            .broker
            .store
            .revoke_device(&login.number, target, unix_now() as i64)
            .await?;
        if !revoked {
            return Err(Refusal::new(ErrorCode::NotFound, "no such active device"));
        }
        let event_device = args.device;
        self.broker
            .online
            .push_all(&login.number, Some(target), || {
                Push::close(Event::DeviceRevoked(DeviceRevoked {
                    device: event_device,
                }))
            });
        info!(conn = self.conn_id, device = target, "device revoked");
        Ok(ResponseData::DeviceRevoke)
    }
}

impl Conn {
    fn announce(&self, address: &Address) {
        if let Some(login) = &self.login {
            let resolved = resolve_address(address, self.peer.ip());
            self.broker
                .online
                .set_address(&login.number, self.conn_id, resolved);
        }
    }

    fn is_networked(&self, target: &Number) -> Handled {
        // From configuration only, never a lookup (protocol.md 6.10).
        let data = match self.broker.federation.as_ref() {
            // A standalone broker: its own prefixes are OWN, everything else NONE.
            None => {
                let own = self.broker.numbers.owns(target.as_str());
                IsNetworkedData {
                    networked: false,
                    home: if own { Home::Own } else { Home::None },
                    broker: own.then(|| self.broker.config.server.broker_id.clone()),
                }
            }
            Some(f) => match f.home_of(target.as_str()) {
                crate::federation::Home::Own => IsNetworkedData {
                    networked: false,
                    home: Home::Own,
                    broker: Some(f.me.id.clone()),
                },
                crate::federation::Home::Peer(peer) => IsNetworkedData {
                    networked: true,
                    home: Home::Peer,
                    broker: Some(peer.id.clone()),
                },
                crate::federation::Home::None => IsNetworkedData {
                    networked: false,
                    home: Home::None,
                    broker: None,
                },
            },
        };
        Ok(ResponseData::IsNetworked(data))
    }

    /// INITIATE-*-NETWORKED: NOT-NETWORKED and PEER-UNAVAILABLE come from configuration and
    /// local link state; otherwise the ack goes out and the request is forwarded in the
    /// background (silent from then on, as INITIATE-NEW).
    fn initiate_networked(&mut self, args: InitiateNetworkedArgs, kind: InitiateKind) -> Handled {
        let login = self.logged_in()?.clone();
        if let Err(wait) = self.broker.initiates.hit(&login.number, Instant::now()) {
            return Err(Refusal::retry(
                ErrorCode::RateLimited,
                "too many contact requests; slow down",
                wait,
            ));
        }
        let request = crate::federation::contact::forward_initiate(
            &self.broker,
            &login.number,
            self.conn_id,
            args.target.as_str(),
            kind,
            *args.pubkey.as_bytes(),
        )
        .map_err(|refusal| match refusal {
            ForwardRefusal::NotNetworked => Refusal::new(
                ErrorCode::NotNetworked,
                "number is not in a peer broker's share",
            ),
            ForwardRefusal::PeerUnavailable(secs) => Refusal::retry(
                ErrorCode::PeerUnavailable,
                "the broker serving this number cannot be reached now",
                Duration::from_secs(secs),
            ),
        })?;
        let data = InitiateData {
            request: Hex16::from_bytes(request),
        };
        Ok(match kind {
            InitiateKind::New => ResponseData::InitiateNewNetworked(data),
            InitiateKind::Existing => ResponseData::InitiateExistingNetworked(data),
        })
    }

    fn initiate(&mut self, target: Number, kind: InitiateKind) -> Handled {
        let login = self.logged_in()?.clone();
        if let Err(wait) = self.broker.initiates.hit(&login.number, Instant::now()) {
            return Err(Refusal::retry(
                ErrorCode::RateLimited,
                "too many contact requests; slow down",
                wait,
            ));
        }
        let request = new_request_id();
        // The ack is decided here, before anything about the target is looked up; the lookup
        // runs as its own task so its cost cannot show in the ack's timing.
        tokio::spawn(route_initiate(
            Arc::clone(&self.broker),
            Initiate {
                request,
                caller: login.number,
                origin: Origin::Local {
                    caller_conn: self.conn_id,
                },
                target: target.as_str().to_owned(),
                kind,
            },
        ));
        let data = InitiateData {
            request: Hex16::from_bytes(request),
        };
        Ok(match kind {
            InitiateKind::New => ResponseData::InitiateNew(data),
            InitiateKind::Existing => ResponseData::InitiateExisting(data),
        })
    }

    async fn contact_answer(&mut self, args: ContactAnswerArgs) -> Handled {
        let login = self.logged_in()?.clone();
        let request = *args.request.as_bytes();
        let not_found = || {
            Refusal::new(
                ErrorCode::NotFound,
                "no such contact request (unknown, expired or already answered)",
            )
        };
        // Check the answer against the request before consuming it: an error has no effects.
        let peeked = self
            .broker
            .contacts
            .peek(&request, &login.number, Instant::now())
            .ok_or_else(not_found)?;
        let networked = matches!(peeked.origin, Origin::Networked(_));
        if args.accept {
            if networked {
                if args.address.is_some() {
                    return Err(Refusal::new(
                        ErrorCode::BadArgs,
                        "a networked request is accepted with PUBKEY and SEALED-ADDRESS, never \
                         ADDRESS (the plain address must not reach the caller's broker)",
                    ));
                }
                let Some(sealed) = &args.sealed_address else {
                    return Err(Refusal::new(
                        ErrorCode::BadArgs,
                        "ACCEPT: true for a networked request needs SEALED-ADDRESS and PUBKEY",
                    ));
                };
                if args.pubkey.is_none() {
                    return Err(Refusal::new(
                        ErrorCode::BadArgs,
                        "ACCEPT: true for a networked request needs PUBKEY",
                    ));
                }
                if !(SEALED_MIN..=SEALED_MAX).contains(&sealed.len()) {
                    return Err(Refusal::new(
                        ErrorCode::BadArgs,
                        format!(
                            "SEALED-ADDRESS must decode to {SEALED_MIN}..={SEALED_MAX} bytes \
                             (nonce, sealed Address, tag)"
                        ),
                    ));
                }
            } else {
                if args.pubkey.is_some() || args.sealed_address.is_some() {
                    return Err(Refusal::new(
                        ErrorCode::BadArgs,
                        "a request from this broker is accepted with ADDRESS only",
                    ));
                }
                if args.address.is_none() {
                    return Err(Refusal::new(
                        ErrorCode::BadArgs,
                        "ACCEPT: true on this broker needs ADDRESS",
                    ));
                }
            }
        } else if args.address.is_some() || args.pubkey.is_some() || args.sealed_address.is_some() {
            return Err(Refusal::new(
                ErrorCode::BadArgs,
                "a declining answer carries no ADDRESS, PUBKEY or SEALED-ADDRESS",
            ));
        }
        let Some(pending) = self
            .broker
            .contacts
            .take(&request, &login.number, Instant::now())
        else {
            // Another device of the entity answered in the meantime.
            return Err(not_found());
        };
        let now = unix_now() as i64;
        if !args.accept {
            // The seed: a rejection puts the caller on the target's blacklist.
            self.broker
                .store
                .block(&login.number, &pending.caller, now)
                .await?;
            return Ok(ResponseData::ContactAnswer);
        }
        match &pending.origin {
            Origin::Networked(origin) => {
                let (Some(pubkey), Some(sealed)) = (args.pubkey, args.sealed_address) else {
                    return Err(Refusal::new(ErrorCode::Internal, "internal error"));
                };
                let span = tracing::info_span!(parent: &origin.span, "contact.answer.networked");
                crate::federation::contact::accept_networked(
                    &self.broker,
                    origin,
                    Acceptance {
                        local_request: request,
                        caller: pending.caller.clone(),
                        target: login.number.clone(),
                        target_conn: self.conn_id,
                        target_pubkey: *pubkey.as_bytes(),
                        sealed_address: sealed.into_vec(),
                    },
                )
                .instrument(span)
                .await?;
            }
            Origin::Local { caller_conn } => {
                let Some(address) = &args.address else {
                    return Err(Refusal::new(ErrorCode::Internal, "internal error"));
                };
                self.announce(address);
                let address = resolve_address(address, self.peer.ip());
                self.broker
                    .store
                    .add_contact(&login.number, &pending.caller, now)
                    .await?;
                self.broker
                    .store
                    .add_contact(&pending.caller, &login.number, now)
                    .await?;
                hand_out(
                    &self.broker,
                    &request,
                    &pending.caller,
                    *caller_conn,
                    &login.number,
                    self.conn_id,
                    &address,
                );
            }
        }
        Ok(ResponseData::ContactAnswer)
    }

    async fn contact_policy(&mut self, args: ContactPolicyArgs) -> Handled {
        let login = self.logged_in()?.clone();
        self.broker
            .store
            .set_auto_existing(&login.number, args.auto_existing)
            .await?;
        if let Some(address) = &args.address {
            self.announce(address);
        }
        Ok(ResponseData::ContactPolicy)
    }
}

/// Room left in a response frame for YAML around the inbox messages.
const FETCH_FRAME_SLACK: usize = 2048;
/// Messages per INBOX-FETCH answer at most (the YAML event budget fits about 290).
const FETCH_MAX_MESSAGES: usize = 250;

impl Conn {
    /// The devices a message to `number` is stored for: every active device in entity mode,
    /// one shared inbox (`None`) in number mode.
    async fn recipients(
        &self,
        number: &str,
        except: Option<u32>,
    ) -> Result<Vec<Option<u32>>, Refusal> {
        Ok(match self.broker.config.inbox.mode {
            InboxMode::Number => vec![None],
            InboxMode::Entity => self
                .broker
                .store
                .list_devices(number)
                .await?
                .into_iter()
                .filter(|d| d.revoked_at.is_none() && Some(d.device_id) != except)
                .map(|d| Some(d.device_id))
                .collect(),
        })
    }

    /// Stores one message for each recipient device through the group commit; answers only
    /// once every copy is committed.
    async fn store_copies(
        &self,
        login: &LoggedIn,
        recipient: &str,
        devices: Vec<Option<u32>>,
        id: [u8; 16],
        body: Vec<u8>,
        now: u64,
    ) -> Result<u64, Refusal> {
        let expires = now + self.broker.config.inbox.ttl_secs;
        let mut pending = Vec::with_capacity(devices.len());
        for device in devices {
            let item = NewInboxItem {
                id,
                recipient_number: recipient.to_owned(),
                recipient_device: device,
                sender_number: login.number.clone(),
                sender_device: login.device,
                created_at: now as i64,
                expires_at: expires as i64,
                body: body.clone(),
            };
            let batcher = self.broker.deposits.clone();
            pending.push(tokio::spawn(async move { batcher.deposit(item).await }));
        }
        let mut quota = false;
        for task in pending {
            match task.await {
                Ok(Ok(_stored_or_already)) => {}
                Ok(Err(StoreError::QuotaExceeded)) => quota = true,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(Refusal::new(ErrorCode::Internal, "internal error")),
            }
        }
        if quota {
            return Err(Refusal::new(
                ErrorCode::QuotaExceeded,
                "the recipient's inbox is full; nothing already stored was touched, try later",
            ));
        }
        // One new message (protocol 7.5: COUNT is an increment).
        self.broker.online.push_all(recipient, None, || {
            Push::event(Event::Inbox(InboxNotice { count: 1 }))
        });
        Ok(expires)
    }

    /// Refuses a ciphertext or backup larger than the broker holds (`inbox.max_message_bytes`).
    fn check_size(&self, field: &str, len: usize) -> Result<(), Refusal> {
        let max = self.broker.config.inbox.max_message_bytes as usize;
        if len > max {
            return Err(Refusal::new(
                ErrorCode::BadArgs,
                format!("{field} is {len} bytes; this broker holds at most {max}"),
            ));
        }
        Ok(())
    }

    async fn deposit(&mut self, args: DepositArgs) -> Handled {
        let login = self.logged_in()?.clone();
        self.check_size("BODY", args.body.len())?;
        let target = args.target.as_str();
        let route = self.broker.routes.route(&login.number, target).await?;
        if !route.contact {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                "no contact pair with TARGET; set one up with INITIATE-NEW first",
            ));
        }
        let now = unix_now();
        if let Some(f) = self.broker.federation.as_ref()
            && let crate::federation::Home::Peer(peer) = f.home_of(target)
        {
            // The target's home broker applies its block list; here the message goes into the
            // durable outbox, and the ack means "durably accepted by the home broker".
            let expires = now + self.broker.config.inbox.ttl_secs;
            crate::federation::outbox::enqueue_deposit(
                &self.broker,
                PeerDeposit {
                    sender: login.number.clone(),
                    sender_device: login.device,
                    recipient: target.to_owned(),
                    peer: peer.id.clone(),
                    message_id: *args.id.as_bytes(),
                    created_at: now,
                    expires_at: expires,
                    body: args.body.into_vec(),
                },
            )
            .await?;
            return Ok(ResponseData::Deposit(DepositData {
                id: args.id,
                expires,
            }));
        }
        if route.blocked {
            // Acknowledged and discarded: the blocked sender cannot tell.
            return Ok(ResponseData::Deposit(DepositData {
                id: args.id,
                expires: now + self.broker.config.inbox.ttl_secs,
            }));
        }
        let devices = match self.broker.config.inbox.mode {
            InboxMode::Number => vec![None],
            InboxMode::Entity => route.devices.into_iter().map(Some).collect(),
        };
        let expires = self
            .store_copies(
                &login,
                target,
                devices,
                *args.id.as_bytes(),
                args.body.into_vec(),
                now,
            )
            .await?;
        Ok(ResponseData::Deposit(DepositData {
            id: args.id,
            expires,
        }))
    }

    async fn sync_copy(&mut self, args: SyncCopyArgs) -> Handled {
        let login = self.logged_in()?.clone();
        self.check_size("BODY", args.body.len())?;
        let devices = self.recipients(&login.number, Some(login.device)).await?;
        if !devices.is_empty() {
            self.store_copies(
                &login,
                &login.number.clone(),
                devices,
                *args.id.as_bytes(),
                args.body.into_vec(),
                unix_now(),
            )
            .await?;
        }
        Ok(ResponseData::SyncCopy(SyncCopyData { id: args.id }))
    }

    async fn inbox_fetch(&mut self, args: InboxFetchArgs) -> Handled {
        let login = self.logged_in()?.clone();
        let limit = args.limit_or_default().min(FETCH_MAX_MESSAGES as u32);
        let after = args.after.map(|a| *a.as_bytes());
        let (items, mut more) = self
            .broker
            .store
            .fetch_inbox(&login.number, login.device, after, limit, unix_now() as i64)
            .await?;
        let budget =
            (self.broker.config.limits.max_frame_len as usize).saturating_sub(FETCH_FRAME_SLACK);
        let mut used = 0;
        let mut messages = Vec::with_capacity(items.len());
        for item in items {
            // base64 grows 4/3; the per-message YAML keys take about 200 bytes.
            let size = item.body.len().div_ceil(3) * 4 + 200;
            if used + size > budget && !messages.is_empty() {
                more = true;
                break;
            }
            used += size;
            let (Ok(from), Ok(from_device)) = (
                Number::new(item.sender_number.clone()),
                DeviceId::new(item.sender_device),
            ) else {
                continue;
            };
            messages.push(InboxMessage {
                id: Hex16::from_bytes(item.id),
                from,
                from_device,
                time: item.created_at.max(0) as u64,
                expires: item.expires_at.max(0) as u64,
                body: Blob::new(item.body),
            });
        }
        Ok(ResponseData::InboxFetch(InboxFetchData { messages, more }))
    }

    async fn inbox_ack(&mut self, args: InboxAckArgs) -> Handled {
        let login = self.logged_in()?.clone();
        let ids: Vec<[u8; 16]> = args.ids.iter().map(|i| *i.as_bytes()).collect();
        let removed = self
            .broker
            .store
            .ack_inbox(&login.number, login.device, &ids, unix_now() as i64)
            .await?;
        Ok(ResponseData::InboxAck(InboxAckData { removed }))
    }

    async fn backup_put(&mut self, args: BackupPutArgs) -> Handled {
        let login = self.logged_in()?.clone();
        self.check_size("BLOB", args.blob.len())?;
        let version = i64::try_from(args.version)
            .map_err(|_| Refusal::new(ErrorCode::BadArgs, "VERSION too large"))?;
        match self
            .broker
            .store
            .put_backup(
                &login.number,
                version - 1,
                version,
                args.blob.as_bytes(),
                unix_now() as i64,
            )
            .await
        {
            Ok(()) => Ok(ResponseData::BackupPut),
            Err(StoreError::Conflict | StoreError::InvalidArgument(_)) => Err(Refusal::new(
                ErrorCode::Conflict,
                "VERSION must be the stored version + 1 (another device updated the backup?)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn backup_get(&mut self) -> Handled {
        let login = self.logged_in()?.clone();
        let backup = self.broker.store.get_backup(&login.number).await?;
        Ok(ResponseData::BackupGet(match backup {
            Some(b) => BackupGetData {
                blob: Some(Blob::new(b.blob)),
                version: b.version.max(0) as u64,
            },
            None => BackupGetData {
                blob: None,
                version: 0,
            },
        }))
    }
}

fn wire_number(number: &str) -> Result<Number, Refusal> {
    Number::new(number).map_err(|_| Refusal::new(ErrorCode::Internal, "internal error"))
}

fn wire_device(id: u32) -> Result<DeviceId, Refusal> {
    DeviceId::new(id).map_err(|_| Refusal::new(ErrorCode::Internal, "internal error"))
}
