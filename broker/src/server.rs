//! The client listener: accept loop, per-connection task, graceful shutdown.
//!
//! Shape (after mini-redis and linkerd): a semaphore permit is taken *before* `accept`, so a
//! full broker stops accepting instead of accepting and dropping; per-IP counts are checked
//! right after; each connection runs in its own task inside a span, does the TLS handshake
//! under a timeout, then loops over `select!` between the next frame, queued events, the idle
//! timer and shutdown. On shutdown the loop stops accepting, every connection finishes the
//! request it is in, says `SHUTDOWN` and closes, and the server waits for them up to a grace
//! period.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broker::Broker;
use crate::connection;

/// Counts open connections per client IP; a guard gives its slot back on drop.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// Holds one per-IP connection slot.
#[derive(Debug)]
pub(crate) struct PerIpGuard {
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

/// A bound client listener, ready to run.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    broker: Arc<Broker>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Resolves once `shutdown` is (or becomes) true, or its sender is gone.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across the caller's awaits.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

impl Server {
    /// Binds the client listener.
    pub async fn bind(broker: Arc<Broker>, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let acceptor = TlsAcceptor::from(Arc::clone(&broker.tls));
        Ok(Self {
            listener,
            acceptor,
            broker,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true, then drains connections within the grace period.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let limits = &self.broker.config.limits;
        // Why a semaphore and not a counter: waiting for a permit before accept() pushes back on
        // the kernel's accept queue instead of accepting connections we would drop.
        let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
        let per_ip = Arc::new(PerIp::default());
        let mut tasks = JoinSet::new();
        let mut accept_backoff = Duration::from_millis(5);

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
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => {
                        accept_backoff = Duration::from_millis(5);
                        pair
                    }
                    Err(e) => {
                        // Running out of file descriptors is transient: back off, don't exit.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(accept_backoff).await;
                        accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                () = stopped(&mut shutdown) => break,
            };
            let Some(ip_slot) = per_ip.try_acquire(peer.ip(), limits.max_connections_per_ip) else {
                debug!(%peer, "per-IP connection limit reached; closing");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let broker = Arc::clone(&self.broker);
            let acceptor = self.acceptor.clone();
            let shutdown = shutdown.clone();
            // Client addresses are personal data: they appear in logs only at debug level.
            let span = info_span!("conn");
            tasks.spawn(
                async move {
                    debug!(%peer, "accepted");
                    serve(broker, acceptor, tcp, peer, shutdown).await;
                    drop(ip_slot);
                    drop(permit);
                }
                .instrument(span),
            );
        }

        let grace = Duration::from_secs(self.broker.config.server.shutdown_grace_secs);
        info!(
            open = tasks.len(),
            "stopped accepting; waiting for connections to finish"
        );
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                left = tasks.len(),
                "grace period over; closing remaining connections"
            );
            tasks.shutdown().await;
        }
    }
}

async fn serve(
    broker: Arc<Broker>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let timeout = Duration::from_secs(broker.config.limits.handshake_timeout_secs);
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return;
        }
    };
    connection::run(broker, tls, peer, shutdown).await;
}
