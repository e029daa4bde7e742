//! Mutual TLS between brokers: TLS 1.3 only, ALPN `h2`, ECDSA certificates from the network CA.
//!
//! * **Server side** ([`Acceptor`]): the handshake requires a client certificate that chains
//!   to the network CA and is valid now (rustls' WebPKI client verifier: unknown CA and
//!   expired certificates fail here). Then the peer's id is read from the certificate: the one
//!   broker id of the network file the certificate is valid for as a DNS name (CN and a SAN
//!   carry it). A certificate valid for no network id, for this broker's own id, or for
//!   several is refused and the connection closed before any gRPC byte is read.
//! * **Client side** ([`connector`]): the TCP connection goes to the endpoint from the network
//!   file, but the server certificate is verified against the *peer's id* as server name, so
//!   the broker answering must hold the certificate of the broker we meant to reach.
//!
//! Every refusal is counted ([`MtlsCounters`]) and logged at `warn` with the reason, so an
//! operator (and the tests) can see why a link does not come up.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tracing::warn;

use crate::config::FederationFiles;
use crate::federation::network::Network;
use crate::listener::{Handshake, Slot};
use crate::tls::{TlsError, load_certs, load_key};

/// ALPN of gRPC over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The TLS configurations of a networked broker.
#[derive(Debug, Clone)]
pub struct MtlsConfig {
    /// For the federation listener (client certificates required).
    pub server: Arc<ServerConfig>,
    /// For calls to peers (presents this broker's certificate).
    pub client: Arc<ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_file: &std::path::Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: ca_file.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

impl MtlsConfig {
    /// Loads the CA, certificate and key of `files`.
    pub fn load(files: &FederationFiles) -> Result<Self, TlsError> {
        Self::from_files(&files.ca, &files.cert, &files.key)
    }

    /// Builds both configurations from a CA file, a certificate chain file and a key file.
    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, TlsError> {
        let roots = roots(ca)?;
        let certs = load_certs(cert)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| TlsError::Pem {
                path: ca.to_owned(),
                reason: format!("cannot verify clients with this CA: {e}"),
            })?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), load_key(key)?)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, load_key(key)?)?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Why an incoming peer connection was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRefused {
    /// The TLS handshake failed (unknown CA, expired certificate, no certificate, TLS < 1.3…).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// The handshake did not finish in time.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The certificate is valid but names no (or more than one) peer of the network file.
    #[error("certificate names no single peer broker of the network")]
    UnknownId,
}

/// Refusals seen by the federation listener, by kind (also in the admin status logs).
#[derive(Debug, Default)]
pub struct MtlsCounters {
    /// Handshakes that failed or timed out.
    pub handshake_failures: AtomicU64,
    /// Valid certificates whose id is not a peer of the network file.
    pub unknown_ids: AtomicU64,
    /// Connections accepted (peer id established).
    pub accepted: AtomicU64,
}

/// The authenticated peer of an incoming connection; tonic puts it in each request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer broker's id, from its certificate.
    pub id: String,
    /// Its socket address.
    pub addr: SocketAddr,
}

/// Server side of the federation listener's TLS: the handshake of the shared accept loop
/// ([`crate::listener`]), which runs it under `handshake_timeout_secs`.
#[derive(Clone)]
pub struct Acceptor {
    tls: TlsAcceptor,
    network: Arc<Network>,
    me: String,
    /// Refusal counters.
    pub counters: Arc<MtlsCounters>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// An acceptor for broker `me` of `network`.
    pub fn new(config: Arc<ServerConfig>, network: Arc<Network>, me: String) -> Self {
        Self {
            tls: TlsAcceptor::from(config),
            network,
            me,
            counters: Arc::default(),
        }
    }

    /// Runs the handshake and establishes the peer's id.
    async fn accept(&self, tcp: TcpStream, addr: SocketAddr) -> Result<PeerHandshake, PeerRefused> {
        let tls = match self.tls.accept(tcp).await {
            Err(e) => {
                self.counters
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(PeerRefused::Handshake(e));
            }
            Ok(tls) => tls,
        };
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| peer_id(cert, &self.network, &self.me));
        let Some(id) = id else {
            self.counters.unknown_ids.fetch_add(1, Ordering::Relaxed);
            return Err(PeerRefused::UnknownId);
        };
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(PeerHandshake {
            tls,
            info: PeerInfo { id, addr },
        })
    }
}

impl Handshake for Acceptor {
    type Stream = PeerHandshake;
    type Error = PeerRefused;

    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Result<PeerHandshake, PeerRefused> {
        let result = self.accept(tcp, addr).await;
        if let Err(e) = &result {
            warn!(%addr, error = %e, "peer connection refused");
        }
        result
    }

    fn timed_out(&self) {
        self.counters
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        warn!(error = %PeerRefused::Timeout, "peer connection refused");
    }
}

/// A peer connection whose handshake succeeded, before it holds a listener slot.
#[derive(Debug)]
pub struct PeerHandshake {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl PeerHandshake {
    /// The connection, holding its listener `slot` until it is dropped.
    pub fn into_stream(self, slot: Slot) -> PeerStream {
        PeerStream {
            inner: self.tls,
            info: self.info,
            _slot: slot,
        }
    }
}

/// The one peer id of `network` (other than `me`) that `cert` is valid for as a DNS name.
pub fn peer_id(cert: &CertificateDer<'_>, network: &Network, me: &str) -> Option<String> {
    let end_entity = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut matches = network.brokers.iter().filter(|b| {
        ServerName::try_from(b.id.as_str())
            .is_ok_and(|name| end_entity.verify_is_valid_for_subject_name(&name).is_ok())
    });
    let first = matches.next()?;
    if matches.next().is_some() || first.id == me {
        return None;
    }
    Some(first.id.clone())
}

/// An accepted, authenticated peer connection (holds its listener slot until dropped).
#[derive(Debug)]
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    _slot: Slot,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connector of a channel to one peer: TCP to `endpoint`, then TLS verifying the server
/// certificate for the name `peer_id`, all within `timeout`.
pub fn connector(
    client: Arc<ClientConfig>,
    endpoint: String,
    peer_id: String,
    timeout: Duration,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
             + Send,
> + Clone
+ Send
+ 'static {
    let tls = TlsConnector::from(client);
    tower::service_fn(move |_uri: tonic::transport::Uri| {
        let tls = tls.clone();
        let endpoint = endpoint.clone();
        let peer_id = peer_id.clone();
        async move {
            let name = ServerName::try_from(peer_id)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let connect = async {
                let tcp = TcpStream::connect(endpoint.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                tls.connect(name, tcp).await
            };
            let stream = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            Ok(TokioIo::new(stream))
        }
    })
}
