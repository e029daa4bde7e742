//! The federation listener and the `micromsg.federation.v1.Federation` service.
//!
//! The accept loop is the client listener's ([`crate::listener`]): a slot
//! (`federation.max_connections`) before `accept`, then each connection's TLS handshake and
//! peer-id check in its own task under `handshake_timeout_secs`; only authenticated
//! connections reach tonic, through a bounded channel. Every call is attributed to the peer id in the connection's certificate
//! ([`PeerInfo`]); a call arriving any other way is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::listener::{AcceptLimits, Slot, accept_loop};

use super::mtls::{Acceptor, MtlsCounters, PeerHandshake, PeerInfo, PeerStream};
use super::proto::federation_server::{Federation as FederationApi, FederationServer};
use super::proto::{
    AcceptedAck, AcceptedRequest, DeliverRequest, DeliverResponse, InitiateAck, InitiateRequest,
    IsNetworkedRequest, IsNetworkedResponse, PingRequest, PingResponse, PortOutRequest,
    PortOutResponse, PortedAck, PortedEntry, RelayFrame, RelayWaitingAck, RelayWaitingRequest,
};
use super::{Home, contact, outbox, porting};
use crate::broker::Broker;
use crate::clock::{Now, unix_now};
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

/// Frames queued towards the caller's broker on a relay stream.
const RELAY_QUEUE: usize = 16;

#[tonic::async_trait]
impl FederationApi for FederationService {
    type RelayStream = ReceiverStream<Result<RelayFrame, Status>>;

    async fn relay(
        &self,
        request: Request<tonic::Streaming<RelayFrame>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let peer = peer_of(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the relay stream ended before naming a relay")
        })?;
        let id: [u8; 16] = first
            .relay
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("relay must be 16 bytes"))?;
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        let half = crate::relay::remote::stream_half(inbound, tx, Ok);
        self.broker
            .relays
            .attach_remote(id, &peer, half)
            .map_err(|_| Status::not_found("no such relay for this peer"))?;
        debug!(peer = %peer, "relay stream from a peer broker");
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn relay_waiting(
        &self,
        request: Request<RelayWaitingRequest>,
    ) -> Result<Response<RelayWaitingAck>, Status> {
        let peer = peer_of(&request)?;
        if let Ok(id) = <[u8; 16]>::try_from(request.get_ref().relay.as_slice()) {
            self.broker.relays.remote_waiting(id, &peer);
        }
        Ok(Response::new(RelayWaitingAck {}))
    }

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
        let Some(f) = self.broker.federation.as_ref() else {
            return Err(Status::failed_precondition("not networked"));
        };
        contact::receive_initiate(
            &self.broker.router,
            f,
            &peer,
            request.into_inner(),
            Now::read(),
        )?;
        Ok(Response::new(InitiateAck {}))
    }

    async fn accepted(
        &self,
        request: Request<AcceptedRequest>,
    ) -> Result<Response<AcceptedAck>, Status> {
        let peer = peer_of(&request)?;
        let span = info_span!("federation.accepted.receive", peer = %peer);
        telemetry::set_parent(&span, request.metadata());
        let Some(f) = self.broker.federation.as_ref() else {
            return Err(Status::failed_precondition("not networked"));
        };
        contact::receive_accepted(
            &self.broker.router,
            f,
            &peer,
            request.into_inner(),
            Now::read(),
        )
        .instrument(span)
        .await?;
        Ok(Response::new(AcceptedAck {}))
    }

    async fn port_out(
        &self,
        request: Request<PortOutRequest>,
    ) -> Result<Response<PortOutResponse>, Status> {
        let peer = peer_of(&request)?;
        let span = info_span!("federation.port_out.receive", peer = %peer);
        telemetry::set_parent(&span, request.metadata());
        let answer =
            porting::receive_port_out(&self.broker, &peer, request.into_inner(), unix_now())
                .instrument(span)
                .await?;
        Ok(Response::new(answer))
    }

    async fn ported(&self, request: Request<PortedEntry>) -> Result<Response<PortedAck>, Status> {
        let peer = peer_of(&request)?;
        let span = info_span!("federation.ported.receive", peer = %peer);
        telemetry::set_parent(&span, request.metadata());
        porting::receive_ported(&self.broker, &peer, request.into_inner(), unix_now())
            .instrument(span)
            .await?;
        Ok(Response::new(PortedAck {}))
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
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let Some(f) = self.broker.federation.as_ref() else {
            return;
        };
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
                crate::shutdown::stopped(&mut stop).await;
            });
        let mut server = tokio::spawn(server);
        let limits = AcceptLimits {
            max_connections: f.config.max_connections as usize,
            max_per_source: None,
            max_handshakes: f.config.max_handshakes as usize,
            max_handshakes_per_source: f.config.max_handshakes_per_source,
            handshake_timeout: Duration::from_secs(f.config.handshake_timeout_secs.max(1)),
            pressured_handshake_timeout: Duration::from_millis(
                f.config.pressured_handshake_timeout_ms.max(1),
            ),
        };
        // Authenticated connections go to tonic through the channel, each holding its slot.
        let serve = move |peer: PeerHandshake, _addr, slot: Slot| {
            let tx = tx.clone();
            async move {
                let stream = peer.into_stream(slot);
                debug!(peer = %stream_peer(&stream), "peer connection authenticated");
                let _ = tx.send(Ok(stream)).await;
            }
        };
        let mut handshakes = JoinSet::new();
        accept_loop(
            &self.listener,
            limits,
            self.acceptor.clone(),
            serve,
            || info_span!("federation.conn"),
            &mut handshakes,
            shutdown,
        )
        .await;
        // The handshakes in flight hold the last senders; tonic's incoming stream ends with them.
        handshakes.shutdown().await;
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
