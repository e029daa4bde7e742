//! The live session: one task per connection that seals what the application queues, opens
//! what the peer sends, keeps the session alive with heartbeats and ends it cleanly.
//!
//! The task `select!`s over: delivering a waiting event, the next frame, the outgoing queue,
//! writing buffered bytes (or flushing what a TLS writer holds back, for a session inside a
//! relay's connection), the heartbeat timer and the liveness deadline. Reading and writing
//! are independent branches, so two peers that both send faster than they read cannot
//! deadlock: a full event queue pauses only reading, a slow socket pauses only sending.
//!
//! Hot path: queued messages are drained in batches and sealed into one reused write buffer
//! (length prefix included), written with a non-blocking `try_write` first; frames already
//! buffered by the reader are opened without another trip through `select!`; timers are reset
//! lazily (checked when they fire) instead of per message; the send counter is published with
//! a relaxed atomic store. No locks.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use micromsg_crypto::SessionKeys;
use micromsg_crypto::handshake::{AbortReason, SESSION_ID_LEN, TYPE_ABORT};
use micromsg_crypto::message::{
    Body, DirectionKeys, Kind, MessageError, ReplayGuard, Sender, TYPE_DATA,
};
use micromsg_wire::io::{FrameReadError, FrameReader};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use super::{SessionConfig, Transport};

/// Messages taken from the outgoing queue per wake-up.
const SEND_BATCH: usize = 64;
/// Frames opened per wake-up without going back through `select!`.
const READ_BATCH: usize = 64;
/// Above this many unwritten bytes nothing more is sealed and the outgoing queue is not read
/// (backpressure). It also bounds what is sealed ahead of the socket, so a batch of large
/// messages is written while its bytes are still in the cache, not sealed whole (64 × 64 KiB)
/// first.
const WRITE_HIGH_WATER: usize = 256 * 1024;

/// Durable storage of a session's next send counter (protocol 12.7: the next counter is
/// persisted before a frame with the current one leaves the device).
///
/// Called from a blocking thread (`spawn_blocking`), at most once per
/// [`SessionConfig::counter_reservation`] frames; the session sends nothing with a counter at
/// or above the last persisted value until the call returns `Ok`. An error ends the session
/// with [`EndReason::CounterPersistFailed`].
pub trait CounterPersist: Send + Sync + fmt::Debug + 'static {
    /// Records durably that session `session_id` may have used every counter below
    /// `next_send_counter`. Must not lower a value already stored.
    fn persist_next_send_counter(
        &self,
        session_id: &[u8; SESSION_ID_LEN],
        next_send_counter: u64,
    ) -> io::Result<()>;
}

/// What the session reports to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A TEXT message, in order.
    Text {
        /// The peer's counter for it.
        counter: u64,
        /// The peer's clock when it sealed it (Unix seconds; informational).
        unix: u64,
        /// The message.
        text: String,
    },
    /// A GROUP frame (docs/groups.md): an opaque payload for the group layer, in order.
    Group {
        /// The peer's counter for it.
        counter: u64,
        /// The peer's clock when it sealed it (Unix seconds; informational).
        unix: u64,
        /// The payload (a JSON object for [`crate::groups`]).
        payload: Vec<u8>,
    },
    /// The peer proved it holds the session keys: its first authentic DATA frame arrived
    /// (protocol 12.3, key confirmation). Always the first event but [`PeerEvent::Ended`];
    /// content queued before it was held and goes out now. Only a confirmed session may seal
    /// offline messages (12.11).
    Confirmed,
    /// A MOVED notice (protocol.md 12.13), unchecked: [`crate::moving`] checks it.
    Moved {
        /// The peer's counter for it.
        counter: u64,
        /// The peer's clock when it sealed it (Unix seconds; informational).
        unix: u64,
        /// The notice.
        payload: Vec<u8>,
    },
    /// The session is over; always the last event.
    Ended(SessionEnd),
}

/// How a session ended, and the counters to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// Why it ended.
    pub reason: EndReason,
    /// The first send counter never used with these keys ([`u64::MAX`] once they are
    /// exhausted). Offline sealing with the same keys continues from here.
    pub next_send_counter: u64,
    /// The last counter received live, if any.
    pub last_recv_counter: Option<u64>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndReason {
    /// We closed it (DISCONNECT sent): [`SessionSender::close`], or every [`SessionSender`]
    /// was dropped, or the event receiver was dropped and an event could not be delivered.
    #[error("closed locally")]
    LocalClose,
    /// The peer sent DISCONNECT with this reason (possibly empty).
    #[error("the peer disconnected ({0:?})")]
    PeerDisconnected(String),
    /// No valid DATA frame for [`SessionConfig::missed_heartbeats`] intervals.
    #[error("the peer stopped sending (heartbeat timeout)")]
    HeartbeatTimeout,
    /// The TCP connection closed or failed without DISCONNECT.
    #[error("the connection was lost")]
    ConnectionLost,
    /// A frame was authentic but not the next in sequence (replayed, dropped or reordered).
    /// The frame was not delivered.
    #[error("replayed or out-of-order frame: counter {counter}, expected {expected}")]
    Replay {
        /// The counter presented.
        counter: u64,
        /// The counter due.
        expected: u64,
    },
    /// A frame failed authentication. It was not delivered.
    #[error("a frame failed authentication")]
    Tampered,
    /// The peer broke the protocol otherwise (bad frame type or length, unknown kind, invalid
    /// payload).
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// The peer sent ABORT after the handshake (it refused our FINISH).
    #[error("the peer aborted the handshake: {0:?}")]
    PeerAborted(AbortReason),
    /// The next send counter could not be persisted; nothing more was sent.
    #[error("cannot persist the send counter: {0}")]
    CounterPersistFailed(String),
    /// The send counter reached its end; these keys must not be used again.
    #[error("send counter exhausted")]
    CounterExhausted,
    /// No authentic DATA frame from the peer within [`SessionConfig::confirmation_timeout`]
    /// of the start: the peer may never have completed the handshake or kept the keys (12.3), so
    /// nothing queued was sent on it.
    #[error("the peer never confirmed the session keys")]
    Unconfirmed,
}

/// The counter and time a queued TEXT was sealed with, and the DATA frame itself (see
/// [`SessionSender::send_text_tracked`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Our counter for it.
    pub counter: u64,
    /// Our clock when sealing it (Unix seconds).
    pub unix: u64,
    /// The DATA frame as sent (from its `0x10` byte, without the length prefix): wrapped in an
    /// offline envelope it is the copy for other devices (protocol 13.3).
    pub frame: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("counter", &self.counter)
            .field("unix", &self.unix)
            .field("frame_len", &self.frame.len())
            .finish()
    }
}

/// Why a message could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The session has ended.
    #[error("the session has ended")]
    Closed,
    /// The outgoing queue is full ([`SessionSender::try_send_text`] only).
    #[error("the outgoing queue is full")]
    Full,
    /// The text does not fit one frame.
    #[error("text of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit, [`SessionConfig::max_text_len`].
        max: usize,
    },
}

enum Outgoing {
    Text {
        text: String,
        sealed: Option<oneshot::Sender<Sealed>>,
        /// The message's bytes of the queue's room, given back once it is sealed.
        _room: OwnedSemaphorePermit,
    },
    Group {
        payload: Vec<u8>,
        sealed: oneshot::Sender<Sealed>,
        /// GROUP, or MOVED: both opaque bytes tracked the same way.
        kind: Kind,
        _room: OwnedSemaphorePermit,
    },
    /// With a byte of room, taken after every send already waiting for room: a close
    /// never overtakes a message sent before it.
    Close(String, OwnedSemaphorePermit),
}

/// The outgoing queue's room in payload bytes ([`SessionConfig::outgoing_queue_bytes`]): a
/// message takes its length (at most all of it) before it is queued and gives it back once
/// sealed. When the session ends, its task drops what it had not sealed and the channel
/// what was queued, before it tells the application: the room comes back, and a sender that
/// was waiting for it finds the channel closed. Cheap to clone: the senders share one.
#[derive(Debug, Clone)]
struct Room {
    bytes: Arc<Semaphore>,
    /// What one message may take: all of the room, so a larger one still goes, alone.
    most: u32,
}

impl Room {
    fn new(bytes: usize) -> Self {
        let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(bytes)),
            most: u32::try_from(bytes).unwrap_or(u32::MAX),
        }
    }

    fn share(&self, len: usize) -> u32 {
        u32::try_from(len).unwrap_or(u32::MAX).min(self.most)
    }

    /// Waits for `len` bytes of room.
    async fn take(&self, len: usize) -> Result<OwnedSemaphorePermit, SendError> {
        Arc::clone(&self.bytes)
            .acquire_many_owned(self.share(len))
            .await
            .map_err(|_| SendError::Closed)
    }

    /// `len` bytes of room if there are that many now.
    fn try_take(&self, len: usize) -> Result<OwnedSemaphorePermit, SendError> {
        Arc::clone(&self.bytes)
            .try_acquire_many_owned(self.share(len))
            .map_err(|e| match e {
                TryAcquireError::NoPermits => SendError::Full,
                TryAcquireError::Closed => SendError::Closed,
            })
    }
}

/// State shared between the task and its handles: one atomic, no lock.
#[derive(Debug)]
struct Shared {
    next_send_counter: AtomicU64,
}

/// The sending side of a session; cheap to clone. The session closes (with DISCONNECT and an
/// empty reason) once every sender is dropped.
#[derive(Debug, Clone)]
pub struct SessionSender {
    tx: mpsc::Sender<Outgoing>,
    room: Room,
    max_text_len: usize,
    shared: Arc<Shared>,
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never show message bodies.
        match self {
            Self::Text { text, .. } => write!(f, "Text({} bytes)", text.len()),
            Self::Group { payload, .. } => write!(f, "Group({} bytes)", payload.len()),
            Self::Close(..) => f.write_str("Close"),
        }
    }
}

impl SessionSender {
    fn check(&self, text: &str) -> Result<(), SendError> {
        if text.len() > self.max_text_len {
            return Err(SendError::TooLong {
                len: text.len(),
                max: self.max_text_len,
            });
        }
        Ok(())
    }

    /// Queues a TEXT message, waiting while the queue is full.
    pub async fn send_text(&self, text: impl Into<String>) -> Result<(), SendError> {
        let text = text.into();
        self.check(&text)?;
        let room = self.room.take(text.len()).await?;
        self.tx
            .send(Outgoing::Text {
                text,
                sealed: None,
                _room: room,
            })
            .await
            .map_err(|_| SendError::Closed)
    }

    /// Queues a TEXT message if there is room now.
    pub fn try_send_text(&self, text: impl Into<String>) -> Result<(), SendError> {
        let text = text.into();
        self.check(&text)?;
        let room = self.room.try_take(text.len())?;
        self.tx
            .try_send(Outgoing::Text {
                text,
                sealed: None,
                _room: room,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            })
    }

    /// Queues a TEXT message; the receiver yields the counter and time it was sealed with (for
    /// the history), or an error if the session ended before it was sealed.
    pub async fn send_text_tracked(
        &self,
        text: impl Into<String>,
    ) -> Result<oneshot::Receiver<Sealed>, SendError> {
        let text = text.into();
        self.check(&text)?;
        let room = self.room.take(text.len()).await?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Outgoing::Text {
                text,
                sealed: Some(tx),
                _room: room,
            })
            .await
            .map_err(|_| SendError::Closed)?;
        Ok(rx)
    }

    /// Queues a GROUP frame (docs/groups.md), waiting while the queue is full; like
    /// [`SessionSender::send_text_tracked`], the receiver yields how it was sealed.
    pub async fn send_group(
        &self,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<Sealed>, SendError> {
        self.send_bytes(Kind::Group, payload).await
    }

    /// Queues a MOVED notice (protocol.md 12.13), tracked like [`SessionSender::send_group`].
    pub async fn send_moved(
        &self,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<Sealed>, SendError> {
        self.send_bytes(Kind::Moved, payload).await
    }

    async fn send_bytes(
        &self,
        kind: Kind,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<Sealed>, SendError> {
        if payload.len() > self.max_text_len {
            return Err(SendError::TooLong {
                len: payload.len(),
                max: self.max_text_len,
            });
        }
        let room = self.room.take(payload.len()).await?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Outgoing::Group {
                payload,
                sealed: tx,
                kind,
                _room: room,
            })
            .await
            .map_err(|_| SendError::Closed)?;
        Ok(rx)
    }

    /// Ends the session after the messages queued before: sends DISCONNECT with `reason`
    /// (cut to fit one frame), flushes and closes. Watch for [`PeerEvent::Ended`].
    pub async fn close(&self, reason: impl Into<String>) -> Result<(), SendError> {
        // The room is given out in the order asked for: one byte of it puts the close behind
        // a send that is still waiting for room.
        let room = self.room.take(1).await?;
        self.tx
            .send(Outgoing::Close(reason.into(), room))
            .await
            .map_err(|_| SendError::Closed)
    }

    /// The longest TEXT accepted, in bytes.
    pub fn max_text_len(&self) -> usize {
        self.max_text_len
    }

    /// The first send counter not yet used (updated as the session seals frames).
    pub fn next_send_counter(&self) -> u64 {
        self.shared.next_send_counter.load(Ordering::Relaxed)
    }

    /// True once the session task has stopped taking messages.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A running session: a [`SessionSender`] and the event queue.
#[derive(Debug)]
pub struct SessionHandle {
    sender: SessionSender,
    events: mpsc::Receiver<PeerEvent>,
    session_id: [u8; SESSION_ID_LEN],
}

impl SessionHandle {
    /// A sender for this session (clone it freely).
    pub fn sender(&self) -> SessionSender {
        self.sender.clone()
    }

    /// See [`SessionSender::send_text`].
    pub async fn send_text(&self, text: impl Into<String>) -> Result<(), SendError> {
        self.sender.send_text(text).await
    }

    /// See [`SessionSender::close`].
    pub async fn close(&self, reason: impl Into<String>) -> Result<(), SendError> {
        self.sender.close(reason).await
    }

    /// The next event; `None` after [`PeerEvent::Ended`] has been taken.
    pub async fn next_event(&mut self) -> Option<PeerEvent> {
        self.events.recv().await
    }

    /// The session id.
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.session_id
    }

    /// See [`SessionSender::next_send_counter`].
    pub fn next_send_counter(&self) -> u64 {
        self.sender.next_send_counter()
    }

    /// Splits the handle, for example to send and receive from different tasks.
    pub fn into_parts(self) -> (SessionSender, mpsc::Receiver<PeerEvent>) {
        (self.sender, self.events)
    }
}

pub(super) fn spawn(
    transport: Transport,
    keys: SessionKeys,
    persist: Option<Arc<dyn CounterPersist>>,
) -> SessionHandle {
    let Transport {
        reader,
        writer,
        cfg,
        ..
    } = transport;
    spawn_on(reader, writer, cfg, keys, persist)
}

/// The write half a session runs on: async writes, and a write that never waits (the hot
/// path tries it first).
///
/// Sessions run on TCP; the trait exists so that the session's timers (heartbeats, the
/// liveness deadline) are tested over an in-memory pipe on paused tokio time. A real socket
/// and a paused clock do not mix: the clock jumps ahead whenever the runtime waits for the
/// network, which fires those very timers.
pub(super) trait SessionWrite: AsyncWrite + Unpin + Send + 'static {
    /// Writes what fits now without waiting; `WouldBlock` when nothing does.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;

    /// Whether a write may leave bytes buffered that only a flush sends: true of TLS, whose
    /// records wait in rustls until the socket takes them. The session then flushes once it
    /// has nothing more to write.
    fn holds_writes(&self) -> bool {
        false
    }
}

impl SessionWrite for OwnedWriteHalf {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        OwnedWriteHalf::try_write(self, buf)
    }
}

impl SessionWrite for Box<dyn SessionWrite> {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (**self).try_write(buf)
    }

    fn holds_writes(&self) -> bool {
        (**self).holds_writes()
    }
}

/// The write half of a relay's TLS stream (a session inside the connection to the broker).
impl SessionWrite for WriteHalf<crate::link::Stream> {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_without_waiting(self, buf)
    }

    fn holds_writes(&self) -> bool {
        true
    }
}

/// [`SessionWrite::try_write`] for a writer that has no write of its own that never waits:
/// one poll with a no-op waker, pending being `WouldBlock`. Nobody is woken by it; the
/// session's `select!` polls the write (or the flush) again with its own waker before it sleeps.
pub(super) fn write_without_waiting<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &[u8],
) -> io::Result<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(writer).poll_write(&mut cx, buf) {
        Poll::Ready(result) => result,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// [`spawn`] on any stream halves.
pub(super) fn spawn_on<R, W>(
    reader: FrameReader<R>,
    writer: W,
    cfg: SessionConfig,
    keys: SessionKeys,
    persist: Option<Arc<dyn CounterPersist>>,
) -> SessionHandle
where
    R: AsyncRead + Unpin + Send + 'static,
    W: SessionWrite,
{
    let (out_tx, out_rx) = mpsc::channel(cfg.outgoing_queue);
    let room = Room::new(cfg.outgoing_queue_bytes);
    let (ev_tx, ev_rx) = mpsc::channel(cfg.event_queue);
    let shared = Arc::new(Shared {
        next_send_counter: AtomicU64::new(0),
    });
    let now = Instant::now();
    let SessionKeys {
        session_id,
        send,
        recv,
    } = keys;
    let task = Task {
        reader,
        writer,
        session_id,
        sender: Sender::new(send, 0),
        recv,
        guard: ReplayGuard::new(),
        out_rx,
        batch: Vec::with_capacity(SEND_BATCH),
        events: ev_tx,
        queued: VecDeque::new(),
        queued_bytes: 0,
        pending: None,
        app_gone: false,
        wbuf: Vec::new(),
        wpos: 0,
        unflushed: false,
        last_sent: now,
        last_recv: now,
        started: now,
        confirmed: false,
        reserved: if persist.is_some() { 0 } else { u64::MAX },
        persist,
        shared: Arc::clone(&shared),
        max_text_len: cfg.max_text_len(),
        cfg,
    };
    let sender = SessionSender {
        tx: out_tx,
        room,
        max_text_len: task.max_text_len,
        shared,
    };
    tokio::spawn(task.run());
    SessionHandle {
        sender,
        events: ev_rx,
        session_id,
    }
}

/// A payload to seal: text, which is UTF-8 by its type and is not checked again, or bytes,
/// which are checked against their kind.
enum Plain<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

struct Task<R, W> {
    reader: FrameReader<R>,
    writer: W,
    cfg: SessionConfig,
    session_id: [u8; SESSION_ID_LEN],
    /// Our send keys and next counter.
    sender: Sender,
    recv: DirectionKeys,
    /// Live rule: every frame's counter is exactly the last plus one.
    guard: ReplayGuard,
    out_rx: mpsc::Receiver<Outgoing>,
    /// Messages taken from `out_rx` and not sealed yet, the next one last (reversed, so
    /// they are taken with `pop`). Sealing stops at [`WRITE_HIGH_WATER`]; the rest waits here
    /// for the socket, and `out_rx` is read again once this is empty.
    batch: Vec<Outgoing>,
    events: mpsc::Sender<PeerEvent>,
    /// The payload length of each event in `events`, oldest first, and their sum: reading
    /// pauses while the sum is at [`SessionConfig::event_queue_bytes`]. Only this task sends
    /// into `events`, so the queue's length tells how many the application has taken.
    queued: VecDeque<usize>,
    queued_bytes: usize,
    /// An event the full queue could not take yet; reading pauses until it is delivered.
    pending: Option<PeerEvent>,
    /// The event receiver was dropped: nobody would see what arrives.
    app_gone: bool,
    /// Sealed frames with their length prefixes; `wbuf[..wpos]` is already written.
    wbuf: Vec<u8>,
    wpos: usize,
    /// A write went to a writer that may hold it back ([`SessionWrite::holds_writes`]): flush
    /// once everything is written.
    unflushed: bool,
    /// When the last frame was sealed (heartbeat timer).
    last_sent: Instant,
    /// When the last valid frame arrived (liveness deadline).
    last_recv: Instant,
    /// When the session started (the key confirmation deadline).
    started: Instant,
    /// An authentic DATA frame from the peer arrived: it holds the keys (12.3). Until then
    /// the outgoing queue is not read, so nothing the application sends is sealed with keys
    /// the peer may not have.
    confirmed: bool,
    /// Counters below this are durably reserved.
    reserved: u64,
    persist: Option<Arc<dyn CounterPersist>>,
    shared: Arc<Shared>,
    max_text_len: usize,
}

/// The bytes an event holds that count against [`SessionConfig::event_queue_bytes`].
fn payload_len(event: &PeerEvent) -> usize {
    match event {
        PeerEvent::Text { text, .. } => text.len(),
        PeerEvent::Group { payload, .. } | PeerEvent::Moved { payload, .. } => payload.len(),
        _ => 0,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<R, W> Task<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: SessionWrite,
{
    async fn run(mut self) {
        let reason = self.pump().await;
        let end = SessionEnd {
            reason,
            next_send_counter: self.next_send_counter(),
            last_recv_counter: self.guard.last(),
        };
        let Self {
            reader,
            mut writer,
            events,
            pending,
            cfg,
            out_rx,
            batch,
            ..
        } = self;
        // Nothing more is sealed. What waited goes now, its room with it, and the channel
        // closes: a sender waiting for room or for the queue, and a tracked send waiting for
        // its seal, learn the session ended now, not once the application has read the
        // events below (one that both sends and reads would otherwise wait for ever).
        drop((out_rx, batch));
        // Close the connection before telling the application.
        drop(reader);
        if writer.holds_writes() {
            // A TLS stream (a relay's): end it with close_notify, or the broker takes the end
            // for a lost connection and tells both devices so. Bounded: the peer may be gone.
            // (After a local close this only repeats the flush.)
            let _ = timeout(cfg.close_timeout, writer.shutdown()).await;
        }
        drop(writer);
        if let Some(event) = pending {
            let _ = events.send(event).await;
        }
        let _ = events.send(PeerEvent::Ended(end)).await;
    }

    fn next_send_counter(&self) -> u64 {
        self.sender.next_counter().unwrap_or(u64::MAX)
    }

    /// When the session ends for want of a frame from the peer: the liveness deadline, and
    /// before the peer confirmed the keys, at the latest the confirmation deadline.
    fn liveness_due(&self) -> Instant {
        let due = self.last_recv + self.cfg.liveness_timeout();
        if self.confirmed {
            due
        } else {
            due.min(self.started + self.cfg.confirmation_timeout())
        }
    }

    async fn pump(&mut self) -> EndReason {
        let interval = self.cfg.heartbeat_interval;
        // Key confirmation (12.3): our first DATA frame goes out at once, so the peer learns
        // without waiting a heartbeat interval that we hold the keys (and have stored them:
        // the application saved the session before starting it).
        if let Err(reason) = self.send_heartbeat().await {
            return reason;
        }
        let mut heartbeat = pin!(sleep_until(self.last_sent + interval));
        let mut liveness = pin!(sleep_until(self.liveness_due()));
        loop {
            let unwritten = self.wbuf.len() - self.wpos;
            let full = self.queue_full_of_bytes();
            // While the queue holds its byte budget: wait until the application takes an
            // event (one more free slot than now), instead of reading.
            let room = full.then(|| {
                let events = self.events.clone();
                let wanted = events.capacity() + 1;
                async move { drop(events.reserve_many(wanted).await) }
            });
            let step = tokio::select! {
                () = async { if let Some(room) = room { room.await } }, if full => {
                    // Also done when the application dropped its receiver: then nobody reads.
                    self.app_gone |= self.events.is_closed();
                    Ok(())
                }
                // Owned, so the permit does not borrow `self` into the other handlers; this
                // branch runs only when the application is behind.
                permit = self.events.clone().reserve_owned(), if self.pending.is_some() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(event) = self.pending.take() {
                                self.note_queued(&event);
                                permit.send(event);
                            }
                        }
                        Err(_) => self.app_gone = true,
                    }
                    Ok(())
                }
                frame = self.reader.next_frame(), if self.pending.is_none() && !full => {
                    self.handle_read(frame)
                }
                n = self.out_rx.recv_many(&mut self.batch, SEND_BATCH),
                    if self.confirmed && unwritten < WRITE_HIGH_WATER && self.batch.is_empty() =>
                {
                    if n == 0 {
                        // Every sender is gone: end the session in order.
                        return self.close_locally(String::new()).await;
                    }
                    self.batch.reverse();
                    match self.handle_outgoing().await {
                        Ok(Some(reason)) => return self.close_locally(reason).await,
                        Ok(None) => Ok(()),
                        Err(reason) => Err(reason),
                    }
                }
                written = write_or_flush(&mut self.writer, &self.wbuf[self.wpos..]),
                    if unwritten > 0 || self.unflushed =>
                {
                    match written {
                        Ok(None) => {
                            self.unflushed = false;
                            Ok(())
                        }
                        Ok(Some(n)) if n > 0 => {
                            self.advance(n);
                            // Room again: seal what waits in the batch.
                            match self.handle_outgoing().await {
                                Ok(Some(reason)) => return self.close_locally(reason).await,
                                Ok(None) => Ok(()),
                                Err(reason) => Err(reason),
                            }
                        }
                        _ => Err(EndReason::ConnectionLost),
                    }
                }
                () = &mut heartbeat => {
                    let due = self.last_sent + interval;
                    let step = if Instant::now() >= due {
                        self.send_heartbeat().await
                    } else {
                        Ok(())
                    };
                    heartbeat.as_mut().reset(self.last_sent + interval);
                    step
                }
                () = &mut liveness => {
                    if self.pending.is_some() || full {
                        // We stopped reading ourselves (the application is slow): not the
                        // peer's fault.
                        self.last_recv = Instant::now();
                    }
                    let due = self.liveness_due();
                    if Instant::now() >= due {
                        return if self.confirmed
                            || Instant::now() < self.started + self.cfg.confirmation_timeout()
                        {
                            EndReason::HeartbeatTimeout
                        } else {
                            EndReason::Unconfirmed
                        };
                    }
                    liveness.as_mut().reset(due);
                    Ok(())
                }
            };
            if let Err(reason) = step {
                return reason;
            }
            if self.app_gone {
                return self.close_locally(String::new()).await;
            }
        }
    }

    /// Handles one read result, then opens the frames the reader already holds.
    fn handle_read(
        &mut self,
        frame: Result<Option<Vec<u8>>, FrameReadError>,
    ) -> Result<(), EndReason> {
        self.handle_frame(frame)?;
        // `next_frame` returns at once when a whole frame is buffered; polling it with a no-op
        // waker takes those without a trip through `select!`. When it is pending, the next
        // `select!` polls it again with the task's waker, so no wake-up is lost.
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..READ_BATCH {
            if self.pending.is_some() || self.app_gone || self.queue_full_of_bytes() {
                break;
            }
            let next = pin!(self.reader.next_frame()).poll(&mut cx);
            match next {
                Poll::Ready(frame) => self.handle_frame(frame)?,
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    fn handle_frame(
        &mut self,
        frame: Result<Option<Vec<u8>>, FrameReadError>,
    ) -> Result<(), EndReason> {
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(EndReason::ConnectionLost),
            Err(FrameReadError::BadLength { len, max }) => {
                return Err(EndReason::ProtocolViolation(format!(
                    "frame length {len} outside 1..={max}"
                )));
            }
            Err(_) => return Err(EndReason::ConnectionLost),
        };
        match frame.as_slice() {
            [TYPE_DATA, ..] => {}
            [TYPE_ABORT, reason] => {
                return Err(EndReason::PeerAborted(AbortReason::from_byte(*reason)));
            }
            [t, ..] => {
                return Err(EndReason::ProtocolViolation(format!(
                    "unexpected frame type {t:#04x}"
                )));
            }
            [] => return Err(EndReason::ProtocolViolation("empty frame".into())),
        }
        let (header, body) = self.recv.open_owned(frame).map_err(|e| match e {
            MessageError::Tampered => EndReason::Tampered,
            other => EndReason::ProtocolViolation(other.to_string()),
        })?;
        self.guard
            .accept_next(header.counter)
            .map_err(|e| match e {
                MessageError::OutOfOrder { counter, expected } => {
                    EndReason::Replay { counter, expected }
                }
                other => EndReason::ProtocolViolation(other.to_string()),
            })?;
        self.last_recv = Instant::now();
        if !self.confirmed {
            self.confirmed = true;
            // The first event of the session, so the queue has room. An application that no
            // longer reads events is not a reason to drop what it queued before: only content
            // that cannot be delivered ends the session (`app_gone`).
            match self.events.try_send(PeerEvent::Confirmed) {
                Ok(()) => self.queued.push_back(0),
                Err(mpsc::error::TrySendError::Full(event)) => self.pending = Some(event),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        match (header.kind, body) {
            (Kind::Text, Body::Text(text)) => {
                self.deliver(PeerEvent::Text {
                    counter: header.counter,
                    unix: header.unix_secs,
                    text,
                });
            }
            (Kind::Group, Body::Bytes(payload)) => {
                self.deliver(PeerEvent::Group {
                    counter: header.counter,
                    unix: header.unix_secs,
                    payload,
                });
            }
            (Kind::Moved, Body::Bytes(payload)) => {
                self.deliver(PeerEvent::Moved {
                    counter: header.counter,
                    unix: header.unix_secs,
                    payload,
                });
            }
            (Kind::Disconnect, Body::Text(reason)) => {
                return Err(EndReason::PeerDisconnected(reason));
            }
            // HEARTBEAT only proves liveness; SYNC is reserved and ignored (12.8).
            _ => {}
        }
        Ok(())
    }

    fn deliver(&mut self, event: PeerEvent) {
        let len = payload_len(&event);
        match self.events.try_send(event) {
            Ok(()) => {
                self.queued.push_back(len);
                self.queued_bytes += len;
            }
            Err(mpsc::error::TrySendError::Full(event)) => self.pending = Some(event),
            Err(mpsc::error::TrySendError::Closed(_)) => self.app_gone = true,
        }
    }

    /// Counts `event`, about to go into the queue, in the queue's bytes.
    fn note_queued(&mut self, event: &PeerEvent) {
        let len = payload_len(event);
        self.queued.push_back(len);
        self.queued_bytes += len;
    }

    /// Whether the events the application has not taken yet carry the byte budget. Drops
    /// the ones it took from the count first: the queue's length says how many are left, and
    /// it takes them oldest first.
    fn queue_full_of_bytes(&mut self) -> bool {
        let left = self.events.max_capacity() - self.events.capacity();
        while self.queued.len() > left {
            if let Some(len) = self.queued.pop_front() {
                self.queued_bytes -= len;
            }
        }
        self.queued_bytes >= self.cfg.event_queue_bytes
    }

    /// Seals waiting messages and writes what the socket takes, until the batch is empty or
    /// [`WRITE_HIGH_WATER`] bytes wait for the socket. Returns the close reason if the batch
    /// holds a close (messages after it are dropped).
    async fn handle_outgoing(&mut self) -> Result<Option<String>, EndReason> {
        loop {
            if self.wbuf.len() - self.wpos >= WRITE_HIGH_WATER || self.batch.is_empty() {
                return Ok(None);
            }
            if let Some(reason) = self.seal_batch().await? {
                self.batch.clear();
                return Ok(Some(reason));
            }
            self.flush_now()?;
        }
    }

    /// Seals messages from the batch until it is empty or [`WRITE_HIGH_WATER`] bytes are
    /// unwritten.
    async fn seal_batch(&mut self) -> Result<Option<String>, EndReason> {
        self.reserve(self.batch.len() as u64).await?;
        let unix = unix_now();
        self.compact();
        while self.wbuf.len() - self.wpos < WRITE_HIGH_WATER {
            let Some(item) = self.batch.pop() else {
                break;
            };
            match item {
                Outgoing::Text {
                    text,
                    sealed,
                    _room: room,
                } => {
                    let start = self.wbuf.len();
                    let counter = self.seal(unix, Kind::Text, Plain::Text(&text))?;
                    // Sealed: its bytes now count against the write buffer, not the queue.
                    drop(room);
                    if let Some(sealed) = sealed {
                        // Only tracked sends pay for the copy of the frame.
                        let frame = self.wbuf.get(start + 4..).unwrap_or_default().to_vec();
                        let _ = sealed.send(Sealed {
                            counter,
                            unix,
                            frame,
                        });
                    }
                }
                Outgoing::Group {
                    payload,
                    sealed,
                    kind,
                    _room: room,
                } => {
                    let start = self.wbuf.len();
                    let counter = self.seal(unix, kind, Plain::Bytes(&payload))?;
                    drop(room);
                    let frame = self.wbuf.get(start + 4..).unwrap_or_default().to_vec();
                    let _ = sealed.send(Sealed {
                        counter,
                        unix,
                        frame,
                    });
                }
                Outgoing::Close(reason, _room) => return Ok(Some(reason)),
            }
        }
        Ok(None)
    }

    async fn send_heartbeat(&mut self) -> Result<(), EndReason> {
        self.reserve(1).await?;
        self.compact();
        self.seal(unix_now(), Kind::Heartbeat, Plain::Bytes(b""))?;
        self.flush_now()
    }

    /// Makes sure the next `count` counters are durably reserved.
    async fn reserve(&mut self, count: u64) -> Result<(), EndReason> {
        let next = self
            .sender
            .next_counter()
            .ok_or(EndReason::CounterExhausted)?;
        let needed = next.saturating_add(count);
        if needed <= self.reserved {
            return Ok(());
        }
        let Some(persist) = self.persist.clone() else {
            return Ok(());
        };
        let bound = needed.saturating_add(self.cfg.counter_reservation);
        let session_id = self.session_id;
        let done = tokio::task::spawn_blocking(move || {
            persist.persist_next_send_counter(&session_id, bound)
        })
        .await;
        match done {
            Ok(Ok(())) => {
                self.reserved = bound;
                Ok(())
            }
            Ok(Err(e)) => Err(EndReason::CounterPersistFailed(e.to_string())),
            Err(e) => Err(EndReason::CounterPersistFailed(e.to_string())),
        }
    }

    /// Seals one frame, with its length prefix, onto the write buffer. The counter must have
    /// been reserved.
    fn seal(&mut self, unix: u64, kind: Kind, payload: Plain<'_>) -> Result<u64, EndReason> {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; 4]);
        let sealed = match payload {
            Plain::Text(text) => self.sender.seal_str_into(unix, kind, text, &mut self.wbuf),
            Plain::Bytes(bytes) => self.sender.seal_into(unix, kind, bytes, &mut self.wbuf),
        };
        match sealed {
            Ok(counter) => {
                let len = (self.wbuf.len() - start - 4) as u32; // <= max_frame_len (checked)
                self.wbuf[start..start + 4].copy_from_slice(&len.to_be_bytes());
                self.shared
                    .next_send_counter
                    .store(self.next_send_counter(), Ordering::Relaxed);
                self.last_sent = Instant::now();
                Ok(counter)
            }
            Err(e) => {
                self.wbuf.truncate(start);
                Err(match e {
                    MessageError::CounterExhausted => EndReason::CounterExhausted,
                    other => EndReason::ProtocolViolation(other.to_string()),
                })
            }
        }
    }

    /// Writes what the socket takes without waiting; the rest goes in the write branch.
    fn flush_now(&mut self) -> Result<(), EndReason> {
        while self.wpos < self.wbuf.len() {
            match self.writer.try_write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(EndReason::ConnectionLost),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(EndReason::ConnectionLost),
            }
        }
        Ok(())
    }

    /// Drops the written front of the write buffer before frames are appended, but only when
    /// it is at least as long as the unwritten rest that moves: each byte is then moved at most
    /// once on average (dropping it after every partial write moved the unwritten rest again
    /// each time).
    fn compact(&mut self) {
        if self.wpos > 0 && self.wpos >= self.wbuf.len() - self.wpos {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
    }

    fn advance(&mut self, n: usize) {
        self.unflushed |= self.writer.holds_writes();
        self.wpos += n;
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
    }

    /// Sends DISCONNECT after everything queued, half-closes, and waits (bounded) for the
    /// peer to close, so our last bytes are not lost to a reset.
    async fn close_locally(&mut self, reason: String) -> EndReason {
        if let Err(end) = self.reserve(1).await {
            return end;
        }
        let reason = truncate_utf8(&reason, self.max_text_len);
        if let Err(end) = self.seal(unix_now(), Kind::Disconnect, Plain::Text(reason)) {
            return end;
        }
        let limit = self.cfg.close_timeout;
        let Self {
            reader,
            writer,
            wbuf,
            wpos,
            ..
        } = self;
        let send = async {
            writer.write_all(&wbuf[*wpos..]).await?;
            writer.shutdown().await
        };
        // Whatever the peer still sends after our DISCONNECT is discarded.
        let drain = async { while let Ok(Some(_)) = reader.next_frame().await {} };
        let _ = timeout(limit, async {
            let (_, ()) = tokio::join!(send, drain);
        })
        .await;
        EndReason::LocalClose
    }
}

/// Writes `pending`, or when it is empty, flushes what the writer holds back
/// ([`SessionWrite::holds_writes`]): `Some(bytes written)`, or `None` once flushed. One future
/// for both, as the `select!` branch that owns the writer.
fn write_or_flush<'a, W: AsyncWrite + Unpin>(
    writer: &'a mut W,
    pending: &'a [u8],
) -> impl Future<Output = io::Result<Option<usize>>> + 'a {
    std::future::poll_fn(move |cx| {
        if pending.is_empty() {
            std::pin::Pin::new(&mut *writer)
                .poll_flush(cx)
                .map_ok(|()| None)
        } else {
            std::pin::Pin::new(&mut *writer)
                .poll_write(cx, pending)
                .map_ok(Some)
        }
    })
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod timing_tests;

#[cfg(test)]
mod tests {
    use super::truncate_utf8;

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
