//! Splicing the two halves of a relay: bytes one way and the other, through a bounded buffer
//! per direction, throttled to a byte rate, ended when either side goes or nothing moves for
//! the idle timeout. The bytes are the clients' section-12 session, sealed end to end: the
//! broker copies them and counts them, and never looks at or logs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// One side's connection after its RELAY answer.
pub struct Half {
    /// Its read side.
    pub read: Box<dyn AsyncRead + Send + Unpin>,
    /// Its write side.
    pub write: Box<dyn AsyncWrite + Send + Unpin>,
    /// Bytes the client sent after its RELAY request that were already read (they go first).
    pub early: Vec<u8>,
    /// The client connection's place in its listener (`limits.max_connections` and the per-IP
    /// limit), held until the half is dropped; none for a peer broker's stream.
    pub slot: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// For a peer broker's stream: how each broker's splice ended, told across.
    pub ends: Option<Arc<Ends>>,
}

/// How the two brokers' splices of a relay across brokers ended: this one's is set before
/// the stream's half is shut down, so the stream can say it to the peer broker; the peer's
/// comes in the stream's last frame. A relay one broker ends for a reason of its own (its
/// shutdown, its client's lost connection, its idle timeout) is then told to both clients
/// with that reason, not as a session that ended in order.
#[derive(Debug, Default)]
pub struct Ends {
    /// This broker's.
    pub ours: std::sync::OnceLock<Ended>,
    /// The peer broker's.
    pub theirs: std::sync::OnceLock<Ended>,
}

impl std::fmt::Debug for Half {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Half")
            .field("early", &self.early.len())
            .finish_non_exhaustive()
    }
}

/// What bounds a spliced relay.
#[derive(Debug, Clone, Copy)]
pub struct SpliceLimits {
    /// Bytes per second each way; 0 for no limit.
    pub bytes_per_sec: u64,
    /// Nothing either way for this long ends the relay.
    pub idle: Duration,
    /// The read buffer of each direction.
    pub buffer: usize,
}

/// Why a spliced relay ended (RELAY-CLOSED's `REASON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed their end (the session inside ended).
    Closed,
    /// One side's connection failed or was reset.
    Lost,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The broker is shutting down.
    Shutdown,
    /// The other side's broker is shutting down (a relay across brokers).
    PeerShutdown,
    /// Nothing moved for the other side's broker's idle timeout (a relay across brokers).
    PeerIdle,
}

impl Ended {
    /// For people (RELAY-CLOSED `REASON`).
    pub fn reason(self, idle: Duration) -> String {
        match self {
            Ended::Closed => "the session ended".into(),
            Ended::Lost => "the other side's connection to its broker was lost".into(),
            Ended::Idle => format!(
                "nothing was relayed for {} s (relay.idle_timeout_secs)",
                idle.as_secs()
            ),
            Ended::Shutdown => "the broker is shutting down".into(),
            Ended::PeerShutdown => "the other side's broker is shutting down".into(),
            Ended::PeerIdle => {
                "nothing was relayed for the other side's broker's idle timeout".into()
            }
        }
    }
}

/// Runs the relay between `a` and `b` until it ends, or until `stopping` turns true (each side
/// is then closed in order); adds every byte copied to `bytes`.
pub async fn splice(
    a: Half,
    b: Half,
    limits: SpliceLimits,
    bytes: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
) -> Ended {
    let started = Instant::now();
    // Milliseconds since `started` of the last byte either way.
    let last = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(Notify::new());
    let ab = pump(
        a.read,
        a.early,
        b.write,
        limits,
        Clock {
            started,
            last: Arc::clone(&last),
        },
        Stops {
            relay: Arc::clone(&stop),
            broker: stopping.clone(),
        },
        Arc::clone(&bytes),
    );
    let ba = pump(
        b.read,
        b.early,
        a.write,
        limits,
        Clock { started, last },
        Stops {
            relay: stop,
            broker: stopping,
        },
        bytes,
    );
    let ends = [a.ends, b.ends];
    let ((x, to_b), (y, to_a)) = tokio::join!(ab, ba);
    // The worse of the two directions names the end; a peer broker that said why it ended
    // names it, unless this broker is shutting down itself.
    let ours = [Ended::Shutdown, Ended::Idle, Ended::Lost]
        .into_iter()
        .find(|&ended| x == ended || y == ended)
        .unwrap_or(Ended::Closed);
    let theirs = ends.iter().flatten().find_map(|e| e.theirs.get().copied());
    let ended = match (ours, theirs) {
        (Ended::Shutdown, _) | (_, None | Some(Ended::Closed)) => ours,
        (_, Some(Ended::Shutdown | Ended::PeerShutdown)) => Ended::PeerShutdown,
        // Its own timeout, not this broker's.
        (_, Some(Ended::Idle | Ended::PeerIdle)) => Ended::PeerIdle,
        (_, Some(theirs)) => theirs,
    };
    // Told before the halves close, so a stream half can pass it on.
    for e in ends.iter().flatten() {
        let _ = e.ours.set(ended);
    }
    // Side by side and bounded: a client that stops reading must not hold back the other
    // half's close (and a stream half's last frame) or the relay's end.
    let close = async |to: Option<Box<dyn AsyncWrite + Send + Unpin>>| {
        if let Some(mut to) = to {
            let _ = to.shutdown().await;
        }
    };
    let _ =
        tokio::time::timeout(CLOSE_WAIT, async { tokio::join!(close(to_a), close(to_b)) }).await;
    ended
}

/// How long the splice waits for both halves to close in order once the relay ended.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// When a relay started, and the milliseconds since then of its last byte either way.
struct Clock {
    started: Instant,
    last: Arc<AtomicU64>,
}

/// What stops a direction early: the other direction's failure (`relay`), or the broker's
/// shutdown (`broker` turning true).
struct Stops {
    relay: Arc<Notify>,
    broker: watch::Receiver<bool>,
}

impl Stops {
    /// Ready with the reason once either stop comes.
    async fn stopped(&mut self) -> Ended {
        let shutdown = async {
            if self.broker.wait_for(|stopping| *stopping).await.is_err() {
                // The sender is gone without a shutdown: nothing will stop us this way.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = self.relay.notified() => Ended::Lost,
            () = shutdown => Ended::Shutdown,
        }
    }
}

/// One direction. A clean end of stream is passed on as a half-close (the other direction
/// goes on until it ends too); a failure or the idle timeout stops both; the broker's shutdown
/// stops both. A direction that stopped hands back the side it writes to, which the splice
/// closes in order once it knows why the relay ended.
async fn pump(
    mut from: Box<dyn AsyncRead + Send + Unpin>,
    early: Vec<u8>,
    mut to: Box<dyn AsyncWrite + Send + Unpin>,
    limits: SpliceLimits,
    clock: Clock,
    mut stops: Stops,
    bytes: Arc<AtomicU64>,
) -> (Ended, Option<Box<dyn AsyncWrite + Send + Unpin>>) {
    let Clock { started, last } = clock;
    let mut rate = Rate::new(limits.bytes_per_sec, limits.buffer);
    // Small while the relay is quiet (most are: chat), doubled whenever a read fills it, up to
    // `buffer`; back to small after an idle spell. An idle relay then holds little memory.
    let small = limits.buffer.min(SMALL_BUFFER);
    let mut buf = vec![0u8; small];
    let ended = 'relay: {
        // Bytes the first side sent before the second came: a receiver that does not read
        // them holds this write as it would any other, until a stop comes.
        if !early.is_empty() {
            let wrote = tokio::select! {
                ended = stops.stopped() => break 'relay ended,
                wrote = async {
                    to.write_all(&early).await?;
                    to.flush().await
                } => wrote,
            };
            if wrote.is_err() {
                break 'relay Ended::Lost;
            }
        }
        loop {
            let read = tokio::select! {
                ended = stops.stopped() => break ended,
                read = tokio::time::timeout(limits.idle, from.read(&mut buf)) => read,
            };
            let n = match read {
                Err(_) => {
                    if buf.len() > small {
                        buf = vec![0u8; small];
                    }
                    let quiet = started
                        .elapsed()
                        .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                    if quiet >= limits.idle {
                        break Ended::Idle;
                    }
                    continue;
                }
                Ok(Ok(0)) => {
                    // The sender closed its end: pass the half-close on.
                    let _ = to.shutdown().await;
                    return (Ended::Closed, None);
                }
                Ok(Ok(n)) => n,
                Ok(Err(_)) => break Ended::Lost,
            };
            last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            let grow = n == buf.len() && buf.len() < limits.buffer;
            let wrote = tokio::select! {
                ended = stops.stopped() => break ended,
                wrote = async {
                    to.write_all(&buf[..n]).await?;
                    to.flush().await
                } => wrote,
            };
            if wrote.is_err() {
                break Ended::Lost;
            }
            if grow {
                buf.resize((buf.len() * 2).min(limits.buffer), 0);
            }
            if let Some(wait) = rate.spend(n as u64, Instant::now()) {
                tokio::select! {
                    ended = stops.stopped() => break ended,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    stops.relay.notify_waiters();
    (ended, Some(to))
}

/// The read buffer of a quiet direction.
const SMALL_BUFFER: usize = 2048;

/// A byte budget refilled at `per_sec` up to `burst` (0 `per_sec`: unlimited).
struct Rate {
    per_sec: u64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Rate {
    fn new(per_sec: u64, burst: usize) -> Self {
        Self {
            per_sec,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` bytes; how long to wait before reading more, if the budget is overdrawn.
    fn spend(&mut self, n: u64, now: Instant) -> Option<Duration> {
        if self.per_sec == 0 {
            return None;
        }
        let rate = self.per_sec as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(self.burst) - n as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::duplex;

    fn half(stream: tokio::io::DuplexStream) -> Half {
        let (read, write) = tokio::io::split(stream);
        Half {
            read: Box::new(read),
            write: Box::new(write),
            early: Vec::new(),
            slot: None,
            ends: None,
        }
    }

    /// A broker that never shuts down (its sender gone).
    fn running() -> watch::Receiver<bool> {
        watch::channel(false).1
    }

    const LIMITS: SpliceLimits = SpliceLimits {
        bytes_per_sec: 0,
        idle: Duration::from_secs(5),
        buffer: 4096,
    };

    #[tokio::test]
    async fn bytes_go_both_ways_early_bytes_first_and_half_closes_pass_on() {
        let (mut client_a, broker_a) = duplex(1 << 16);
        let (mut client_b, broker_b) = duplex(1 << 16);
        let mut a = half(broker_a);
        a.early = b"early ".to_vec();
        let bytes = Arc::new(AtomicU64::new(0));
        let relay = tokio::spawn(splice(
            a,
            half(broker_b),
            LIMITS,
            Arc::clone(&bytes),
            running(),
        ));
        client_a.write_all(b"hello b").await.unwrap();
        client_a.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early hello b");
        // b still talks after a closed its sending side.
        client_b.write_all(b"hello a").await.unwrap();
        client_b.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello a");
        assert_eq!(relay.await.unwrap(), Ended::Closed);
        assert_eq!(bytes.load(Ordering::Relaxed), 7 + 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_relay_is_closed_at_the_idle_timeout() {
        let (_client_a, broker_a) = duplex(1 << 16);
        let (mut client_b, broker_b) = duplex(1 << 16);
        let relay = tokio::spawn(splice(
            half(broker_a),
            half(broker_b),
            LIMITS,
            Arc::default(),
            running(),
        ));
        let started = Instant::now();
        assert_eq!(relay.await.unwrap(), Ended::Idle);
        assert!(started.elapsed() >= LIMITS.idle);
        // b's connection was closed.
        let mut rest = Vec::new();
        assert_eq!(client_b.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_over_the_byte_rate_is_throttled() {
        let (mut client_a, broker_a) = duplex(1 << 20);
        let (mut client_b, broker_b) = duplex(1 << 20);
        let limits = SpliceLimits {
            bytes_per_sec: 64 * 1024,
            ..LIMITS
        };
        tokio::spawn(splice(
            half(broker_a),
            half(broker_b),
            limits,
            Arc::default(),
            running(),
        ));
        let started = Instant::now();
        let payload = vec![7u8; 256 * 1024];
        let writer = tokio::spawn(async move {
            client_a.write_all(&payload).await.unwrap();
            client_a
        });
        let mut got = vec![0u8; 256 * 1024];
        client_b.read_exact(&mut got).await.unwrap();
        let took = started.elapsed();
        // 256 KiB at 64 KiB/s with a 4 KiB burst: about 4 s.
        assert!(took >= Duration::from_millis(3_800), "{took:?}");
        drop(writer);
    }

    #[tokio::test]
    async fn a_shutdown_ends_a_relay_whose_receiver_does_not_read_the_early_bytes() {
        // b's connection holds 1 KiB and b never reads: the early bytes cannot all be written.
        let (_client_a, broker_a) = duplex(1 << 16);
        let (_client_b, broker_b) = duplex(1024);
        let mut a = half(broker_a);
        a.early = vec![7; 64 * 1024];
        let (stop, stopping) = watch::channel(false);
        let relay = tokio::spawn(splice(a, half(broker_b), LIMITS, Arc::default(), stopping));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!relay.is_finished());
        stop.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(2), relay).await;
        assert_eq!(
            ended.expect("the shutdown ends the relay").unwrap(),
            Ended::Shutdown
        );
    }

    #[tokio::test]
    async fn the_brokers_shutdown_ends_a_busy_relay_closing_both_sides_in_order() {
        let (mut client_a, broker_a) = duplex(1 << 16);
        let (mut client_b, broker_b) = duplex(1 << 16);
        let (stop, stopping) = watch::channel(false);
        let relay = tokio::spawn(splice(
            half(broker_a),
            half(broker_b),
            LIMITS,
            Arc::default(),
            stopping,
        ));
        client_a.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        client_b.read_exact(&mut got).await.unwrap();
        stop.send_replace(true);
        assert_eq!(relay.await.unwrap(), Ended::Shutdown);
        // Each side's connection was shut down (an end of stream, not a reset), and nothing
        // else came.
        for client in [&mut client_a, &mut client_b] {
            let mut rest = Vec::new();
            assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        }
        // A relay spliced after the shutdown ends at once.
        let (_a, broker_a) = duplex(1 << 16);
        let (_b, broker_b) = duplex(1 << 16);
        let late = splice(
            half(broker_a),
            half(broker_b),
            LIMITS,
            Arc::default(),
            stop.subscribe(),
        );
        assert_eq!(late.await, Ended::Shutdown);
    }
}
