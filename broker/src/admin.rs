//! The operator's gRPC service (`proto/micromsg/admin/v1/admin.proto`) on its own listener
//! (`admin.listen`, `127.0.0.1:7402` by default; plain gRPC, so keep it local), with the
//! standard health service (`grpc.health.v1.Health`) and server reflection, so any gRPC tool
//! can query it. [`fetch_status`] and [`render_text`] / [`render_json`] are what
//! `micromsg-broker status` prints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::broker::Broker;
use crate::clock::unix_now;

/// The generated gRPC code of `micromsg.admin.v1`.
pub mod proto {
    #![allow(
        missing_docs,
        unreachable_pub,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("micromsg.admin.v1");

    /// The encoded descriptors of every MicroMsg service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("micromsg_descriptor");
}

use proto::admin_server::{Admin, AdminServer};

/// The gRPC services the admin port serves, and so the ones its reflection lists.
pub const SERVED: &[&str] = &[
    "micromsg.admin.v1.Admin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];
use proto::{
    FederationCounters, PeerStatus, PortedNumber, RelayCounters, StatusRequest, StatusResponse,
};

/// Why the admin service or the status command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The listener could not be bound.
    #[error("binding the admin listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reflection could not be set up from the descriptors.
    #[error("server reflection: {0}")]
    Reflection(String),
    /// The status call failed.
    #[error("admin service at {addr}: {reason}")]
    Call {
        /// Where.
        addr: String,
        /// What failed.
        reason: String,
    },
}

/// The `Admin` service over the shared broker state.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    /// A service reporting on `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

/// Builds the status snapshot of `broker`.
pub async fn status(broker: &Broker) -> StatusResponse {
    let store = &broker.store;
    let nonneg = |v: i64| u64::try_from(v).unwrap_or(0);
    let store_ok = store.ping().await.is_ok();
    let entities = store.entity_count().await.map(nonneg).unwrap_or(0);
    let devices = store.device_count().await.map(nonneg).unwrap_or(0);
    let inbox_depth = store.inbox_depth().await.map(nonneg).unwrap_or(0);
    let outbox_depth = store.outbox_depth().await.map(nonneg).unwrap_or(0);
    let per_peer = store.outbox_depth_by_peer().await.unwrap_or_default();
    let ported = if broker.federation.is_some() {
        ported_status(store).await
    } else {
        Vec::new()
    };
    let (network, peers, counters) = match broker.federation.as_ref() {
        None => (String::new(), Vec::new(), None),
        Some(f) => {
            let mut peers: Vec<PeerStatus> = f
                .links
                .values()
                .map(|link| {
                    let state = link.state();
                    PeerStatus {
                        broker_id: link.entry.id.clone(),
                        endpoint: link.entry.endpoint.clone(),
                        prefixes: link.entry.prefixes.clone(),
                        reachable: state.reachable == Some(true),
                        last_ok: state.last_ok,
                        last_error: state.last_error,
                        outbox_depth: per_peer
                            .iter()
                            .find(|(id, _)| *id == link.entry.id)
                            .map_or(0, |(_, n)| nonneg(*n)),
                    }
                })
                .collect();
            peers.sort_by(|a, b| a.broker_id.cmp(&b.broker_id));
            let c = &f.counters;
            let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
            let counters = FederationCounters {
                delivered: load(&c.delivered),
                delivery_retries: load(&c.delivery_retries),
                delivery_expired: load(&c.delivery_expired),
                received: load(&c.received),
                initiates_forwarded: load(&c.initiates_forwarded),
                initiates_failed: load(&c.initiates_failed),
                initiates_overflow: load(&c.initiates_overflow),
                initiates_received: load(&c.initiates_received),
                accepted_relayed: load(&c.accepted_relayed),
            };
            (f.network.name.clone(), peers, Some(counters))
        }
    };
    StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        broker_id: broker.config.server.broker_id.clone(),
        uptime_secs: broker.started.elapsed().as_secs(),
        connected_clients: broker.online.connection_count() as u64,
        connected_entities: broker.online.entity_count() as u64,
        entities,
        devices,
        inbox_depth,
        outbox_depth,
        store_backend: store.backend_name().to_owned(),
        store_ok,
        network,
        prefixes: broker.config.numbers.prefixes.clone(),
        peers,
        relays: Some(RelayCounters {
            open: u64::from(broker.relays.open()),
            spliced: broker.relays.stats.spliced.load(Ordering::Relaxed),
            bytes: broker.relays.stats.bytes.load(Ordering::Relaxed),
            refused_by_limit: broker.relays.stats.refused_by_limit.load(Ordering::Relaxed),
        }),
        federation: counters,
        ported,
    }
}

/// The ported-number entries held, with the peers each still has to be announced to.
async fn ported_status(store: &micromsg_store::Store) -> Vec<PortedNumber> {
    let waiting = store.unannounced_by_number().await.unwrap_or_default();
    store
        .ported_entries()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|e| PortedNumber {
            unannounced: waiting
                .iter()
                .find(|(n, _)| n == e.number.as_str())
                .map_or(0, |(_, c)| u64::try_from(*c).unwrap_or(0)),
            number: e.number.as_str().to_owned(),
            seq: e.seq,
            from_broker: e.from_broker,
            to_broker: e.to_broker,
            time: e.time,
            signed_by_broker: !e.broker_signature.is_empty(),
        })
        .collect()
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(status(&self.broker).await))
    }
}

/// A bound admin listener.
#[derive(Debug)]
pub struct AdminListener {
    listener: TcpListener,
    broker: Arc<Broker>,
}

impl AdminListener {
    /// Binds `addr`.
    pub async fn bind(broker: Arc<Broker>, addr: SocketAddr) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener, broker })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves Admin, Health and reflection until `shutdown`; health turns NOT_SERVING first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), AdminError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AdminServer<AdminService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        // The descriptor set also holds the federation service, which this port does not
        // serve: reflection lists only what is served here.
        let reflection = || {
            SERVED
                .iter()
                .fold(tonic_reflection::server::Builder::configure(), |b, name| {
                    b.with_service_name(*name)
                })
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| AdminError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| AdminError::Reflection(e.to_string()))?;
        let service = AdminServer::new(AdminService::new(Arc::clone(&self.broker)));
        let incoming = TcpListenerStream::new(self.listener);
        let signal = async move {
            crate::shutdown::stopped(&mut shutdown).await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health.set_not_serving::<AdminServer<AdminService>>().await;
        };
        let server = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, signal);
        // Admin calls are short: the server ends on its own once they are answered.
        if let Err(e) = server.await {
            warn!(error = %e, "admin service ended with an error");
        }
        info!("admin listener stopped");
        Ok(())
    }
}

/// Calls `Status` on the admin service at `addr` (`host:port`).
pub async fn fetch_status(addr: &str) -> Result<StatusResponse, AdminError> {
    let err = |reason: String| AdminError::Call {
        addr: addr.to_owned(),
        reason,
    };
    let mut client = proto::admin_client::AdminClient::new(connect(addr).await?);
    let response = client
        .status(StatusRequest {})
        .await
        .map_err(|s| err(format!("{:?}: {}", s.code(), s.message())))?;
    Ok(response.into_inner())
}

async fn connect(addr: &str) -> Result<tonic::transport::Channel, AdminError> {
    let err = |reason: String| AdminError::Call {
        addr: addr.to_owned(),
        reason,
    };
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| err(crate::telemetry::error_chain(&e)))
}

/// Asks the standard health service at `addr` about `service` (`""` for the whole server);
/// true when it answers SERVING.
pub async fn check_health(addr: &str, service: &str) -> Result<bool, AdminError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(connect(addr).await?);
    let answer = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| AdminError::Call {
            addr: addr.to_owned(),
            reason: format!("{:?}: {}", s.code(), s.message()),
        })?;
    Ok(answer.into_inner().status == ServingStatus::Serving as i32)
}

/// The services listed by server reflection (`grpc.reflection.v1`) at `addr`.
pub async fn reflected_services(addr: &str) -> Result<Vec<String>, AdminError> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let fail = |reason: String| AdminError::Call {
        addr: addr.to_owned(),
        reason,
    };
    let mut client = ServerReflectionClient::new(connect(addr).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .map_err(|s| fail(s.message().to_owned()))?
        .into_inner();
    let first = answers
        .message()
        .await
        .map_err(|s| fail(s.message().to_owned()))?
        .ok_or_else(|| fail("no answer".into()))?;
    match first.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        _ => Err(fail("unexpected reflection answer".into())),
    }
}

/// The status as JSON (field names as in the proto, snake case).
pub fn render_json(s: &StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "version": s.version,
        "broker_id": s.broker_id,
        "uptime_secs": s.uptime_secs,
        "connected_clients": s.connected_clients,
        "connected_entities": s.connected_entities,
        "entities": s.entities,
        "devices": s.devices,
        "inbox_depth": s.inbox_depth,
        "outbox_depth": s.outbox_depth,
        "store_backend": s.store_backend,
        "store_ok": s.store_ok,
        "network": if s.network.is_empty() { serde_json::Value::Null } else { s.network.clone().into() },
        "prefixes": s.prefixes,
        "peers": s.peers.iter().map(|p| serde_json::json!({
            "broker_id": p.broker_id,
            "endpoint": p.endpoint,
            "prefixes": p.prefixes,
            "reachable": p.reachable,
            "last_ok": p.last_ok,
            "last_error": p.last_error,
            "outbox_depth": p.outbox_depth,
        })).collect::<Vec<_>>(),
        "relays": s.relays.as_ref().map(|r| serde_json::json!({
            "open": r.open,
            "spliced": r.spliced,
            "bytes": r.bytes,
            "refused_by_limit": r.refused_by_limit,
        })),
        "federation": s.federation.as_ref().map(|c| serde_json::json!({
            "delivered": c.delivered,
            "delivery_retries": c.delivery_retries,
            "delivery_expired": c.delivery_expired,
            "received": c.received,
            "initiates_forwarded": c.initiates_forwarded,
            "initiates_failed": c.initiates_failed,
            "initiates_overflow": c.initiates_overflow,
            "initiates_received": c.initiates_received,
            "accepted_relayed": c.accepted_relayed,
        })),
        "ported": s.ported.iter().map(|p| serde_json::json!({
            "number": p.number,
            "seq": p.seq,
            "from_broker": p.from_broker,
            "to_broker": p.to_broker,
            "time": p.time,
            "signed_by_broker": p.signed_by_broker,
            "unannounced": p.unannounced,
        })).collect::<Vec<_>>(),
    })
}

/// The status as aligned text for a terminal.
pub fn render_text(s: &StatusResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "broker    {} (micromsg-broker {})",
        s.broker_id, s.version
    );
    let _ = writeln!(out, "uptime    {}", human_duration(s.uptime_secs));
    let _ = writeln!(
        out,
        "store     {} ({})",
        s.store_backend,
        if s.store_ok { "ok" } else { "NOT ANSWERING" }
    );
    let _ = writeln!(
        out,
        "clients   {} connections, {} entities online",
        s.connected_clients, s.connected_entities
    );
    let _ = writeln!(out, "entities  {} ({} devices)", s.entities, s.devices);
    let _ = writeln!(out, "inbox     {} messages held", s.inbox_depth);
    let _ = writeln!(out, "prefixes  {}", s.prefixes.join(", "));
    if let Some(r) = &s.relays {
        let _ = writeln!(
            out,
            "relays    {} open; since up {} joined, {} bytes relayed, {} refused by a limit",
            r.open, r.spliced, r.bytes, r.refused_by_limit
        );
    }
    if s.network.is_empty() {
        let _ = writeln!(out, "network   none (standalone)");
        return out;
    }
    let _ = writeln!(out, "network   {}", s.network);
    let _ = writeln!(out, "outbox    {} deliveries waiting", s.outbox_depth);
    if let Some(c) = &s.federation {
        let _ = writeln!(
            out,
            "since up  {} delivered, {} received, {} retried, {} expired; contact requests {} forwarded, {} received, {} accepted",
            c.delivered,
            c.received,
            c.delivery_retries,
            c.delivery_expired,
            c.initiates_forwarded,
            c.initiates_received,
            c.accepted_relayed
        );
    }
    let _ = writeln!(out, "peers");
    let now = unix_now();
    for p in &s.peers {
        let state = if p.reachable {
            "reachable".to_owned()
        } else if p.last_error.is_empty() {
            "not tried yet".to_owned()
        } else {
            format!("UNREACHABLE ({})", p.last_error)
        };
        let last = if p.last_ok == 0 {
            "never".to_owned()
        } else {
            format!("{} ago", human_duration(now.saturating_sub(p.last_ok)))
        };
        let _ = writeln!(
            out,
            "  {:<12} {:<24} prefixes {:<12} outbox {:<6} last ok {:<10} {}",
            p.broker_id,
            p.endpoint,
            p.prefixes.join(","),
            p.outbox_depth,
            last,
            state
        );
    }
    if !s.ported.is_empty() {
        let _ = writeln!(out, "ported numbers");
        for p in &s.ported {
            let mut notes = Vec::new();
            if !p.signed_by_broker {
                notes.push("awaiting the announcement".to_owned());
            }
            if p.unannounced > 0 {
                notes.push(format!("{} peers still to tell", p.unannounced));
            }
            let line = format!(
                "  {:<15} {} -> {:<12} seq {:<4} {}",
                p.number,
                p.from_broker,
                p.to_broker,
                p.seq,
                notes.join(", ")
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}
