//! In-memory rate limiters: token buckets per connection, sliding counts per IP and per entity.
//!
//! They take `now` as an argument (sans-clock), so tests drive them deterministically. Tables
//! keyed by IP or entity are bounded by pruning entries that no longer limit anything.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; `Err(wait)` says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate <= 0.0 {
            Err(Duration::from_secs(3600))
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// At most `max` events per `window` for each key (a fixed window per key, reset when it ends).
#[derive(Debug)]
pub struct WindowLimiter<K> {
    max: u32,
    window: Duration,
    table: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Eq + Hash + Clone> WindowLimiter<K> {
    /// `max` events per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event for `key`; `Err(retry_after)` when over the limit (not counted).
    pub fn hit(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() > 100_000 {
            let window = self.window;
            table.retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
        }
        let entry = table.entry(key.clone()).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.max {
            return Err(self
                .window
                .saturating_sub(now.saturating_duration_since(entry.0)));
        }
        entry.1 += 1;
        Ok(())
    }
}

/// Counts login failures per entity and locks an entity after too many.
#[derive(Debug)]
pub struct FailureLock {
    max_failures: u32,
    lock_for: Duration,
    table: Mutex<HashMap<String, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

impl FailureLock {
    /// Locks for `lock_for` after `max_failures` failures in a row.
    pub fn new(max_failures: u32, lock_for: Duration) -> Self {
        Self {
            max_failures: max_failures.max(1),
            lock_for,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` while `entity` is locked.
    pub fn check(&self, entity: &str, now: Instant) -> Result<(), Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(entity).and_then(|f| f.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; returns true when this failure locked the entity.
    pub fn fail(&self, entity: &str, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() > 100_000 {
            let lock_for = self.lock_for;
            table.retain(|_, f| now.saturating_duration_since(f.last) < lock_for);
        }
        let f = table.entry(entity.to_owned()).or_insert(Failures {
            count: 0,
            locked_until: None,
            last: now,
        });
        if f.locked_until.is_some_and(|until| until <= now) {
            *f = Failures {
                count: 0,
                locked_until: None,
                last: now,
            };
        }
        f.count += 1;
        f.last = now;
        if f.count >= self.max_failures && f.locked_until.is_none() {
            f.locked_until = Some(now + self.lock_for);
            return true;
        }
        false
    }

    /// Clears the failures of `entity` after a successful login.
    pub fn succeed(&self, entity: &str) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.remove(entity);
    }
}

/// Remembers accepted login nonces for as long as they could verify, so that each nonce is
/// accepted once. The TLS channel binding already makes a nonce useless on any other
/// connection; this closes the remaining gap (the same connection, or a broken binding).
#[derive(Debug)]
pub struct ReplayCache {
    keep: Duration,
    seen: Mutex<HashMap<[u8; 32], Instant>>,
}

impl ReplayCache {
    /// Keeps each nonce for `keep` (the width of the acceptance window).
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records `nonce`; false if it was already accepted inside the window.
    pub fn first_use(&self, nonce: [u8; 32], now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 {
            let keep = self.keep;
            seen.retain(|_, at| now.saturating_duration_since(*at) < keep);
        }
        match seen.get(&nonce) {
            Some(at) if now.saturating_duration_since(*at) < self.keep => false,
            _ => {
                seen.insert(nonce, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100));
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn window_limits_per_key_and_resets() {
        let t0 = Instant::now();
        let l = WindowLimiter::new(2, Duration::from_secs(60));
        assert!(l.hit(&1, t0).is_ok());
        assert!(l.hit(&1, t0).is_ok());
        assert!(l.hit(&1, t0).is_err());
        assert!(l.hit(&2, t0).is_ok());
        assert!(l.hit(&1, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn failures_lock_and_expire() {
        let t0 = Instant::now();
        let l = FailureLock::new(3, Duration::from_secs(10));
        assert!(!l.fail("a", t0));
        assert!(!l.fail("a", t0));
        assert!(l.fail("a", t0));
        assert!(l.check("a", t0).is_err());
        assert!(l.check("b", t0).is_ok());
        assert!(l.check("a", t0 + Duration::from_secs(10)).is_ok());
        l.succeed("a");
        assert!(l.check("a", t0).is_ok());
    }

    #[test]
    fn replay_cache_accepts_once() {
        let t0 = Instant::now();
        let c = ReplayCache::new(Duration::from_secs(18));
        assert!(c.first_use([1; 32], t0));
        assert!(!c.first_use([1; 32], t0 + Duration::from_secs(5)));
        assert!(c.first_use([2; 32], t0));
    }
}
