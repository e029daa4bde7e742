//! [`Broker`]: the state every connection shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

use micromsg_crypto::identity::IdentityKey;
use micromsg_wire::message::response::{
    BrokerInfoData, InboxMode as WireInboxMode, Info, InfoLimits, KeyStorage, Network,
    NonceAlgorithm, Peer, Registration,
};
use micromsg_wire::{Hex32, Hex64, Limits, NumberPrefix, encode_info_canonical};

use crate::config::{Config, InboxMode, RegistrationPolicy};
use crate::contacts::Router;
use crate::federation::Federation;
use crate::limits::{DiscardedDeposits, FailureLock, ReplayCache, Source, WindowLimiter};
use crate::numbers::NumberAllocator;
use crate::online::Online;
use micromsg_store::{BatcherConfig, DepositBatcher, OutboxBatcher, Store};

/// Version of the client↔broker protocol this broker speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The state every connection, handler and background task of one broker shares. Its parts
/// are crate-private and grouped by who uses them; a handler gets only its area's part (see
/// `handlers`), the outside world the few accessors below.
#[derive(Debug)]
pub struct Broker {
    /// The effective configuration.
    pub(crate) config: Config,
    /// Entities, devices, inboxes.
    pub(crate) store: Store,
    /// Signs BROKER-INFO.
    pub(crate) identity: IdentityKey,
    /// Draws new numbers.
    pub(crate) numbers: Arc<NumberAllocator>,
    /// Logged-in devices and their event queues.
    pub(crate) online: Arc<Online>,
    /// Rate limits, lockouts and the login replay cache.
    pub(crate) limiters: Limiters,
    /// Routes contact requests (and holds the ones waiting for an answer).
    pub(crate) router: Router,
    /// The group commits and batched reads of the inbox paths.
    pub(crate) batchers: Batchers,
    /// Decoder limits derived from the configuration.
    pub(crate) wire_limits: Limits,
    /// When the broker started.
    pub(crate) started: Instant,
    /// Network membership, peers and the outbox; `None` for a standalone broker.
    pub(crate) federation: Option<Arc<Federation>>,
    /// Relays between clients that cannot reach each other directly.
    pub(crate) relays: Arc<crate::relay::Relays>,
}

/// Counters that refuse work beyond a configured rate, and the login replay cache.
#[derive(Debug)]
pub(crate) struct Limiters {
    /// Registrations (and device joins) per client IP per hour.
    pub(crate) registrations: WindowLimiter<Source>,
    /// INITIATE requests per entity per minute.
    pub(crate) initiates: WindowLimiter<String>,
    /// Login failures per entity, with the sources that failed.
    pub(crate) login_failures: FailureLock,
    /// Login failures per source, for any entities.
    pub(crate) login_sources: WindowLimiter<Source>,
    /// Accepted login nonces, refused a second time.
    /// Shared with the store's login readers, which check a LOGIN's nonce between its reads.
    pub(crate) replay: Arc<ReplayCache>,
    /// The answers given to discarded deposits (blocked senders), for their repeats.
    pub(crate) discarded: DiscardedDeposits,
}

impl Limiters {
    fn new(config: &Config) -> Self {
        // A nonce verifies for (2 * skew + 1) steps; remember it a little longer than that.
        let window = u64::from(config.auth.nonce_step_secs)
            * (2 * u64::from(config.auth.nonce_skew_steps) + 2);
        let entries = config.limits.max_table_entries;
        Self {
            registrations: WindowLimiter::new(
                config.registration.per_ip_per_hour,
                Duration::from_secs(3600),
                entries,
            ),
            initiates: WindowLimiter::new(
                config.contacts.initiates_per_minute,
                Duration::from_secs(60),
                entries,
            ),
            login_failures: FailureLock::new(
                config.auth.max_login_failures,
                Duration::from_secs(config.auth.lock_secs),
                entries,
            ),
            login_sources: WindowLimiter::new(
                config.auth.max_failures_per_source,
                Duration::from_secs(60),
                entries,
            ),
            replay: Arc::new(ReplayCache::new(Duration::from_secs(window))),
            discarded: DiscardedDeposits::new(entries),
        }
    }
}

/// The batching front ends of the store that the inbox paths use.
#[derive(Debug)]
pub(crate) struct Batchers {
    /// Group commit of offline deposits.
    pub(crate) deposits: DepositBatcher,
    /// Group commit of cross-broker deposits into the federation outbox, with their contact
    /// check.
    pub(crate) outbox: OutboxBatcher,
}

impl Batchers {
    fn spawn(config: &Config, store: &Store) -> Self {
        // On Postgres up to `database.deposit_batches_in_flight` deposit batches commit side by
        // side, each in a quota counter slot of its own (store::inbox::Lane), so one batch's
        // statements run while the other waits for its WAL flush. Gathering keeps senders who
        // deposit again at once in one batch instead of two taking turns (BatcherConfig::gather;
        // docs/performance.md). SQLite has one writer at a time.
        let deposits = DepositBatcher::spawn(
            store.clone(),
            BatcherConfig {
                max_in_flight: if store.backend_name() == "sqlite" {
                    1
                } else {
                    config.database.deposit_batches_in_flight
                },
                quota_per_device: config.inbox.quota_per_device,
                timeout: config.database.timeout(),
                gather: std::time::Duration::from_micros(config.database.deposit_gather_us),
                ..BatcherConfig::default()
            },
        );
        // Deliveries across brokers are not ordered, so outbox batches may commit side by side
        // on Postgres: as many as deposit batches (`database.deposit_batches_in_flight`). More
        // than two were measured to cost more CPU per message for no more throughput, since
        // smaller batches pay a transaction each (docs/performance.md). SQLite has one writer
        // at a time: a second batch would only wait for the write lock in SQLite's busy
        // handler, which sleeps in steps of up to 100 ms, where waiting here for the batch
        // before it wakes at once. A DEPOSIT to a peer broker's client waits for its answer
        // like one to a local client, so this gathers too.
        let outbox = OutboxBatcher::spawn(
            store.clone(),
            BatcherConfig {
                max_in_flight: if store.backend_name() == "sqlite" {
                    1
                } else {
                    config.database.deposit_batches_in_flight
                },
                timeout: config.database.timeout(),
                gather: std::time::Duration::from_micros(config.database.deposit_gather_us),
                ..BatcherConfig::default()
            },
        );
        Self { deposits, outbox }
    }
}

impl Broker {
    /// Assembles the shared state of a standalone broker.
    pub fn new(config: Config, store: Store, identity: IdentityKey) -> Self {
        Self::with_federation(config, store, identity, None)
    }

    /// Assembles the shared state; `federation` makes it a member of a network (its prefixes
    /// must already be in `config.numbers.prefixes`).
    pub fn with_federation(
        config: Config,
        store: Store,
        identity: IdentityKey,
        federation: Option<Federation>,
    ) -> Self {
        let numbers = Arc::new(NumberAllocator::new(
            config.numbers.prefixes.clone(),
            config.numbers.length,
        ));
        let online = Arc::<Online>::default();
        let federation = federation.map(Arc::new);
        let relays = Arc::new(crate::relay::Relays::new(
            config.relay.clone(),
            Arc::clone(&online),
            federation.clone(),
            Duration::from_secs(config.contacts.request_ttl_secs),
            config.limits.max_table_entries,
        ));
        let router = Router {
            relays: Arc::clone(&relays),
            store: store.clone(),
            online: Arc::clone(&online),
            pending: Arc::default(),
            numbers: Arc::clone(&numbers),
            remember_unknown_targets: config.contacts.remember_unknown_targets,
            probes: Arc::new(crate::contacts::probes::ProbeLog::new(
                config.limits.max_table_entries,
            )),
            request_ttl: Duration::from_secs(config.contacts.request_ttl_secs),
            pubkey_ttl_secs: federation.as_ref().map_or(0, |f| f.config.pubkey_ttl_secs),
        };
        let wire_limits = Limits {
            max_frame_len: config.limits.max_frame_len,
            ..Limits::default()
        };
        Self {
            limiters: Limiters::new(&config),
            batchers: Batchers::spawn(&config, &store),
            router,
            numbers,
            online,
            config,
            store,
            identity,
            wire_limits,
            started: Instant::now(),
            federation,
            relays,
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store (for tests and tools that inspect what the broker holds).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Network membership, peers and counters; `None` for a standalone broker.
    pub fn federation(&self) -> Option<&Federation> {
        self.federation.as_deref()
    }

    /// The relays (counters for status and metrics).
    pub fn relays(&self) -> &crate::relay::Relays {
        &self.relays
    }

    /// The contact-request router (for driving the federation's receiving side directly, as
    /// the fuzz targets do).
    pub fn router(&self) -> &crate::contacts::Router {
        &self.router
    }

    /// BROKER-INFO: what this broker does, signed with its identity key.
    pub fn info(&self, now: u64) -> BrokerInfoData {
        let c = &self.config;
        let prefixes = c
            .numbers
            .prefixes
            .iter()
            .filter_map(|p| NumberPrefix::new(p.clone()).ok())
            .collect();
        let info = Info {
            protocol: PROTOCOL_VERSION,
            broker_id: c.server.broker_id.clone(),
            inbox_mode: match c.inbox.mode {
                InboxMode::Entity => WireInboxMode::Entity,
                InboxMode::Number => WireInboxMode::Number,
            },
            registration: match c.registration.policy {
                RegistrationPolicy::Open => Registration::Open,
                RegistrationPolicy::Token => Registration::Token,
                RegistrationPolicy::Closed => Registration::Closed,
            },
            nonce_step: c.auth.nonce_step_secs,
            nonce_skew: c.auth.nonce_skew_steps,
            nonce_algorithm: NonceAlgorithm::MmNonce1,
            key_storage: vec![KeyStorage::BrokerBackup, KeyStorage::DeviceToDevice],
            network: match &self.federation {
                None => Network {
                    name: None,
                    peers: Vec::new(),
                },
                Some(f) => Network {
                    name: Some(f.network.name.clone()),
                    peers: f
                        .network
                        .peers(&f.me.id)
                        .map(|p| Peer {
                            id: p.id.clone(),
                            prefixes: p
                                .prefixes
                                .iter()
                                .filter_map(|x| NumberPrefix::new(x.clone()).ok())
                                .collect(),
                        })
                        .collect(),
                },
            },
            prefixes,
            limits: InfoLimits {
                max_frame: c.limits.max_frame_len,
                max_devices: c.limits.max_devices,
                inbox_quota: c.inbox.quota_per_device,
                message_max: c.inbox.max_message_bytes,
                message_ttl: c.inbox.ttl_secs,
            },
            time: now,
        };
        let signature = self.identity.sign(&encode_info_canonical(&info));
        BrokerInfoData {
            info,
            signature: Hex64::from_bytes(signature),
            identity_key: Hex32::from_bytes(*self.identity.public_key().as_bytes()),
        }
    }
}
