//! The link prober: pings every peer now and then, so reachability is known before a client
//! needs it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::debug;

use super::Federation;
use super::peers::{PeerLink, describe};
use super::proto::PingRequest;

/// Pings every peer now and then, so reachability is known before a client needs it.
pub async fn probe_forever(federation: Arc<Federation>, shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(federation.config.probe_interval_secs.max(1));
    let timeout = federation.request_timeout();
    rounds(every, shutdown, || probe_all(&federation, timeout)).await;
}

/// One round: pings every peer in turn and records the outcome on its link.
async fn probe_all(federation: &Federation, timeout: Duration) {
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
}

/// Tries a link that is marked unreachable once more, now (one ping within `timeout`), and
/// records the outcome; true when the peer answered. Concurrent callers share one attempt.
pub async fn recheck(link: &PeerLink, timeout: Duration) -> bool {
    let _one_at_a_time = link.rechecking.lock().await;
    if link.is_available() {
        // Another request's recheck (or a probe, or a call) found it up meanwhile.
        return true;
    }
    let mut client = link.client();
    let result = match tokio::time::timeout(timeout, client.ping(PingRequest {})).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded("ping timed out")),
    };
    match link.record(result) {
        Ok(()) => true,
        Err(status) => {
            debug!(peer = %link.entry.id, error = %describe(&status), "recheck failed");
            false
        }
    }
}

/// Runs `round` at once, then again `every` after each round ended, until shutdown. Generic
/// over the round so that this schedule is tested on paused time without peers (pinging is
/// real network I/O, which does not mix with a paused clock).
async fn rounds<F, R>(every: Duration, mut shutdown: watch::Receiver<bool>, mut round: R)
where
    R: FnMut() -> F,
    F: Future<Output = ()>,
{
    loop {
        round().await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = crate::shutdown::stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio::time::{Instant, sleep};

    use super::rounds;

    const MS: Duration = Duration::from_millis(1);

    /// The prober's schedule, with rounds that take `takes` each: (when each round started,
    /// the shutdown switch, the prober task).
    fn prober(
        every: Duration,
        takes: Duration,
    ) -> (
        Arc<Mutex<Vec<Duration>>>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let started = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn({
            let log = Arc::clone(&log);
            rounds(every, shutdown, move || {
                log.lock().unwrap().push(started.elapsed());
                sleep(takes)
            })
        });
        (log, stop, task)
    }

    fn secs(s: &[u64]) -> Vec<Duration> {
        s.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn peers_are_probed_at_once_then_every_interval() {
        let every = Duration::from_secs(30);
        let (log, stop, task) = prober(every, Duration::ZERO);
        sleep(3 * every - MS).await;
        assert_eq!(
            *log.lock().unwrap(),
            secs(&[0, 30, 60]),
            "not yet the fourth"
        );
        sleep(2 * MS).await;
        assert_eq!(*log.lock().unwrap(), secs(&[0, 30, 60, 90]));
        // Shutdown ends the wait between rounds at once.
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(log.lock().unwrap().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_counts_from_the_end_of_a_round() {
        // A round of slow pings (5 s) does not eat into the pause after it.
        let (log, stop, task) = prober(Duration::from_secs(30), Duration::from_secs(5));
        sleep(Duration::from_secs(70) - MS).await;
        assert_eq!(*log.lock().unwrap(), secs(&[0, 35]));
        sleep(2 * MS).await;
        assert_eq!(*log.lock().unwrap(), secs(&[0, 35, 70]));
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
