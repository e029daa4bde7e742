//! The agent: one device online. It keeps the broker link logged in, listens for peers, sets up
//! contacts, runs end-to-end sessions, and takes commands from the CLI over a local socket.
//!
//! ```text
//!  broker link (events, requests) ─┐
//!  peer listener (TCP accept)      ├─► one loop (select!) ─► notices (printed by the CLI)
//!  handshakes (spawned tasks)      │      owns: sessions, pending tokens, pending requests
//!  session events (per session)    │
//!  control socket (CLI commands)  ─┘
//! ```
//!
//! Everything that touches the link or the tables runs in the one loop, so there are no locks
//! except the token table, which the handshake tasks read.
//!
//! Offline and multi-device (protocol 12.11, 13): the agent fetches its inbox at start and on
//! every INBOX event ([`crate::inbox`]). `send` to a contact with no live session first asks
//! for one (INITIATE-EXISTING) and, when none is up within [`AgentConfig::offline_after`],
//! seals the message with this device's latest session with the contact (never one that is
//! live) and DEPOSITs it. Every message this device sends is also copied to the entity's
//! other devices (SYNC-COPY), every live message is also deposited for the contact's other
//! devices, and every new session's keys go to the entity's other devices (`MMK1`), so each
//! device can read the whole conversation.
//! `micromsg listen` runs an agent until stopped; a one-shot command with no agent running
//! starts a short-lived one, runs the command through it, and stops it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::identity::IdentityKey;
use micromsg_wire::message::request::ContactPolicyArgs;
use micromsg_wire::{Address, Event, Message, Request, ResponseData};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::account::{self, AccountError, unix_now};
use crate::error_text::error_text;
use crate::groups::EarlyMessages;
use crate::inbox::{Delivery, LiveTable};
use crate::link::{BrokerLink, LinkError};
use crate::outbox::{Outbox, Queued};
use crate::p2p::{Established, P2pError, PeerEvent, SessionSender};
use crate::profile::{Profile, ProfileInfo};
use crate::store::Store;

mod arrivals;
mod config;
mod contacts;
mod control;
mod group_chat;
mod limits;
mod member_sessions;
mod moves;
mod notice;
mod outbound;
mod queue;
mod reconnect;
mod relays;
mod reply;
mod sessions;

pub use config::{AcceptPolicy, AgentConfig};
pub use control::{
    Cancel, Command, ControlRequest, Subscription, cancel_queued, control_path, name_contact,
    remove_contact, send_to_running, send_to_running_cancellable, subscribe_to_running,
};
use control::{Waiter, cancelled_reply};
pub use notice::Notice;
use reply::refused;
pub use reply::{
    Answer, CommandError, Delivered, Detail, GroupReport, InboxBatch, InboxMessage, MemberDelivery,
    MoveReport, Output, Reply,
};

use control::{bind_control, serve_control};

/// How often a running agent forgets the kept session keys nothing can use any more.
const FORGET_KEYS_EVERY: Duration = Duration::from_secs(6 * 3600);

/// Events from all live sessions waiting for the agent's loop. Small, because each may hold
/// a message of up to a frame (1 MiB): when the loop is behind, each session's forwarder
/// waits, its session's own queue fills up to its byte budget
/// ([`crate::p2p::SessionConfig::event_queue_bytes`]) and it stops reading, so a contact
/// sending large messages faster than they are stored pushes back on its own connection
/// instead of growing this process's memory.
const SESSION_EVENTS: usize = 64;

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Logging in or the profile failed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The broker link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A socket could not be opened.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Another agent already serves this profile.
    #[error("an agent (`micromsg listen`) is already running for this profile ({0})")]
    AlreadyRunning(PathBuf),
    /// Something that logging in again cannot fix (the device revoked, the profile
    /// unreadable, a broker that is not the one the profile registered with).
    #[error("{0}")]
    Fatal(String),
}

/// A handle to a running agent.
#[derive(Debug)]
pub struct AgentHandle {
    commands: mpsc::Sender<ControlRequest>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

/// A cheap handle that sends commands to a running agent (for a UI that keeps several
/// commands in flight while it goes on drawing).
#[derive(Debug, Clone)]
pub struct Commander {
    commands: mpsc::Sender<ControlRequest>,
}

impl Commander {
    /// Runs a command in the agent and waits for its answer.
    pub async fn command(&self, command: Command) -> Answer {
        let (reply, answer) = oneshot::channel();
        let request = ControlRequest {
            command,
            reply: Waiter::new(reply, Cancel::default()),
        };
        if self.commands.send(request).await.is_err() {
            return Err(refused("the agent has stopped"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(refused("the agent stopped before answering")))
    }
}

impl AgentHandle {
    /// A handle for sending commands from other tasks.
    pub fn commander(&self) -> Commander {
        Commander {
            commands: self.commands.clone(),
        }
    }

    /// Runs a command in the agent and waits for its answer.
    pub async fn command(&self, command: Command) -> Answer {
        self.command_cancellable(command, Cancel::default()).await
    }

    /// [`Self::command`], cancelled when `cancel` is set: a message that has not left by then
    /// never leaves, and the reply says so (or that it had already gone).
    pub async fn command_cancellable(&self, command: Command, cancel: Cancel) -> Answer {
        let (reply, answer) = oneshot::channel();
        let request = ControlRequest {
            command,
            reply: Waiter::new(reply, cancel),
        };
        if self.commands.send(request).await.is_err() {
            return Err(refused("the agent has stopped"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(refused("the agent stopped before answering")))
    }

    /// Stops the agent: sessions get a DISCONNECT notice, then the link closes.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap_or(Ok(()))
    }

    /// Waits until the agent ends by itself (an error that reconnecting cannot fix).
    pub async fn wait(mut self) -> Result<(), AgentError> {
        let _keep = self.stop.take();
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Logs in, opens the listeners and starts the agent in the background. Notices go to
/// `notices`. With [`AgentConfig::wait_for_broker`], a broker that cannot be reached now is
/// not an error: the agent starts offline ([`Notice::BrokerLost`]) and logs in once it can.
pub async fn start(
    profile: Profile,
    config: AgentConfig,
    notices: mpsc::Sender<Notice>,
) -> Result<AgentHandle, AgentError> {
    let control = if config.control {
        let control = bind_control(&profile).await?;
        // Not under a move: its switch would change the account under this agent. Checked
        // after the control socket is bound, as a move takes its lock before looking for that
        // socket, so whichever starts second sees the other.
        if let Err(e) = profile.check_no_move() {
            // The file goes while the socket still listens: another agent starting meanwhile
            // finds it live (and stops) or finds no file (and binds its own, which this one
            // must not remove), never a dead file it would clear and bind over.
            let _ = std::fs::remove_file(control_path(&profile));
            drop(control);
            return Err(AccountError::from(e).into());
        }
        Some(control)
    } else {
        None
    };
    let connected = account::connect(&profile).await;
    let clock_offset = connected.as_ref().map_or(0, |session| session.clock_offset);
    let link = match connected {
        Ok(session) => Ok(session.link),
        Err(e) if config.wait_for_broker && reconnect::fatal_reason(&e).is_none() => Err(e),
        Err(e) => return Err(e.into()),
    };
    let info = profile.info().map_err(AccountError::from)?;
    let secrets = profile.secrets().map_err(AccountError::from)?;
    let identity = IdentityKey::from_seed(&secrets.identity_seed);
    let peers = TcpListener::bind(config.peer_listen)
        .await
        .map_err(|source| AgentError::Io {
            what: format!("listening for peers on {}", config.peer_listen),
            source,
        })?;
    let port = peers
        .local_addr()
        .map_err(|source| AgentError::Io {
            what: "reading the peer listener address".into(),
            source,
        })?
        .port();
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("0.0.0.0:{port}"));
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = oneshot::channel();
    let online = link.is_ok();
    let unreachable = link.as_ref().err().map(|e| error_text(e));
    let mut agent = Agent::new(
        profile,
        info,
        link.ok(),
        identity,
        config,
        advertise,
        notices,
    )?;
    if online {
        agent.read_broker_limits().await;
        // What an earlier run left queued goes first.
        agent.flush_outbox(None).await;
        if agent.config.announce {
            // Group frames waiting for a first session with a member: ask for it again.
            agent.ask_awaited_members().await;
            // Contacts whose broker-level pair a move undid (protocol 12.13).
            agent.ask_repairs().await;
        }
    }
    if agent.config.announce {
        if online {
            agent.announce().await?;
        }
        agent
            .notify(Notice::Listening {
                number: agent.info.number.clone(),
                device: agent.info.device,
                peer_address: agent.advertise.clone(),
            })
            .await;
    }
    if let Some(warning) = account::clock_warning(clock_offset, agent.info.nonce_step) {
        agent.warn(warning).await;
    }
    if let Some(reason) = unreachable {
        agent.start_offline(reason).await;
    }
    if let Some(listener) = control {
        tokio::spawn(serve_control(
            listener,
            commands_tx.clone(),
            agent.subscribers.clone(),
        ));
    }
    let task = tokio::spawn(agent.run(peers, commands_rx, stop_rx));
    Ok(AgentHandle {
        commands: commands_tx,
        stop: Some(stop_tx),
        task,
    })
}

/// A contact request or reconnect we started and are waiting on.
struct Outgoing {
    target: String,
    deadline: Instant,
    /// Who to tell once the session is up (or the wait fails).
    waiters: Vec<Waiter>,
    /// Messages to send once the session is up (unless their `send` was cancelled).
    queued: Vec<(String, Waiter)>,
    /// Deposit the queued messages at the broker if no session is up by the deadline.
    deposit_on_timeout: bool,
    /// Networked request: the broker-keypair secret that opens the target's sealed address
    /// (protocol 11.2); dropped, and so erased, once used or when the wait ends.
    broker_key: Option<EphemeralSecret>,
}

/// A contact request waiting for the user's answer (ask policy).
struct Asked {
    /// The caller.
    from: String,
    /// Networked request: the caller's broker-keypair public key to seal our address to.
    caller_key: Option<[u8; 32]>,
}

/// How long an incoming handshake waits for its connect token to be announced by the broker.
const TOKEN_GRACE: Duration = Duration::from_secs(2);

/// Connect tokens we were given as the target, by token id.
type TokenTable = Arc<Mutex<HashMap<[u8; 16], (Secret32, String, Instant)>>>;

/// Notices held for a control-socket subscriber that reads slowly; past it the oldest are
/// skipped (the subscriber is told how many).
const SUBSCRIBER_QUEUE: usize = 1024;

/// What a handshake task reports.
struct HandshakeDone {
    peer: Option<String>,
    request: Option<[u8; 16]>,
    result: Result<Established, P2pError>,
    /// How the connection reached the peer.
    path: crate::relay::Path,
}

/// What a session-forwarding task reports.
struct SessionEvent {
    peer: String,
    session_id: [u8; 16],
    event: PeerEvent,
}

struct Agent {
    profile: Profile,
    store: Store,
    info: ProfileInfo,
    identity: Arc<IdentityKey>,
    /// The logged-in broker link; `None` while it is down (see [`reconnect`]).
    link: Option<BrokerLink>,
    /// Delays between reconnect attempts.
    backoff: reconnect::Backoff,
    /// When to try the broker again while the link is down.
    reconnect_at: Instant,
    /// Since when the link is down.
    down_since: Option<Instant>,
    /// Set when something happened that ends the agent (a revoked device).
    fatal: Option<String>,
    /// A login attempt running while the link is down.
    attempt: Option<tokio::task::JoinHandle<Result<account::Session, AccountError>>>,
    /// The broker's limits on a message (BROKER-INFO, read at each login).
    broker_limits: limits::BrokerLimits,
    /// Whether `broker_limits` came from this run's BROKER-INFO (not the defaults).
    broker_limits_read: bool,
    /// Whether this run has checked `keys/` (`forget_old_keys`) with the broker's limits.
    keys_checked: bool,
    /// Messages waiting to be deposited, as in the outbox file.
    outbox: Vec<Queued>,
    /// The outbox file.
    outbox_file: Outbox,
    config: AgentConfig,
    advertise: String,
    notices: mpsc::Sender<Notice>,
    tokens: TokenTable,
    outgoing: HashMap<[u8; 16], Outgoing>,
    sessions: HashMap<String, (SessionSender, [u8; 16])>,
    /// Live sessions the peer has not confirmed yet (protocol.md 12.3), by session id: the
    /// peer, and the request whose queued messages go out once it does. Sending on such a
    /// session waits for the confirmation, so nothing waits for it on the agent's loop but
    /// what the user sends meanwhile.
    confirming: HashMap<[u8; 16], (String, Option<Outgoing>)>,
    /// How each live session reaches its peer, by peer.
    paths: HashMap<String, crate::relay::Path>,
    /// Relays offered with this device's contact requests (protocol.md 6.26).
    relays: relays::RelayTable,
    asked: HashMap<[u8; 16], Asked>,
    /// IS-NETWORKED answers by number. They change only when a number is ported to another
    /// broker (docs/federation.md 12): then the broker it left drops a local INITIATE for it
    /// without an answer, and a networked INITIATE for a number ported to this broker is
    /// refused (NOT-NETWORKED). So an INITIATE that is refused or gets no answer drops its
    /// target's entry here, and the next one asks again.
    networked: HashMap<String, bool>,
    handshakes_tx: mpsc::Sender<HandshakeDone>,
    handshakes_rx: mpsc::Receiver<HandshakeDone>,
    events_tx: mpsc::Sender<SessionEvent>,
    events_rx: mpsc::Receiver<SessionEvent>,
    /// Offline delivery state (ids taken, envelopes waiting for keys).
    delivery: Delivery,
    /// What live sessions received, so the inbox copy of a live message is not shown twice.
    live: LiveTable,
    /// An INBOX event came: fetch once the current step is done.
    inbox_due: bool,
    /// Group messages that came before the ops that make them acceptable.
    early: EarlyMessages,
    /// Every notice, for the control socket's subscribers.
    subscribers: tokio::sync::broadcast::Sender<Notice>,
}

impl Agent {
    fn new(
        profile: Profile,
        info: ProfileInfo,
        link: Option<BrokerLink>,
        identity: IdentityKey,
        config: AgentConfig,
        advertise: String,
        notices: mpsc::Sender<Notice>,
    ) -> Result<Self, AgentError> {
        let (handshakes_tx, handshakes_rx) = mpsc::channel(64);
        let (events_tx, events_rx) = mpsc::channel(SESSION_EVENTS);
        let store = Store::new(&profile);
        let delivery = Delivery::new(store.clone(), &info.number, info.device, identity.seed())
            .map_err(|e| AgentError::Io {
                what: "reading the inbox state".into(),
                source: std::io::Error::other(e),
            })?
            .leaving_link_transfers_while_awaiting(profile.clone());
        let outbox_file = Outbox::new(&profile);
        let outbox = outbox_file.load().map_err(|e| AgentError::Io {
            what: "reading the outbox".into(),
            source: std::io::Error::other(e),
        })?;
        let inbox_due = config.inbox;
        let early = EarlyMessages::new(
            config.early_group_messages,
            config.early_group_ttl.as_secs(),
        );
        Ok(Self {
            store,
            profile,
            info,
            identity: Arc::new(identity),
            link,
            backoff: reconnect::Backoff::new(config.reconnect_initial, config.reconnect_max),
            reconnect_at: Instant::now(),
            down_since: None,
            fatal: None,
            attempt: None,
            broker_limits: limits::BrokerLimits::default(),
            broker_limits_read: false,
            keys_checked: false,
            outbox,
            outbox_file,
            config,
            advertise,
            notices,
            tokens: Arc::new(Mutex::new(HashMap::new())),
            outgoing: HashMap::new(),
            sessions: HashMap::new(),
            confirming: HashMap::new(),
            paths: HashMap::new(),
            relays: relays::RelayTable::default(),
            asked: HashMap::new(),
            networked: HashMap::new(),
            handshakes_tx,
            handshakes_rx,
            events_tx,
            events_rx,
            delivery,
            live: LiveTable::new(),
            inbox_due,
            early,
            subscribers: tokio::sync::broadcast::channel(SUBSCRIBER_QUEUE).0,
        })
    }

    async fn notify(&self, notice: Notice) {
        // Subscribers on the control socket (`micromsg chat` attached to this agent); none is
        // fine.
        if self.subscribers.receiver_count() > 0 {
            let _ = self.subscribers.send(notice.clone());
        }
        let _ = self.notices.send(notice).await;
    }

    async fn warn(&self, message: impl Into<String>) {
        self.notify(Notice::Warning {
            message: message.into(),
        })
        .await;
    }

    fn address(&self) -> Result<Address, LinkError> {
        Address::new(self.advertise.clone())
            .map_err(|e| LinkError::Protocol(format!("advertised address {}: {e}", self.advertise)))
    }

    /// Tells the broker where this device listens, and whether contacts may reconnect
    /// without asking.
    async fn announce(&mut self) -> Result<(), LinkError> {
        let address = self.address()?;
        self.call(Request::ContactPolicy(ContactPolicyArgs {
            auto_existing: self.config.auto_existing,
            address: Some(address),
        }))
        .await?;
        Ok(())
    }

    async fn run(
        mut self,
        peers: TcpListener,
        mut control_rx: mpsc::Receiver<ControlRequest>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<(), AgentError> {
        let mut keepalive = tokio::time::interval(Duration::from_secs(30));
        keepalive.tick().await;
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut member_retry =
            tokio::time::interval(self.config.member_retry.max(Duration::from_secs(1)));
        member_retry.tick().await;
        // Its first tick is at once: at start, then every few hours.
        let mut forget_keys = tokio::time::interval(FORGET_KEYS_EVERY);
        self.resume_kept_frames().await;
        let result = loop {
            if let Some(reason) = self.fatal.take() {
                break Err(AgentError::Fatal(reason));
            }
            if self.inbox_due && self.link.is_some() {
                self.inbox_due = false;
                self.fetch_inbox().await;
            }
            // Events that came while a request waited for its answer (`next_message` below
            // only reads new frames).
            self.drain_queued_events().await;
            let offline = self.link.is_none();
            tokio::select! {
                _ = &mut stop => break Ok(()),
                message = next_message(&mut self.link) => match message {
                    Ok(Message::Event(event)) => self.on_broker_event(event).await,
                    Ok(other) => self.warn(format!("unexpected frame from the broker: {other:?}")).await,
                    Err(e) => self.link_lost(error_text(&e)).await,
                },
                () = tokio::time::sleep_until(self.reconnect_at.into()),
                    if offline && self.attempt.is_none() => self.start_attempt(),
                result = attempt_result(&mut self.attempt) => {
                    if let Err(e) = self.attempt_done(result).await {
                        break Err(e);
                    }
                }
                accepted = peers.accept() => match accepted {
                    Ok((stream, _addr)) => self.spawn_respond(stream),
                    Err(e) => self.warn(format!("accepting a peer failed: {e}")).await,
                },
                Some(done) = self.handshakes_rx.recv() => self.on_handshake(done).await,
                Some(event) = self.events_rx.recv() => self.on_session_event(event).await,
                Some(request) = control_rx.recv() => self.on_command(request.command, request.reply).await,
                _ = keepalive.tick(), if !offline => {
                    // A lost link is handled in `call`.
                    let _ = self.call(Request::Ping).await;
                }
                _ = sweep.tick() => self.expire().await,
                // The agent that reads the inbox (not a one-shot command's) keeps `keys/` short.
                _ = forget_keys.tick(), if self.config.inbox => self.forget_old_keys().await,
                // A member that was offline when its group frames first asked for a session.
                _ = member_retry.tick(), if !offline && self.config.announce => {
                    self.ask_awaited_members().await;
                }
            }
        };
        if let Some(attempt) = self.attempt.take() {
            attempt.abort();
        }
        // Say goodbye to every peer, then give the sessions a moment to flush.
        for (sender, _) in self.sessions.values() {
            let _ = sender.close("going offline").await;
        }
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        while !self.sessions.is_empty() {
            tokio::select! {
                () = &mut deadline => break,
                Some(event) = self.events_rx.recv() => self.on_session_event(event).await,
            }
        }
        let _ = std::fs::remove_file(control_path(&self.profile));
        result
    }

    /// Forgets the kept session keys nothing can use any more (`store/prune.rs`), keeping
    /// each for at least the broker's MESSAGE-TTL: not before this run has read it (an agent
    /// that started offline does it when it first logs in).
    async fn forget_old_keys(&mut self) {
        if !self.broker_limits_read {
            return;
        }
        self.keys_checked = true;
        let ttl = Duration::from_secs(self.broker_limits.message_ttl);
        let keep = self.config.keep_replaced_keys.max(ttl);
        let now = unix_now();
        if let Err(e) = self
            .on_disk(move |store| store.forget_old_keys(now, keep))
            .await
        {
            self.warn(format!("forgetting the keys of old sessions failed: {e}"))
                .await;
        }
    }

    /// Runs a write to the profile store (each one syncs to disk) on the blocking pool, so the
    /// agent's task (and, under `listen`'s one-thread runtime, every session) never waits for
    /// the disk.
    async fn on_disk<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> T {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || write(&store)).await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down, and this task goes with it.
            Err(_) => std::future::pending().await,
        }
    }

    /// Reads the broker's message limits (BROKER-INFO); on failure the last known ones stay.
    async fn read_broker_limits(&mut self) {
        if let Ok(ResponseData::BrokerInfo(info)) = self.call(Request::BrokerInfo).await {
            self.broker_limits = limits::BrokerLimits::from(&info.info.limits);
            self.broker_limits_read = true;
        }
    }

    /// Events that arrived while a request waited for its answer.
    async fn drain_queued_events(&mut self) {
        let events = self
            .link
            .as_mut()
            .map(BrokerLink::take_queued_events)
            .unwrap_or_default();
        for event in events {
            Box::pin(self.on_broker_event(event)).await;
        }
    }

    /// A request to the broker. While the link is down it fails at once with
    /// [`LinkError::Offline`]; a request that finds the link gone takes it down.
    async fn call(&mut self, request: Request) -> Result<ResponseData, LinkError> {
        let Some(link) = self.link.as_mut() else {
            return Err(LinkError::Offline);
        };
        let result = link.call(request).await;
        if let Err(e) = &result
            && reconnect::is_connection_loss(e)
        {
            self.link_lost(error_text(e)).await;
        }
        self.drain_queued_events().await;
        result
    }

    async fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<[u8; 16]> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        // A cancelled `send` that is still waiting for its session: nothing goes out.
        for o in self.outgoing.values_mut() {
            for (_, waiter) in o.queued.extract_if(.., |(_, w)| w.cancelled()) {
                let _ = waiter.send(cancelled_reply(
                    "nothing was sent (it was waiting for a session with the contact)",
                ));
            }
            for waiter in o.waiters.extract_if(.., |w| w.cancelled()) {
                let _ = waiter.send(cancelled_reply(
                    "stopped waiting for an answer (the request itself had gone to the broker)",
                ));
            }
        }
        for id in expired {
            if let Some(o) = self.outgoing.remove(&id) {
                self.networked.remove(&o.target);
                if o.deposit_on_timeout {
                    for (text, waiter) in o.queued {
                        // A session may have come up another way (the contact asked): then
                        // it goes live (the one outbound path never seals offline with the
                        // live session's keys).
                        let reply = self.send_text(&o.target, &text).await;
                        let _ = waiter.send(reply);
                    }
                    continue;
                }
                let message = format!(
                    "no answer from {} (it may not exist, be offline, or have declined)",
                    o.target
                );
                for waiter in o.waiters {
                    let _ = waiter.send(Err(refused(message.clone())));
                }
                for (_, waiter) in o.queued {
                    let _ = waiter.send(Err(refused(message.clone())));
                }
            }
        }
        {
            let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            tokens.retain(|_, (_, _, expires)| *expires > now);
        }
        let unix = unix_now();
        if self.link.is_some()
            && self
                .outbox
                .iter()
                .any(|q| q.pending() && q.next_attempt <= unix)
        {
            self.flush_outbox(None).await;
        }
    }

    async fn on_broker_event(&mut self, event: Event) {
        match event {
            Event::ContactRequest(r) => self.on_contact_request(r).await,
            Event::ContactAccepted(a) => self.on_contact_accepted(a).await,
            Event::ContactConnecting(c) => self.on_contact_connecting(c),
            Event::Shutdown(_) => self.link_lost("the broker is shutting down".into()).await,
            Event::DeviceRevoked(_) => {
                self.fatal = Some(
                    "this device was revoked (by another device of this entity); it can no \
                     longer log in"
                        .into(),
                );
            }
            Event::Inbox(_) => {
                if self.config.inbox {
                    self.inbox_due = true;
                }
            }
            Event::PubkeyRequest(_) => {}
            Event::RelayWaiting(w) => self.on_relay_waiting(w).await,
            Event::RelayClosed(c) => self.on_relay_closed(c).await,
            Event::Forwarded(f) => self.on_forwarded(f).await,
        }
    }
}

/// The next frame from the broker; never ready while the link is down.
async fn next_message(link: &mut Option<BrokerLink>) -> Result<Message, LinkError> {
    match link {
        Some(link) => link.next_message().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the running login attempt; never ready while none runs. Takes the attempt
/// once it is done.
async fn attempt_result(
    attempt: &mut Option<tokio::task::JoinHandle<Result<account::Session, AccountError>>>,
) -> Result<account::Session, AccountError> {
    let Some(task) = attempt.as_mut() else {
        return std::future::pending().await;
    };
    let result = match task.await {
        Ok(result) => result,
        Err(e) => Err(AccountError::Link(LinkError::Protocol(format!(
            "the login attempt failed: {e}"
        )))),
    };
    *attempt = None;
    result
}
