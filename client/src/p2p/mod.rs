//! The client-to-client session (protocol section 12): a thin tokio pump around the crypto
//! crate's sans-IO handshake and DATA frames, over plain TCP.
//!
//! ```text
//! connect / accept          handshake: INIT, ACCEPT, FINISH (or ABORT), under a timeout
//!   -> Established          peer identity, session keys, token id; nothing sent yet
//!        .start(persist)    spawns the session task
//!   -> SessionHandle        bounded queue in (TEXT, close), bounded queue out (PeerEvent)
//! ```
//!
//! Layout:
//! - `handshake`: the handshake pump ([`initiate`], [`respond`], and the [`connect`] /
//!   [`accept`] conveniences).
//! - `session`: the live session task, [`SessionHandle`], [`PeerEvent`], [`EndReason`].
//! - `stored`: [`StoredSession`], what is kept for offline use after the session ends.
//!
//! The handshake does not pin identities: [`Established`] hands the peer's identity key to the
//! caller, which checks it against its pins ([`crate::store::Store::pin_identity`]) before it
//! shows or sends anything. `initiate` and `respond` also take a check that runs *before* the
//! last handshake frame is sent, for callers that want to refuse a peer with ABORT 2.
//!
//! Key confirmation (protocol 12.3): a handshake cut off around FINISH can leave the keys on
//! one side only, so a started session sends a HEARTBEAT at once (the application saved the
//! session first), holds what the application queues until the peer's first authentic DATA
//! frame shows it holds the keys too ([`PeerEvent::Confirmed`]), and ends with
//! [`EndReason::Unconfirmed`], nothing queued sent, when none comes within
//! [`SessionConfig::confirmation_timeout`].
//!
//! Nothing here logs keys, tokens or message bodies.
//!
//! A responder's listen loop, in outline (`pending` maps token ids to the tokens and peer
//! numbers that CONTACT-CONNECTING delivered):
//!
//! ```text
//! let (stream, _) = listener.accept().await?;
//! let est = p2p::accept(stream, |id| pending.take(id).map(|p| p.token), &identity, cfg).await?;
//! let peer = number_for(est.token_id);
//! match store.pin_identity(&peer, &est.peer_identity, now)? {
//!     PinResult::Changed { old } => { /* warn loudly; show and send nothing until repin */ }
//!     _ => {}
//! }
//! store.save_new_session(&peer, &est.stored_session(now))?;      // before any counter is used
//! let mut session = est.start(Some(store.counter_persister(&peer)?));
//! while let Some(event) = session.next_event().await {
//!     match event {
//!         PeerEvent::Confirmed => { store.confirm_session(&session.session_id())?; }
//!         PeerEvent::Text { counter, unix, text } => { /* store.append_history(...) */ }
//!         PeerEvent::Ended(end) => { /* load, record_end(&end), save_session */ }
//!         _ => {}
//!     }
//! }
//! ```

mod handshake;
mod session;
mod stored;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use micromsg_crypto::handshake::{ACCEPT_LEN, HandshakeError, Role, SESSION_ID_LEN, TOKEN_ID_LEN};
use micromsg_crypto::hex;
use micromsg_crypto::identity::IdentityPublicKey;
use micromsg_crypto::message::{MAX_HEADER_STRING_LEN, PREFIX_LEN};
use micromsg_crypto::{SessionKeys, aead::TAG_LEN};
use micromsg_wire::io::{FrameReadError, FrameReader};
use tokio::io::AsyncRead;
use tokio::net::TcpStream;

pub use handshake::{accept, connect, initiate, respond};
pub use session::{
    CounterPersist, EndReason, PeerEvent, Sealed, SendError, SessionEnd, SessionHandle,
    SessionSender,
};
pub use stored::StoredSession;

/// Default largest frame body: 1 MiB + 128 bytes (protocol 12.2, `max_p2p_frame`).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 1_048_704;

/// Limits and timers of one session. Every field has a protocol default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// A HEARTBEAT is sent when nothing was sent for this long. Default 10 s (12.9).
    pub heartbeat_interval: Duration,
    /// The session is dead when no valid DATA frame arrived for this many intervals.
    /// Default 3 (30 s with the default interval).
    pub missed_heartbeats: u32,
    /// Largest frame body accepted or sent, in bytes; at least 193 (an ACCEPT). Default
    /// [`DEFAULT_MAX_FRAME_LEN`]. One frame buffer of this size may be held per session.
    pub max_frame_len: u32,
    /// The whole handshake (including the TCP connect for [`connect`]) must finish within
    /// this. Default 10 s (12.1). The peer's first DATA frame (key confirmation, 12.3) must
    /// then arrive within as long again plus one heartbeat interval
    /// ([`SessionConfig::confirmation_timeout`]), or the session ends with
    /// [`EndReason::Unconfirmed`].
    pub handshake_timeout: Duration,
    /// How long a local close may take to flush DISCONNECT and wait for the peer to close
    /// the connection. Default 2 s.
    pub close_timeout: Duration,
    /// Capacity of the outgoing queue, in messages. When full, [`SessionSender::send_text`]
    /// waits and [`SessionSender::try_send_text`] fails with [`SendError::Full`]. Default 1024.
    pub outgoing_queue: usize,
    /// Most payload bytes (texts, group frames, notices) the outgoing queue holds before they
    /// are sealed: past it, sending waits (or [`SessionSender::try_send_text`] fails with
    /// [`SendError::Full`]) as when the queue is full, so an application sending large
    /// messages faster than the peer takes them holds this much, not `outgoing_queue` × the
    /// largest message. A message larger than this waits for an empty queue. Default 16 MiB.
    pub outgoing_queue_bytes: usize,
    /// Capacity of the event queue, in events. When full, the session stops reading from the
    /// socket (TCP flow control pushes back on the peer) but keeps sending. Default 1024.
    pub event_queue: usize,
    /// Most payload bytes (texts, group frames, notices) the event queue holds: once the
    /// events waiting for the application carry this much, the session stops reading as when
    /// the queue is full, so a peer sending large messages to a slow application cannot make
    /// it hold `event_queue` × the largest frame (about 1 GiB). One event may pass it (a frame
    /// is never split). Default 16 MiB.
    pub event_queue_bytes: usize,
    /// With a [`CounterPersist`], send counters are reserved on disk this many at a time, so
    /// a crash can never reuse one and the disk is touched once per block. Default 65 536.
    pub counter_reservation: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 3,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            outgoing_queue: 1024,
            outgoing_queue_bytes: 16 << 20,
            event_queue: 1024,
            event_queue_bytes: 16 << 20,
            counter_reservation: 65_536,
        }
    }
}

impl SessionConfig {
    /// Checks the values that would make a session unusable.
    pub fn validate(&self) -> Result<(), P2pError> {
        let bad = |what| Err(P2pError::Config(what));
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be positive");
        }
        if self.missed_heartbeats == 0 {
            return bad("missed_heartbeats must be at least 1");
        }
        if (self.max_frame_len as usize) < ACCEPT_LEN {
            return bad("max_frame_len must be at least 193 (an ACCEPT frame)");
        }
        if self.outgoing_queue == 0
            || self.outgoing_queue_bytes == 0
            || self.event_queue == 0
            || self.event_queue_bytes == 0
        {
            return bad("queue capacities must be at least 1");
        }
        if self.counter_reservation == 0 {
            return bad("counter_reservation must be at least 1");
        }
        Ok(())
    }

    /// The longest TEXT (in bytes) that fits one frame whatever the counter and clock.
    pub fn max_text_len(&self) -> usize {
        // prefix, the longest header string and its tag, the kind byte, the body tag.
        (self.max_frame_len as usize)
            .saturating_sub(PREFIX_LEN + MAX_HEADER_STRING_LEN + TAG_LEN + 1 + TAG_LEN)
    }

    /// How long a started session waits for the peer's first DATA frame (key confirmation,
    /// 12.3) before it ends with [`EndReason::Unconfirmed`]: the handshake timeout plus one
    /// heartbeat interval (20 s by default). The interval is there for a peer that sends its
    /// first HEARTBEAT only after an interval of silence, as 12.9 had it before 12.3 asked for
    /// one at once: a deadline of one interval would race that HEARTBEAT.
    pub fn confirmation_timeout(&self) -> Duration {
        self.handshake_timeout
            .saturating_add(self.heartbeat_interval)
    }

    /// No valid DATA frame for this long ends the session.
    pub fn liveness_timeout(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.missed_heartbeats)
    }
}

/// Why a handshake failed. The ABORT (if any) has already been sent and the connection closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum P2pError {
    /// The [`SessionConfig`] is unusable.
    #[error("invalid session config: {0}")]
    Config(&'static str),
    /// The TCP connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed during the handshake.
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// A frame could not be read (bad length, truncated).
    #[error("bad handshake frame: {0}")]
    Frame(#[source] FrameReadError),
    /// The handshake did not complete in time.
    #[error("the handshake did not complete within {0:?}")]
    Timeout(Duration),
    /// The peer's handshake frame was refused (we sent ABORT), or the peer aborted.
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    /// Our own check refused the peer's identity key (we sent ABORT 2).
    #[error("the peer's identity key was refused")]
    PeerRefused,
    /// The broker relay could not be opened (protocol.md 6.26).
    #[error("no direct connection, and {0}")]
    Relay(String),
}

impl P2pError {
    /// True when the peer sent ABORT (rather than us refusing it or the network failing).
    pub fn peer_aborted(&self) -> bool {
        matches!(self, Self::Handshake(HandshakeError::PeerAborted(_)))
    }
}

/// What a handshake, and then its session, runs on.
#[derive(Debug)]
pub enum PeerStream {
    /// A TCP connection between the two clients.
    Direct(TcpStream),
    /// This device's half of a broker relay (protocol.md 6.26), from [`crate::relay::open`]:
    /// the session runs inside the TLS connection to the home broker. (Boxed: a TLS
    /// connection's state is a kilobyte, a socket's a few words.)
    Relayed(Box<crate::relay::Relayed>),
}

impl From<TcpStream> for PeerStream {
    fn from(stream: TcpStream) -> Self {
        Self::Direct(stream)
    }
}

impl From<crate::relay::Relayed> for PeerStream {
    fn from(relayed: crate::relay::Relayed) -> Self {
        Self::Relayed(Box::new(relayed))
    }
}

/// The read side of a [`PeerStream`].
type ReadSide = Box<dyn AsyncRead + Send + Unpin>;
/// The write side of a [`PeerStream`].
type WriteSide = Box<dyn session::SessionWrite>;

/// The stream's halves and settings, carried from the handshake to the session task.
struct Transport {
    /// Still holds any DATA the initiator sent right after FINISH.
    reader: FrameReader<ReadSide>,
    writer: WriteSide,
    peer_addr: Option<SocketAddr>,
    cfg: SessionConfig,
}

/// A completed handshake. Nothing has been sent on the session yet; call
/// [`Established::start`] (after checking [`Established::peer_identity`] against the pins and
/// saving [`Established::stored_session`]) to run it, or [`Established::close`] to refuse it.
/// Dropping it closes the connection abruptly, without DISCONNECT.
pub struct Established {
    /// The peer's long-term identity key, authenticated by its transcript signature.
    pub peer_identity: IdentityPublicKey,
    /// This side's keys; `keys.session_id` names the session.
    pub keys: SessionKeys,
    /// The id of the connect token used (the responder finds the peer's number by it).
    pub token_id: [u8; TOKEN_ID_LEN],
    /// Which end of the handshake we were.
    pub role: Role,
    transport: Transport,
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established")
            .field("peer_identity", &self.peer_identity)
            .field("session_id", &hex::encode(&self.keys.session_id))
            .field("role", &self.role)
            .field("peer_addr", &self.transport.peer_addr)
            .finish_non_exhaustive()
    }
}

impl Established {
    /// The session id (not secret; offline envelopes carry it in clear).
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.keys.session_id
    }

    /// The peer's TCP address, when known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.transport.peer_addr
    }

    /// The session's durable record at its start (next send counter 0, nothing received);
    /// save it before [`Established::start`] so a [`CounterPersist`] has something to raise.
    pub fn stored_session(&self, now_unix: u64) -> StoredSession {
        StoredSession::new(&self.keys, self.role, self.peer_identity, now_unix)
    }

    /// Spawns the session task (on the current tokio runtime) and returns its handle.
    ///
    /// With `persist`, send counters are reserved on disk in blocks of
    /// [`SessionConfig::counter_reservation`] before they are used (protocol 12.7: a crash must
    /// not reuse a counter). Without it nothing is written: the caller must persist
    /// [`SessionEnd::next_send_counter`] when the session ends, and a crash before that could
    /// reuse counters if the keys are used again.
    pub fn start(self, persist: Option<Arc<dyn CounterPersist>>) -> SessionHandle {
        session::spawn(self.transport, self.keys, persist)
    }

    /// Ends the connection without starting the session (the peer's identity was refused,
    /// say), in order, as a session's end does: a relayed one with TLS `close_notify`, so the
    /// broker tells both devices that the session ended rather than that a connection was lost
    /// (protocol.md 6.26). Runs on a task of its own (on the current tokio runtime), bounded by
    /// [`SessionConfig::close_timeout`].
    pub fn close(self) {
        let Transport {
            mut writer, cfg, ..
        } = self.transport;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                cfg.close_timeout,
                tokio::io::AsyncWriteExt::shutdown(&mut writer),
            )
            .await;
        });
    }
}
