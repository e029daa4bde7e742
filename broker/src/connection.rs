//! One client connection after the TLS handshake: the frame loop, and nothing else.
//!
//! The loop owns the socket, one read buffer and a bounded event queue, and `select!`s over
//! the next frame, queued events, the idle timer and shutdown. It answers each request before
//! reading the next (a client pipelines by sending several; answers come in order). Requests
//! are decoded, rate limited and routed here; handling them is [`crate::handlers`]. A
//! malformed request gets a typed error frame and the connection goes on; a framing violation
//! gets an error frame and closes this connection only.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use micromsg_crypto::nonce;
use micromsg_wire::io::{FrameReadError, FrameReader, write_frame};
use micromsg_wire::message::event::Shutdown;
use micromsg_wire::message::request::RequestKind;
use micromsg_wire::{ErrorBody, ErrorCode, Event, Response, decode_request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::clock::Now;
use crate::event_queue;
use crate::handlers::{self, Login, PublicOutcome, Refusal, Routed, Session};
use crate::limits::TokenBucket;
use crate::online::Push;

type Stream = TlsStream<TcpStream>;

/// Per-connection state: who is on the other end, and whether they are logged in.
#[derive(Debug)]
struct Conn {
    broker: Arc<Broker>,
    session: Session,
    /// `Some` once LOGIN succeeded: authenticated requests are dispatched only with it.
    login: Option<Login>,
    requests: TokenBucket,
    close_after_reply: bool,
    /// Set by an accepted RELAY: after its answer the connection becomes that relay's half.
    relay: Option<crate::relay::Reservation>,
}

/// The connection's task, once its TLS handshake is done: runs until the client leaves,
/// misbehaves, idles out or the broker stops (at once when the TLS exporter is unavailable).
///
/// Not an `async fn`, and boxed: the future lives as long as the connection, so its size is
/// memory per idle connection (docs/performance.md, "idle"). The stream is split here, before
/// the future exists, so the future holds two pointers to it and not the TLS state itself (an
/// `async fn` keeps its arguments inside its state); and boxed once here, the callers' futures
/// hold a pointer, not another copy of this one each time it is moved into them.
pub(crate) fn run(
    broker: Arc<Broker>,
    tls: Stream,
    peer: SocketAddr,
    slot: Slot,
    shutdown: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let mut binding = [0u8; 32];
    if let Err(e) =
        tls.get_ref()
            .1
            .export_keying_material(&mut binding, nonce::TLS_EXPORTER_LABEL, None)
    {
        warn!(error = %e, "TLS exporter unavailable; closing");
        return Box::pin(std::future::ready(()));
    }
    Box::pin(serve(
        broker,
        tokio::io::split(tls),
        peer,
        binding,
        slot,
        shutdown,
    ))
}

/// What holds a connection's place in its listener (the connection and per-IP slots) while it
/// is open; a relay half keeps it, so a relayed connection counts toward the limits too.
pub(crate) type Slot = Box<dyn std::any::Any + Send + Sync>;

/// The frame loop on an established stream, already split, whose TLS `binding` is known.
/// Generic over the stream (production runs it on TLS only) so that its timers, the idle
/// timeout first, are tested over an in-memory pipe on paused tokio time: a real socket and a
/// paused clock do not mix (the clock jumps ahead whenever the runtime waits for the network).
///
/// What happens only now and then (handling a request, the drains before a close) is boxed:
/// those futures are large (a request's handler holds store calls) and would otherwise be
/// part of this one, which every idle connection holds.
async fn serve<S>(
    broker: Arc<Broker>,
    (read, mut write): (ReadHalf<S>, WriteHalf<S>),
    peer: SocketAddr,
    binding: [u8; 32],
    slot: Slot,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let limits = &broker.config.limits;
    // Most connections are idle most of the time: keep a small read buffer between frames.
    let mut reader = FrameReader::new(read, limits.max_frame_len).idle_capacity(256);
    let (queue, mut events) = event_queue::channel(limits.event_queue.max(1));
    let conn_id = broker.online.next_conn_id();
    let mut conn = Conn {
        requests: TokenBucket::new(
            limits.requests_per_sec,
            limits.requests_burst,
            Instant::now(),
        ),
        broker: Arc::clone(&broker),
        session: Session {
            conn_id,
            peer,
            binding,
            queue,
        },
        login: None,
        close_after_reply: false,
        relay: None,
    };
    let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
    let write_timeout = idle;
    debug!(conn = conn_id, "connection open");

    loop {
        tokio::select! {
            biased;
            () = crate::shutdown::stopped(&mut shutdown) => {
                let event = Event::Shutdown(Shutdown { reconnect_after: RECONNECT_AFTER_SECS })
                    .encode();
                if send(&mut write, &broker, &event, write_timeout).await.is_ok() {
                    Box::pin(drain_after_shutdown(&mut reader, &mut write, &broker, write_timeout))
                        .await;
                }
                break;
            }
            push = events.recv() => {
                // Encoded before the write: only the bytes wait in this future, not the
                // event (nor the reply below), which keeps the future small.
                let (event, close) = match push {
                    Push::Event(e) => (e.encode(), false),
                    Push::Close(e) => (e.encode(), true),
                };
                if send(&mut write, &broker, &event, write_timeout).await.is_err() || close {
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
                        )).encode();
                        if send(&mut write, &broker, &reply, write_timeout).await.is_ok() {
                            // The frame's body, as declared, minus what was already read.
                            let rest = u64::from(len).saturating_sub(
                                reader.buffered().saturating_sub(4) as u64,
                            );
                            Box::pin(drain_before_close(&mut reader, &mut write, rest)).await;
                        }
                        break;
                    }
                    Ok(Err(e)) => {
                        debug!(conn = conn_id, error = %e, "read failed");
                        break;
                    }
                };
                let reply = Box::pin(conn.handle_frame(&body)).await.encode();
                drop(body);
                if send(&mut write, &broker, &reply, write_timeout).await.is_err() {
                    break;
                }
                if let Some(reservation) = conn.relay.take() {
                    // From here on this connection carries the relay's bytes, not frames:
                    // it leaves the online registry (no events may land in the relayed
                    // stream) and its halves go to the relay.
                    if let Some(login) = &conn.login {
                        broker.online.remove(login.number().as_str(), conn_id);
                    }
                    let (read, early) = reader.into_parts();
                    let half = crate::relay::Half {
                        read: Box::new(read),
                        write: Box::new(write),
                        early,
                        slot: Some(slot),
                        ends: None,
                    };
                    broker.relays.attach(reservation, half);
                    debug!(conn = conn_id, "connection is now a relay half");
                    return;
                }
                if conn.close_after_reply {
                    break;
                }
            }
        }
    }

    if let Some(login) = &conn.login {
        broker.online.remove(login.number().as_str(), conn_id);
    }
    debug!(conn = conn_id, "connection closed");
}

/// After a closing error, at most this much of what the client still sends is read and
/// dropped, for at most this long, before the connection closes.
const CLOSE_DRAIN_BYTES: u64 = 16 << 20;
const CLOSE_DRAIN_TIME: Duration = Duration::from_secs(2);

/// After a closing error frame (FRAME-TOO-LARGE, BAD-FRAME): ends the write side (TLS
/// `close_notify`, then FIN), then reads and drops the `rest` of the refused frame that the
/// client is still sending, bounded by [`CLOSE_DRAIN_BYTES`] and [`CLOSE_DRAIN_TIME`].
/// Closing with it unread made the kernel reset the connection, so a client that writes the
/// whole frame before reading saw its write fail and never read the error frame.
async fn drain_before_close<R, W>(reader: &mut FrameReader<R>, write: &mut W, rest: u64)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(CLOSE_DRAIN_TIME, write.shutdown()).await;
    let mut rest = reader.get_mut().take(rest.min(CLOSE_DRAIN_BYTES));
    let _ = tokio::time::timeout(
        CLOSE_DRAIN_TIME,
        tokio::io::copy(&mut rest, &mut tokio::io::sink()),
    )
    .await;
}

/// RECONNECT-AFTER of the SHUTDOWN event, and RetryAfter of a SHUTTING-DOWN answer.
const RECONNECT_AFTER_SECS: u32 = 5;
/// How long a connection still reads after SHUTDOWN, answering SHUTTING-DOWN (protocol.md 7.7):
/// requests already on their way when the broker began to stop get an answer, not a silent
/// close.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);
/// At most this many requests are answered while draining.
const SHUTDOWN_DRAIN_FRAMES: usize = 64;

/// After SHUTDOWN: answers what arrives within [`SHUTDOWN_DRAIN`] with SHUTTING-DOWN (its own
/// `Id`, a RetryAfter), then returns so the connection closes.
async fn drain_after_shutdown<R: AsyncRead, W: AsyncWrite>(
    reader: &mut FrameReader<ReadHalf<R>>,
    write: &mut WriteHalf<W>,
    broker: &Broker,
    write_timeout: Duration,
) {
    let until = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
    for _ in 0..SHUTDOWN_DRAIN_FRAMES {
        let Ok(Ok(Some(body))) = tokio::time::timeout_at(until, reader.next_frame()).await else {
            return;
        };
        let reply = match decode_request(&body, &broker.wire_limits) {
            Ok((id, request)) => Response::error(
                id,
                Some(request.kind()),
                ErrorBody::new(
                    ErrorCode::ShuttingDown,
                    "the broker is shutting down; try again after RetryAfter",
                )
                .retry_after(RECONNECT_AFTER_SECS),
            ),
            Err(bad) => bad.to_response(),
        };
        if send(write, broker, &reply.encode(), write_timeout)
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn send<W: AsyncWrite>(
    write: &mut WriteHalf<W>,
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
                    conn = self.session.conn_id,
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
        let now = Now::read();
        if let Err(wait) = self.requests.take(now.instant) {
            return Response::error(
                id,
                Some(kind),
                Refusal::retry(ErrorCode::RateLimited, "too many requests", wait).0,
            );
        }
        if let Some(login) = &self.login {
            self.broker
                .online
                .touch(login.number().as_str(), self.session.conn_id, now.instant);
        }
        // The outer bound on any request: a store call on a pooled Postgres connection that
        // the network black-holed waits for no server-side timeout (`statement_timeout` needs
        // the server to answer), so it is cut here (`limits.request_timeout_ms`).
        let deadline = Duration::from_millis(self.broker.config.limits.request_timeout_ms);
        let handled = tokio::time::timeout(deadline, self.dispatch(Routed::from(request), kind, now))
            .await
            .unwrap_or_else(|_| {
                warn!(
                    conn = self.session.conn_id,
                    request = kind.as_str(),
                    "request cut at limits.request_timeout_ms (the store or a peer broker did not answer)"
                );
                Err(Refusal::retry(
                    ErrorCode::Unavailable,
                    "the broker could not finish this request in time (its storage or a peer \
                     broker did not answer); try again after RetryAfter",
                    handlers::UNAVAILABLE_RETRY_AFTER,
                ))
            });
        match handled {
            Ok(data) => Response::ok(id, data),
            Err(Refusal(error)) => Response::error(id, Some(kind), error),
        }
    }

    /// Routes a request by the connection's state: public requests to
    /// [`handlers::public`], authenticated ones to [`handlers::authenticated`] with the login
    /// (or NOT-LOGGED-IN without one).
    async fn dispatch(
        &mut self,
        request: Routed,
        kind: RequestKind,
        now: Now,
    ) -> handlers::Handled {
        let broker = &self.broker;
        match (request, &self.login) {
            // A logged-in connection cannot log in again, register or join (protocol.md 6.0).
            (
                Routed::Public(
                    handlers::Public::Login(_)
                    | handlers::Public::Register(_)
                    | handlers::Public::DeviceJoin(_),
                ),
                Some(_),
            ) => Err(Refusal::new(
                ErrorCode::AlreadyLoggedIn,
                format!(
                    "this connection is already logged in; {} needs a new connection",
                    kind.as_str()
                ),
            )),
            (Routed::Public(request), _) => {
                match handlers::public(broker, &self.session, request, now).await? {
                    PublicOutcome::Answer(data) => Ok(data),
                    PublicOutcome::LoggedIn(data, login) => {
                        self.login = Some(login);
                        Ok(data)
                    }
                }
            }
            (Routed::Authenticated(_), None) => Err(Refusal::new(
                ErrorCode::NotLoggedIn,
                format!(
                    "{} needs a logged-in connection; send LOGIN first",
                    kind.as_str()
                ),
            )),
            (Routed::Authenticated(handlers::Authenticated::Relay(args)), Some(login)) => {
                let who = crate::relay::Party::local(login.number().as_str(), login.device.get());
                match broker.relays.reserve(&args.relay, who) {
                    Ok(reservation) => {
                        self.relay = Some(reservation);
                        Ok(micromsg_wire::ResponseData::Relay)
                    }
                    Err(refused @ crate::relay::Refused::Unknown) => Err(Refusal::new(
                        ErrorCode::NotFound,
                        broker.relays.describe(refused),
                    )),
                    Err(refused) => Err(Refusal::retry(
                        ErrorCode::QuotaExceeded,
                        broker.relays.describe(refused),
                        Duration::from_secs(5),
                    )),
                }
            }
            (Routed::Authenticated(request), Some(login)) => {
                if matches!(request, handlers::Authenticated::Logout) {
                    self.close_after_reply = true;
                }
                let deleting = matches!(request, handlers::Authenticated::AccountDelete(_));
                let answer =
                    handlers::authenticated(broker, &self.session, login, request, now).await;
                // The entity is gone: nothing more can be done on this connection.
                if deleting && answer.is_ok() {
                    self.close_after_reply = true;
                }
                answer
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use micromsg_crypto::{IdentityKey, Secret32};
    use micromsg_store::Store;
    use micromsg_wire::{Limits, Message};
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;
    use tokio::time::{Instant, sleep, timeout_at};

    use super::*;

    const IDLE: Duration = Duration::from_secs(30);
    const MS: Duration = Duration::from_millis(1);

    /// A broker whose connections idle out after [`IDLE`], on a temporary SQLite store.
    ///
    /// Opened before the clock is paused: the store's pool waits on its own threads, and a
    /// paused clock would jump to the pool's timeouts while it does. The tests below never
    /// touch the store.
    async fn broker() -> (Arc<Broker>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::default();
        config.limits.idle_timeout_secs = IDLE.as_secs();
        let store = Store::open_sqlite(dir.path().join("micromsg.db"))
            .await
            .unwrap();
        let identity = IdentityKey::from_seed(&Secret32::from_bytes([7; 32]));
        (Arc::new(Broker::new(config, store, identity)), dir)
    }

    /// A connection served over an in-memory pipe: the client's reader and writer, the
    /// shutdown switch and the connection task.
    #[allow(clippy::type_complexity)]
    fn connect(
        broker: &Arc<Broker>,
    ) -> (
        FrameReader<ReadHalf<DuplexStream>>,
        WriteHalf<DuplexStream>,
        watch::Sender<bool>,
        JoinHandle<()>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (stop, shutdown) = watch::channel(false);
        let peer = "127.0.0.1:9".parse().unwrap();
        let task = tokio::spawn(serve(
            Arc::clone(broker),
            tokio::io::split(server),
            peer,
            [0; 32],
            Box::new(()),
            shutdown,
        ));
        let (read, write) = tokio::io::split(client);
        (FrameReader::new(read, 1 << 20), write, stop, task)
    }

    /// Asserts that the broker closes the connection `IDLE` after `since`, and not before.
    ///
    /// The clock was paused in the middle of a millisecond of the timer wheel, whose deadlines
    /// round up to the next tick: "at" is within two ticks.
    async fn closes_idle(reader: &mut FrameReader<ReadHalf<DuplexStream>>, since: Instant) {
        let early = timeout_at(since + IDLE - MS, reader.next_frame()).await;
        assert!(early.is_err(), "closed before the idle timeout: {early:?}");
        assert!(
            reader.next_frame().await.unwrap().is_none(),
            "a frame instead of the close"
        );
        let took = since.elapsed();
        assert!(
            took >= IDLE && took < IDLE + 2 * MS,
            "closed after {took:?}"
        );
    }

    /// The size of the future `f` returns, without making one.
    fn future_size<F, Fut>(_: &F) -> usize
    where
        F: Fn(
            Arc<Broker>,
            (ReadHalf<Stream>, WriteHalf<Stream>),
            SocketAddr,
            [u8; 32],
            Slot,
            watch::Receiver<bool>,
        ) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every idle connection holds its task's future: it must not grow back to the ~12 KiB it
    /// was when request handlers, drains and the TLS stream itself were inline in it
    /// (docs/performance.md, "idle"). The bound leaves room for unoptimised test builds.
    #[tokio::test]
    async fn an_idle_connection_future_stays_small() {
        const BOUND: usize = 1536;
        let production = future_size(&serve::<Stream>);
        assert!(
            production <= BOUND,
            "connection future on TLS: {production} bytes"
        );
        let (broker, _dir) = broker().await;
        let (_client, server) = tokio::io::duplex(64);
        let (_stop, shutdown) = watch::channel(false);
        let peer = "127.0.0.1:9".parse().unwrap();
        let piped = serve(
            broker,
            tokio::io::split(server),
            peer,
            [0; 32],
            Box::new(()),
            shutdown,
        );
        let size = std::mem::size_of_val(&piped);
        assert!(size <= BOUND, "connection future on a pipe: {size} bytes");
        eprintln!(
            "connection future: {production} bytes on TLS, {size} on a pipe; Conn {}, reader {}, \
             Sleep {}",
            std::mem::size_of::<Conn>(),
            std::mem::size_of::<FrameReader<ReadHalf<Stream>>>(),
            std::mem::size_of::<tokio::time::Sleep>(),
        );
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_idle_timeout() {
        let (broker, _dir) = broker().await;
        tokio::time::pause();
        let opened = Instant::now();
        let (mut reader, _write, _stop, task) = connect(&broker);
        closes_idle(&mut reader, opened).await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn every_request_restarts_the_idle_timer() {
        let (broker, _dir) = broker().await;
        tokio::time::pause();
        let (mut reader, mut write, _stop, task) = connect(&broker);
        // A PING shortly before each timeout keeps the connection open well past it.
        for id in 1..=3 {
            sleep(IDLE - 5 * MS).await;
            let ping = format!("Request: PING\nId: {id}\n");
            write_frame(&mut write, ping.as_bytes()).await.unwrap();
            let answer = reader.next_frame().await.unwrap().unwrap();
            let answer = Message::decode(&answer, &Limits::default()).unwrap();
            assert!(matches!(answer, Message::Response(_)), "{answer:?}");
        }
        // Then silence: closed one idle period after the last request.
        closes_idle(&mut reader, Instant::now()).await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_racing_the_shutdown_is_answered_shutting_down_then_the_connection_closes() {
        let (broker, _dir) = broker().await;
        tokio::time::pause();
        let (mut reader, mut write, stop, task) = connect(&broker);
        stop.send(true).unwrap();
        let event = reader.next_frame().await.unwrap().unwrap();
        let event = Message::decode(&event, &Limits::default()).unwrap();
        assert!(
            matches!(event, Message::Event(Event::Shutdown(_))),
            "{event:?}"
        );
        // A request that was on its way: answered, with its Id and a RetryAfter.
        write_frame(&mut write, b"Request: PING\nId: 9\n")
            .await
            .unwrap();
        let answer = reader.next_frame().await.unwrap().unwrap();
        let text = String::from_utf8(answer.to_vec()).unwrap();
        assert!(text.contains("Id: 9"), "{text}");
        assert!(text.contains("SHUTTING-DOWN"), "{text}");
        assert!(text.contains("RetryAfter: 5"), "{text}");
        // Then the drain window ends and the connection closes.
        let since = Instant::now();
        assert!(reader.next_frame().await.unwrap().is_none());
        assert!(
            since.elapsed() <= SHUTDOWN_DRAIN + 2 * MS,
            "{:?}",
            since.elapsed()
        );
        task.await.unwrap();
    }
}
