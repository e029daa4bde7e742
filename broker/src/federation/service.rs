//! The federation listener and the `micromsg.federation.v1.Federation` service.
//!
//! Accept loop (as the client listener): a permit (`federation.max_connections`) before
//! `accept`, then each connection's TLS handshake and peer-id check in its own task under
//! `handshake_timeout_secs`; only authenticated connections reach tonic, through a bounded
//! channel. Every call is attributed to the peer id in the connection's certificate
//! ([`PeerInfo`]); a call arriving any other way is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use super::mtls::{Acceptor, MtlsCounters, PeerInfo, PeerStream};
use super::proto::federation_server::{Federation as FederationApi, FederationServer};
use super::proto::{
    AcceptedAck, AcceptedRequest, DeliverRequest, DeliverResponse, InitiateAck, InitiateRequest,
    IsNetworkedRequest, IsNetworkedResponse, PingRequest, PingResponse,
};
use super::{Home, contact, outbox};
use crate::broker::{Broker, unix_now};
use crate::telemetry;

/// Authenticated connections waiting for tonic to pick them up.
const HANDOFF_QUEUE: usize = 64;

/// The gRPC service, over the shared broker state.
#[derive(Debug, Clone)]
pub struct FederationService {
    broker: Arc<Broker>,
}

fn peer_of<T>(request: &Request<T>) -> Result<String, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.id.clone())
        .ok_or_else(|| Status::unauthenticated("no peer certificate"))
}

#[tonic::async_trait]
impl FederationApi for FederationService {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        peer_of(&request)?;
        let Some(f) = self.broker.federation.as_ref() else {
            return Err(Status::failed_precondition("not networked"));
        };
        Ok(Response::new(PingResponse {
            broker_id: f.me.id.clone(),
            network: f.network.name.clone(),
            time: unix_now(),
        }))
    }

    async fn is_networked(
        &self,
        request: Request<IsNetworkedRequest>,
    ) -> Result<Response<IsNetworkedResponse>, Status> {
        peer_of(&request)?;
        let Some(f) = self.broker.federation.as_ref() else {
            return Err(Status::failed_precondition("not networked"));
        };
        let broker_id = match f.home_of(&request.get_ref().number) {
            Home::Own => f.me.id.clone(),
            Home::Peer(p) => p.id.clone(),
            Home::None => String::new(),
        };
        Ok(Response::new(IsNetworkedResponse { broker_id }))
    }

    async fn initiate(
        &self,
        request: Request<InitiateRequest>,
    ) -> Result<Response<InitiateAck>, Status> {
        let peer = peer_of(&request)?;
        let span = info_span!("federation.initiate.receive", peer = %peer);
        telemetry::set_parent(&span, request.metadata());
        let _entered = span.enter();
        contact::receive_initiate(&self.broker, &peer, request.into_inner())?;
        Ok(Response::new(InitiateAck {}))
    }

    async fn accepted(
        &self,
        request: Request<AcceptedRequest>,
    ) -> Result<Response<AcceptedAck>, Status> {
        let peer = peer_of(&request)?;
        let span = info_span!("federation.accepted.receive", peer = %peer);
        telemetry::set_parent(&span, request.metadata());
        contact::receive_accepted(&self.broker, &peer, request.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(AcceptedAck {}))
    }

    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let peer = peer_of(&request)?;
        let span = info_span!(
            "federation.deliver.receive",
            peer = %peer,
            items = request.get_ref().items.len()
        );
        telemetry::set_parent(&span, request.metadata());
        let results = outbox::receive(&self.broker, &peer, request.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(DeliverResponse { results }))
    }
}

/// A bound federation listener, ready to serve.
#[derive(Debug)]
pub struct FederationServerHandle {
    listener: TcpListener,
    acceptor: Acceptor,
    broker: Arc<Broker>,
}

impl FederationServerHandle {
    /// Binds `addr` for the networked `broker`.
    pub async fn bind(broker: Arc<Broker>, addr: SocketAddr) -> std::io::Result<Option<Self>> {
        let Some(f) = broker.federation.as_ref() else {
            return Ok(None);
        };
        let acceptor = Acceptor::new(
            Arc::clone(&f.mtls.server),
            Arc::clone(&f.network),
            f.me.id.clone(),
            Duration::from_secs(f.config.handshake_timeout_secs.max(1)),
        );
        let listener = TcpListener::bind(addr).await?;
        Ok(Some(Self {
            listener,
            acceptor,
            broker,
        }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The refusal counters of the listener.
    pub fn counters(&self) -> Arc<MtlsCounters> {
        Arc::clone(&self.acceptor.counters)
    }

    /// Serves until `shutdown`, then lets calls in progress finish within the grace period.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Some(f) = self.broker.federation.as_ref() else {
            return;
        };
        let permits = Arc::new(Semaphore::new(f.config.max_connections as usize));
        let (tx, rx) = mpsc::channel::<Result<PeerStream, std::io::Error>>(HANDOFF_QUEUE);
        let grace = Duration::from_secs(self.broker.config.server.shutdown_grace_secs);
        let service = FederationServer::new(FederationService {
            broker: Arc::clone(&self.broker),
        })
        .max_decoding_message_size(f.config.max_message_bytes)
        .max_encoding_message_size(f.config.max_message_bytes);
        let mut stop = shutdown.clone();
        let server = tonic::transport::Server::builder()
            .timeout(Duration::from_millis(f.config.request_timeout_ms.max(1)) * 2)
            .add_service(service)
            .serve_with_incoming_shutdown(ReceiverStream::new(rx), async move {
                crate::server::stopped(&mut stop).await;
            });
        let mut server = tokio::spawn(server);
        let acceptor = self.acceptor.clone();
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = crate::server::stopped(&mut shutdown) => break,
            };
            let (tcp, addr) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(error = %e, "federation accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = crate::server::stopped(&mut shutdown) => break,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(
                async move {
                    match acceptor.accept(tcp, addr, permit).await {
                        Ok(stream) => {
                            debug!(peer = %stream_peer(&stream), "peer connection authenticated");
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Err(e) => warn!(%addr, error = %e, "peer connection refused"),
                    }
                }
                .instrument(info_span!("federation.conn")),
            );
        }
        drop(tx);
        info!("federation listener stopped accepting");
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            warn!("federation calls still running after the grace period; closing");
            server.abort();
        }
    }
}

fn stream_peer(stream: &PeerStream) -> String {
    use tonic::transport::server::Connected as _;
    stream.connect_info().id
}
