//! Starting and stopping a whole broker: data directory, store, TLS, identity, the client
//! listener and, when configured, the federation listener, the outbox worker, the peer prober
//! and the admin listener.
//!
//! [`start`] is what the binary and the in-process integration tests share, so the tests run
//! the same code a user runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use crate::admin::AdminListener;
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::datadir_lock::{DataDirLock, LockError};
use crate::federation::mtls::MtlsCounters;
use crate::federation::service::FederationServerHandle;
use crate::federation::{Federation, FederationError};
use crate::server::Server;
use crate::tls::{self, TlsError};
use micromsg_store::{Store, StoreError};

/// Why a broker could not start. A variant with a cause names only what was being done: the
/// cause is its `source`, which the error chain prints once (`Caused by:`), where putting it
/// in the text too printed it twice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data directory or listener could not be set up.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TLS files or the identity key could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store could not be opened or migrated.
    #[error("opening the store")]
    Store(#[from] StoreError),
    /// The network file or the federation certificates are unusable.
    #[error("setting up federation")]
    Federation(#[from] FederationError),
    /// The configuration does not fit the network file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another process serves from (or migrates) the same data directory.
    #[error(transparent)]
    Locked(#[from] LockError),
}

/// A broker running in this process.
#[derive(Debug)]
pub struct RunningBroker {
    /// Where the client listener is bound.
    pub addr: SocketAddr,
    /// The CA file clients should trust, when the broker made its own certificates.
    pub ca_file: Option<PathBuf>,
    /// The shared state, for tests and the admin service.
    pub broker: Arc<Broker>,
    /// Where the federation listener is bound (networked brokers only).
    pub federation_addr: Option<SocketAddr>,
    /// Refusals counted by the federation listener (networked brokers only).
    pub federation_refusals: Option<Arc<MtlsCounters>>,
    /// Where the admin listener is bound (unless disabled).
    pub admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    background: JoinSet<()>,
}

impl RunningBroker {
    /// Stops accepting, lets in-flight requests finish, and waits for the server, the
    /// federation and admin listeners and the background tasks to end.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        // Relays are not requests in flight: they end now, each side closed in order.
        self.broker.relays().stop_all();
        let _ = self.task.await;
        let grace = std::time::Duration::from_secs(
            self.broker
                .config
                .server
                .shutdown_grace_secs
                .saturating_add(1),
        );
        let drained = tokio::time::timeout(grace, async {
            while self.background.join_next().await.is_some() {}
            // The splices close their sides, then leave the registry.
            while self.broker.relays().open() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        if drained.is_err() {
            warn!("background tasks still running after the grace period; stopping them");
            self.background.shutdown().await;
        }
    }
}

/// Opens the store the configuration names: Postgres at `database.url`, else the embedded
/// SQLite file `DATA_DIR/micromsg.db` (made when missing).
pub async fn open_store(config: &Config) -> Result<Store, StoreError> {
    match &config.database.url {
        Some(url) => {
            Store::connect_postgres(
                url,
                config.database.max_connections,
                config.database.timeout(),
            )
            .await
        }
        None => {
            Store::open_sqlite_with(
                sqlite_path(&config.server.data_dir),
                config.database.max_connections,
            )
            .await
        }
    }
}

/// The embedded SQLite store's file in `data_dir`.
pub fn sqlite_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("micromsg.db")
}

/// Sets everything up and starts serving in the background.
pub async fn start(config: Config) -> Result<RunningBroker, StartError> {
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| StartError::Io {
        what: format!("creating data directory {}", data_dir.display()),
        source,
    })?;
    let operator = config.tls.cert.as_deref().zip(config.tls.key.as_deref());
    let files = tls::ensure_certificates(operator, &data_dir.join("tls"), &config.tls.names)?;
    let server_tls = tls::server_config(&files)?;
    let identity = crate::identity::load_or_create(&data_dir.join("identity.key"))?;
    let mut store = open_store(&config).await?;
    // Only a serving broker takes LOGINs: the admin tools, which open the store too, need no
    // login readers (Postgres ignores the setting).
    store
        .start_login_readers(config.database.login_readers, config.database.timeout())
        .await?;
    let mut config = config;
    let federation = Federation::load(&config.federation, &config.server.broker_id)?;
    if let Some(f) = &federation {
        // A networked broker allocates from its prefixes in the network file.
        config.numbers.prefixes.clone_from(&f.me.prefixes);
        config.validate()?;
    }
    let broker = Arc::new(Broker::with_federation(config, store, identity, federation));
    // Ported numbers route before the first request is served.
    let ported = crate::federation::porting::load_routes(&broker).await?;
    if ported > 0 {
        info!(ported, "ported-number entries loaded");
    }
    let server = Server::bind(Arc::clone(&broker), broker.config.server.listen, server_tls)
        .await
        .map_err(|source| StartError::Io {
            what: format!("binding {}", broker.config.server.listen),
            source,
        })?;
    let addr = server.local_addr().map_err(|source| StartError::Io {
        what: "reading the bound address".into(),
        source,
    })?;
    let (shutdown, rx) = watch::channel(false);
    let mut background = JoinSet::new();
    let mut federation_addr = None;
    let mut federation_refusals = None;
    if let Some(f) = broker.federation.as_ref() {
        let listen = f.config.listen.unwrap_or_else(|| {
            let port = if f.me.port() == 0 { 7401 } else { f.me.port() };
            SocketAddr::from(([0, 0, 0, 0], port))
        });
        let listener = FederationServerHandle::bind(Arc::clone(&broker), listen)
            .await
            .map_err(|source| StartError::Io {
                what: format!("binding the federation listener {listen}"),
                source,
            })?;
        if let Some(listener) = listener {
            let bound = listener.local_addr().map_err(|source| StartError::Io {
                what: "reading the federation address".into(),
                source,
            })?;
            info!(
                addr = %bound,
                network = %f.network.name,
                peers = f.links.len(),
                "listening for peer brokers (gRPC, mutual TLS 1.3)"
            );
            federation_addr = Some(bound);
            federation_refusals = Some(listener.counters());
            background.spawn(listener.run(rx.clone()));
        }
        background.spawn(crate::federation::outbox::run_outbox(
            Arc::clone(&broker),
            rx.clone(),
        ));
        background.spawn(crate::federation::porting::run_announcer(
            Arc::clone(&broker),
            rx.clone(),
        ));
        background.spawn(crate::federation::probe::probe_forever(
            Arc::clone(f),
            rx.clone(),
        ));
    }
    // Said only once every listener the broker cannot run without is bound: a broker that
    // then fails to bind its federation port never claimed to be serving.
    info!(
        %addr,
        store = broker.store.backend_name(),
        broker_id = %broker.config.server.broker_id,
        "listening for clients (TLS 1.3)"
    );
    if let Some(ca) = &files.ca {
        info!(ca = %ca.display(), "clients trust this CA file");
    }
    let mut admin_addr = None;
    if broker.config.admin.enabled {
        // The admin listener serves operators, not clients: if its address is taken the broker
        // still serves its clients, and says loudly that status and health are unavailable
        // (a health check against the address then fails, which is how it gets noticed).
        match AdminListener::bind(Arc::clone(&broker), broker.config.admin.listen).await {
            Err(e) => tracing::error!(
                error = %e,
                "admin service NOT started: no status, health or reflection on this broker"
            ),
            Ok(admin) => {
                let bound = admin.local_addr().map_err(|source| StartError::Io {
                    what: "reading the admin address".into(),
                    source,
                })?;
                info!(addr = %bound, "admin service listening (gRPC: Status, health, reflection)");
                admin_addr = Some(bound);
                let rx = rx.clone();
                background.spawn(async move {
                    if let Err(e) = admin.run(rx).await {
                        warn!(error = %e, "admin service failed");
                    }
                });
            }
        }
    }
    crate::metrics::register(&broker.online, broker.federation.as_ref());
    crate::metrics::register_relays(&broker.relays);
    background.spawn(sweep_forever(Arc::clone(&broker), rx.clone()));
    background.spawn(crate::contacts::probes::flush_forever(
        Arc::clone(&broker.router.probes),
        broker.store.clone(),
        rx.clone(),
    ));
    let task = tokio::spawn(server.run(rx));
    Ok(RunningBroker {
        addr,
        ca_file: files.ca,
        broker,
        federation_addr,
        federation_refusals,
        admin_addr,
        shutdown,
        task,
        background,
    })
}

/// How often expired inbox items, spent registration secrets and expired pubkeys are removed.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

async fn sweep_forever(broker: Arc<Broker>, shutdown: watch::Receiver<bool>) {
    after_each(SWEEP_EVERY, shutdown, || sweep_once(&broker)).await;
}

/// One sweep. Each call of the store removes a bounded batch; keep going while it says there
/// is more.
async fn sweep_once(broker: &Broker) {
    loop {
        match broker.store.sweep(crate::clock::unix_now() as i64).await {
            Ok(report) if report.more => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "sweep failed; will retry");
                break;
            }
        }
    }
}

/// Runs `round` each time `period` has passed since the last round ended (the first one
/// `period` after the start), until shutdown. Generic over the round so that the schedule is
/// tested on paused time with a counter: the store's pool waits on its own threads, and a
/// paused clock jumps ahead (to the pool's timeouts) whenever the runtime waits on them.
async fn after_each<F, R>(
    period: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
    mut round: R,
) where
    R: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = crate::shutdown::stopped(&mut shutdown) => return,
        }
        round().await;
    }
}

/// Runs a broker until SIGINT or SIGTERM, then shuts down gracefully.
///
/// Holds the data directory's lock ([`DataDirLock`]) while it runs, so that `migrate-store`
/// and `import` refuse to write the store under it.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| StartError::Io {
        what: format!("creating data directory {}", data_dir.display()),
        source,
    })?;
    let _lock = DataDirLock::acquire(&data_dir)?;
    let running = start(config).await?;
    crate::signals::wait_for_stop().await;
    info!("shutting down: finishing in-flight requests");
    let broker = Arc::clone(&running.broker);
    running.stop().await;
    // Closing the store returns its connections; on SQLite the last one checkpoints the WAL
    // into `micromsg.db` and removes `-wal`, so a stopped broker's store is one file to copy.
    // The lock is held until then, so no tool writes the store while it closes.
    if tokio::time::timeout(STORE_CLOSE_GRACE, broker.store().close())
        .await
        .is_err()
    {
        warn!("the store did not close within {STORE_CLOSE_GRACE:?}; stopping without it");
    }
    info!("stopped");
    Ok(())
}

/// How long a stopping broker waits for its store to close (connections returned, and on
/// SQLite the WAL checkpointed) before it exits anyway. Nothing committed is lost either way.
const STORE_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio::time::sleep;

    use super::{SWEEP_EVERY, after_each};

    #[tokio::test(start_paused = true)]
    async fn the_sweep_runs_once_a_minute_not_at_start() {
        assert_eq!(SWEEP_EVERY, Duration::from_secs(60));
        let ms = Duration::from_millis(1);
        let sweeps = Arc::new(AtomicU32::new(0));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn({
            let sweeps = Arc::clone(&sweeps);
            after_each(SWEEP_EVERY, shutdown, move || {
                sweeps.fetch_add(1, Ordering::SeqCst);
                std::future::ready(())
            })
        });
        let count = || sweeps.load(Ordering::SeqCst);
        sleep(SWEEP_EVERY - ms).await;
        assert_eq!(count(), 0, "not before the first minute is over");
        sleep(2 * ms).await;
        assert_eq!(count(), 1);
        sleep(SWEEP_EVERY - 2 * ms).await;
        assert_eq!(count(), 1);
        sleep(2 * ms).await;
        assert_eq!(count(), 2);
        // Shutdown ends the wait at once; no sweep on the way out.
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(count(), 2);
    }
}
