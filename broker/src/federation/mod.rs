//! Federation: brokers of a pre-contracted network sharing one number space over gRPC with
//! mutual TLS (`proto/micromsg/federation/v1/federation.proto`, `docs/federation.md`).
//!
//! Layout:
//! - [`network`]: the network file (ids, endpoints, prefixes) and `network init`.
//! - [`mtls`]: TLS 1.3 with client certificates; the peer's id comes from its certificate.
//! - [`proto`]: the generated gRPC code.
//! - [`peers`]: one lazily connected gRPC channel per peer and its reachability.
//! - [`probe`]: the task that pings every peer now and then.
//! - [`outgoing`]: networked contact requests of this broker's clients, waiting for an answer.
//! - [`contact`]: networked contact setup (forwarding INITIATEs, answering, the sealed address
//!   handoff).
//! - [`outbox`]: cross-broker offline delivery through the durable outbox, and its receiving
//!   end.
//! - [`porting`]: number portability: the losing broker's `PortOut`, the ported-number
//!   entries (signed, verified, announced durably to every peer) and the routing they change.
//! - [`service`]: the gRPC server (listener, accept loop, the `Federation` service).
//!
//! [`Federation`] is the state a networked broker shares between its connections, the gRPC
//! service and its background tasks; a standalone broker has none.

pub mod contact;
pub mod handoff;
pub mod mtls;
pub mod network;
pub mod outbox;
pub mod outgoing;
pub mod peers;
pub mod porting;
pub mod probe;
pub mod proto;
pub mod service;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use crate::config::{FederationConfig, FederationFiles};
use crate::tls::TlsError;
use mtls::MtlsConfig;
use network::{BrokerEntry, Network, NetworkError};
use outgoing::Outgoing;
use peers::PeerLink;

/// Why federation could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The network file is missing or invalid.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The certificates could not be loaded.
    #[error("federation TLS: {0}")]
    Tls(#[from] TlsError),
    /// This broker's id is not in the network file.
    #[error("server.broker_id {0:?} is not a broker of the network file")]
    NotAMember(String),
}

/// Where a number lives, as far as the network file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home<'a> {
    /// One of this broker's prefixes.
    Own,
    /// A peer's prefixes.
    Peer(&'a BrokerEntry),
    /// No broker of the network serves it.
    None,
}

/// Where a ported number lives now, from its latest ported-number entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The entry's sequence.
    pub seq: u64,
    /// The broker the number left.
    pub from: String,
    /// The broker that serves it now.
    pub to: String,
}

/// Counters of what federation did (logged, and exported as metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Networked INITIATEs forwarded to a peer.
    pub initiates_forwarded: AtomicU64,
    /// Forwards dropped because too many were in flight.
    pub initiates_overflow: AtomicU64,
    /// Forwards whose call failed (peer down after the ack); silent to the caller.
    pub initiates_failed: AtomicU64,
    /// Initiate calls received from peers.
    pub initiates_received: AtomicU64,
    /// Acceptances relayed to a local caller.
    pub accepted_relayed: AtomicU64,
    /// Deliveries sent and confirmed by peers.
    pub delivered: AtomicU64,
    /// Delivery attempts that failed and were rescheduled.
    pub delivery_retries: AtomicU64,
    /// Outbox items dropped because they expired before the peer took them.
    pub delivery_expired: AtomicU64,
    /// Deliveries received from peers and committed (or already held).
    pub received: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The state of a networked broker.
#[derive(Debug)]
pub struct Federation {
    /// The network file.
    pub network: Arc<Network>,
    /// This broker's entry in it.
    pub me: BrokerEntry,
    /// The settings.
    pub config: FederationConfig,
    /// TLS configurations (listener and calls).
    pub mtls: MtlsConfig,
    /// One link per peer, by id.
    pub links: HashMap<String, Arc<PeerLink>>,
    /// Networked contact requests this broker's clients made, waiting for `Accepted`.
    pub outgoing: Outgoing,
    /// Bounds the forwards in flight.
    pub forwards: Arc<Semaphore>,
    /// Wakes the outbox worker to read the outbox table: a row was queued that it was not
    /// handed in memory.
    pub outbox_wake: Notify,
    /// Committed outbox rows on their way to the outbox worker ([`handoff`]).
    pub outbox_handoff: handoff::Handoff,
    /// What happened so far.
    pub counters: Counters,
    /// Ported numbers: number → where it lives now (docs/federation.md 12). Consulted before
    /// the network file's prefixes; loaded from the store at start
    /// ([`porting::load_routes`]) and updated as entries are recorded.
    pub ported: RwLock<HashMap<String, Route>>,
    /// Wakes the announcer when an entry was queued for the peers.
    pub announce_wake: Notify,
}

/// Rows the outbox worker keeps waiting per peer (beyond them rows wait in the table): a few
/// batches beyond those in flight, so a busy peer's next batch is ready in memory.
pub fn handoff_waiting(config: &FederationConfig) -> usize {
    config
        .outbox_batch
        .max(1)
        .saturating_mul(config.outbox_batches_in_flight.max(1))
        .saturating_mul(2)
}

impl Federation {
    /// Loads the network file and certificates named by `config` for broker `me`.
    pub fn load(config: &FederationConfig, me: &str) -> Result<Option<Self>, FederationError> {
        let Some(files) = config.files(me) else {
            return Ok(None);
        };
        Self::from_files(config, me, &files).map(Some)
    }

    fn from_files(
        config: &FederationConfig,
        me: &str,
        files: &FederationFiles,
    ) -> Result<Self, FederationError> {
        let network = Arc::new(Network::load(&files.network)?);
        let entry = network
            .broker(me)
            .cloned()
            .ok_or_else(|| FederationError::NotAMember(me.to_owned()))?;
        let mtls = MtlsConfig::load(files)?;
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let links = network
            .peers(me)
            .map(|peer| {
                let link = PeerLink::new(
                    peer.clone(),
                    Arc::clone(&mtls.client),
                    connect_timeout,
                    config.max_message_bytes,
                );
                (peer.id.clone(), Arc::new(link))
            })
            .collect();
        let outbox_handoff = handoff::Handoff::new(
            handoff_waiting(config).saturating_mul(network.peers(me).count().max(1)),
        );
        Ok(Self {
            network,
            me: entry,
            config: config.clone(),
            mtls,
            links,
            outgoing: Outgoing::default(),
            forwards: Arc::new(Semaphore::new(config.max_forwards_in_flight)),
            outbox_wake: Notify::new(),
            outbox_handoff,
            counters: Counters::default(),
            ported: RwLock::default(),
            announce_wake: Notify::new(),
        })
    }

    /// Where `number` lives: a ported-number entry first, else the prefixes of the network
    /// file.
    pub fn home_of(&self, number: &str) -> Home<'_> {
        let ported = self.route(number).map(|r| r.to);
        let entry = match ported {
            // An entry naming a broker no longer in the network file routes nowhere.
            Some(to) => self.network.broker(&to),
            None => self.network.home_of(number),
        };
        match entry {
            Some(b) if b.id == self.me.id => Home::Own,
            Some(b) => Home::Peer(b),
            None => Home::None,
        }
    }

    /// The ported-number route held for `number`.
    pub fn route(&self, number: &str) -> Option<Route> {
        self.ported
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(number)
            .cloned()
    }

    /// The link to peer `id`.
    pub fn link(&self, id: &str) -> Option<&Arc<PeerLink>> {
        self.links.get(id)
    }

    /// How long connecting to a peer may take (`connect_timeout_ms`).
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.config.connect_timeout_ms.max(1))
    }

    /// The per-call deadline (`request_timeout_ms`).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms.max(1))
    }
}
