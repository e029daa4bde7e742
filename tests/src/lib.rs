//! Support for MicroMsg's integration tests: brokers started in process on `127.0.0.1:0` with
//! either store backend, each test with its own data directory and (for Postgres) its own
//! fresh database, a copy of a migrated template (`micromsg-testdb`). The tests themselves live
//! in `tests/it/`; those that run the broker binary get it from this package's
//! `micromsg-test-broker` (`src/bin/`), which cargo builds for them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use micromsg_broker::config::Config;
use micromsg_broker::run::{RunningBroker, start};

pub mod agents;
pub mod fault_proxy;
pub mod netns;
pub mod raw;
pub mod wait;

/// Declares `mod sqlite` and `mod postgres`, each with one `#[tokio::test]` per listed
/// scenario `async fn name(backend: Backend)` of the calling module, so every scenario runs on
/// both stores.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Backend::Postgres).await })*
        }
    };
}

/// Which store a test broker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite in the data directory.
    Sqlite,
    /// A fresh database on the server named by `DATABASE_URL`.
    Postgres,
}

/// A broker running in this process for one test.
#[derive(Debug)]
pub struct TestBroker {
    /// The running broker.
    pub running: RunningBroker,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The CA file clients trust.
    pub ca: PathBuf,
    /// Data directory (removed when the test ends).
    pub dir: tempfile::TempDir,
    /// The URL of the test's own Postgres database, dropped by [`TestBroker::stop`].
    database: Option<String>,
}

impl TestBroker {
    /// Starts a broker with test-friendly defaults; `tweak` adjusts the configuration.
    pub async fn start(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.data_dir = dir.path().join("data");
        config.server.shutdown_grace_secs = 5;
        // Tests register many entities from one address, many at once.
        config.registration.per_ip_per_hour = 100_000;
        config.limits.max_handshakes = 4_096;
        config.limits.max_handshakes_per_source = 4_096;
        // Many brokers run at once: no fixed admin port.
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let url = fresh_postgres_database().await;
                config.database.url = Some(url.clone());
                Some(url)
            }
        };
        tweak(&mut config);
        let running = start(config).await.unwrap();
        let addr = format!("127.0.0.1:{}", running.addr.port());
        let ca = running.ca_file.clone().unwrap();
        Self {
            running,
            addr,
            ca,
            dir,
            database,
        }
    }

    /// Stops the broker and drops its database.
    pub async fn stop(self) {
        self.running.stop().await;
        if let Some(url) = self.database {
            drop_postgres_database(&url).await;
        }
    }

    /// A fresh profile directory inside the test's temporary directory.
    pub fn profile_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("profiles").join(name)
    }
}

/// A fresh database `mm_it_<random>` on the server of `DATABASE_URL`, a copy of the template
/// with every migration applied ([`micromsg_testdb::fresh_database`]); returns its URL. Panics
/// with instructions when `DATABASE_URL` is not set, so a Postgres test can never pass without
/// Postgres.
pub async fn fresh_postgres_database() -> String {
    micromsg_testdb::fresh_database("mm_it").await
}

/// Drops a database made by [`fresh_postgres_database`]. A failed `DROP` is reported but does
/// not fail the test: its verdict is in by then, and the leftover is only on a test server.
pub async fn drop_postgres_database(url: &str) {
    if let Err(e) = micromsg_testdb::drop_database(url).await {
        eprintln!("warning: could not drop the test database {url}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Broker networks (federation)

/// A network of brokers running in this process on loopback, made with the broker's own
/// `network init` code: each broker has its own data directory and (for Postgres) its own fresh
/// database, a fixed federation port (so it can be stopped and started again at the same
/// endpoint), and test-friendly timings (1 s probes and retries).
#[derive(Debug)]
pub struct TestNetwork {
    /// The backend of every broker.
    pub backend: Backend,
    /// Network directory (CA, certificates, network file) and every broker's data.
    pub dir: tempfile::TempDir,
    /// The network file.
    pub network_file: PathBuf,
    /// The network CA, to issue more certificates in tests.
    pub ca: micromsg_broker::tls::Authority,
    /// Broker ids, in the order given.
    pub ids: Vec<String>,
    /// Federation endpoints (`127.0.0.1:PORT`), by broker.
    pub endpoints: Vec<String>,
    brokers: Vec<Option<TestBroker>>,
    configs: Vec<Config>,
    databases: Vec<Option<String>>,
    data_dirs: Vec<Option<tempfile::TempDir>>,
}

/// A loopback port that is free now, for a listener a test binds later (a broker's fixed
/// client or federation port, a container's published port).
///
/// Not `bind(0)`: that hands out ports from the kernel's ephemeral range, which every outgoing
/// connection of every concurrently running test draws from too, so such a port could be taken
/// between this pick and the later bind ("Address already in use" on a broker restart was seen
/// in a full run). Ports below the ephemeral range are only ever taken by explicit binds; the
/// pick is random there and checked with a bind.
///
/// A check bind alone does not stop two picks made before either listener binds from getting
/// the same port: two brokers of one test network, or two test processes at once (seen in a
/// full run: a federation listener's "Address already in use"). So each port handed out is
/// also held, for the life of the test process, by an exclusive lock on a file named after it
/// in `$TMPDIR/micromsg-test-ports/`; the kernel drops the lock when the process ends.
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let locks = std::env::temp_dir().join("micromsg-test-ports");
    let _ = std::fs::create_dir_all(&locks);
    // 10,000 ports just below the ephemeral range (22768..32767 with Linux's default range).
    let high = ephemeral_port_low().max(12_000);
    let low = high - 10_000;
    for _ in 0..1_000 {
        let draw = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        let port = low + (draw % u64::from(high - low)) as u16;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(locks.join(port.to_string()));
        // Without a writable temporary directory, fall back to the bind check alone.
        let lock = match lock {
            Ok(file) if file.try_lock().is_err() => continue, // handed out already
            Ok(file) => Some(file),
            Err(_) => None,
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            if let Some(file) = lock {
                HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
            }
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high} after 1,000 tries");
}

/// The first port of the kernel's ephemeral range (Linux's default where it cannot be read).
fn ephemeral_port_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

impl TestNetwork {
    /// Makes a network of `brokers` (id, prefixes) and starts every broker; `tweak` adjusts
    /// each broker's configuration (by index) before it starts.
    pub async fn start(
        backend: Backend,
        brokers: &[(&str, &[&str])],
        tweak: impl Fn(usize, &mut Config),
    ) -> Self {
        use micromsg_broker::federation::network::{InitBroker, init_keeping_ca};
        let dir = tempfile::tempdir().unwrap();
        let endpoints: Vec<String> = brokers
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let specs: Vec<InitBroker> = brokers
            .iter()
            .zip(&endpoints)
            .map(|((id, prefixes), endpoint)| InitBroker {
                id: (*id).to_owned(),
                prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
                endpoint: endpoint.clone(),
            })
            .collect();
        let net_dir = dir.path().join("network");
        let (report, ca) = init_keeping_ca(&net_dir, "test-net", &specs).unwrap();
        let mut net = Self {
            backend,
            network_file: report.network_file.clone(),
            ca,
            ids: brokers.iter().map(|(id, _)| (*id).to_owned()).collect(),
            endpoints,
            brokers: Vec::new(),
            configs: Vec::new(),
            databases: Vec::new(),
            data_dirs: Vec::new(),
            dir,
        };
        for i in 0..brokers.len() {
            let mut config = Config::default();
            // Fixed ports, so a restarted broker is where its clients' profiles say.
            config.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            config.server.broker_id = net.ids[i].clone();
            config.server.shutdown_grace_secs = 5;
            config.registration.per_ip_per_hour = 100_000;
            config.limits.max_handshakes = 4_096;
            config.limits.max_handshakes_per_source = 4_096;
            config.admin.listen = "127.0.0.1:0".parse().unwrap();
            config.federation.network_file = Some(report.network_file.clone());
            config.federation.listen = Some(net.endpoints[i].parse().unwrap());
            config.federation.probe_interval_secs = 1;
            config.federation.retry_initial_secs = 1;
            config.federation.retry_max_secs = 2;
            config.federation.outbox_poll_ms = 200;
            config.federation.request_timeout_ms = 3_000;
            config.federation.connect_timeout_ms = 1_000;
            let database = match backend {
                Backend::Sqlite => None,
                Backend::Postgres => {
                    let url = fresh_postgres_database().await;
                    config.database.url = Some(url.clone());
                    Some(url)
                }
            };
            tweak(i, &mut config);
            net.configs.push(config);
            net.databases.push(database);
            net.data_dirs.push(Some(tempfile::tempdir().unwrap()));
            net.brokers.push(None);
        }
        for i in 0..brokers.len() {
            net.start_broker(i).await;
        }
        net
    }

    /// Broker `i` (panics when it is stopped).
    pub fn broker(&self, i: usize) -> &TestBroker {
        self.brokers[i].as_ref().unwrap()
    }

    /// The configuration broker `i` runs (or will run) with.
    pub fn config(&self, i: usize) -> &Config {
        &self.configs[i]
    }

    /// Starts broker `i` again (same data, database and federation endpoint).
    pub async fn start_broker(&mut self, i: usize) {
        assert!(self.brokers[i].is_none(), "broker {i} is running");
        let data = self.data_dirs[i].take().unwrap();
        let mut config = self.configs[i].clone();
        config.server.data_dir = data.path().join("data");
        // The federation port was just released by a stopped broker: retry briefly.
        let mut tries = 0;
        let running = loop {
            match start(config.clone()).await {
                Ok(r) => break r,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("broker {i} did not start: {e}"),
            }
        };
        let addr = format!("127.0.0.1:{}", running.addr.port());
        let ca = running.ca_file.clone().unwrap();
        self.brokers[i] = Some(TestBroker {
            running,
            addr,
            ca,
            dir: data,
            database: None,
        });
    }

    /// Stops broker `i`, keeping its data and database for [`TestNetwork::start_broker`].
    pub async fn stop_broker(&mut self, i: usize) {
        let broker = self.brokers[i].take().unwrap();
        let TestBroker { running, dir, .. } = broker;
        running.stop().await;
        self.data_dirs[i] = Some(dir);
    }

    /// Waits (up to 30 s) until every running broker sees every running peer as reachable.
    pub async fn wait_linked(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let running: Vec<&TestBroker> = self.brokers.iter().flatten().collect();
            let ids: Vec<String> = running
                .iter()
                .map(|b| b.running.broker.config().server.broker_id.clone())
                .collect();
            let linked = running.iter().all(|b| {
                let f = b.running.broker.federation().unwrap();
                f.links
                    .values()
                    .filter(|l| ids.contains(&l.entry.id))
                    .all(|l| l.state().reachable == Some(true))
            });
            if linked {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "brokers did not link within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Stops every broker and drops their databases.
    pub async fn stop(mut self) {
        for i in 0..self.brokers.len() {
            if self.brokers[i].is_some() {
                self.stop_broker(i).await;
            }
        }
        for url in self.databases.iter().flatten() {
            drop_postgres_database(url).await;
        }
    }

    /// Issues a broker certificate from the network CA for `id` with endpoint host 127.0.0.1,
    /// valid `days` (negative: already expired), and writes `NAME.pem` / `NAME.key`.
    pub fn issue_cert(&self, name: &str, id: &str, days: i64) -> (PathBuf, PathBuf) {
        issue_cert_with(&self.ca, &self.dir.path().join("extra"), name, id, days)
    }
}

/// Issues a broker-style certificate for `id` from `ca` into `dir` (`NAME.pem`, `NAME.key`).
pub fn issue_cert_with(
    ca: &micromsg_broker::tls::Authority,
    dir: &std::path::Path,
    name: &str,
    id: &str,
    days: i64,
) -> (PathBuf, PathBuf) {
    use micromsg_broker::federation::network::{BrokerEntry, issue_broker_cert};
    std::fs::create_dir_all(dir).unwrap();
    let entry = BrokerEntry {
        id: id.to_owned(),
        endpoint: "127.0.0.1:1".to_owned(),
        prefixes: vec!["0".to_owned()],
    };
    let (cert, key) = issue_broker_cert(ca, &entry, days).unwrap();
    let cert_file = dir.join(format!("{name}.pem"));
    let key_file = dir.join(format!("{name}.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    (cert_file, key_file)
}

/// The sealed address of protocol.md 11.4 (`micromsg_crypto::sealed`) with fixed secret bytes,
/// for tests that play a client by hand.
pub fn seal_address(
    sk_sender: &micromsg_crypto::Secret32,
    pk_recipient: &[u8; 32],
    nonce: &[u8; 24],
    address: &str,
) -> Vec<u8> {
    let sender = micromsg_crypto::agreement::EphemeralSecret::from_secret(sk_sender);
    micromsg_crypto::sealed::seal_with_nonce(&sender, pk_recipient, nonce, address.as_bytes())
        .unwrap()
}

/// Opens a sealed address (protocol.md 11.4) with the recipient's secret and the sender's
/// public key; `None` when it does not open.
pub fn open_address(
    sk_recipient: &micromsg_crypto::Secret32,
    pk_sender: &[u8; 32],
    sealed: &[u8],
) -> Option<String> {
    let recipient = micromsg_crypto::agreement::EphemeralSecret::from_secret(sk_recipient);
    let plain = micromsg_crypto::sealed::open(&recipient, pk_sender, sealed).ok()?;
    String::from_utf8(plain).ok()
}

/// The whole inbox of `session`'s device: INBOX-FETCH page by page until `MORE` is false
/// (nothing is acknowledged).
pub async fn fetch_whole_inbox(
    session: &mut micromsg_client::account::Session,
) -> Vec<micromsg_wire::message::response::InboxMessage> {
    use micromsg_wire::message::request::InboxFetchArgs;
    use micromsg_wire::{Request, ResponseData};
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = match session
            .link
            .call(Request::InboxFetch(InboxFetchArgs {
                limit: Some(250),
                after,
            }))
            .await
            .unwrap()
        {
            ResponseData::InboxFetch(d) => d,
            other => panic!("INBOX-FETCH: {other:?}"),
        };
        after = page.messages.last().map(|m| m.id);
        all.extend(page.messages);
        if !page.more {
            return all;
        }
    }
}
