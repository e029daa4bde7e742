//! The one accept loop, shared by the client listener ([`crate::server`]) and the federation
//! listener ([`crate::federation::service`]).
//!
//! Shape (after mini-redis and linkerd): a connection slot (a semaphore permit) is taken
//! *before* `accept`, so a full listener stops accepting instead of accepting and dropping;
//! the per-source count is checked right after; each connection then runs in its own task,
//! which does the handshake under a timeout and hands the result to the listener's `serve`.
//! The [`Slot`] travels with the connection and gives its places back when it drops.
//!
//! Connections that have not finished their handshake (anyone can open one) cannot take the
//! whole listener: they hold a second, smaller budget of handshake places, at most a few per
//! source, and while more than half of those places are taken (a flood of idle connections)
//! each handshake gets a much shorter time. So the slots of a full listener belong to
//! authenticated connections, and a real peer gets a handshake place within about that shorter
//! time even during a flood (docs/operations.md, "Connection floods").
//!
//! This module knows nothing of the broker: what a handshake is and what serving means are
//! the caller's ([`Handshake`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, Span, debug, warn};

use crate::limits::Source;
use crate::shutdown::stopped;

/// How a listener admits connections.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Connections open at once (handshakes included).
    pub max_connections: usize,
    /// Connections open at once from one source (IPv4 address, IPv6 /64); `None` for no
    /// per-source limit.
    pub max_per_source: Option<u32>,
    /// Connections in their handshake at once; beyond, a new connection is closed at once.
    pub max_handshakes: usize,
    /// Connections in their handshake at once from one source.
    pub max_handshakes_per_source: u32,
    /// How long a connection may take from `accept` to the end of its handshake.
    pub handshake_timeout: Duration,
    /// The same while more than half of the handshake places are taken.
    pub pressured_handshake_timeout: Duration,
}

/// What a listener does with a TCP connection: a handshake (TLS, peer checks), which
/// [`accept_loop`] runs under [`AcceptLimits::handshake_timeout`].
pub trait Handshake: Clone + Send + Sync + 'static {
    /// The connection after a successful handshake.
    type Stream: Send + 'static;
    /// Why a handshake failed.
    type Error: Display + Send;
    /// Runs the handshake on `tcp` from `peer`.
    fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = Result<Self::Stream, Self::Error>> + Send;
    /// Called when a handshake did not finish in time (for the listener's counters).
    fn timed_out(&self) {}
}

/// A connection's places in its listener (the connection slot, the per-IP slot); held for as
/// long as the connection is open.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _per_source: Option<PerSourceGuard>,
}

/// A connection's handshake places (the listener's and its source's); given back when the
/// handshake ends, however it ends.
struct HandshakePlace {
    _permit: OwnedSemaphorePermit,
    _per_source: PerSourceGuard,
}

/// Accepts connections on `listener` until `shutdown`, running `handshake` and then `serve`
/// for each in a task of `tasks` (inside `span()`). Returns when shutdown begins; the caller
/// decides how long to wait for `tasks`.
pub async fn accept_loop<H, S, F>(
    listener: &TcpListener,
    limits: AcceptLimits,
    handshake: H,
    serve: S,
    span: impl Fn() -> Span,
    tasks: &mut JoinSet<()>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Handshake,
    S: Fn(H::Stream, SocketAddr, Slot) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    // Why a semaphore and not a counter: waiting for a permit before accept() pushes back on
    // the kernel's accept queue instead of accepting connections we would drop.
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_source = Arc::new(PerSource::default());
    let max_handshakes = limits.max_handshakes.max(1);
    let handshake_places = Arc::new(Semaphore::new(max_handshakes));
    let handshakes_per_source = Arc::new(PerSource::default());
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    // Running out of file descriptors is transient: back off, don't exit.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let source = Source::of(peer.ip());
        let source_slot = match limits.max_per_source {
            None => None,
            Some(max) => match per_source.try_acquire(source, max) {
                Some(slot) => Some(slot),
                None => {
                    debug!(%peer, "per-source connection limit reached; closing");
                    continue;
                }
            },
        };
        // A handshake place, or the connection is closed at once: waiting for one would let
        // idle connections hold the listener's accept queue too.
        let Ok(place) = Arc::clone(&handshake_places).try_acquire_owned() else {
            debug!(%peer, "all handshake places taken; closing");
            continue;
        };
        let Some(source_place) =
            handshakes_per_source.try_acquire(source, limits.max_handshakes_per_source.max(1))
        else {
            debug!(%peer, "per-source handshake limit reached; closing");
            continue;
        };
        let place = HandshakePlace {
            _permit: place,
            _per_source: source_place,
        };
        let _ = tcp.set_nodelay(true);
        let slot = Slot {
            _permit: permit,
            _per_source: source_slot,
        };
        let handshake = handshake.clone();
        let serve = serve.clone();
        let deadline = Deadline {
            started: Instant::now(),
            full: limits.handshake_timeout,
            pressured: limits.pressured_handshake_timeout,
            places: Arc::clone(&handshake_places),
            max: max_handshakes,
        };
        tasks.spawn(
            async move {
                // Client addresses are personal data: they appear in logs only at debug level.
                debug!(%peer, "accepted");
                // Boxed: the handshake's state is large and needed only until it ends, while
                // this task lives as long as the connection (memory per idle connection).
                let done = Box::pin(async {
                    tokio::select! {
                        done = handshake.handshake(tcp, peer) => Some(done),
                        () = deadline.passed() => None,
                    }
                })
                .await;
                drop(place);
                let stream = match done {
                    Some(Ok(stream)) => stream,
                    Some(Err(e)) => {
                        debug!(%peer, error = %e, "handshake failed");
                        return;
                    }
                    None => {
                        handshake.timed_out();
                        debug!(%peer, "handshake timed out");
                        return;
                    }
                };
                let serving = serve(stream, peer, slot);
                serving.await;
            }
            .instrument(span()),
        );
    }
}

/// When a handshake has taken too long: after the full timeout, or after the shorter one
/// while more than half of the listener's handshake places are taken.
struct Deadline {
    started: Instant,
    full: Duration,
    pressured: Duration,
    places: Arc<Semaphore>,
    max: usize,
}

impl Deadline {
    /// Under pressure, the handshake places taken now.
    fn under_pressure(&self) -> bool {
        let taken = self.max.saturating_sub(self.places.available_permits());
        2 * taken > self.max
    }

    /// Resolves when the handshake's time is up.
    async fn passed(&self) {
        let full = self.started + self.full;
        let short = self.started + self.pressured.min(self.full);
        tokio::time::sleep_until(short).await;
        // Past the short time: cut at once if the listener is under pressure now or becomes
        // so before the full time (looked at a few times a second).
        let step = (self.pressured / 4).max(Duration::from_millis(50));
        while Instant::now() < full {
            if self.under_pressure() {
                return;
            }
            tokio::time::sleep_until((Instant::now() + step).min(full)).await;
        }
    }
}

/// Counts open connections (or handshakes) per source; a guard gives its place back on drop.
#[derive(Debug, Default)]
struct PerSource {
    counts: Mutex<HashMap<Source, u32>>,
}

/// Holds one per-source place.
#[derive(Debug)]
struct PerSourceGuard {
    table: Arc<PerSource>,
    source: Source,
}

impl PerSource {
    fn try_acquire(self: &Arc<Self>, source: Source, max: u32) -> Option<PerSourceGuard> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(source).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerSourceGuard {
            table: Arc::clone(self),
            source,
        })
    }
}

impl Drop for PerSourceGuard {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    /// A handshake that is one byte from the client: idle connections never finish it.
    #[derive(Clone)]
    struct OneByte;

    impl Handshake for OneByte {
        type Stream = TcpStream;
        type Error = std::io::Error;
        async fn handshake(
            &self,
            mut tcp: TcpStream,
            _peer: SocketAddr,
        ) -> Result<TcpStream, std::io::Error> {
            tcp.read_u8().await?;
            Ok(tcp)
        }
    }

    /// A TCP connection to `to` from loopback address `127.0.0.{from}`.
    async fn connect_from(from: u8, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from(([127, 0, 0, from], 0)))
            .unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Whether `tcp` was closed by the listener (read gives end of stream or a reset) within
    /// `within`.
    async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, tcp.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn idle_connections_cannot_keep_a_peer_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Hardly more connection slots than handshake places: idle connections alone could
        // fill the listener, and before the handshake limits they kept a peer out for the
        // whole 30 s handshake timeout.
        let limits = AcceptLimits {
            max_connections: 5,
            max_per_source: None,
            max_handshakes: 4,
            max_handshakes_per_source: 2,
            handshake_timeout: Duration::from_secs(30),
            pressured_handshake_timeout: Duration::from_millis(300),
        };
        let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel();
        let serve = move |mut tcp: TcpStream, peer: SocketAddr, slot: Slot| {
            let served_tx = served_tx.clone();
            async move {
                let _ = served_tx.send(peer);
                let _ = tcp.write_all(b"ok").await;
                // Held open, like a logged-in connection.
                let _ = tcp.read_u8().await;
                drop(slot);
            }
        };
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            accept_loop(
                &listener,
                limits,
                OneByte,
                serve,
                Span::none,
                &mut tasks,
                shutdown,
            )
            .await;
        });

        // Two sources fill every handshake place with idle connections.
        let mut idle = Vec::new();
        for from in [2, 3] {
            for _ in 0..2 {
                idle.push(connect_from(from, addr).await);
            }
        }
        // A third from a flooding source is closed at once (its per-source places are taken).
        let mut extra = connect_from(2, addr).await;
        assert!(closed_within(&mut extra, Duration::from_secs(2)).await);

        // A real peer gets in soon (well before the 30 s handshake timeout): the idle ones are
        // cut after the short time because the listener is under pressure.
        let started = Instant::now();
        let peer = loop {
            let mut tcp = connect_from(9, addr).await;
            let _ = tcp.write_all(&[1]).await;
            let mut answer = [0u8; 2];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), tcp.read_exact(&mut answer)).await
            {
                break tcp;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a real peer was kept out by idle connections"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(served.recv().await.unwrap().ip(), IpAddrV4Loopback(9).ip());
        // Idle connections were cut until no more than half of the places were taken.
        let mut cut = 0;
        for tcp in &mut idle {
            if closed_within(tcp, Duration::from_millis(500)).await {
                cut += 1;
            }
        }
        assert!(
            cut >= 2,
            "only {cut} of 4 idle connections were cut under pressure"
        );
        drop(peer);
        let _ = stop.send(true);
        let _ = server.await;
    }

    /// `127.0.0.{n}` (for comparing a served peer's address).
    #[allow(non_snake_case)]
    fn IpAddrV4Loopback(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 0))
    }

    #[test]
    fn per_source_places_come_back_when_their_guards_drop() {
        let table = Arc::new(PerSource::default());
        let ip = Source::of([127, 0, 0, 1].into());
        let a = table.try_acquire(ip, 2).expect("first");
        let b = table.try_acquire(ip, 2).expect("second");
        assert!(table.try_acquire(ip, 2).is_none(), "third over the limit");
        assert!(
            table
                .try_acquire(Source::of([10, 0, 0, 1].into()), 2)
                .is_some(),
            "per source"
        );
        drop(a);
        let c = table.try_acquire(ip, 2).expect("a place came back");
        drop((b, c));
        assert!(
            table
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&ip)
                .is_none(),
            "an IP with no connections leaves the table"
        );
    }
}
