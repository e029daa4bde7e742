//! Shutdown as a value: one `watch` channel whose sender turns `true` when the broker stops.
//! Every loop of the broker (listeners, connections, background tasks) selects on [`stopped`].

use tokio::sync::watch;

/// Resolves once `shutdown` is (or becomes) true, or its sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across the caller's awaits.
    let _ = shutdown.wait_for(|stop| *stop).await;
}
