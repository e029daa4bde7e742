//! Time, read in one place. Handlers never read the clock: the connection reads it once per
//! request ([`Now::read`]) and passes it in, so a handler test fixes time by building a `Now`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The moment a request is handled, in both clocks the broker needs: wall time (Unix seconds,
/// for expiries, nonces and what is stored) and the monotonic clock (for limiters and
/// in-memory lifetimes, which must not jump with the wall clock).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Seconds since the Unix epoch.
    pub unix: u64,
    /// The monotonic clock.
    pub instant: Instant,
}

impl Now {
    /// Reads both clocks.
    pub fn read() -> Self {
        Self {
            unix: unix_now(),
            instant: Instant::now(),
        }
    }

    /// Wall time as the store keeps it (signed seconds).
    pub fn unix_i64(&self) -> i64 {
        i64::try_from(self.unix).unwrap_or(i64::MAX)
    }
}

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
