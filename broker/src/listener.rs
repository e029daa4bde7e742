//! The one accept loop, shared by the client listener ([`crate::server`]) and the federation
//! listener ([`crate::federation::service`]).
//!
//! Shape (after mini-redis and linkerd): a connection slot (a semaphore permit) is taken
//! *before* `accept`, so a full listener stops accepting instead of accepting and dropping;
//! the per-IP count is checked right after; each connection then runs in its own task, which
//! does the handshake under a timeout and hands the result to the listener's `serve`. The
//! [`Slot`] travels with the connection and gives its places back when it drops.
//!
//! This module knows nothing of the broker: what a handshake is and what serving means are
//! the caller's ([`Handshake`]).

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, Span, debug, warn};

use crate::shutdown::stopped;

/// How a listener admits connections.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Connections open at once (handshakes included).
    pub max_connections: usize,
    /// Connections open at once from one IP address; `None` for no per-IP limit.
    pub max_per_ip: Option<u32>,
    /// How long a connection may take from `accept` to the end of its handshake.
    pub handshake_timeout: Duration,
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
    _per_ip: Option<PerIpGuard>,
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
    let per_ip = Arc::new(PerIp::default());
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
        let per_ip_slot = match limits.max_per_ip {
            None => None,
            Some(max) => match per_ip.try_acquire(peer.ip(), max) {
                Some(slot) => Some(slot),
                None => {
                    debug!(%peer, "per-IP connection limit reached; closing");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let slot = Slot {
            _permit: permit,
            _per_ip: per_ip_slot,
        };
        let handshake = handshake.clone();
        let serve = serve.clone();
        let timeout = limits.handshake_timeout;
        tasks.spawn(
            async move {
                // Client addresses are personal data: they appear in logs only at debug level.
                debug!(%peer, "accepted");
                match tokio::time::timeout(timeout, handshake.handshake(tcp, peer)).await {
                    Ok(Ok(stream)) => serve(stream, peer, slot).await,
                    Ok(Err(e)) => debug!(%peer, error = %e, "handshake failed"),
                    Err(_) => {
                        handshake.timed_out();
                        debug!(%peer, "handshake timed out");
                    }
                }
            }
            .instrument(span()),
        );
    }
}

/// Counts open connections per client IP; a guard gives its place back on drop.
#[derive(Debug, Default)]
struct PerIp {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// Holds one per-IP connection place.
#[derive(Debug)]
struct PerIpGuard {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<PerIpGuard> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            table: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_places_come_back_when_their_guards_drop() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = [127, 0, 0, 1].into();
        let a = table.try_acquire(ip, 2).expect("first");
        let b = table.try_acquire(ip, 2).expect("second");
        assert!(table.try_acquire(ip, 2).is_none(), "third over the limit");
        assert!(
            table.try_acquire([10, 0, 0, 1].into(), 2).is_some(),
            "per IP"
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
