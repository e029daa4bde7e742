//! Starting and stopping a whole broker: data directory, store, TLS, identity, listener.
//!
//! [`start`] is what the binary and the in-process integration tests share, so the tests run
//! the same code a user runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::broker::Broker;
use crate::config::Config;
use crate::server::Server;
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data directory or listener could not be set up.
    #[error("{what}: {source}")]
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
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
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
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningBroker {
    /// Stops accepting, lets in-flight requests finish, and waits for the server to end.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
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
    let store = match &config.database.url {
        Some(url) => Store::connect_postgres(url, config.database.max_connections).await?,
        None => {
            Store::open_sqlite_with(
                data_dir.join("micromsg.db"),
                config.database.max_connections,
            )
            .await?
        }
    };
    let broker = Arc::new(Broker::new(config, store, identity, server_tls));
    let server = Server::bind(Arc::clone(&broker), broker.config.server.listen)
        .await
        .map_err(|source| StartError::Io {
            what: format!("binding {}", broker.config.server.listen),
            source,
        })?;
    let addr = server.local_addr().map_err(|source| StartError::Io {
        what: "reading the bound address".into(),
        source,
    })?;
    info!(
        %addr,
        store = broker.store.backend_name(),
        broker_id = %broker.config.server.broker_id,
        "listening for clients (TLS 1.3)"
    );
    if let Some(ca) = &files.ca {
        info!(ca = %ca.display(), "clients trust this CA file");
    }
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(sweep_forever(Arc::clone(&broker), rx.clone()));
    let task = tokio::spawn(server.run(rx));
    Ok(RunningBroker {
        addr,
        ca_file: files.ca,
        broker,
        shutdown,
        task,
    })
}

/// How often expired inbox items, spent registration secrets and expired pubkeys are removed.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

async fn sweep_forever(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = crate::server::stopped(&mut shutdown) => return,
        }
        // Each call removes a bounded batch; keep going while it says there is more.
        loop {
            match broker.store.sweep(crate::broker::unix_now() as i64).await {
                Ok(report) if report.more => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed; will retry");
                    break;
                }
            }
        }
    }
}

/// Runs a broker until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let running = start(config).await?;
    wait_for_signal().await;
    info!("shutting down: finishing in-flight requests");
    running.stop().await;
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
