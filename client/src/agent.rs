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
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::message::{Kind, OfflineEnvelope};
use micromsg_crypto::sealed;
use micromsg_wire::message::event::{ContactAccepted, ContactConnecting, ContactRequest};
use micromsg_wire::message::request::{
    Answer, ContactAnswerArgs, ContactPolicyArgs, DepositArgs, InitiateNetworkedArgs,
    InitiateNewArgs, SyncCopyArgs, TargetArgs,
};
use micromsg_wire::message::response::Home;
use micromsg_wire::{
    Address, Blob, ErrorCode, Event, Hex16, Hex32, Message, Number, Request, ResponseData,
};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::account::{self, AccountError, Session, unix_now};
use crate::groups::{self, Change, Early, EarlyMessages, Frame, Group, GroupEntry, Payload};
use crate::inbox::{Arrived, Delivery, InboxError, LiveRecv, LiveTable, new_message_id};
use crate::keys::{self, SharedSession};
use crate::link::{BrokerLink, LinkError};
use crate::p2p::{self, Established, P2pError, PeerEvent, SessionConfig, SessionSender};
use crate::profile::{Profile, ProfileInfo};
use crate::store::{Direction, Entry, PinResult, Store};

/// Who may set up a session with this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptPolicy {
    /// Everyone who is not blocked.
    Any,
    /// Only numbers already in the contact list; others are rejected (and so blocked).
    Contacts,
    /// Print the request and wait for `micromsg contact accept|reject`.
    Ask,
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Who may connect.
    pub accept: AcceptPolicy,
    /// Where to listen for peers. Default `0.0.0.0:0` (any interface, a free port).
    pub peer_listen: SocketAddr,
    /// The `HOST:PORT` peers are told to connect to. Default: `0.0.0.0:<port>`, which the
    /// broker replaces with the address it sees for this device (protocol 10.7); a sealed
    /// address for a peer broker's caller uses the local address of the broker link instead.
    pub advertise: Option<String>,
    /// Session timers and limits.
    pub session: SessionConfig,
    /// Serve the control socket (`DIR/control.sock`) for one-shot commands.
    pub control: bool,
    /// Let existing contacts reconnect without asking (CONTACT-POLICY AUTO-EXISTING).
    pub auto_existing: bool,
    /// How long a contact request or a reconnect waits for the other side.
    pub answer_timeout: Duration,
    /// Announce the listening address and contact policy to the broker (off for the short-lived
    /// agent of a one-shot command, which nobody should connect to).
    pub announce: bool,
    /// How long `send` waits for a contact without a live session to come online before it
    /// deposits the message at the broker instead. Default 10 s.
    pub offline_after: Duration,
    /// Fetch the inbox at start and on every INBOX event. Default true (off for the
    /// short-lived agent of a one-shot command other than `inbox`).
    pub inbox: bool,
    /// Copy what this device sends to the entity's other devices (SYNC-COPY), deposit a copy
    /// of each live message for the contact's other devices, and share new sessions' keys with
    /// the entity's other devices. Default true.
    pub copies: bool,
    /// How many group messages to hold that arrived before the ops that make them acceptable
    /// (across brokers a message can overtake the group's create or an add). Default 256.
    pub early_group_messages: usize,
    /// How long such a message is held. Default 1 hour.
    pub early_group_ttl: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            accept: AcceptPolicy::Ask,
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            advertise: None,
            session: SessionConfig::default(),
            control: true,
            auto_existing: true,
            answer_timeout: Duration::from_secs(60),
            announce: true,
            offline_after: Duration::from_secs(10),
            inbox: true,
            copies: true,
            early_group_messages: 256,
            early_group_ttl: Duration::from_secs(3600),
        }
    }
}

/// Something the user should see; printed as a line of text or one JSON object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Notice {
    /// The agent is up.
    Listening {
        /// This entity's number.
        number: String,
        /// This device.
        device: u32,
        /// Where peers connect.
        peer_address: String,
    },
    /// Someone asks to become a contact (ask mode).
    ContactRequest {
        /// The caller's number.
        from: String,
        /// Answer with `micromsg contact accept|reject <request>`.
        request: String,
        /// `NEW` or `EXISTING`.
        kind: String,
    },
    /// A contact request was refused by the accept policy.
    ContactRefused {
        /// The caller's number.
        from: String,
    },
    /// An end-to-end session is up.
    SessionStarted {
        /// The other side.
        peer: String,
        /// True the first time this contact's identity key was seen (it is now pinned).
        first_contact: bool,
        /// The safety number to compare out of band.
        safety_number: String,
    },
    /// The peer's identity key differs from the pinned one: the session was refused.
    IdentityChanged {
        /// The other side.
        peer: String,
        /// The pinned key.
        pinned: String,
        /// The key it presented.
        presented: String,
    },
    /// A message arrived.
    Message {
        /// The sender.
        from: String,
        /// The text.
        text: String,
        /// The sender's clock (Unix seconds).
        time: u64,
        /// True when it came through the broker's inbox (deposited while this device was
        /// offline, or a copy), false when it came over a live session.
        offline: bool,
    },
    /// A copy of a message another device of this entity sent.
    SentElsewhere {
        /// The contact it went to.
        to: String,
        /// The device of this entity that sent it.
        device: u32,
        /// The text.
        text: String,
        /// The sending device's clock (Unix seconds).
        time: u64,
    },
    /// Another device of this entity shared the keys of a session with `peer`, so this device
    /// can read that conversation.
    KeysSynced {
        /// The contact.
        peer: String,
        /// The device that set the session up.
        device: u32,
    },
    /// A group message arrived (or a copy of one another device of this entity sent).
    GroupMessage {
        /// The group id.
        group: String,
        /// The group's name.
        name: String,
        /// The sender (this entity's own number for a copy).
        from: String,
        /// The text.
        text: String,
        /// The sender's clock (Unix seconds).
        time: u64,
        /// True when it came through the broker's inbox.
        offline: bool,
    },
    /// A group's membership or name changed.
    GroupChanged {
        /// The group id.
        group: String,
        /// The group's name (after the change).
        name: String,
        /// Who made the change.
        by: String,
        /// What changed, for people (`created`, `added 1234`, `removed 1234`, `left`,
        /// `renamed`).
        change: String,
        /// The members after it, in order.
        members: Vec<String>,
        /// The membership version after it.
        version: u64,
    },
    /// A session is over.
    SessionEnded {
        /// The other side.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Something failed (the agent goes on).
    Warning {
        /// What.
        message: String,
    },
}

/// A command for a running agent (one JSON object per line on the control socket).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Ask `number` to become a contact; answers once the session is up.
    ContactAdd {
        /// The number.
        number: String,
    },
    /// Send `text` to `number` (setting up a session first if needed).
    Send {
        /// The contact.
        number: String,
        /// The message.
        text: String,
    },
    /// Block `number` at the broker and locally.
    Block {
        /// The number.
        number: String,
    },
    /// Unblock `number`.
    Unblock {
        /// The number.
        number: String,
    },
    /// Answer a pending contact request (ask mode).
    Answer {
        /// The request id from the notice.
        request: String,
        /// Accept or reject.
        accept: bool,
    },
    /// Fetch the inbox now; the reply's `data.messages` lists what arrived.
    Inbox,
    /// Create a group with these members (contacts of this entity).
    GroupCreate {
        /// The group's name.
        name: String,
        /// The other members' numbers.
        members: Vec<String>,
    },
    /// Add a member to a group.
    GroupAdd {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The new member (a contact).
        number: String,
    },
    /// Remove a member from a group.
    GroupRemove {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The member.
        number: String,
    },
    /// Leave a group.
    GroupLeave {
        /// The group id or an unambiguous prefix.
        group: String,
    },
    /// Rename a group.
    GroupRename {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The new name.
        name: String,
    },
    /// Send a message to a group.
    GroupSend {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The message.
        text: String,
    },
}

/// The agent's answer to a [`Command`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What happened, for people.
    pub message: String,
    /// Details for programs (`send`: how it was delivered; `inbox`: the messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Reply {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            data: None,
        }
    }

    fn err(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            data: None,
        }
    }

    fn with(mut self, data: serde_json::Value) -> Self {
        self.data = Some(data);
        self
    }
}

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
}

/// The control socket of a profile.
pub fn control_path(profile: &Profile) -> PathBuf {
    profile.path("control.sock")
}

/// Sends `command` to the agent running for `profile`; `None` when no agent runs.
pub async fn send_to_running(profile: &Profile, command: &Command) -> Option<Reply> {
    let stream = UnixStream::connect(control_path(profile)).await.ok()?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(command).ok()?;
    line.push('\n');
    write.write_all(line.as_bytes()).await.ok()?;
    let mut lines = BufReader::new(read).lines();
    match lines.next_line().await {
        Ok(Some(line)) => serde_json::from_str(&line).ok(),
        _ => Some(Reply::err(
            "the running agent closed the control connection",
        )),
    }
}

/// A command with its reply channel.
#[derive(Debug)]
pub struct ControlRequest {
    command: Command,
    reply: oneshot::Sender<Reply>,
}

/// A handle to a running agent.
#[derive(Debug)]
pub struct AgentHandle {
    commands: mpsc::Sender<ControlRequest>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl AgentHandle {
    /// Runs a command in the agent and waits for its answer.
    pub async fn command(&self, command: Command) -> Reply {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(ControlRequest { command, reply })
            .await
            .is_err()
        {
            return Reply::err("the agent has stopped");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::err("the agent stopped before answering"))
    }

    /// Stops the agent: sessions get a DISCONNECT notice, then the link closes.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap_or(Ok(()))
    }

    /// Waits until the agent ends by itself (broker gone, fatal error).
    pub async fn wait(mut self) -> Result<(), AgentError> {
        let _keep = self.stop.take();
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Logs in, opens the listeners and starts the agent in the background. Notices go to
/// `notices`.
pub async fn start(
    profile: Profile,
    config: AgentConfig,
    notices: mpsc::Sender<Notice>,
) -> Result<AgentHandle, AgentError> {
    let control = if config.control {
        Some(bind_control(&profile).await?)
    } else {
        None
    };
    let session = account::connect(&profile).await?;
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
    let mut agent = Agent::new(profile, session, identity, config, advertise, notices)?;
    if agent.config.announce {
        agent.announce().await?;
        agent
            .notify(Notice::Listening {
                number: agent.info.number.clone(),
                device: agent.info.device,
                peer_address: agent.advertise.clone(),
            })
            .await;
    }
    if let Some(listener) = control {
        tokio::spawn(serve_control(listener, commands_tx.clone()));
    }
    let task = tokio::spawn(agent.run(peers, commands_rx, stop_rx));
    Ok(AgentHandle {
        commands: commands_tx,
        stop: Some(stop_tx),
        task,
    })
}

async fn bind_control(profile: &Profile) -> Result<UnixListener, AgentError> {
    let path = control_path(profile);
    if UnixStream::connect(&path).await.is_ok() {
        return Err(AgentError::AlreadyRunning(path));
    }
    // A socket file with nobody behind it is left over from an agent that died.
    let _ = std::fs::remove_file(&path);
    if !profile.exists() {
        return Err(AccountError::Profile(crate::profile::ProfileError::Missing(
            profile.dir().to_owned(),
        ))
        .into());
    }
    UnixListener::bind(&path).map_err(|source| AgentError::Io {
        what: format!("opening the control socket {}", path.display()),
        source,
    })
}

/// A contact request or reconnect we started and are waiting on.
struct Outgoing {
    target: String,
    deadline: Instant,
    /// Who to tell once the session is up (or the wait fails).
    waiters: Vec<oneshot::Sender<Reply>>,
    /// Messages to send once the session is up.
    queued: Vec<(String, oneshot::Sender<Reply>)>,
    /// Deposit the queued messages at the broker if no session is up by the deadline.
    deposit_on_timeout: bool,
    /// Networked request: the broker-keypair secret that opens the target's sealed address
    /// (protocol 11.2); dropped, and so erased, once used or when the wait ends.
    broker_key: Option<EphemeralSecret>,
}

/// A contact request waiting for the user's answer (ask policy).
struct Asked {
    /// Networked request: the caller's broker-keypair public key to seal our address to.
    caller_key: Option<[u8; 32]>,
}

/// How long an incoming handshake waits for its connect token to be announced by the broker.
const TOKEN_GRACE: Duration = Duration::from_secs(2);

/// Connect tokens we were given as the target, by token id.
type TokenTable = Arc<Mutex<HashMap<[u8; 16], (Secret32, String, Instant)>>>;

/// What a handshake task reports.
struct HandshakeDone {
    peer: Option<String>,
    request: Option<[u8; 16]>,
    result: Result<Established, P2pError>,
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
    link: BrokerLink,
    config: AgentConfig,
    advertise: String,
    notices: mpsc::Sender<Notice>,
    tokens: TokenTable,
    outgoing: HashMap<[u8; 16], Outgoing>,
    sessions: HashMap<String, (SessionSender, [u8; 16])>,
    asked: HashMap<[u8; 16], Asked>,
    /// IS-NETWORKED answers by number: computed from broker configuration, so stable for the
    /// life of the link.
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
}

impl Agent {
    fn new(
        profile: Profile,
        session: Session,
        identity: IdentityKey,
        config: AgentConfig,
        advertise: String,
        notices: mpsc::Sender<Notice>,
    ) -> Result<Self, AgentError> {
        let (handshakes_tx, handshakes_rx) = mpsc::channel(64);
        let (events_tx, events_rx) = mpsc::channel(1024);
        let store = Store::new(&profile);
        let delivery = Delivery::new(
            store.clone(),
            &session.info.number,
            session.info.device,
            identity.seed(),
        )
        .map_err(|e| AgentError::Io {
            what: "reading the inbox state".into(),
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
            info: session.info,
            identity: Arc::new(identity),
            link: session.link,
            config,
            advertise,
            notices,
            tokens: Arc::new(Mutex::new(HashMap::new())),
            outgoing: HashMap::new(),
            sessions: HashMap::new(),
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
        })
    }

    async fn notify(&self, notice: Notice) {
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
        self.link
            .call(Request::ContactPolicy(ContactPolicyArgs {
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
        let result = loop {
            if self.inbox_due {
                self.inbox_due = false;
                self.fetch_inbox().await;
            }
            // Events that came while a request waited for its answer (`next_message` below
            // only reads new frames).
            self.drain_queued_events().await;
            tokio::select! {
                _ = &mut stop => break Ok(()),
                message = self.link.next_message() => match message {
                    Ok(Message::Event(event)) => self.on_broker_event(event).await,
                    Ok(other) => self.warn(format!("unexpected frame from the broker: {other:?}")).await,
                    Err(e) => break Err(AgentError::Link(e)),
                },
                accepted = peers.accept() => match accepted {
                    Ok((stream, _addr)) => self.spawn_respond(stream),
                    Err(e) => self.warn(format!("accepting a peer failed: {e}")).await,
                },
                Some(done) = self.handshakes_rx.recv() => self.on_handshake(done).await,
                Some(event) = self.events_rx.recv() => self.on_session_event(event).await,
                Some(request) = control_rx.recv() => self.on_command(request.command, request.reply).await,
                _ = keepalive.tick() => {
                    if let Err(e) = self.link.call(Request::Ping).await {
                        break Err(AgentError::Link(e));
                    }
                    self.drain_queued_events().await;
                }
                _ = sweep.tick() => self.expire().await,
            }
        };
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

    /// Events that arrived while a request waited for its answer.
    async fn drain_queued_events(&mut self) {
        for event in self.link.take_queued_events() {
            Box::pin(self.on_broker_event(event)).await;
        }
    }

    async fn call(&mut self, request: Request) -> Result<ResponseData, LinkError> {
        let result = self.link.call(request).await;
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
        for id in expired {
            if let Some(o) = self.outgoing.remove(&id) {
                if o.deposit_on_timeout {
                    for (text, waiter) in o.queued {
                        let reply = self.send_offline(&o.target, &text).await;
                        let _ = waiter.send(reply);
                    }
                    continue;
                }
                let message = format!(
                    "no answer from {} (it may not exist, be offline, or have declined)",
                    o.target
                );
                for waiter in o.waiters {
                    let _ = waiter.send(Reply::err(message.clone()));
                }
                for (_, waiter) in o.queued {
                    let _ = waiter.send(Reply::err(message.clone()));
                }
            }
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, (_, _, expires)| *expires > now);
    }

    /// Fetches the inbox and reports what arrived (errors become warnings).
    async fn fetch_inbox(&mut self) -> Vec<Arrived> {
        let result = self
            .delivery
            .fetch_all(&mut self.link, &mut self.live, unix_now())
            .await;
        match result {
            Ok(arrived) => {
                for a in &arrived {
                    self.report(a).await;
                }
                for a in &arrived {
                    if let Arrived::Group {
                        peer,
                        direction,
                        payload,
                        time,
                    } = a
                    {
                        self.on_group_frame(peer, *direction, payload, *time, true)
                            .await;
                    }
                }
                arrived
            }
            Err(InboxError::Link(e)) => {
                self.warn(format!("fetching the inbox failed: {e}")).await;
                Vec::new()
            }
            Err(InboxError::Store(e)) => {
                self.warn(format!(
                    "storing inbox messages failed (they stay at the broker): {e}"
                ))
                .await;
                Vec::new()
            }
        }
    }

    async fn report(&self, arrived: &Arrived) {
        match arrived {
            Arrived::Message {
                peer,
                direction: Direction::In,
                text,
                time,
                ..
            } => {
                self.notify(Notice::Message {
                    from: peer.clone(),
                    text: text.clone(),
                    time: *time,
                    offline: true,
                })
                .await;
            }
            Arrived::Message {
                peer,
                direction: Direction::Out,
                from_device,
                text,
                time,
            } => {
                self.notify(Notice::SentElsewhere {
                    to: peer.clone(),
                    device: *from_device,
                    text: text.clone(),
                    time: *time,
                })
                .await;
            }
            Arrived::KeysSynced { peer, device } => {
                self.notify(Notice::KeysSynced {
                    peer: peer.clone(),
                    device: *device,
                })
                .await;
            }
            Arrived::Dropped { reason } => self.warn(format!("inbox: dropped {reason}")).await,
            Arrived::Linked(_) | Arrived::Group { .. } => {}
        }
    }

    /// Seals `text` with this device's latest session with `peer` (never a live one) and
    /// deposits it; the history gets it once the broker has committed it.
    async fn send_offline(&mut self, peer: &str, text: &str) -> Reply {
        let Ok(target) = Number::new(peer.to_owned()) else {
            return Reply::err(format!("{peer:?} is not a number"));
        };
        if self.sessions.contains_key(peer) {
            return Reply::err(format!(
                "{peer} has a live session; refusing to seal an offline message with live keys"
            ));
        }
        let mut stored = match self.store.load_session(peer) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Reply::err(format!(
                    "{peer} did not come online, and this device has no earlier session with {peer} \
                     to seal an offline message with (a device sends offline only with sessions \
                     it set up itself); try again when {peer} is online"
                ));
            }
            Err(e) => return Reply::err(format!("reading the session with {peer}: {e}")),
        };
        let now = unix_now();
        let envelope = match stored.seal_offline_text(now, text) {
            Ok(e) => e,
            Err(e) => return Reply::err(format!("sealing for {peer}: {e}")),
        };
        let counter = stored.next_send_counter.saturating_sub(1);
        // The counter is on disk before the envelope leaves the device (12.7).
        if let Err(e) = self.store.save_session(peer, &stored) {
            return Reply::err(format!("saving the send counter: {e}"));
        }
        let id = new_message_id();
        let deposit = Request::Deposit(DepositArgs {
            target,
            id,
            body: Blob::new(envelope.clone()),
        });
        let expires = match self.call(deposit).await {
            Ok(ResponseData::Deposit(d)) => d.expires,
            Ok(other) => {
                return Reply::err(format!("unexpected answer {}", other.kind().as_str()));
            }
            Err(e) => return Reply::err(deposit_error(peer, &e)),
        };
        let entry = Entry {
            direction: Direction::Out,
            time: now,
            text: text.to_owned(),
            session: stored.session_id,
            counter,
            offline: true,
        };
        if let Err(e) = self.store.append_history(peer, &entry) {
            self.warn(format!("saving history failed: {e}")).await;
        }
        self.sync_copy(peer, envelope).await;
        Reply::ok(format!(
            "{peer} is offline; message deposited at the broker (expires {})",
            describe_expiry(expires, now)
        ))
        .with(serde_json::json!({
            "delivered": "deposited",
            "id": id.to_hex(),
            "expires": expires,
        }))
    }

    /// Copies what this device sent to the entity's other devices (13.3). Failures are only
    /// warnings: the message itself went out.
    async fn sync_copy(&mut self, peer: &str, body: Vec<u8>) {
        if !self.config.copies {
            return;
        }
        let Ok(peer_number) = Number::new(peer.to_owned()) else {
            return;
        };
        let request = Request::SyncCopy(SyncCopyArgs {
            id: new_message_id(),
            body: Blob::new(body),
            peer: peer_number,
        });
        if let Err(e) = self.call(request).await {
            self.warn(format!(
                "copying to this entity's other devices failed: {e}"
            ))
            .await;
        }
    }

    /// Deposits the envelope of a message sent live for the contact's other devices (13: the
    /// device with the live session gets it live; the broker's copy reaches the others, and
    /// the live device drops it as a repeat). Failures are only warnings.
    async fn deposit_copy(&mut self, peer: &str, body: Vec<u8>) {
        let Ok(target) = Number::new(peer.to_owned()) else {
            return;
        };
        let request = Request::Deposit(DepositArgs {
            target,
            id: new_message_id(),
            body: Blob::new(body),
        });
        if let Err(e) = self.call(request).await {
            self.warn(format!(
                "leaving a copy for {peer}'s other devices failed: {}",
                deposit_error(peer, &e)
            ))
            .await;
        }
    }

    /// Shares a new session's keys with the entity's other devices (`MMK1`, 13.4).
    async fn share_session(&mut self, peer: &str, session: &crate::p2p::StoredSession) {
        if !self.config.copies {
            return;
        }
        let shared = SharedSession {
            peer: peer.to_owned(),
            device: self.info.device,
            session: session.clone(),
        };
        match keys::seal_session_sync(&self.identity.seed(), &shared) {
            Ok(blob) => self.sync_copy(peer, blob).await,
            Err(e) => self.warn(format!("sharing session keys failed: {e}")).await,
        }
    }

    async fn on_broker_event(&mut self, event: Event) {
        match event {
            Event::ContactRequest(r) => self.on_contact_request(r).await,
            Event::ContactAccepted(a) => self.on_contact_accepted(a).await,
            Event::ContactConnecting(c) => self.on_contact_connecting(c),
            Event::Shutdown(_) => self.warn("the broker is shutting down").await,
            Event::DeviceRevoked(_) => self.warn("this device was revoked").await,
            Event::Inbox(_) => {
                if self.config.inbox {
                    self.inbox_due = true;
                }
            }
            Event::PubkeyRequest(_) => {}
        }
    }

    async fn on_contact_request(&mut self, r: ContactRequest) {
        let from = r.from.as_str().to_owned();
        let known = matches!(self.store.contact(&from), Ok(Some(c)) if !c.blocked);
        let caller_key = if r.networked {
            match r.pubkey {
                Some(pk) => Some(*pk.as_bytes()),
                None => {
                    self.warn(format!(
                        "networked contact request from {from} without a public key: ignored"
                    ))
                    .await;
                    return;
                }
            }
        } else {
            None
        };
        let decision = match self.config.accept {
            AcceptPolicy::Any => Some(true),
            AcceptPolicy::Contacts => Some(known),
            // On one broker the broker answers for us (AUTO-EXISTING); for a peer broker's
            // caller only this device can seal its address, so it answers itself (11.3).
            AcceptPolicy::Ask
                if r.networked
                    && known
                    && self.config.auto_existing
                    && r.kind.as_str() == "EXISTING" =>
            {
                Some(true)
            }
            AcceptPolicy::Ask => None,
        };
        match decision {
            Some(accept) => {
                if let Err(e) = self.answer(r.request, accept, caller_key).await {
                    self.warn(format!("answering {from}: {e}")).await;
                } else if !accept {
                    self.notify(Notice::ContactRefused { from }).await;
                }
            }
            None => {
                self.asked
                    .insert(*r.request.as_bytes(), Asked { caller_key });
                self.notify(Notice::ContactRequest {
                    from,
                    request: r.request.to_hex(),
                    kind: r.kind.as_str().to_owned(),
                })
                .await;
            }
        }
    }

    /// Answers a contact request. Accepting a networked one seals this device's address to
    /// the caller's broker-keypair public key with a fresh pair of our own (protocol 11.4), so
    /// neither broker learns it.
    async fn answer(
        &mut self,
        request: Hex16,
        accept: bool,
        caller_key: Option<[u8; 32]>,
    ) -> Result<(), LinkError> {
        let answer = match (accept, caller_key) {
            (false, _) => Answer::Decline,
            (true, None) => Answer::Accept {
                address: self.address()?,
            },
            (true, Some(caller_key)) => {
                let address = self.reachable_address()?;
                let ours = EphemeralSecret::generate(&mut OsRng);
                let sealed =
                    sealed::seal(&ours, &caller_key, address.as_str().as_bytes(), &mut OsRng)
                        .map_err(|e| LinkError::Protocol(format!("sealing the address: {e}")))?;
                Answer::AcceptNetworked {
                    pubkey: Hex32::from_bytes(ours.public_key()),
                    sealed_address: Blob::new(sealed),
                }
            }
        };
        self.call(Request::ContactAnswer(ContactAnswerArgs {
            request,
            answer,
        }))
        .await
        .map(drop)
    }

    /// The address a peer on another broker can connect to. The broker cannot fill in an
    /// unspecified host for us (it only sees the sealed form), so `0.0.0.0`/`[::]` becomes the
    /// local address of the broker connection: the interface that reaches the network.
    fn reachable_address(&self) -> Result<Address, LinkError> {
        let address = self.address()?;
        if !matches!(address.host(), "0.0.0.0" | "[::]") {
            return Ok(address);
        }
        let ip = self.link.local_ip().ok_or_else(|| {
            LinkError::Protocol("the broker connection has no local address".into())
        })?;
        let text = match ip {
            std::net::IpAddr::V4(v4) => format!("{v4}:{}", address.port()),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", address.port()),
        };
        Address::new(text).map_err(|e| LinkError::Protocol(format!("local address: {e}")))
    }

    fn on_contact_connecting(&mut self, c: ContactConnecting) {
        let token = Secret32::from_bytes(*c.token.as_bytes());
        let id = micromsg_crypto::handshake::token_id(&token);
        let expires = Instant::now() + self.config.answer_timeout;
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.insert(id, (token, c.from.as_str().to_owned(), expires));
    }

    async fn on_contact_accepted(&mut self, a: ContactAccepted) {
        let request = *a.request.as_bytes();
        let peer = a.target.as_str().to_owned();
        let address = match (a.address, a.sealed_address, a.pubkey) {
            (Some(address), None, _) => address,
            (None, Some(sealed), Some(theirs)) => {
                let opened = self
                    .outgoing
                    .get_mut(&request)
                    .and_then(|o| o.broker_key.take())
                    .ok_or("no networked request of ours has this id")
                    .and_then(|ours| {
                        sealed::open(&ours, theirs.as_bytes(), sealed.as_bytes())
                            .map_err(|_| "it does not open with our key")
                    })
                    .and_then(|plain| {
                        String::from_utf8(plain)
                            .ok()
                            .and_then(|text| Address::new(text).ok())
                            .ok_or("it is not an address")
                    });
                match opened {
                    Ok(address) => address,
                    Err(why) => {
                        // Protocol 11.4: abandon the request; the waiters hear it.
                        let message = format!(
                            "{peer} accepted, but the sealed address is unusable ({why}): the \
                             brokers may be misbehaving"
                        );
                        self.warn(message.clone()).await;
                        if let Some(o) = self.outgoing.remove(&request) {
                            for w in o.waiters {
                                let _ = w.send(Reply::err(message.clone()));
                            }
                            for (_, w) in o.queued {
                                let _ = w.send(Reply::err(message.clone()));
                            }
                        }
                        return;
                    }
                }
            }
            _ => {
                self.warn(format!("{peer} accepted without a usable address"))
                    .await;
                return;
            }
        };
        let token = Secret32::from_bytes(*a.token.as_bytes());
        let identity = Arc::clone(&self.identity);
        let cfg = self.config.session.clone();
        let done = self.handshakes_tx.clone();
        let _ = self
            .store
            .set_address(&peer, Some(address.as_str().to_owned()), unix_now());
        tokio::spawn(async move {
            let result = p2p::connect(address.as_str(), &token, &identity, cfg).await;
            let _ = done
                .send(HandshakeDone {
                    peer: Some(peer),
                    request: Some(request),
                    result,
                })
                .await;
        });
    }

    fn spawn_respond(&self, stream: tokio::net::TcpStream) {
        let tokens = Arc::clone(&self.tokens);
        let identity = Arc::clone(&self.identity);
        let cfg = self.config.session.clone();
        let done = self.handshakes_tx.clone();
        tokio::spawn(async move {
            let peer_slot: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
            let slot = Arc::clone(&peer_slot);
            let lookup = async move |id: [u8; 16]| {
                // The broker's CONTACT-CONNECTING may still be on its way (or waiting while
                // this agent finishes a request): give it a moment before refusing.
                let deadline = Instant::now() + TOKEN_GRACE;
                loop {
                    // A connect token is good for one connection.
                    let taken = tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    if let Some((token, peer, _)) = taken {
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
                        return Some(token);
                    }
                    if Instant::now() >= deadline {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let result = p2p::accept(stream, lookup, &identity, cfg).await;
            let peer = peer_slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let _ = done
                .send(HandshakeDone {
                    peer,
                    request: None,
                    result,
                })
                .await;
        });
    }

    async fn on_handshake(&mut self, done: HandshakeDone) {
        let waiting = done.request.and_then(|r| self.outgoing.remove(&r));
        let fail = |waiting: Option<Outgoing>, message: String| {
            if let Some(o) = waiting {
                for w in o.waiters {
                    let _ = w.send(Reply::err(message.clone()));
                }
                for (_, w) in o.queued {
                    let _ = w.send(Reply::err(message.clone()));
                }
            }
        };
        let (peer, established) = match (done.peer, done.result) {
            (Some(peer), Ok(established)) => (peer, established),
            (peer, Err(e)) => {
                let who = peer.unwrap_or_else(|| "an unknown peer".into());
                let message = format!("session setup with {who} failed: {e}");
                self.warn(message.clone()).await;
                fail(waiting, message);
                return;
            }
            (None, Ok(_)) => return,
        };
        let now = unix_now();
        let pinned = match self
            .store
            .pin_identity(&peer, &established.peer_identity, now)
        {
            Ok(p) => p,
            Err(e) => {
                let message = format!("pinning {peer}'s identity failed: {e}");
                self.warn(message.clone()).await;
                fail(waiting, message);
                return;
            }
        };
        if let PinResult::Changed { old } = pinned {
            let message = format!(
                "{peer}'s identity key CHANGED: refusing the session. Compare safety numbers \
                 out of band before trusting the new key."
            );
            self.notify(Notice::IdentityChanged {
                peer: peer.clone(),
                pinned: old.to_hex(),
                presented: established.peer_identity.to_hex(),
            })
            .await;
            fail(waiting, message);
            return;
        }
        let safety_number = crate::store::safety_number(
            &self.info.number,
            &self.identity.public_key(),
            &peer,
            &established.peer_identity,
        )
        .unwrap_or_default();
        let stored = established.stored_session(now);
        if let Err(e) = self.store.save_session(&peer, &stored) {
            let message = format!("saving the session keys for {peer} failed: {e}");
            self.warn(message.clone()).await;
            fail(waiting, message);
            return;
        }
        let persist = self.store.counter_persister(&peer).ok();
        let session_id = established.session_id();
        self.live.insert(session_id, LiveRecv::default());
        let handle = established.start(persist);
        let (sender, mut events) = handle.into_parts();
        // A newer session with the same peer replaces the old one.
        if let Some((old, _)) = self
            .sessions
            .insert(peer.clone(), (sender.clone(), session_id))
        {
            let _ = old.close("replaced by a new session").await;
        }
        let forward = self.events_tx.clone();
        let tag = peer.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if forward
                    .send(SessionEvent {
                        peer: tag.clone(),
                        session_id,
                        event,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        self.notify(Notice::SessionStarted {
            peer: peer.clone(),
            first_contact: pinned == PinResult::FirstUse,
            safety_number,
        })
        .await;
        self.share_session(&peer, &stored).await;
        if let Some(o) = waiting {
            for w in o.waiters {
                let _ = w.send(Reply::ok(format!("session with {peer} is up")));
            }
            for (text, w) in o.queued {
                let reply = self.send_on(&peer, &sender, session_id, text).await;
                let _ = w.send(reply);
            }
        }
    }

    async fn send_on(
        &mut self,
        peer: &str,
        sender: &SessionSender,
        session_id: [u8; 16],
        text: String,
    ) -> Reply {
        match sender.send_text_tracked(text.clone()).await {
            Ok(sealed) => match sealed.await {
                Ok(sealed) => {
                    let envelope = OfflineEnvelope {
                        session_id,
                        frame: &sealed.frame,
                    }
                    .encode();
                    let entry = Entry {
                        direction: Direction::Out,
                        time: sealed.unix,
                        text,
                        session: session_id,
                        counter: sealed.counter,
                        offline: false,
                    };
                    if let Err(e) = self.store.append_history(peer, &entry) {
                        self.warn(format!("saving history failed: {e}")).await;
                    }
                    if self.config.copies {
                        self.deposit_copy(peer, envelope.clone()).await;
                        self.sync_copy(peer, envelope).await;
                    }
                    Reply::ok(format!("sent to {peer}"))
                        .with(serde_json::json!({"delivered": "live"}))
                }
                Err(_) => Reply::err(format!("the session with {peer} ended before sending")),
            },
            Err(e) => Reply::err(format!("sending to {peer}: {e}")),
        }
    }

    async fn on_session_event(&mut self, event: SessionEvent) {
        let SessionEvent {
            peer,
            session_id,
            event,
        } = event;
        match event {
            PeerEvent::Text {
                counter,
                unix,
                text,
            } => {
                let live = self.live.entry(session_id).or_default();
                live.last = Some(counter);
                if live.offline.remove(&counter) {
                    // Its broker copy arrived first and is already stored and shown.
                    return;
                }
                let entry = Entry {
                    direction: Direction::In,
                    time: unix,
                    text: text.clone(),
                    session: session_id,
                    counter,
                    offline: false,
                };
                if let Err(e) = self.store.append_history(&peer, &entry) {
                    self.warn(format!("saving history failed: {e}")).await;
                }
                self.notify(Notice::Message {
                    from: peer,
                    text,
                    time: unix,
                    offline: false,
                })
                .await;
            }
            PeerEvent::Group {
                counter,
                unix,
                payload,
            } => {
                let live = self.live.entry(session_id).or_default();
                live.last = Some(counter);
                if live.offline.remove(&counter) {
                    return;
                }
                self.on_group_frame(&peer, Direction::In, &payload, unix, false)
                    .await;
            }
            PeerEvent::Ended(end) => {
                if self
                    .sessions
                    .get(&peer)
                    .is_some_and(|(_, id)| *id == session_id)
                {
                    self.sessions.remove(&peer);
                }
                if let Ok(Some(mut stored)) = self.store.load_session(&peer)
                    && stored.session_id == session_id
                {
                    stored.record_end(&end, unix_now());
                    if let Err(e) = self.store.save_session(&peer, &stored) {
                        self.warn(format!("saving the session end failed: {e}"))
                            .await;
                    }
                }
                self.notify(Notice::SessionEnded {
                    peer,
                    reason: end.reason.to_string(),
                })
                .await;
            }
        }
    }

    async fn on_command(&mut self, command: Command, reply: oneshot::Sender<Reply>) {
        match command {
            Command::ContactAdd { number } => self.initiate(number, None, reply, false).await,
            Command::Send { number, text } => {
                if let Some((sender, id)) = self.sessions.get(&number).cloned() {
                    let r = self.send_on(&number, &sender, id, text).await;
                    let _ = reply.send(r);
                } else if self.config.offline_after.is_zero() {
                    let r = self.send_offline(&number, &text).await;
                    let _ = reply.send(r);
                } else {
                    self.initiate(number, Some(text), reply, true).await;
                }
            }
            Command::Inbox => {
                let arrived = self.fetch_inbox().await;
                let messages: Vec<serde_json::Value> = arrived
                    .iter()
                    .filter_map(|a| match a {
                        Arrived::Message {
                            peer,
                            direction,
                            from_device,
                            text,
                            time,
                        } => Some(serde_json::json!({
                            "peer": peer,
                            "direction": direction,
                            "device": from_device,
                            "text": text,
                            "time": time,
                        })),
                        _ => None,
                    })
                    .collect();
                let message = match messages.len() {
                    0 => "no new messages".to_owned(),
                    1 => "1 new message".to_owned(),
                    n => format!("{n} new messages"),
                };
                let pending = self.delivery.pending();
                let message = if pending > 0 {
                    format!("{message} ({pending} waiting for session keys from another device)")
                } else {
                    message
                };
                let _ = reply.send(
                    Reply::ok(message)
                        .with(serde_json::json!({"messages": messages, "pending": pending})),
                );
            }
            Command::GroupCreate { name, members } => {
                let r = self.group_create(name, members).await;
                let _ = reply.send(r);
            }
            Command::GroupAdd { group, number } => {
                let r = self.group_change(&group, Change::Add(number)).await;
                let _ = reply.send(r);
            }
            Command::GroupRemove { group, number } => {
                let r = self.group_change(&group, Change::Remove(number)).await;
                let _ = reply.send(r);
            }
            Command::GroupLeave { group } => {
                let r = self.group_change(&group, Change::Leave).await;
                let _ = reply.send(r);
            }
            Command::GroupRename { group, name } => {
                let r = self.group_change(&group, Change::Rename(name)).await;
                let _ = reply.send(r);
            }
            Command::GroupSend { group, text } => {
                let r = self.group_send(&group, text).await;
                let _ = reply.send(r);
            }
            Command::Block { number } => {
                let r = self.block(&number, true).await;
                let _ = reply.send(r);
            }
            Command::Unblock { number } => {
                let r = self.block(&number, false).await;
                let _ = reply.send(r);
            }
            Command::Answer { request, accept } => {
                let asked = micromsg_crypto::hex::decode_array::<16>(&request)
                    .ok()
                    .and_then(|id| Some((id, self.asked.remove(&id)?)));
                let r = match asked {
                    Some((id, asked)) => {
                        let request = Hex16::from_bytes(id);
                        match self.answer(request, accept, asked.caller_key).await {
                            Ok(()) if accept => {
                                Reply::ok("accepted; the session starts when they connect")
                            }
                            Ok(()) => Reply::ok("rejected (and blocked)"),
                            Err(e) => Reply::err(e.to_string()),
                        }
                    }
                    None => Reply::err("no such pending contact request"),
                };
                let _ = reply.send(r);
            }
        }
    }

    // ---- groups (docs/groups.md) ----

    /// True when this device can reach `number` end to end: a live session or a stored one.
    fn reachable(&self, number: &str) -> bool {
        self.sessions.contains_key(number) || matches!(self.store.load_session(number), Ok(Some(_)))
    }

    /// The short-lived agent of a one-shot command does not watch the inbox: bring the group
    /// state up to date first.
    async fn refresh_groups(&mut self) {
        if !self.config.inbox {
            self.fetch_inbox().await;
        }
    }

    /// Finds a group by id or prefix.
    fn find_group(&self, query: &str) -> Result<Group, String> {
        let ids = self.store.group_ids().map_err(|e| e.to_string())?;
        let id = groups::resolve(&ids, query)?;
        match self.store.load_group(id) {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err(format!("no group {query:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends one group frame to `member`: over the live session when there is one (with the
    /// copies of 13.3), else sealed with this device's latest session and deposited.
    async fn group_deliver(&mut self, member: &str, frame: &Frame) -> Result<&'static str, String> {
        let bytes = frame.encode();
        if let Some((sender, session_id)) = self.sessions.get(member).cloned() {
            let sealed = match sender.send_group(bytes).await {
                Ok(rx) => rx
                    .await
                    .map_err(|_| format!("the session with {member} ended before sending"))?,
                Err(e) => return Err(format!("sending to {member}: {e}")),
            };
            if self.config.copies {
                let envelope = OfflineEnvelope {
                    session_id,
                    frame: &sealed.frame,
                }
                .encode();
                self.deposit_copy(member, envelope.clone()).await;
                self.sync_copy(member, envelope).await;
            }
            return Ok("live");
        }
        let target =
            Number::new(member.to_owned()).map_err(|_| format!("{member:?} is not a number"))?;
        let mut stored = match self.store.load_session(member) {
            Ok(Some(s)) => s,
            Ok(None) => return Err(not_a_contact(member)),
            Err(e) => return Err(format!("reading the session with {member}: {e}")),
        };
        let envelope = stored
            .seal_offline(unix_now(), Kind::Group, &bytes)
            .map_err(|e| format!("sealing for {member}: {e}"))?;
        // The counter is on disk before the envelope leaves the device (12.7).
        self.store
            .save_session(member, &stored)
            .map_err(|e| format!("saving the send counter: {e}"))?;
        let deposit = Request::Deposit(DepositArgs {
            target,
            id: new_message_id(),
            body: Blob::new(envelope.clone()),
        });
        self.call(deposit)
            .await
            .map_err(|e| deposit_error(member, &e))?;
        self.sync_copy(member, envelope).await;
        Ok("deposited")
    }

    /// Sends planned frames; returns how each member was reached (or why not).
    async fn group_send_all(&mut self, plan: Vec<(String, Frame)>) -> serde_json::Value {
        let mut delivered = serde_json::Map::new();
        for (member, frame) in plan {
            let how = match self.group_deliver(&member, &frame).await {
                Ok(how) => how.to_owned(),
                Err(e) => {
                    self.warn(format!("group {}: {e}", short(&frame.group)))
                        .await;
                    format!("failed: {e}")
                }
            };
            delivered.insert(member, serde_json::Value::String(how));
        }
        serde_json::Value::Object(delivered)
    }

    fn group_reply(&self, message: String, group: &Group, delivered: serde_json::Value) -> Reply {
        Reply::ok(message).with(serde_json::json!({
            "group": group.id,
            "name": group.state.name,
            "members": group.state.members,
            "version": group.state.version,
            "delivered": delivered,
        }))
    }

    async fn group_create(&mut self, name: String, members: Vec<String>) -> Reply {
        if name.len() > groups::MAX_NAME_LEN {
            return Reply::err(format!(
                "the name is longer than {} bytes",
                groups::MAX_NAME_LEN
            ));
        }
        let me = self.info.number.clone();
        let mut list = vec![me.clone()];
        for m in members {
            if Number::new(m.clone()).is_err() {
                return Reply::err(format!("{m:?} is not a number"));
            }
            if m != me && !list.contains(&m) {
                list.push(m);
            }
        }
        let strangers: Vec<&String> = list.iter().skip(1).filter(|m| !self.reachable(m)).collect();
        if !strangers.is_empty() {
            let names: Vec<&str> = strangers.iter().map(|s| s.as_str()).collect();
            return Reply::err(format!(
                "not contacts of yours yet (no session on this device): {}; add them with \
                 `micromsg contact add NUMBER` first",
                names.join(", ")
            ));
        }
        let mut group = Group::new(&groups::new_id());
        let before = group.state.clone();
        let op = group.new_op(
            &me,
            Change::Create {
                name: name.clone(),
                members: list,
            },
        );
        let new = group.merge([op]);
        if let Err(e) = self.store.save_group(&group) {
            return Reply::err(format!("saving the group: {e}"));
        }
        let plan = groups::plan_control(&before, &group, &new, &me, &[]);
        let delivered = self.group_send_all(plan).await;
        self.group_reply(
            format!("created group {name:?} ({})", group.id),
            &group,
            delivered,
        )
    }

    async fn group_change(&mut self, query: &str, change: Change) -> Reply {
        self.refresh_groups().await;
        let me = self.info.number.clone();
        let mut group = match self.find_group(query) {
            Ok(g) => g,
            Err(e) => return Reply::err(e),
        };
        if !group.state.is_member(&me) {
            return Reply::err(format!(
                "you are not a member of group {:?} ({})",
                group.state.name, group.id
            ));
        }
        let what = match &change {
            Change::Add(m) => {
                if Number::new(m.clone()).is_err() {
                    return Reply::err(format!("{m:?} is not a number"));
                }
                if group.state.is_member(m) {
                    return Reply::err(format!("{m} is already a member"));
                }
                if !self.reachable(m) {
                    return Reply::err(not_a_contact(m));
                }
                format!("added {m} to")
            }
            Change::Remove(m) => {
                if *m == me {
                    return Reply::err("to remove yourself, use `group leave`");
                }
                if !group.state.is_member(m) {
                    return Reply::err(format!("{m} is not a member"));
                }
                format!("removed {m} from")
            }
            Change::Leave => "left".to_owned(),
            Change::Rename(name) => {
                if name.len() > groups::MAX_NAME_LEN {
                    return Reply::err(format!(
                        "the name is longer than {} bytes",
                        groups::MAX_NAME_LEN
                    ));
                }
                "renamed".to_owned()
            }
            Change::Create { .. } => return Reply::err("a group is created only once"),
        };
        let before = group.state.clone();
        let op = group.new_op(&me, change);
        let new = group.merge([op]);
        if let Err(e) = self.store.save_group(&group) {
            return Reply::err(format!("saving the group: {e}"));
        }
        let plan = groups::plan_control(&before, &group, &new, &me, &[]);
        let delivered = self.group_send_all(plan).await;
        self.group_reply(
            format!("{what} group {:?} ({})", group.state.name, group.id),
            &group,
            delivered,
        )
    }

    async fn group_send(&mut self, query: &str, text: String) -> Reply {
        self.refresh_groups().await;
        let me = self.info.number.clone();
        let group = match self.find_group(query) {
            Ok(g) => g,
            Err(e) => return Reply::err(e),
        };
        if !group.state.is_member(&me) {
            return Reply::err(format!(
                "you are not a member of group {:?} ({})",
                group.state.name, group.id
            ));
        }
        let now = unix_now();
        let entry = GroupEntry {
            id: groups::new_id(),
            from: me.clone(),
            text: text.clone(),
            sent: now,
            received: now,
        };
        if let Err(e) = self.store.append_group_message(&group.id, &entry) {
            return Reply::err(format!("saving the group history: {e}"));
        }
        let frame = Frame {
            group: group.id.clone(),
            payload: Payload::Message {
                id: entry.id.clone(),
                text,
                sent: now,
            },
        };
        let plan = groups::message_recipients(&group.state, &me)
            .into_iter()
            .map(|m| (m, frame.clone()))
            .collect();
        let delivered = self.group_send_all(plan).await;
        self.group_reply(
            format!("sent to group {:?} ({})", group.state.name, group.id),
            &group,
            delivered,
        )
    }

    /// A GROUP frame from `peer` (`In`), or a copy of one another device of this entity sent
    /// to `peer` (`Out`). Bad or unwelcome frames are dropped (docs/groups.md section 3).
    async fn on_group_frame(
        &mut self,
        peer: &str,
        direction: Direction,
        payload: &[u8],
        time: u64,
        offline: bool,
    ) {
        let frame = match Frame::decode(payload) {
            Ok(f) => f,
            Err(e) => {
                self.warn(format!("dropped a group frame from {peer}: {e}"))
                    .await;
                return;
            }
        };
        let me = self.info.number.clone();
        let mut group = match self.store.load_group(&frame.group) {
            Ok(Some(g)) => g,
            Ok(None) => Group::new(&frame.group),
            Err(e) => {
                self.warn(format!("reading group {}: {e}", short(&frame.group)))
                    .await;
                return;
            }
        };
        match frame.payload {
            Payload::Message { id, text, sent } => {
                let from = match direction {
                    Direction::In => peer.to_owned(),
                    Direction::Out => me.clone(),
                };
                let entry = GroupEntry {
                    id,
                    from: from.clone(),
                    text,
                    sent: if sent == 0 { time } else { sent },
                    received: unix_now(),
                };
                if direction == Direction::In && !groups::accepts_message(&group.state, peer, &me) {
                    if group.may_be_early(peer, &me) {
                        let early = Early {
                            group: group.id.clone(),
                            from,
                            entry,
                            held_at: unix_now(),
                            offline,
                        };
                        self.hold_early(early).await;
                    }
                    return;
                }
                self.show_group_message(&group, entry, offline).await;
            }
            Payload::Op(op) => {
                self.on_group_ops(peer, direction, &mut group, vec![op])
                    .await
            }
            Payload::State(ops) => self.on_group_ops(peer, direction, &mut group, ops).await,
        }
    }

    /// Stores a group message in the history and shows it (once: duplicates are skipped).
    async fn show_group_message(&mut self, group: &Group, entry: GroupEntry, offline: bool) {
        match self.store.append_group_message(&group.id, &entry) {
            Ok(true) => {
                self.notify(Notice::GroupMessage {
                    group: group.id.clone(),
                    name: group.state.name.clone(),
                    from: entry.from,
                    text: entry.text,
                    time: entry.sent,
                    offline,
                })
                .await;
            }
            Ok(false) => {}
            Err(e) => self.warn(format!("saving the group history: {e}")).await,
        }
    }

    async fn hold_early(&mut self, early: Early) {
        for gone in self.early.hold(early, unix_now()) {
            self.warn(format!(
                "dropped a message from {} for group {}: it came before the change that \
                 made it acceptable, and that change did not come in time",
                gone.from,
                short(&gone.group)
            ))
            .await;
        }
    }

    async fn on_group_ops(
        &mut self,
        peer: &str,
        direction: Direction,
        group: &mut Group,
        ops: Vec<groups::Op>,
    ) {
        if direction == Direction::In && !group.accepts_from(peer, &ops) {
            return;
        }
        let me = self.info.number.clone();
        let known = !group.log.is_empty();
        let before = group.state.clone();
        let new = group.merge(ops);
        if new.is_empty() {
            return;
        }
        if let Err(e) = self.store.save_group(group) {
            self.warn(format!("saving group {}: {e}", short(&group.id)))
                .await;
            return;
        }
        for op in &new {
            let change = match &op.change {
                Change::Create { .. } => "created".to_owned(),
                Change::Add(m) => format!("added {m}"),
                Change::Remove(m) => format!("removed {m}"),
                Change::Leave => "left".to_owned(),
                Change::Rename(_) => "renamed".to_owned(),
            };
            self.notify(Notice::GroupChanged {
                group: group.id.clone(),
                name: group.state.name.clone(),
                by: op.author.clone(),
                change,
                members: group.state.members.clone(),
                version: group.state.version,
            })
            .await;
        }
        // Messages that overtook these ops may be acceptable now.
        for early in self.early.take(&group.id, unix_now()) {
            if groups::accepts_message(&group.state, &early.from, &me) {
                self.show_group_message(group, early.entry, early.offline)
                    .await;
            } else if group.may_be_early(&early.from, &me) {
                self.hold_early(early).await;
            }
        }
        // Relay what was new to the members this device knows (docs/groups.md section 3):
        // a member the author did not know of yet still hears of it. A device that just
        // learned of the group relays nothing (its sender knew all it knows); copies from
        // another device of this entity were relayed by that device.
        if direction == Direction::In && known && before.is_member(&me) {
            let plan = groups::plan_control(&before, group, &new, &me, &[peer])
                .into_iter()
                .filter(|(m, _)| self.reachable(m))
                .collect();
            self.group_send_all(plan).await;
        }
    }

    async fn block(&mut self, number: &str, block: bool) -> Reply {
        let Ok(target) = Number::new(number.to_owned()) else {
            return Reply::err(format!("{number:?} is not a number"));
        };
        let request = if block {
            Request::Block(TargetArgs { target })
        } else {
            Request::Unblock(TargetArgs { target })
        };
        if let Err(e) = self.call(request).await {
            return Reply::err(e.to_string());
        }
        if let Err(e) = self.store.set_blocked(number, block, unix_now()) {
            return Reply::err(e.to_string());
        }
        if block && let Some((sender, _)) = self.sessions.get(number) {
            let _ = sender.close("blocked").await;
        }
        Reply::ok(if block { "blocked" } else { "unblocked" })
    }

    /// Whether `target` lives on a peer broker (IS-NETWORKED, protocol 11.1); an error when no
    /// broker of the network serves it.
    async fn is_networked(&mut self, target: &Number) -> Result<bool, String> {
        if let Some(&networked) = self.networked.get(target.as_str()) {
            return Ok(networked);
        }
        let data = match self
            .call(Request::IsNetworked(TargetArgs {
                target: target.clone(),
            }))
            .await
        {
            Ok(ResponseData::IsNetworked(data)) => data,
            Ok(other) => return Err(format!("unexpected answer {}", other.kind().as_str())),
            Err(e) => return Err(e.to_string()),
        };
        if data.home == Home::None {
            return Err(format!(
                "{target} is outside the number space of this broker and its network"
            ));
        }
        self.networked
            .insert(target.as_str().to_owned(), data.networked);
        Ok(data.networked)
    }

    async fn initiate(
        &mut self,
        number: String,
        text: Option<String>,
        reply: oneshot::Sender<Reply>,
        existing: bool,
    ) {
        let Ok(target) = Number::new(number.clone()) else {
            let _ = reply.send(Reply::err(format!("{number:?} is not a number")));
            return;
        };
        if number == self.info.number {
            let _ = reply.send(Reply::err("that is your own number"));
            return;
        }
        let networked = match self.is_networked(&target).await {
            Ok(networked) => networked,
            Err(message) => {
                let _ = reply.send(Reply::err(message));
                return;
            }
        };
        // A fresh broker keypair per networked request (protocol 11.2).
        let broker_key = networked.then(|| EphemeralSecret::generate(&mut OsRng));
        let request = match (&broker_key, existing) {
            (None, true) => Request::InitiateExisting(TargetArgs { target }),
            (None, false) => Request::InitiateNew(InitiateNewArgs {
                target,
                address: None,
            }),
            (Some(key), existing) => {
                let args = InitiateNetworkedArgs {
                    target,
                    pubkey: Hex32::from_bytes(key.public_key()),
                };
                if existing {
                    Request::InitiateExistingNetworked(args)
                } else {
                    Request::InitiateNewNetworked(args)
                }
            }
        };
        let id = match self.call(request).await {
            Ok(
                ResponseData::InitiateNew(d)
                | ResponseData::InitiateExisting(d)
                | ResponseData::InitiateNewNetworked(d)
                | ResponseData::InitiateExistingNetworked(d),
            ) => *d.request.as_bytes(),
            Ok(other) => {
                let _ = reply.send(Reply::err(format!(
                    "unexpected answer {}",
                    other.kind().as_str()
                )));
                return;
            }
            Err(e) => {
                let _ = reply.send(Reply::err(e.to_string()));
                return;
            }
        };
        let deposit_on_timeout = text.is_some();
        let wait = if deposit_on_timeout {
            self.config.offline_after
        } else {
            self.config.answer_timeout
        };
        let mut waiting = Outgoing {
            target: number,
            deadline: Instant::now() + wait,
            waiters: Vec::new(),
            queued: Vec::new(),
            deposit_on_timeout,
            broker_key,
        };
        match text {
            Some(text) => waiting.queued.push((text, reply)),
            None => waiting.waiters.push(reply),
        }
        self.outgoing.insert(id, waiting);
    }
}

async fn serve_control(listener: UnixListener, control: mpsc::Sender<ControlRequest>) {
    while let Ok((stream, _)) = listener.accept().await {
        let control = control.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Command>(&line) {
                    Ok(command) => {
                        let (tx, rx) = oneshot::channel();
                        if control
                            .send(ControlRequest { command, reply: tx })
                            .await
                            .is_err()
                        {
                            Reply::err("the agent is stopping")
                        } else {
                            rx.await.unwrap_or_else(|_| {
                                Reply::err("the agent stopped before answering")
                            })
                        }
                    }
                    Err(e) => Reply::err(format!("bad command: {e}")),
                };
                let mut out = serde_json::to_string(&reply).unwrap_or_default();
                out.push('\n');
                if write.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The first 8 digits of a group id, for messages.
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Why a group frame cannot go to `number`, for people.
fn not_a_contact(number: &str) -> String {
    format!(
        "{number} is not a contact of yours yet (no session with {number} on this device); \
         add them with `micromsg contact add {number}` first"
    )
}

/// A DEPOSIT refusal, for people.
fn deposit_error(peer: &str, e: &LinkError) -> String {
    match e.code() {
        Some(ErrorCode::QuotaExceeded) => format!(
            "{peer}'s inbox at the broker is full (QUOTA-EXCEEDED): the message was not \
             deposited; nothing already held there was lost; try again later"
        ),
        Some(ErrorCode::NotFound) => format!(
            "the broker holds no contact pair with {peer} (NOT-FOUND): messages can be left \
             only for contacts set up with `contact add`"
        ),
        _ => format!("depositing the message for {peer} failed: {e}"),
    }
}

/// "in 30 days", "in 5 hours", … for an expiry time.
fn describe_expiry(expires: u64, now: u64) -> String {
    let secs = expires.saturating_sub(now);
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 120 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("in {n} {unit}, at unix time {expires}")
}
