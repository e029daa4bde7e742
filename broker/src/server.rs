//! The client listener: TLS 1.3 connections from clients, each served by
//! `connection`, through the shared accept loop ([`crate::listener`]).
//!
//! On shutdown the loop stops accepting, every connection finishes the request it is in, says
//! `SHUTDOWN` and closes, and the server waits for them up to a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, info_span, warn};

use crate::broker::Broker;
use crate::connection;
use crate::listener::{AcceptLimits, Handshake, Slot, accept_loop};

/// A bound client listener, ready to run.
pub struct Server {
    listener: TcpListener,
    acceptor: ClientTls,
    broker: Arc<Broker>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// The client handshake: TLS with the broker's server certificate.
#[derive(Clone)]
struct ClientTls(TlsAcceptor);

impl Handshake for ClientTls {
    type Stream = TlsStream<TcpStream>;
    type Error = std::io::Error;

    async fn handshake(
        &self,
        tcp: TcpStream,
        _peer: SocketAddr,
    ) -> Result<Self::Stream, Self::Error> {
        self.0.accept(tcp).await
    }
}

impl Server {
    /// Binds the client listener, serving TLS with `tls` (the broker's server certificate).
    pub async fn bind(
        broker: Arc<Broker>,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let acceptor = ClientTls(TlsAcceptor::from(tls));
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
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let limits = &self.broker.config.limits;
        let accept = AcceptLimits {
            max_connections: limits.max_connections as usize,
            max_per_source: Some(limits.max_connections_per_ip),
            max_handshakes: limits.max_handshakes as usize,
            max_handshakes_per_source: limits.max_handshakes_per_source,
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_secs),
            pressured_handshake_timeout: Duration::from_millis(
                limits.pressured_handshake_timeout_ms,
            ),
        };
        let broker = Arc::clone(&self.broker);
        let stop = shutdown.clone();
        // Not an `async move` around `connection::run`: that would keep the TLS stream in
        // this future as well for the connection's whole life (see `connection::run`).
        // The connection holds its slot, and hands it on with the stream when it becomes a
        // relay half.
        let serve = move |tls, peer, slot: Slot| {
            connection::run(Arc::clone(&broker), tls, peer, Box::new(slot), stop.clone())
        };
        let mut tasks = JoinSet::new();
        accept_loop(
            &self.listener,
            accept,
            self.acceptor.clone(),
            serve,
            || info_span!("conn"),
            &mut tasks,
            shutdown,
        )
        .await;

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
