//! The broker's configuration: one typed [`Config`], read from an optional TOML file, then
//! overridden by `MICROMSG_<SECTION>_<KEY>` environment variables, then by command-line flags.
//!
//! Every limit lives here with its default and unit, so an operator can see and change it; the
//! full reference is in `docs/operations.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file or an override is not valid TOML or does not fit the schema.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole broker configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener, identity and logging.
    pub server: ServerConfig,
    /// TLS certificate for the client listener.
    pub tls: TlsConfig,
    /// Where entities, devices and inboxes are stored.
    pub database: DatabaseConfig,
    /// The number space this broker allocates from.
    pub numbers: NumbersConfig,
    /// Who may register.
    pub registration: RegistrationConfig,
    /// Login nonce parameters.
    pub auth: AuthConfig,
    /// Offline inboxes.
    pub inbox: InboxConfig,
    /// Contact setup.
    pub contacts: ContactsConfig,
    /// Relays between clients that cannot reach each other directly.
    pub relay: RelayConfig,
    /// Resource limits.
    pub limits: LimitsConfig,
    /// Membership of a broker network (gRPC over mutual TLS with peer brokers).
    pub federation: FederationConfig,
    /// The operator's gRPC service (status, health, reflection).
    pub admin: AdminConfig,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the client listener (YAML over TLS). Default `0.0.0.0:7400`.
    pub listen: SocketAddr,
    /// Data directory: SQLite store, TLS files, identity key. Default `./micromsg-data`.
    pub data_dir: PathBuf,
    /// This broker's name, shown in BROKER-INFO and used as its id in a network. Default `broker`.
    pub broker_id: String,
    /// Log format: `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// Seconds that in-flight requests get to finish on shutdown. Default 10.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            data_dir: PathBuf::from("./micromsg-data"),
            broker_id: "broker".to_owned(),
            log_format: LogFormat::Text,
            shutdown_grace_secs: 10,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[tls]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Operator certificate chain (PEM). When unset, the broker makes a private CA and a server
    /// certificate in `DATA_DIR/tls/` on first start.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the operator certificate.
    pub key: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the generated certificate (it always covers
    /// `localhost` and `127.0.0.1`). Default empty.
    pub names: Vec<String>,
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` for Postgres; unset means the embedded SQLite file `DATA_DIR/micromsg.db`.
    pub url: Option<String>,
    /// Connection pool size. Default 16.
    pub max_connections: u32,
    /// How long a request waits for the database (a pooled connection, a Postgres statement,
    /// a group commit) before it is answered UNAVAILABLE, milliseconds. Default 5000.
    pub timeout_ms: u64,
    /// Deposit batches committing at once on Postgres (1..=64), each in a quota counter slot
    /// of its own, and as many batches of the federation outbox (DEPOSITs to a peer broker's
    /// clients); SQLite always takes one. A second batch starts beside one in flight only while
    /// flushes are slow beside the statements (the store measures both). Default 2.
    pub deposit_batches_in_flight: usize,
    /// The longest a deposit batch (for local inboxes, or the federation outbox) waits, after
    /// a batch was answered, for the senders it answered to deposit again, so that they share
    /// one commit instead of taking turns (never longer than half that batch's commit took),
    /// microseconds (0..=100000; 0 never waits). Default 2000.
    pub deposit_gather_us: u64,
    /// SQLite: threads that run LOGIN's two reads, each with a read-only connection of its
    /// own, so that a LOGIN's store work is one hop to another thread instead of three through
    /// the pool (0..=64; 0 reads on the pool). Postgres ignores it. Default 1.
    pub login_readers: usize,
}

/// The most `database.login_readers` may be.
pub const MAX_LOGIN_READERS: usize = 64;

/// The most `database.deposit_batches_in_flight` may be.
pub const MAX_DEPOSIT_BATCHES_IN_FLIGHT: usize = 64;

/// The most `database.deposit_gather_us` may be (0.1 s).
pub const MAX_DEPOSIT_GATHER_US: u64 = 100_000;

impl DatabaseConfig {
    /// [`Self::timeout_ms`] as a duration.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 16,
            timeout_ms: micromsg_store::DEFAULT_STORE_TIMEOUT.as_millis() as u64,
            deposit_batches_in_flight: 2,
            deposit_gather_us: 2_000,
            login_readers: 1,
        }
    }
}

/// `[numbers]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NumbersConfig {
    /// Digit prefixes this broker allocates numbers under. Default `["555"]`.
    pub prefixes: Vec<String>,
    /// Total digits of a number, prefix included (4..=15). Default 10.
    pub length: usize,
}

impl Default for NumbersConfig {
    fn default() -> Self {
        Self {
            prefixes: vec!["555".to_owned()],
            length: 10,
        }
    }
}

/// `[registration]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// `open`, `token` (REGISTER must carry one of `tokens`) or `closed`. Default `open`.
    pub policy: RegistrationPolicy,
    /// Accepted registration tokens when the policy is `token`. Default empty.
    pub tokens: Vec<String>,
    /// Registrations allowed per client IP per hour. Default 30.
    pub per_ip_per_hour: u32,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            policy: RegistrationPolicy::Open,
            tokens: Vec::new(),
            per_ip_per_hour: 30,
        }
    }
}

/// Who may register.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationPolicy {
    /// Anyone.
    Open,
    /// Only with a configured token.
    Token,
    /// Nobody.
    Closed,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Seconds per login-nonce step. Default 6 (the seed's value).
    pub nonce_step_secs: u32,
    /// Steps of clock skew accepted either side. Default 1.
    pub nonce_skew_steps: u32,
    /// Failed logins per entity before it is locked against the sources that failed.
    /// Default 10.
    pub max_login_failures: u32,
    /// Failed logins per source (an IPv4 address, or an IPv6 /64) per minute, for any
    /// entities, before that source's LOGINs are refused RATE-LIMITED. Default 30.
    pub max_failures_per_source: u32,
    /// Seconds an entity stays locked after too many failures. Default 300.
    pub lock_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            nonce_step_secs: 6,
            nonce_skew_steps: 1,
            max_login_failures: 10,
            max_failures_per_source: 30,
            lock_secs: 300,
        }
    }
}

/// `[inbox]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// `entity` (a copy per device) or `number` (one shared inbox). Default `entity`.
    pub mode: InboxMode,
    /// Seconds a held message lives. Default 2,592,000 (30 days).
    pub ttl_secs: u64,
    /// Messages held per device. Default 10,000.
    pub quota_per_device: u32,
    /// Largest deposited ciphertext in bytes. Default 48,000: its base64 plus the YAML around it
    /// fits a 64 KiB frame (protocol.md: MESSAGE-MAX ≤ 3·floor((MAX-FRAME−512)/4)).
    pub max_message_bytes: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            mode: InboxMode::Entity,
            ttl_secs: 30 * 24 * 3600,
            quota_per_device: 10_000,
            max_message_bytes: 48_000,
        }
    }
}

/// How offline messages for several devices are held.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InboxMode {
    /// The broker copies each message into every device's inbox.
    Entity,
    /// One inbox per number, kept until every device has acknowledged.
    Number,
}

/// The most `contacts.forward_max_days` may be (ten years).
pub const MAX_FORWARD_DAYS: u64 = 3650;

/// `[contacts]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ContactsConfig {
    /// Remember INITIATEs to numbers that do not exist, so that if the number is handed out
    /// later the caller cannot reach it (the seed's option). Default true.
    pub remember_unknown_targets: bool,
    /// INITIATE requests per entity per minute. Default 30.
    pub initiates_per_minute: u32,
    /// Seconds a target has to answer a contact request, and a connect token lives. Default 120.
    pub request_ttl_secs: u64,
    /// The most days a FORWARD (a moved entity's signed notice for callers of its old number)
    /// is kept; 0 refuses FORWARD, at most 3,650. Default 30.
    pub forward_max_days: u64,
}

impl Default for ContactsConfig {
    fn default() -> Self {
        Self {
            remember_unknown_targets: true,
            initiates_per_minute: 30,
            request_ttl_secs: 120,
            forward_max_days: 30,
        }
    }
}

/// `[relay]`: relays between clients that cannot reach each other directly (protocol.md
/// 6.26).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Offer relays (a `RELAY` id in CONTACT-ACCEPTED and CONTACT-CONNECTING). Default true.
    pub enabled: bool,
    /// Relays one device may have open (joined or waiting) at once. Default 8.
    pub max_per_device: u32,
    /// Relays open on this broker at once. Default 1,000.
    pub max_total: u32,
    /// Bytes per second each direction of a relay may carry; faster senders are throttled
    /// (their bytes wait, then TCP pushes back). 0 means no limit. Default 1,048,576.
    pub bytes_per_sec: u64,
    /// Seconds a relay may carry nothing either way before it is closed. Default 120 (the
    /// sessions inside send heartbeats every 10 s).
    pub idle_timeout_secs: u64,
    /// Bytes the broker holds for one direction of a relay at once (its read buffer); a
    /// sender past it waits. At least 4,096. Default 65,536.
    pub buffer_bytes: u32,
    /// Seconds the first half of a relay waits for the second. Default 30.
    pub join_timeout_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_per_device: 8,
            max_total: 1_000,
            bytes_per_sec: 1 << 20,
            idle_timeout_secs: 120,
            buffer_bytes: 65_536,
            join_timeout_secs: 30,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame in bytes, checked before parsing. Default 65,536.
    pub max_frame_len: u32,
    /// Open client connections in total. Default 20,000.
    pub max_connections: u32,
    /// Open client connections per source (IPv4 address, IPv6 /64). Default 256.
    pub max_connections_per_ip: u32,
    /// Seconds a client has to finish the TLS handshake. Default 10.
    pub handshake_timeout_secs: u64,
    /// Client connections in their TLS handshake at once; more are closed at once. Default
    /// 1,024.
    pub max_handshakes: u32,
    /// Client connections in their TLS handshake at once from one source. Default 64 (a NAT puts many clients behind one address).
    pub max_handshakes_per_source: u32,
    /// Milliseconds a client has to finish the TLS handshake while more than half of
    /// `max_handshakes` are taken (a flood of idle connections). Default 1,000.
    pub pressured_handshake_timeout_ms: u64,
    /// Seconds without a frame before a connection is closed. Default 120 (send PING to stay).
    pub idle_timeout_secs: u64,
    /// Requests per second per connection (token bucket rate). Default 200.
    pub requests_per_sec: u32,
    /// Token bucket burst for requests per connection. Default 400.
    pub requests_burst: u32,
    /// Devices per entity. Default 8.
    pub max_devices: u32,
    /// Seconds a device registration secret lives. Default 600.
    pub device_secret_ttl_secs: u64,
    /// Events queued for one connection before it is dropped as too slow. Default 256.
    pub event_queue: usize,
    /// Most keys each in-memory limiter table holds (registrations per IP, INITIATEs per
    /// entity, login failures per entity and per source). Default 100,000.
    pub max_table_entries: usize,
    /// Milliseconds any one request may take before it is answered UNAVAILABLE. Default
    /// 15,000: past `database.timeout_ms` and a federation call, so it only cuts what nothing
    /// else bounds (a store call on a Postgres connection the network black-holed).
    pub request_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_len: 65_536,
            max_connections: 20_000,
            max_connections_per_ip: 256,
            handshake_timeout_secs: 10,
            max_handshakes: 1_024,
            max_handshakes_per_source: 64,
            pressured_handshake_timeout_ms: 1_000,
            idle_timeout_secs: 120,
            requests_per_sec: 200,
            requests_burst: 400,
            max_devices: 8,
            device_secret_ttl_secs: 600,
            event_queue: 256,
            max_table_entries: 100_000,
            request_timeout_ms: 15_000,
        }
    }
}

/// `[federation]`: this broker's place in a network made with `micromsg-broker network init`.
///
/// With `network_file` unset the broker is standalone: no federation listener, IS-NETWORKED
/// answers `OWN` or `NONE`, and the `-NETWORKED` requests get NOT-NETWORKED.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// The network file (TOML: name, brokers with id, endpoint, prefixes). Default unset.
    /// When set, `server.broker_id` must be one of its brokers, and numbers are allocated from
    /// that broker's prefixes there (`numbers.prefixes` is then ignored).
    pub network_file: Option<PathBuf>,
    /// This broker's certificate (PEM) issued by the network CA. Default: `ID.pem` beside the
    /// network file, where `ID` is `server.broker_id`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM). Default: `ID.key` beside the network file.
    pub key: Option<PathBuf>,
    /// The network CA certificate (PEM) that every peer's certificate must chain to. Default:
    /// `ca.pem` beside the network file.
    pub ca: Option<PathBuf>,
    /// Address of the federation gRPC listener. Default: `0.0.0.0` and the port of this
    /// broker's endpoint in the network file (7401 when the endpoint has none).
    pub listen: Option<SocketAddr>,
    /// Milliseconds to open a TCP + TLS connection to a peer. Default 3,000.
    pub connect_timeout_ms: u64,
    /// Milliseconds a call to a peer may take. Default 5,000.
    pub request_timeout_ms: u64,
    /// Seconds between link checks (Ping) of each peer; also how soon a peer marked
    /// unreachable is tried again. Default 5.
    pub probe_interval_secs: u64,
    /// Seconds a peer has to finish the TLS handshake on the federation listener. Default 10.
    pub handshake_timeout_secs: u64,
    /// Peer connections the federation listener keeps open at once. Default 256.
    pub max_connections: u32,
    /// Connections in their mutual-TLS handshake at once on the federation listener; more
    /// are closed at once, so unauthenticated connections never take the slots of peers.
    /// Default 32.
    pub max_handshakes: u32,
    /// The same from one source (IPv4 address, IPv6 /64). Default 8.
    pub max_handshakes_per_source: u32,
    /// Milliseconds a peer has to finish the handshake while more than half of
    /// `max_handshakes` are taken. Default 1,000.
    pub pressured_handshake_timeout_ms: u64,
    /// Largest gRPC message accepted or sent, bytes. Default 4,194,304 (4 MiB).
    pub max_message_bytes: usize,
    /// Networked contact requests forwarded at once (calls in flight to peers); more are
    /// dropped silently (and counted). Default 1,024.
    pub max_forwards_in_flight: usize,
    /// Most deliveries in one Deliver call. Default 256.
    pub outbox_batch: usize,
    /// Most message bytes in one Deliver call (a single larger message still goes alone).
    /// Default 1,048,576.
    pub outbox_batch_bytes: usize,
    /// `Deliver` calls in flight to one peer at once. Default 2.
    pub outbox_batches_in_flight: usize,
    /// Milliseconds between outbox polls when nothing wakes the worker earlier. Default 1,000.
    pub outbox_poll_ms: u64,
    /// Seconds before the first retry of a failed delivery; doubled per attempt. Default 1.
    pub retry_initial_secs: u64,
    /// Largest delay between retries, seconds. Default 300.
    pub retry_max_secs: u64,
    /// Seconds a broker holds the pubkey of a peer broker's client (swept after). Default
    /// 86,400 (one day).
    pub pubkey_ttl_secs: u64,
    /// Seconds a PORT-OUT token stays valid (number portability, docs/federation.md 12).
    /// Default 600.
    pub port_token_ttl_secs: u64,
    /// Largest difference, in seconds, between a PORT-IN statement's TIME and this broker's
    /// clock. Default 300.
    pub port_max_skew_secs: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            network_file: None,
            cert: None,
            key: None,
            ca: None,
            listen: None,
            connect_timeout_ms: 3_000,
            request_timeout_ms: 5_000,
            probe_interval_secs: 5,
            handshake_timeout_secs: 10,
            max_connections: 256,
            max_handshakes: 32,
            max_handshakes_per_source: 8,
            pressured_handshake_timeout_ms: 1_000,
            max_message_bytes: 4 * 1024 * 1024,
            max_forwards_in_flight: 1_024,
            outbox_batch: 256,
            outbox_batch_bytes: 1024 * 1024,
            outbox_batches_in_flight: 2,
            outbox_poll_ms: 1_000,
            retry_initial_secs: 1,
            retry_max_secs: 300,
            pubkey_ttl_secs: 86_400,
            port_token_ttl_secs: 600,
            port_max_skew_secs: 300,
        }
    }
}

impl FederationConfig {
    /// The certificate, key and CA paths, with the defaults beside the network file filled in.
    /// `None` when the broker is in no network.
    pub fn files(&self, broker_id: &str) -> Option<FederationFiles> {
        let network = self.network_file.as_ref()?;
        let dir = network.parent().unwrap_or_else(|| Path::new("."));
        Some(FederationFiles {
            network: network.clone(),
            cert: self
                .cert
                .clone()
                .unwrap_or_else(|| dir.join(format!("{broker_id}.pem"))),
            key: self
                .key
                .clone()
                .unwrap_or_else(|| dir.join(format!("{broker_id}.key"))),
            ca: self.ca.clone().unwrap_or_else(|| dir.join("ca.pem")),
        })
    }
}

/// The files of a networked broker, defaults resolved (see [`FederationConfig::files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationFiles {
    /// The network file.
    pub network: PathBuf,
    /// This broker's certificate.
    pub cert: PathBuf,
    /// This broker's key.
    pub key: PathBuf,
    /// The network CA.
    pub ca: PathBuf,
}

/// `[admin]`: the operator's gRPC service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin service at all. Default true.
    pub enabled: bool,
    /// Address of the admin listener (plain gRPC, no TLS: keep it local). Default
    /// `127.0.0.1:7402`. If it cannot be bound the broker logs an error and runs without it.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7402)),
        }
    }
}

const ENV_PREFIX: &str = "MICROMSG_";

impl Config {
    /// Loads the file (if any) and applies `MICROMSG_<SECTION>_<KEY>` overrides from `env`.
    ///
    /// An override's value is read as a TOML value when it parses as one (`true`, `42`,
    /// `["a","b"]`), otherwise as a string, so `MICROMSG_SERVER_LISTEN=0.0.0.0:7400` just works.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = file
            .map(|path| {
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            })
            .transpose()?;
        let file = file.zip(text.as_deref());
        let file_table = match file {
            Some((path, text)) => text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Invalid(located(path, text, &e)))?,
            None => toml::Table::new(),
        };
        let mut table = file_table.clone();
        let mut overrides = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            if !SECTIONS.contains(&section.as_str()) {
                continue;
            }
            let value = parse_override(&value);
            let key = key.to_ascii_lowercase();
            set(&mut table, &section, &key, value.clone())?;
            overrides.push((name.clone(), section, key, value));
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|merged| locate_schema_error(file, &file_table, &overrides, merged))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let n = &self.numbers;
        if !(4..=15).contains(&n.length) {
            return invalid(format!("numbers.length must be 4..=15, got {}", n.length));
        }
        if n.prefixes.is_empty() {
            return invalid("numbers.prefixes must not be empty".into());
        }
        if self.contacts.forward_max_days > MAX_FORWARD_DAYS {
            return invalid(format!(
                "contacts.forward_max_days must be 0..={MAX_FORWARD_DAYS}, got {}",
                self.contacts.forward_max_days
            ));
        }
        for p in &n.prefixes {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() + 3 > n.length {
                return invalid(format!(
                    "numbers.prefixes: {p:?} must be digits, leaving at least 3 random digits of numbers.length {}",
                    n.length
                ));
            }
        }
        if self.auth.nonce_step_secs == 0 {
            return invalid("auth.nonce_step_secs must be at least 1".into());
        }
        if self.limits.max_handshakes == 0 || self.limits.max_handshakes_per_source == 0 {
            return invalid(
                "limits.max_handshakes and limits.max_handshakes_per_source must be at least 1"
                    .into(),
            );
        }
        if self.limits.pressured_handshake_timeout_ms < 100
            || self.federation.pressured_handshake_timeout_ms < 100
        {
            return invalid(
                "limits.pressured_handshake_timeout_ms and \
                 federation.pressured_handshake_timeout_ms must be at least 100"
                    .into(),
            );
        }
        if self.limits.max_table_entries < 100 {
            return invalid("limits.max_table_entries must be at least 100".into());
        }
        if self.auth.max_failures_per_source == 0 {
            return invalid("auth.max_failures_per_source must be at least 1".into());
        }
        if self.relay.buffer_bytes < 4096 {
            return invalid("relay.buffer_bytes must be at least 4096".into());
        }
        if self.relay.idle_timeout_secs == 0 || self.relay.join_timeout_secs == 0 {
            return invalid(
                "relay.idle_timeout_secs and relay.join_timeout_secs must be at least 1".into(),
            );
        }
        if self.limits.request_timeout_ms < 100 {
            return invalid("limits.request_timeout_ms must be at least 100".into());
        }
        if !(1..=MAX_DEPOSIT_BATCHES_IN_FLIGHT).contains(&self.database.deposit_batches_in_flight) {
            return invalid(format!(
                "database.deposit_batches_in_flight must be 1..={MAX_DEPOSIT_BATCHES_IN_FLIGHT}"
            ));
        }
        if self.database.login_readers > MAX_LOGIN_READERS {
            return invalid(format!(
                "database.login_readers must be 0..={MAX_LOGIN_READERS}"
            ));
        }
        if self.database.deposit_gather_us > MAX_DEPOSIT_GATHER_US {
            return invalid(format!(
                "database.deposit_gather_us must be 0..={MAX_DEPOSIT_GATHER_US}"
            ));
        }
        if self.database.timeout_ms < 100 {
            return invalid("database.timeout_ms must be at least 100".into());
        }
        if self.limits.max_frame_len < 1024 {
            return invalid("limits.max_frame_len must be at least 1024".into());
        }
        if self.limits.max_devices == 0 {
            return invalid("limits.max_devices must be at least 1".into());
        }
        if self.registration.policy == RegistrationPolicy::Token
            && self.registration.tokens.is_empty()
        {
            return invalid("registration.policy = \"token\" needs registration.tokens".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls.cert and tls.key must be set together".into());
        }
        if self.server.broker_id.is_empty()
            || !self
                .server
                .broker_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return invalid("server.broker_id must be non-empty [A-Za-z0-9._-]".into());
        }
        let f = &self.federation;
        if f.network_file.is_some() && !crate::federation::network::valid_id(&self.server.broker_id)
        {
            return invalid(
                "in a network, server.broker_id must be 1..63 lowercase letters, digits and '-' \
                 (it is a DNS name in the broker's certificate)"
                    .into(),
            );
        }
        if f.outbox_batch == 0
            || f.outbox_batches_in_flight == 0
            || f.max_forwards_in_flight == 0
            || f.max_connections == 0
            || f.max_handshakes == 0
            || f.max_handshakes_per_source == 0
        {
            return invalid(
                "federation.outbox_batch, outbox_batches_in_flight, max_forwards_in_flight, \
                 max_connections, max_handshakes and max_handshakes_per_source must be at least 1"
                    .into(),
            );
        }
        if f.retry_initial_secs == 0 || f.retry_max_secs < f.retry_initial_secs {
            return invalid(
                "federation.retry_initial_secs must be >= 1 and <= retry_max_secs".into(),
            );
        }
        if f.max_message_bytes < 64 * 1024 {
            return invalid("federation.max_message_bytes must be at least 65536".into());
        }
        Ok(())
    }
}

const SECTIONS: &[&str] = &[
    "server",
    "tls",
    "database",
    "numbers",
    "registration",
    "auth",
    "inbox",
    "contacts",
    "limits",
    "federation",
    "admin",
];

/// Sets `[section] key` in `table`.
fn set(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    value: toml::Value,
) -> Result<(), ConfigError> {
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(ConfigError::Invalid(format!("[{section}] is not a table")));
    };
    section_table.insert(key.to_owned(), value);
    Ok(())
}

/// `e` in the file at `path` (whose text is `text`), by line and column. The line itself is
/// not quoted: it may hold a secret (a database URL with its password, a token).
fn located(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .and_then(|span| text.get(..span.start))
        .map(|before| {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: ")
        })
        .unwrap_or_default();
    format!("{}: {at}{}", path.display(), e.message().trim_end())
}

/// An override: its variable's name, its section and key, and its value.
type Override = (String, String, String, toml::Value);

/// Says where a value that does not fit the schema came from. The merged table carries no
/// positions, so the file is read again alone: when it is at fault, the error gives its line
/// and column. Otherwise an override is, and the error names the variables that fail on their
/// own over the file.
fn locate_schema_error(
    file: Option<(&Path, &str)>,
    file_table: &toml::Table,
    overrides: &[Override],
    merged: toml::de::Error,
) -> ConfigError {
    if let Some((path, text)) = file
        && let Err(e) = toml::from_str::<Config>(text)
    {
        return ConfigError::Invalid(located(path, text, &e));
    }
    let failing: Vec<&str> = overrides
        .iter()
        .filter(|(_, section, key, value)| {
            let mut table = file_table.clone();
            set(&mut table, section, key, value.clone()).is_err()
                || toml::Value::Table(table).try_into::<Config>().is_err()
        })
        .map(|(name, ..)| name.as_str())
        .collect();
    let message = merged.message().trim_end();
    match failing.as_slice() {
        [] => ConfigError::Invalid(message.to_owned()),
        names => ConfigError::Invalid(format!("{message} (set by {})", names.join(", "))),
    }
}

fn parse_override(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a TOML assignment; fall back to a plain string.
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_config_is_the_default() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("mm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("broker.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1\"\n[inbox]\nmode = \"number\"\n",
        )
        .unwrap();
        let env = vec![
            ("MICROMSG_SERVER_LISTEN".into(), "127.0.0.1:9".into()),
            ("MICROMSG_LIMITS_MAX_DEVICES".into(), "3".into()),
            (
                "MICROMSG_NUMBERS_PREFIXES".into(),
                "[\"777\", \"778\"]".into(),
            ),
            ("UNRELATED".into(), "x".into()),
        ];
        let c = Config::load(Some(&file), env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.inbox.mode, InboxMode::Number);
        assert_eq!(c.limits.max_devices, 3);
        assert_eq!(c.numbers.prefixes, vec!["777", "778"]);
    }

    /// The reason of an `Invalid` refusal.
    fn refusal(loaded: Result<Config, ConfigError>) -> String {
        match loaded {
            Err(ConfigError::Invalid(why)) => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_schema_error_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broker.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[limits]\nmax_devices = 3\nmax_devics = 4\n",
        )
        .unwrap();
        let why = refusal(Config::load(Some(&file), Vec::new()));
        assert!(why.contains("broker.toml"), "{why}");
        assert!(
            why.contains("line 6, column 1"),
            "the misspelt key's line: {why}"
        );
        assert!(why.contains("max_devics"), "{why}");

        // The line is not quoted: it may hold a secret.
        std::fs::write(
            &file,
            "[database]\nurl_typo = \"postgres://u:hunter2@db/x\"\n",
        )
        .unwrap();
        let why = refusal(Config::load(Some(&file), Vec::new()));
        assert!(
            why.contains("line 2, column 1") && why.contains("url_typo"),
            "{why}"
        );
        assert!(!why.contains("hunter2"), "{why}");
        std::fs::write(&file, "[database]\nurl = \"postgres://u:hunter2@db/x\n").unwrap();
        let why = refusal(Config::load(Some(&file), Vec::new()));
        assert!(why.contains("line 2") && !why.contains("hunter2"), "{why}");

        std::fs::write(&file, "[limits]\nmax_devices = 3\n").unwrap();
        let env = vec![
            (
                "MICROMSG_SERVER_LISTEN".to_owned(),
                "127.0.0.1:9".to_owned(),
            ),
            ("MICROMSG_LIMITS_MAX_DEVICES".to_owned(), "many".to_owned()),
        ];
        let why = refusal(Config::load(Some(&file), env));
        assert!(why.contains("MICROMSG_LIMITS_MAX_DEVICES"), "{why}");
        assert!(
            !why.contains("MICROMSG_SERVER_LISTEN") && !why.contains("line"),
            "only the override at fault: {why}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let env = vec![("MICROMSG_LIMITS_NO_SUCH_LIMIT".to_owned(), "1".to_owned())];
        assert!(matches!(
            Config::load(None, env),
            Err(ConfigError::Invalid(_))
        ));
        let env = vec![("MICROMSG_NUMBERS_LENGTH".to_owned(), "3".to_owned())];
        assert!(matches!(
            Config::load(None, env),
            Err(ConfigError::Invalid(_))
        ));
        let env = vec![(
            "MICROMSG_DATABASE_LOGIN_READERS".to_owned(),
            "65".to_owned(),
        )];
        match Config::load(None, env) {
            Err(ConfigError::Invalid(why)) => assert!(why.contains("login_readers"), "{why}"),
            other => panic!("65 login readers: {other:?}"),
        }
        let env = vec![("MICROMSG_DATABASE_LOGIN_READERS".to_owned(), "0".to_owned())];
        assert_eq!(
            Config::load(None, env).unwrap().database.login_readers,
            0,
            "0 keeps LOGIN's reads on the pool"
        );
        for bad in ["0", "65"] {
            let env = vec![(
                "MICROMSG_DATABASE_DEPOSIT_BATCHES_IN_FLIGHT".to_owned(),
                bad.to_owned(),
            )];
            match Config::load(None, env) {
                Err(ConfigError::Invalid(why)) => {
                    assert!(why.contains("deposit_batches_in_flight"), "{why}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let env = vec![(
            "MICROMSG_DATABASE_DEPOSIT_BATCHES_IN_FLIGHT".to_owned(),
            "64".to_owned(),
        )];
        assert_eq!(
            Config::load(None, env)
                .unwrap()
                .database
                .deposit_batches_in_flight,
            64
        );
        let gather = |us: &str| {
            Config::load(
                None,
                vec![(
                    "MICROMSG_DATABASE_DEPOSIT_GATHER_US".to_owned(),
                    us.to_owned(),
                )],
            )
        };
        assert_eq!(Config::default().database.deposit_gather_us, 2_000);
        assert_eq!(gather("0").unwrap().database.deposit_gather_us, 0);
        assert_eq!(
            gather("100000").unwrap().database.deposit_gather_us,
            100_000
        );
        match gather("100001") {
            Err(ConfigError::Invalid(why)) => assert!(why.contains("deposit_gather_us"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_forward_grace_period_is_read_and_bounded() {
        assert_eq!(Config::default().contacts.forward_max_days, 30);
        let env = |days: &str| {
            vec![(
                "MICROMSG_CONTACTS_FORWARD_MAX_DAYS".to_owned(),
                days.to_owned(),
            )]
        };
        let c = Config::load(None, env("7")).unwrap();
        assert_eq!(c.contacts.forward_max_days, 7);
        assert_eq!(
            Config::load(None, env("0"))
                .unwrap()
                .contacts
                .forward_max_days,
            0
        );
        assert!(matches!(
            Config::load(None, env("3651")),
            Err(ConfigError::Invalid(m)) if m.contains("forward_max_days")
        ));
    }
}
