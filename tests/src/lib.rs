//! Support for MicroMsg's integration tests: brokers started in process on `127.0.0.1:0` with
//! either store backend, each test with its own data directory and (for Postgres) its own
//! fresh database. The tests themselves live in `tests/it/`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use micromsg_broker::config::Config;
use micromsg_broker::run::{RunningBroker, start};

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
    database: Option<(String, String)>,
}

impl TestBroker {
    /// Starts a broker with test-friendly defaults; `tweak` adjusts the configuration.
    pub async fn start(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.data_dir = dir.path().join("data");
        config.server.shutdown_grace_secs = 5;
        // Tests register many entities from one address.
        config.registration.per_ip_per_hour = 100_000;
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let (admin_url, name, url) = fresh_postgres_database().await;
                config.database.url = Some(url);
                Some((admin_url, name))
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
        if let Some((admin_url, name)) = self.database {
            drop_postgres_database(&admin_url, &name).await;
        }
    }

    /// A fresh profile directory inside the test's temporary directory.
    pub fn profile_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("profiles").join(name)
    }
}

/// The server URL from `DATABASE_URL`; panics with instructions when it is not set, so a
/// Postgres test can never pass without Postgres.
pub fn postgres_admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: this test needs a PostgreSQL server. Run the whole suite \
             with scripts/test (it starts one), or run `scripts/postgres start` and export the \
             DATABASE_URL it prints."
        )
    })
}

/// Creates a uniquely named database; returns (admin url, name, url of the new database).
pub async fn fresh_postgres_database() -> (String, String, String) {
    use rand_core::RngCore;
    let admin_url = postgres_admin_url();
    let name = format!("mm_it_{:016x}", rand_core::OsRng.next_u64());
    let mut conn = connect_admin(&admin_url).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = match admin_url.rsplit_once('/') {
        Some((base, _db)) => format!("{base}/{name}"),
        None => panic!("DATABASE_URL must end in /DBNAME"),
    };
    (admin_url, name, url)
}

async fn connect_admin(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!("cannot connect to PostgreSQL at DATABASE_URL ({url}): {e}. Is it running?")
    })
}

/// Drops a database made by [`fresh_postgres_database`].
pub async fn drop_postgres_database(admin_url: &str, name: &str) {
    let mut conn = connect_admin(admin_url).await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
}
