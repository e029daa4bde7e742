//! Fresh PostgreSQL databases for MicroMsg's tests, each a copy of a template database that
//! already holds the schema.
//!
//! Every Postgres test gets a database of its own on the server named by `DATABASE_URL`
//! ([`fresh_database`]) and drops it when it ends ([`drop_database`]). An empty database would
//! make every test apply all the migrations when its broker's store opens; instead the first
//! test to need it makes a *template*: a database with the migrations of `migrations/postgres`
//! applied (embedded here with `sqlx::migrate!`, the same files the broker's store embeds), named
//! after a hash of them, `mm_template_<hash>`. Each test's database is then
//! `CREATE DATABASE <name> TEMPLATE <template>`, a copy of its files; the store's migrator finds
//! every migration applied, with the same checksums, and does nothing.
//!
//! The template stays on the server for later runs. Changed migrations hash differently, so they
//! get a template of their own, and checkouts with different migrations can share one server.
//!
//! Several test processes run at once (nextest runs each test in its own), so many can find the
//! template missing together. Its creation is serialised by a PostgreSQL advisory lock, held by
//! the session (a process that dies releases it), and is idempotent: under the lock the template
//! is built under a temporary name and renamed only once it is migrated, so a template that
//! exists under its final name is complete, and checking for it without the lock is safe.
//!
//! PostgreSQL refuses to copy a database that has sessions ("source database is being accessed
//! by other users"). The migrating connection is closed before the rename, and the template is
//! then marked `ALLOW_CONNECTIONS false`, so nothing connects to it later (not even a psql left
//! open), and `IS_TEMPLATE true`, which also refuses a stray `DROP DATABASE`. To drop one by
//! hand: `ALTER DATABASE mm_template_… IS_TEMPLATE false` first.
//!
//! These are test helpers: a failure panics with what to do about it, which fails the test.

use std::str::FromStr;

use rand_core::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};

/// The Postgres migrations: the same files the broker's store applies.
static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// The advisory lock key that serialises template creation on a server ("mmtestdb" in ASCII).
const TEMPLATE_LOCK: i64 = i64::from_be_bytes(*b"mmtestdb");

/// The longest prefix: a database name has at most 63 bytes, and `_` and 16 hex digits follow.
const MAX_PREFIX: usize = 63 - 17;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The server URL of `DATABASE_URL`.
///
/// # Panics
///
/// When `DATABASE_URL` is unset or empty, with instructions, so that a Postgres test can never
/// pass without Postgres.
pub fn server_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: this test needs a PostgreSQL server. Run the whole suite \
             with scripts/test (it starts one), or run `scripts/postgres start` and export the \
             DATABASE_URL it prints."
        ),
    }
}

/// Creates a new database `PREFIX_<16 random hex digits>` on the server of `DATABASE_URL`, with
/// every Postgres migration applied, and returns its URL (`DATABASE_URL` with the database
/// replaced). Drop it with [`drop_database`].
///
/// `prefix` names what made the database (for example `mm_it` for the integration tests), so
/// one left behind by a killed test can be traced: lowercase ASCII letters, digits and `_`,
/// starting with a letter or `_`, at most 46 bytes.
///
/// # Panics
///
/// When `DATABASE_URL` is unset or not a Postgres URL, when the server cannot be reached, when a
/// statement fails, or on an invalid `prefix`.
pub async fn fresh_database(prefix: &str) -> String {
    check_prefix(prefix);
    let server = server_url();
    let options = server_options(&server);
    let mut admin = connect(&options, &server).await;
    let template = template_name();
    if let Err(e) = ensure_template(&mut admin, &options, &template).await {
        panic!("creating the template database {template} on DATABASE_URL ({server}): {e}");
    }
    let name = format!("{prefix}_{:016x}", rand_core::OsRng.next_u64());
    let create = format!(
        "CREATE DATABASE {} TEMPLATE {}",
        ident(&name),
        ident(&template)
    );
    if let Err(e) = sqlx::query(&create).execute(&mut admin).await {
        panic!("{create} on DATABASE_URL ({server}): {e}");
    }
    // The database exists either way; the server ends the session when the socket closes.
    let _ = admin.close().await;
    database_url(&server, &name)
}

/// Drops the database that `url` names (a URL from [`fresh_database`]) on the server of
/// `DATABASE_URL`, closing any sessions it still has (`WITH (FORCE)`); a database that does not
/// exist is not an error.
///
/// # Errors
///
/// When `DROP DATABASE` fails. Callers decide whether that fails the test.
///
/// # Panics
///
/// As [`fresh_database`] when the server cannot be reached, and when `url` names no database.
pub async fn drop_database(url: &str) -> Result<(), sqlx::Error> {
    let name = match PgConnectOptions::from_str(url) {
        Ok(options) => options.get_database().map(str::to_owned),
        Err(e) => panic!("{url} is not a Postgres URL: {e}"),
    };
    let Some(name) = name else {
        panic!("{url} names no database to drop");
    };
    let server = server_url();
    let mut admin = connect(&server_options(&server), &server).await;
    let dropped = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        ident(&name)
    ))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
    dropped.map(drop)
}

/// The template's name for the embedded migrations: `mm_template_` and 16 hex digits of a
/// SHA-256 over each migration's version, description and checksum (the SHA-384 of its SQL that
/// sqlx records and checks).
pub fn template_name() -> String {
    let mut hash = Sha256::new();
    for migration in MIGRATOR.iter() {
        hash.update(migration.version.to_be_bytes());
        hash.update(migration.description.as_bytes());
        hash.update([0]);
        hash.update(&migration.checksum);
    }
    let digest = hash.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("mm_template_{hex}")
}

/// Makes sure `template` exists, migrated, on the server `admin` is connected to.
async fn ensure_template(
    admin: &mut PgConnection,
    server: &PgConnectOptions,
    template: &str,
) -> Result<(), Error> {
    // A template under its final name is complete (it is renamed only once migrated).
    if database_exists(admin, template).await? {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut *admin)
        .await?;
    let built = build_template(admin, server, template).await;
    // On a panic or a dropped future the connection closes instead, which releases it too.
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut *admin)
        .await;
    built?;
    unlocked?;
    Ok(())
}

/// Builds `template` under `template_building` and renames it; the caller holds the lock.
async fn build_template(
    admin: &mut PgConnection,
    server: &PgConnectOptions,
    template: &str,
) -> Result<(), Error> {
    // Made by the process whose lock this one waited for.
    if database_exists(admin, template).await? {
        return Ok(());
    }
    let building = format!("{template}_building");
    // Left by a process that died while building: it held the lock, which is this one's now.
    execute(
        admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&building)),
    )
    .await?;
    execute(admin, &format!("CREATE DATABASE {}", ident(&building))).await?;
    // Through a pool of one: `Migrator::run` on a bare `&mut PgConnection` makes this future
    // not `Send` ("implementation of `Acquire` is not general enough", a sqlx limitation), and
    // callers spawn it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.clone().database(&building))
        .await?;
    let migrated = MIGRATOR.run(&pool).await;
    // The connection must be closed before the rename, which, like every copy later, needs a
    // database without sessions. `Pool::close` can leave an idle connection open (one that was
    // still being returned when it looked), so take it out of the pool and close it here.
    // (Postgres gives a closing session's backend up to 5 s to exit.)
    let closed = match pool.acquire().await {
        Ok(conn) => conn.detach().close().await,
        Err(e) => Err(e),
    };
    pool.close().await;
    // The migration's error first: a failed close may only be its consequence.
    migrated?;
    closed?;
    let rename = format!(
        "ALTER DATABASE {} RENAME TO {}",
        ident(&building),
        ident(template)
    );
    execute(admin, &rename).await?;
    let seal = format!(
        "ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false",
        ident(template)
    );
    execute(admin, &seal).await?;
    Ok(())
}

async fn execute(conn: &mut PgConnection, statement: &str) -> Result<(), sqlx::Error> {
    sqlx::query(statement).execute(conn).await.map(drop)
}

async fn database_exists(admin: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(admin)
        .await
}

fn server_options(server: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(server)
        .unwrap_or_else(|e| panic!("DATABASE_URL ({server}) is not a Postgres URL: {e}"))
}

async fn connect(options: &PgConnectOptions, server: &str) -> PgConnection {
    PgConnection::connect_with(options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at DATABASE_URL ({server}): {e}. Is it running? \
                 `scripts/postgres start` starts a local one."
            )
        })
}

/// `server` with its database replaced by `name` (user, host, port and parameters kept).
fn database_url(server: &str, name: &str) -> String {
    let mut url = url::Url::parse(server)
        .unwrap_or_else(|e| panic!("DATABASE_URL ({server}) is not a URL: {e}"));
    url.set_path(&format!("/{name}"));
    url.into()
}

/// A quoted SQL identifier (the names here are lowercase, so quoting does not change them).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn check_prefix(prefix: &str) {
    let valid = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && !prefix.starts_with(|c: char| c.is_ascii_digit())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    assert!(
        valid,
        "database name prefix {prefix:?}: lowercase ASCII letters, digits and '_', not starting \
         with a digit, at most {MAX_PREFIX} bytes"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Callers may spawn them (the store conformance suite runs its cases in tasks).
    #[test]
    fn the_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        send(&fresh_database("mm_x"));
        send(&drop_database("postgres://h/mm_x_00"));
    }

    #[test]
    fn template_name_is_a_valid_stable_identifier() {
        let name = template_name();
        assert_eq!(name, template_name());
        assert_eq!(name.len(), "mm_template_".len() + 16);
        assert!(name.starts_with("mm_template_"));
        assert!(name[12..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(MIGRATOR.iter().count() > 0, "the migrations are embedded");
    }

    #[test]
    fn database_url_replaces_only_the_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:54329/postgres", "mm_x_01"),
            "postgres://postgres@127.0.0.1:54329/mm_x_01"
        );
        assert_eq!(
            database_url("postgres://u:p@db:5432/app?sslmode=disable", "mm_x_01"),
            "postgres://u:p@db:5432/mm_x_01?sslmode=disable"
        );
        assert_eq!(
            database_url("postgresql://u@db", "mm_x_01"),
            "postgresql://u@db/mm_x_01"
        );
    }

    #[test]
    fn prefixes() {
        for good in ["mm_it", "mm_test", "_x", "a1"] {
            check_prefix(good);
        }
        for bad in [
            "",
            "1a",
            "MM",
            "mm-it",
            "mm it",
            &"x".repeat(MAX_PREFIX + 1),
        ] {
            assert!(
                std::panic::catch_unwind(|| check_prefix(bad)).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    /// These need the server of `DATABASE_URL`, like every Postgres test.
    mod postgres {
        use super::super::*;

        async fn admin() -> PgConnection {
            let server = server_url();
            connect(&server_options(&server), &server).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fresh_database_is_migrated_from_a_closed_template_and_dropped() {
            let url = fresh_database("mm_testdb").await;
            assert!(url.contains("/mm_testdb_"), "{url}");
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let applied: i64 =
                sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            assert_eq!(applied, i64::try_from(MIGRATOR.iter().count()).unwrap());
            // The broker's migrator finds nothing to do (same checksums).
            MIGRATOR.run(&mut conn).await.unwrap();
            conn.close().await.unwrap();

            let mut admin = admin().await;
            let (is_template, allow_conn): (bool, bool) = sqlx::query_as(
                "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = $1",
            )
            .bind(template_name())
            .fetch_one(&mut admin)
            .await
            .unwrap();
            assert!(is_template && !allow_conn);

            drop_database(&url).await.unwrap();
            let name = url.rsplit('/').next().unwrap();
            assert!(!database_exists(&mut admin, name).await.unwrap());
            // Dropping again is not an error.
            drop_database(&url).await.unwrap();
        }

        /// Several connections (standing in for test processes) build one template at once:
        /// one builds it, the others wait for the lock and find it, and it can be copied.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_template_creation_builds_once() {
            let server = server_options(&server_url());
            let template = format!("mm_template_test_{:016x}", rand_core::OsRng.next_u64());
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let (server, template) = (server.clone(), template.clone());
                    tokio::spawn(async move {
                        let mut admin = admin().await;
                        ensure_template(&mut admin, &server, &template)
                            .await
                            .unwrap();
                        let copy = format!("mm_testdb_{:016x}", rand_core::OsRng.next_u64());
                        let create = format!("CREATE DATABASE {copy} TEMPLATE {template}");
                        execute(&mut admin, &create).await.unwrap();
                        execute(&mut admin, &format!("DROP DATABASE {copy}"))
                            .await
                            .unwrap();
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            let mut admin = admin().await;
            assert!(database_exists(&mut admin, &template).await.unwrap());
            let building = format!("{template}_building");
            assert!(!database_exists(&mut admin, &building).await.unwrap());
            for statement in [
                format!("ALTER DATABASE {template} IS_TEMPLATE false"),
                format!("DROP DATABASE {template}"),
            ] {
                execute(&mut admin, &statement).await.unwrap();
            }
        }
    }
}
