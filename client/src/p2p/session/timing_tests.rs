//! The session's timers on paused tokio time, over an in-memory pipe: the confirming heartbeat
//! at the start and content held until the peer confirms the keys (protocol 12.3), the end of
//! a session the peer never confirms, a heartbeat after an interval without sending, the end
//! after the liveness timeout without a valid frame, and a slow reader not taken for a silent
//! peer, and a writer that holds writes back (TLS) flushed without a later write. Deterministic and instant: the paused clock moves only when every task waits, and then
//! straight to the next timer.

#![allow(clippy::unwrap_used)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use micromsg_crypto::handshake::{Initiator, Responder};
use micromsg_crypto::message::Kind;
use micromsg_crypto::{IdentityKey, Secret32, SessionKeys};
use micromsg_wire::io::{FrameReader, write_frame};
use rand_core::OsRng;
use tokio::io::{AsyncWrite, DuplexStream, ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

use super::{EndReason, PeerEvent, SendError, SessionEnd, SessionHandle, SessionWrite, spawn_on};
use crate::p2p::SessionConfig;

const INTERVAL: Duration = Duration::from_secs(10);
const MS: Duration = Duration::from_millis(1);
/// Longer than any test here runs on the paused clock: a wait that reaches it is a failure,
/// not an endless run of heartbeats.
const NEVER: Duration = Duration::from_secs(3600);

impl SessionWrite for WriteHalf<DuplexStream> {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        super::write_without_waiting(self, buf)
    }
}

/// A writer that keeps what it is given until it is flushed, as a TLS stream keeps records in
/// rustls while its socket is full (`SessionWrite::holds_writes`).
struct Holding {
    inner: WriteHalf<DuplexStream>,
    held: Vec<u8>,
}

impl AsyncWrite for Holding {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.held.is_empty() {
            let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
            this.held.drain(..n);
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl SessionWrite for Holding {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.held.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn holds_writes(&self) -> bool {
        true
    }
}

fn config() -> SessionConfig {
    SessionConfig {
        heartbeat_interval: INTERVAL,
        missed_heartbeats: 3,
        ..SessionConfig::default()
    }
}

/// Both ends' session keys, from a handshake run in memory.
fn keys() -> (SessionKeys, SessionKeys) {
    let token = Secret32::from_bytes([9; 32]);
    let initiator_id = IdentityKey::from_seed(&Secret32::from_bytes([1; 32]));
    let responder_id = IdentityKey::from_seed(&Secret32::from_bytes([2; 32]));
    let (initiator, init) = Initiator::new(&mut OsRng, &initiator_id, &token);
    let (responder, accept) =
        Responder::handle_init(&mut OsRng, &responder_id, &init, |_| Some(token.clone())).unwrap();
    let outcome = initiator.handle_accept(&accept).unwrap();
    let responder_keys = responder.handle_finish(&outcome.finish).unwrap();
    (outcome.keys, responder_keys)
}

type End = (FrameReader<ReadHalf<DuplexStream>>, WriteHalf<DuplexStream>);

/// The two ends of an in-memory connection.
fn pipe(max_frame_len: u32) -> (End, End) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let end = |stream| {
        let (read, write) = tokio::io::split(stream);
        (FrameReader::new(read, max_frame_len), write)
    };
    (end(a), end(b))
}

/// Two sessions talking to each other.
fn two_sessions(a: SessionConfig, b: SessionConfig) -> (SessionHandle, SessionHandle) {
    let (ka, kb) = keys();
    let ((ra, wa), (rb, wb)) = pipe(a.max_frame_len.max(b.max_frame_len));
    (spawn_on(ra, wa, a, ka, None), spawn_on(rb, wb, b, kb, None))
}

/// The other end of a session, played by the test with the crypto crate.
struct RawPeer {
    reader: FrameReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
    keys: SessionKeys,
    next_counter: u64,
}

/// A session against a raw peer.
fn session_and_peer(cfg: SessionConfig) -> (SessionHandle, RawPeer) {
    let (ka, kb) = keys();
    let ((ra, wa), (reader, writer)) = pipe(cfg.max_frame_len);
    let session = spawn_on(ra, wa, cfg, ka, None);
    let peer = RawPeer {
        reader,
        writer,
        keys: kb,
        next_counter: 0,
    };
    (session, peer)
}

impl RawPeer {
    /// The next frame the session sent, opened: its counter and kind; `None` once the session
    /// closed the connection.
    async fn next(&mut self) -> Option<(u64, Kind)> {
        let frame = timeout(NEVER, self.reader.next_frame())
            .await
            .expect("the session neither sent nor closed")
            .unwrap()?;
        let opened = self.keys.recv.open(&frame).unwrap();
        Some((opened.counter, opened.kind))
    }

    /// Asserts that the session sends nothing before `deadline`.
    async fn nothing_before(&mut self, deadline: Instant) {
        let early = timeout_at(deadline, self.reader.next_frame()).await;
        assert!(
            early.is_err(),
            "the session sent or closed early: {early:?}"
        );
    }

    /// Sends a valid frame of `kind`.
    async fn send(&mut self, kind: Kind, payload: &[u8]) {
        let frame = self
            .keys
            .send
            .seal(self.next_counter, 1_700_000_000, kind, payload)
            .unwrap();
        self.next_counter += 1;
        write_frame(&mut self.writer, &frame).await.unwrap();
    }
}

async fn next_event(session: &mut SessionHandle) -> PeerEvent {
    timeout(NEVER, session.next_event())
        .await
        .expect("no event")
        .expect("the event queue closed before Ended")
}

async fn ended(session: &mut SessionHandle) -> SessionEnd {
    loop {
        if let PeerEvent::Ended(end) = next_event(session).await {
            return end;
        }
    }
}

/// The next text, past the key confirmation (the first event of a session).
async fn text(session: &mut SessionHandle) -> (u64, String) {
    loop {
        match next_event(session).await {
            PeerEvent::Confirmed => {}
            PeerEvent::Text { counter, text, .. } => return (counter, text),
            other => panic!("expected a text, got {other:?}"),
        }
    }
}

/// Asserts that the session reports nothing (in particular not its end) before `deadline`.
async fn no_event_before(session: &mut SessionHandle, deadline: Instant) {
    let early = timeout_at(deadline, session.next_event()).await;
    assert!(early.is_err(), "an event early: {early:?}");
}

#[tokio::test(start_paused = true)]
async fn content_waits_until_the_peer_confirms_the_keys() {
    let (mut session, mut peer) = session_and_peer(config());
    let started = Instant::now();
    let sealed = session.sender().send_text_tracked("held").await.unwrap();
    // At once: the confirming HEARTBEAT, and nothing else while the peer has not answered.
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    assert_eq!(started.elapsed(), Duration::ZERO);
    sleep(Duration::from_secs(5)).await;
    no_event_before(&mut session, Instant::now() + MS).await;
    // The peer's first DATA frame proves it holds the keys: the text goes out now.
    peer.send(Kind::Heartbeat, b"").await;
    assert_eq!(next_event(&mut session).await, PeerEvent::Confirmed);
    assert_eq!(peer.next().await, Some((1, Kind::Text)));
    assert_eq!(sealed.await.unwrap().counter, 1);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_confirms_ends_the_session_with_nothing_sent() {
    let cfg = SessionConfig {
        // A liveness deadline beyond the confirmation deadline, so this one is what ends it.
        missed_heartbeats: 30,
        ..config()
    };
    let limit = cfg.confirmation_timeout();
    assert_eq!(limit, cfg.handshake_timeout + cfg.heartbeat_interval);
    assert!(limit < cfg.liveness_timeout());
    let interval = cfg.heartbeat_interval.as_secs_f64();
    let (mut session, mut peer) = session_and_peer(cfg);
    let started = Instant::now();
    let sealed = session
        .sender()
        .send_text_tracked("never sealed")
        .await
        .unwrap();
    no_event_before(&mut session, started + limit - MS).await;
    let end = ended(&mut session).await;
    assert_eq!(end.reason, EndReason::Unconfirmed);
    assert_eq!(started.elapsed(), limit);
    assert!(sealed.await.is_err(), "the text was not sealed");
    // Only HEARTBEATs went out (the one at the start, and one at the interval when it does
    // not race the deadline), then the connection closed.
    let mut kinds = Vec::new();
    while let Some((counter, kind)) = peer.next().await {
        assert_eq!(counter, kinds.len() as u64);
        kinds.push(kind);
    }
    let most = 1 + (limit.as_secs_f64() / interval) as usize;
    assert!((1..=most).contains(&kinds.len()), "{kinds:?}");
    assert!(kinds.iter().all(|k| *k == Kind::Heartbeat), "{kinds:?}");
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_goes_out_after_an_interval_without_sending() {
    let (session, mut peer) = session_and_peer(config());
    let started = Instant::now();
    assert_eq!(
        peer.next().await,
        Some((0, Kind::Heartbeat)),
        "at the start"
    );
    peer.send(Kind::Heartbeat, b"").await;
    peer.nothing_before(started + INTERVAL - MS).await;
    assert_eq!(peer.next().await, Some((1, Kind::Heartbeat)));
    assert_eq!(started.elapsed(), INTERVAL);

    // A message restarts the interval: the next heartbeat is one interval after it.
    sleep(Duration::from_secs(4)).await;
    session.send_text("between heartbeats").await.unwrap();
    let sent = Instant::now();
    assert_eq!(peer.next().await, Some((2, Kind::Text)));
    peer.nothing_before(sent + INTERVAL - MS).await;
    assert_eq!(peer.next().await, Some((3, Kind::Heartbeat)));
    assert_eq!(sent.elapsed(), INTERVAL);
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_ends_the_session_after_the_liveness_timeout() {
    let cfg = config();
    let dead_after = cfg.liveness_timeout();
    assert_eq!(dead_after, 3 * INTERVAL);
    let (mut session, mut peer) = session_and_peer(cfg);
    // The peer confirms the keys at the start, then falls silent.
    peer.send(Kind::Heartbeat, b"").await;
    let started = Instant::now();
    assert_eq!(next_event(&mut session).await, PeerEvent::Confirmed);
    no_event_before(&mut session, started + dead_after - MS).await;
    let end = ended(&mut session).await;
    assert_eq!(end.reason, EndReason::HeartbeatTimeout);
    assert_eq!(started.elapsed(), dead_after);
    // Meanwhile the session sent its heartbeats (the one at the start, one per interval; the
    // last one may race the deadline), then closed the connection.
    let mut kinds = Vec::new();
    while let Some((counter, kind)) = peer.next().await {
        assert_eq!(counter, kinds.len() as u64);
        kinds.push(kind);
    }
    assert!((3..=4).contains(&kinds.len()), "{kinds:?}");
    assert!(kinds.iter().all(|k| *k == Kind::Heartbeat), "{kinds:?}");
    assert_eq!(end.next_send_counter, kinds.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn a_frame_from_the_peer_restarts_the_liveness_timeout() {
    let cfg = config();
    let dead_after = cfg.liveness_timeout();
    let (mut session, mut peer) = session_and_peer(cfg);
    peer.send(Kind::Heartbeat, b"").await;
    sleep(dead_after - Duration::from_secs(5)).await;
    peer.send(Kind::Heartbeat, b"").await;
    let heard = Instant::now();
    assert_eq!(next_event(&mut session).await, PeerEvent::Confirmed);
    no_event_before(&mut session, heard + dead_after - MS).await;
    let end = ended(&mut session).await;
    assert_eq!(end.reason, EndReason::HeartbeatTimeout);
    assert_eq!(heard.elapsed(), dead_after);
    assert_eq!(end.last_recv_counter, Some(1));
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_an_idle_session_alive() {
    let (mut a, mut b) = two_sessions(config(), config());
    // Ten and a half intervals with no traffic but heartbeats: the confirming one at the
    // start and ten more from each side.
    sleep(INTERVAL * 21 / 2).await;
    assert_eq!(a.next_send_counter(), 11, "heartbeats use counters");
    assert_eq!(b.next_send_counter(), 11);
    a.send_text("still here").await.unwrap();
    assert_eq!(text(&mut b).await, (11, "still here".to_owned()));
    b.close("done").await.unwrap();
    assert_eq!(
        ended(&mut a).await.reason,
        EndReason::PeerDisconnected("done".into())
    );
    assert_eq!(ended(&mut b).await.reason, EndReason::LocalClose);
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_does_not_time_out_or_lose_messages() {
    let cfg = SessionConfig {
        event_queue: 2,
        outgoing_queue: 4,
        ..config()
    };
    let (a, mut b) = two_sessions(cfg.clone(), cfg.clone());
    for n in 0..50 {
        a.send_text(format!("m{n}")).await.unwrap();
    }
    // b's application does not read for ten and a half liveness periods: b stops reading its
    // end of the connection, and does not blame a for the silence. (Not a whole number of
    // periods: were the application to catch up at the very instant b's liveness timer
    // fires, the session could end with HeartbeatTimeout, as it refreshes its last-heard
    // time when that timer fires while it is not reading, not when it resumes reading. A
    // coincidence in real time, a certainty on the paused clock.)
    sleep(cfg.liveness_timeout() * 21 / 2).await;
    for n in 0..50 {
        assert_eq!(text(&mut b).await, (n + 1, format!("m{n}")));
    }
    a.close("").await.unwrap();
    assert_eq!(
        ended(&mut b).await.reason,
        EndReason::PeerDisconnected(String::new())
    );
}

/// A peer that follows 12.9 as it was before 12.3 asked for a HEARTBEAT at once sends its
/// first frame only after a heartbeat interval of silence: the session waits for it.
#[tokio::test(start_paused = true)]
async fn a_peer_whose_first_heartbeat_comes_after_an_interval_confirms_in_time() {
    let cfg = SessionConfig {
        handshake_timeout: INTERVAL,
        ..config()
    };
    let (mut session, mut peer) = session_and_peer(cfg.clone());
    let started = Instant::now();
    let sealed = session.sender().send_text_tracked("late").await.unwrap();
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    // The old peer's first HEARTBEAT: one interval after the start plus the handshake's
    // time, at the latest just before the deadline.
    sleep_until(started + cfg.confirmation_timeout() - MS).await;
    peer.send(Kind::Heartbeat, b"").await;
    assert_eq!(next_event(&mut session).await, PeerEvent::Confirmed);
    let mut counter = None;
    while let Some((c, kind)) = peer.next().await {
        if kind == Kind::Text {
            counter = Some(c);
            break;
        }
    }
    assert_eq!(sealed.await.unwrap().counter, counter.unwrap());
}

/// A peer sending more than the event queue's byte budget to an application that does not
/// read: the session holds about the budget and stops reading (the rest waits in the
/// connection), without blaming the peer for the silence; everything arrives once the
/// application reads.
#[tokio::test(start_paused = true)]
async fn a_slow_reader_holds_at_most_the_byte_budget() {
    let cfg = SessionConfig {
        event_queue_bytes: 3_000,
        ..config()
    };
    assert!(cfg.event_queue >= 20, "the count is not what limits here");
    let (mut session, mut peer) = session_and_peer(cfg.clone());
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    let texts: Vec<String> = (0..20)
        .map(|n| format!("{n:04}{}", "x".repeat(996)))
        .collect();
    for text in &texts {
        peer.send(Kind::Text, text.as_bytes()).await;
    }
    sleep(cfg.liveness_timeout() * 3 / 2).await;
    // The confirmation, then texts up to the budget: 3 × 1,000 bytes.
    assert_eq!(session.events.len(), 4);
    let mut got = Vec::new();
    while got.len() < texts.len() {
        got.push(text(&mut session).await.1);
        // Each text taken makes room for about one more, never more than the budget.
        assert!(session.events.len() <= 3, "{}", session.events.len());
    }
    assert_eq!(got, texts);
    assert!(!session.sender().is_closed(), "the session is still up");
}

/// An application sending faster than the session seals: the outgoing queue holds at most its
/// byte budget of unsealed payload (past it `try_send_text` says Full and a send waits), sealing
/// gives the room back, a message larger than the whole budget still goes (alone), and a send
/// waiting for room learns when the session ends instead of waiting for ever.
#[tokio::test(start_paused = true)]
async fn the_outgoing_queue_holds_at_most_its_byte_budget() {
    let cfg = SessionConfig {
        outgoing_queue_bytes: 3_000,
        ..config()
    };
    assert!(
        cfg.outgoing_queue >= 20,
        "the count is not what limits here"
    );
    let (session, mut peer) = session_and_peer(cfg.clone());
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    let sender = session.sender();
    // Until the peer confirms, the session seals nothing: the queue fills.
    for n in 0..3 {
        sender
            .try_send_text(format!("{n:04}{}", "x".repeat(996)))
            .unwrap();
    }
    assert_eq!(sender.try_send_text("y"), Err(SendError::Full));
    let larger = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send_text("z".repeat(5_000)).await }
    });
    sleep(MS).await;
    assert!(!larger.is_finished(), "a send went past the budget");
    peer.send(Kind::Heartbeat, b"").await;
    for counter in 1..=4 {
        assert_eq!(peer.next().await, Some((counter, Kind::Text)));
    }
    larger.await.unwrap().unwrap();
    sender.try_send_text("room again").unwrap();
    assert_eq!(peer.next().await, Some((5, Kind::Text)));

    // A session that ends while a send waits for room: the send says so.
    let (other, _peer) = session_and_peer(cfg.clone());
    let sender = other.sender();
    sender.try_send_text("w".repeat(3_000)).unwrap();
    let waiting = tokio::spawn(async move { sender.send_text("v").await });
    // Never confirmed: the session ends at the confirmation deadline.
    assert_eq!(
        timeout(cfg.confirmation_timeout() * 2, waiting)
            .await
            .expect("a send waiting for room outlived its session")
            .unwrap(),
        Err(SendError::Closed)
    );
    drop(other);
}

/// A close asked for while a message still waits for room goes out after that message: it
/// does not overtake it (the message would then be refused as sent after the close).
#[tokio::test(start_paused = true)]
async fn a_close_waits_behind_a_send_waiting_for_room() {
    let cfg = SessionConfig {
        outgoing_queue_bytes: 1_000,
        ..config()
    };
    let (session, mut peer) = session_and_peer(cfg);
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    let sender = session.sender();
    // Unconfirmed, nothing is sealed: the first text takes all the room.
    sender.try_send_text("a".repeat(1_000)).unwrap();
    let waiting = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send_text("b".repeat(1_000)).await }
    });
    sleep(MS).await;
    let closing = tokio::spawn(async move { sender.close("bye").await });
    sleep(MS).await;
    assert!(!waiting.is_finished() && !closing.is_finished());
    peer.send(Kind::Heartbeat, b"").await;
    assert_eq!(peer.next().await, Some((1, Kind::Text)));
    assert_eq!(peer.next().await, Some((2, Kind::Text)));
    assert_eq!(peer.next().await, Some((3, Kind::Disconnect)));
    assert_eq!(waiting.await.unwrap(), Ok(()));
    assert_eq!(closing.await.unwrap(), Ok(()));
    drop(session);
}

/// A session that ends while its application neither takes its events nor has room to send:
/// the waiting send learns of the end at once, not once the events are read (an application
/// that sends and reads from one task would otherwise wait for ever).
#[tokio::test(start_paused = true)]
async fn a_send_waiting_for_room_learns_of_the_end_while_the_events_wait() {
    let cfg = SessionConfig {
        event_queue: 1,
        outgoing_queue_bytes: 64 * 1024,
        ..config()
    };
    let (session, mut peer) = session_and_peer(cfg);
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    // Confirmed: that event fills the application's queue of one, and nobody takes it.
    peer.send(Kind::Heartbeat, b"").await;
    let sender = session.sender();
    let sending = tokio::spawn(async move {
        loop {
            if let Err(e) = sender.send_text("s".repeat(1_000)).await {
                return e;
            }
        }
    });
    // The peer reads nothing: the connection fills, then the queue's room, and sends wait.
    sleep(MS).await;
    assert!(!sending.is_finished(), "the sends never had to wait");
    drop(peer);
    let ended = timeout(INTERVAL, sending)
        .await
        .expect("the send still waited after the session ended");
    assert_eq!(ended.unwrap(), SendError::Closed);
    drop(session);
}

#[tokio::test(start_paused = true)]
async fn what_the_writer_holds_back_goes_out_without_a_later_write() {
    let (ka, kb) = keys();
    let ((ra, wa), (reader, writer)) = pipe(config().max_frame_len);
    let holding = Holding {
        inner: wa,
        held: Vec::new(),
    };
    let mut session = spawn_on(ra, holding, config(), ka, None);
    let mut peer = RawPeer {
        reader,
        writer,
        keys: kb,
        next_counter: 0,
    };
    let started = Instant::now();
    // Each frame comes out at once, not when the next one is written: the confirming
    // heartbeat, then the text that waited for the peer's confirmation.
    assert_eq!(peer.next().await, Some((0, Kind::Heartbeat)));
    session.send_text("held back").await.unwrap();
    peer.send(Kind::Heartbeat, b"").await;
    assert_eq!(peer.next().await, Some((1, Kind::Text)));
    assert_eq!(next_event(&mut session).await, PeerEvent::Confirmed);
    assert_eq!(started.elapsed(), Duration::ZERO);
}
