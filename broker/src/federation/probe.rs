//! The link prober: pings every peer now and then, so reachability is known before a client
//! needs it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::debug;

use super::Federation;
use super::peers::describe;
use super::proto::PingRequest;

/// Pings every peer now and then, so reachability is known before a client needs it.
pub async fn probe_forever(federation: Arc<Federation>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(federation.config.probe_interval_secs.max(1));
    let timeout = federation.request_timeout();
    loop {
        for link in federation.links.values() {
            let mut client = link.client();
            let call = tokio::time::timeout(timeout, client.ping(PingRequest {}));
            let result = match call.await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(tonic::Status::deadline_exceeded("ping timed out")),
            };
            if let Err(status) = link.record(result) {
                debug!(peer = %link.entry.id, error = %describe(&status), "probe failed");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = crate::shutdown::stopped(&mut shutdown) => return,
        }
    }
}
