//! Probes of unallocated numbers (protocol.md 10.4), remembered off the request path.
//!
//! An INITIATE to a number of this broker's share that nobody holds is remembered, so that the
//! prober cannot reach the number if it is given out later. Writing that record right after
//! the acknowledgement made the next request on the connection measurably slower (the write
//! and its fsync held the store), which told the prober that the number was unallocated. So
//! the routing only notes the probe here, in memory, where it takes effect at once
//! ([`ProbeLog::contains`]), and a background task writes the notes in one transaction per
//! interval ([`flush_forever`]), at times that have nothing to do with any request.
//!
//! The notes are bounded (`limits.max_table_entries`); past that, new probes wait for the
//! next flush to make room and are dropped meanwhile (counted in the log).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use micromsg_store::{Number, Store};
use tokio::sync::watch;
use tracing::{debug, warn};

/// How often the noted probes are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The probes noted and not yet written.
#[derive(Debug)]
pub struct ProbeLog {
    noted: Mutex<HashSet<(Number, Number)>>,
    max: usize,
}

impl ProbeLog {
    /// A log holding at most `max` unwritten probes.
    pub fn new(max: usize) -> Self {
        Self {
            noted: Mutex::new(HashSet::new()),
            max: max.max(1),
        }
    }

    /// Notes that `caller` probed the unallocated `target`.
    pub fn note(&self, caller: &Number, target: &Number) {
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        if noted.len() >= self.max {
            debug!("probe log full until the next flush; a probe is not remembered");
            return;
        }
        noted.insert((caller.clone(), target.clone()));
    }

    /// Whether a probe of `target` by `caller` is noted and not yet written.
    pub fn contains(&self, caller: &Number, target: &Number) -> bool {
        let noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        noted.contains(&(caller.clone(), target.clone()))
    }

    /// Writes what is noted; what was written leaves the log (a failed write keeps it for
    /// the next flush).
    pub async fn flush(&self, store: &Store, now: i64) {
        let batch: Vec<(Number, Number)> = {
            let noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
            noted.iter().cloned().collect()
        };
        if batch.is_empty() {
            return;
        }
        match store.remember_unknown_targets(&batch, now).await {
            Ok(()) => {
                let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
                for probe in &batch {
                    noted.remove(probe);
                }
            }
            Err(e) => warn!(error = %e, "writing probes of unallocated numbers failed; will retry"),
        }
    }
}

/// Writes the noted probes every [`FLUSH_EVERY`], and once more at shutdown.
pub async fn flush_forever(
    log: std::sync::Arc<ProbeLog>,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(FLUSH_EVERY) => {}
            () = crate::shutdown::stopped(&mut shutdown) => {
                log.flush(&store, crate::clock::unix_now() as i64).await;
                return;
            }
        }
        log.flush(&store, crate::clock::unix_now() as i64).await;
    }
}
