//! In-memory rate limiters: token buckets per connection, sliding counts per IP and per entity.
//!
//! They take `now` as an argument (sans-clock), so tests drive them deterministically. Tables
//! keyed by IP or entity are bounded by pruning entries that no longer limit anything.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A table of entries that stop mattering after a while, pruned on access four times per
/// period (and whenever it passes `max_len`), so that it holds about 1.25 periods' keys rather
/// than every key seen until a size mark, or the two periods' keys it reached just before each
/// pruning when it was pruned once per period. Pruning walks the table a few times per period:
/// amortised O(1) per access. Its capacity shrinks with it, so a burst of keys does not pin
/// memory.
#[derive(Debug)]
pub(crate) struct Pruned<K, V> {
    pub(crate) map: HashMap<K, V>,
    next: Option<Instant>,
    /// Entries left by the last pruning.
    kept: usize,
}

/// How many times per period a [`Pruned`] table is pruned.
const PRUNES_PER_PERIOD: u32 = 4;

impl<K: Eq + Hash, V> Default for Pruned<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            next: None,
            kept: 0,
        }
    }
}

impl<K: Eq + Hash, V> Pruned<K, V> {
    /// Keeps only the entries `keep` accepts, if a quarter of `every` has passed since the last
    /// pruning, or the table holds more than `max_len` entries and twice as many as the last
    /// pruning left (so that a table whose live entries pass `max_len` is not walked on every
    /// access).
    pub(crate) fn prune(
        &mut self,
        now: Instant,
        every: Duration,
        max_len: usize,
        keep: impl FnMut(&K, &mut V) -> bool,
    ) {
        let due = self.next.is_none_or(|next| now >= next);
        let full = self.map.len() > max_len.max(2 * self.kept);
        if !due && !full {
            return;
        }
        self.next = Some(now + every / PRUNES_PER_PERIOD);
        self.map.retain(keep);
        self.kept = self.map.len();
        if self.map.capacity() > 4 * self.map.len() + 64 {
            self.map.shrink_to(2 * self.map.len());
        }
    }
}

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
    table: Mutex<Pruned<K, (Instant, u32)>>,
}

impl<K: Eq + Hash + Clone> WindowLimiter<K> {
    /// `max` events per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            table: Mutex::new(Pruned::default()),
        }
    }

    /// Counts one event for `key`; `Err(retry_after)` when over the limit (not counted).
    pub fn hit(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.window;
        table.prune(now, window, 100_000, |_, (start, _)| {
            now.saturating_duration_since(*start) < window
        });
        let entry = table.map.entry(key.clone()).or_insert((now, 0));
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
    table: Mutex<Pruned<String, Failures>>,
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
            table: Mutex::new(Pruned::default()),
        }
    }

    /// `Err(retry_after)` while `entity` is locked.
    pub fn check(&self, entity: &str, now: Instant) -> Result<(), Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.map.get(entity).and_then(|f| f.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; returns true when this failure locked the entity.
    pub fn fail(&self, entity: &str, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let lock_for = self.lock_for;
        table.prune(now, lock_for, 100_000, |_, f| {
            now.saturating_duration_since(f.last) < lock_for
                || f.locked_until.is_some_and(|until| until > now)
        });
        let f = table.map.entry(entity.to_owned()).or_insert(Failures {
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
        table.map.remove(entity);
    }
}

/// Remembers accepted login nonces for as long as they could verify, so that each nonce is
/// accepted once. The TLS channel binding already makes a nonce useless on any other
/// connection; this closes the remaining gap (the same connection, or a broken binding).
///
/// Its size follows the login rate (one entry per login in the window), so it is kept compact
/// and without large reallocations: nonces go into one set per quarter window, and a set is
/// dropped whole once its newest entry is older than the window. A lookup checks the live sets
/// (five or six). Each entry is the nonce's first 16 bytes: a 128-bit prefix of an HMAC output
/// identifies the nonce as well as the whole does here (a replay has the same prefix; two
/// different nonces share it with probability 2^-128). One table of 32-byte nonces and their
/// times, pruned once per window, doubled to 1.6 MiB under the soak's login rate and stepped
/// the broker's RSS up for good (performance.md, "Soak").
#[derive(Debug)]
pub struct ReplayCache {
    keep: Duration,
    /// Sets of nonces by the start of their quarter window, oldest first.
    sets: Mutex<VecDeque<(Instant, HashSet<[u8; 16]>)>>,
}

impl ReplayCache {
    /// Keeps each nonce for `keep` (the width of the acceptance window), and at most a quarter
    /// of `keep` longer.
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            sets: Mutex::new(VecDeque::new()),
        }
    }

    /// Records `nonce`; false if it was already accepted inside the window.
    pub fn first_use(&self, nonce: [u8; 32], now: Instant) -> bool {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let width = self.keep / PRUNES_PER_PERIOD;
        // A set's entries are at most `width` newer than its start.
        while sets
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) >= self.keep + width)
        {
            sets.pop_front();
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&nonce[..16]);
        if sets.iter().any(|(_, set)| set.contains(&key)) {
            return false;
        }
        match sets.back_mut() {
            Some((start, set)) if now.saturating_duration_since(*start) < width => {
                set.insert(key);
            }
            _ => sets.push_back((now, HashSet::from([key]))),
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        sets.iter().map(|(_, set)| set.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pruned_table_forgets_expired_keys_once_a_period() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let limiter = WindowLimiter::new(5, every);
        for k in 0..5_000u32 {
            assert!(limiter.hit(&k, t0).is_ok());
        }
        // At 30 s no window has ended: a pruning (due a quarter period in) keeps them all.
        assert!(
            limiter
                .hit(&9_999_999, t0 + Duration::from_secs(30))
                .is_ok()
        );
        let len = || limiter.table.lock().unwrap().map.len();
        assert_eq!(len(), 5_001);
        // A period later, one hit prunes every entry whose window has ended.
        assert!(limiter.hit(&7, t0 + every + Duration::from_secs(1)).is_ok());
        assert_eq!(len(), 2, "the key hit at 30 s and the new entry for 7");
        let capacity = limiter.table.lock().unwrap().map.capacity();
        assert!(capacity < 1_000, "capacity {capacity} not shrunk");
        // A key still inside its window keeps its count.
        for _ in 0..4 {
            assert!(limiter.hit(&7, t0 + every + Duration::from_secs(2)).is_ok());
        }
        assert!(
            limiter
                .hit(&7, t0 + every + Duration::from_secs(3))
                .is_err()
        );
    }

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

    /// The wait a refusal names is exact: one nanosecond short of it is still refused, and
    /// at it the token is there. (Separate buckets: a refused take still moves the bucket on.)
    #[test]
    fn bucket_refusal_names_the_wait_until_the_next_token() {
        let t0 = Instant::now();
        let drained = || {
            let mut b = TokenBucket::new(4, 2, t0);
            assert!(b.take(t0).is_ok());
            assert!(b.take(t0).is_ok());
            b
        };
        let wait = drained().take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(250), "a token every 250 ms");
        let early = drained().take(t0 + wait - Duration::from_millis(1));
        assert!(early.is_err(), "{early:?}");
        assert!(drained().take(t0 + wait).is_ok());
        // It refills up to the burst, not past it.
        let mut b = drained();
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later).is_ok());
        assert!(b.take(later).is_ok());
        assert!(b.take(later).is_err());
        // A zero rate never refills; it says to come back in an hour.
        let mut none = TokenBucket::new(0, 1, t0);
        assert!(none.take(t0).is_ok());
        assert_eq!(
            none.take(t0 + Duration::from_secs(3600)),
            Err(Duration::from_secs(3600))
        );
    }

    #[test]
    fn window_ends_exactly_one_window_after_its_first_hit() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let l = WindowLimiter::new(2, window);
        assert!(l.hit(&1, t0).is_ok());
        assert!(l.hit(&1, t0 + Duration::from_secs(10)).is_ok());
        // Refused for what is left of the window, counted from the first hit.
        assert_eq!(
            l.hit(&1, t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        let just_before = t0 + window - Duration::from_nanos(1);
        assert_eq!(l.hit(&1, just_before), Err(Duration::from_nanos(1)));
        // At its end a new window starts, with a full count.
        assert!(l.hit(&1, t0 + window).is_ok());
        assert!(l.hit(&1, t0 + window).is_ok());
        assert!(l.hit(&1, t0 + window).is_err());
    }

    #[test]
    fn a_lock_lasts_exactly_lock_for_and_then_starts_over() {
        let t0 = Instant::now();
        let lock_for = Duration::from_secs(10);
        let l = FailureLock::new(2, lock_for);
        assert!(!l.fail("a", t0));
        assert!(l.check("a", t0 + Duration::from_secs(1)).is_ok(), "not yet");
        assert!(
            l.fail("a", t0 + Duration::from_secs(1)),
            "the second failure locks"
        );
        let locked_at = t0 + Duration::from_secs(1);
        assert_eq!(
            l.check("a", locked_at + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        let just_before = locked_at + lock_for - Duration::from_nanos(1);
        assert_eq!(l.check("a", just_before), Err(Duration::from_nanos(1)));
        assert!(l.check("a", locked_at + lock_for).is_ok());
        // Once the lock is over the count starts again: one failure does not lock.
        assert!(!l.fail("a", locked_at + lock_for));
        assert!(l.check("a", locked_at + lock_for).is_ok());
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
        assert!(c.first_use([1; 32], t0 + Duration::from_millis(300)));
        assert!(!c.first_use([1; 32], t0 + Duration::from_secs(5)));
        // Still refused at the end of the window.
        assert!(!c.first_use([1; 32], t0 + Duration::from_millis(18_299)));
        assert!(
            c.first_use([1; 32], t0 + Duration::from_millis(18_300 + 4_500)),
            "window and a quarter over"
        );
        assert!(c.first_use([2; 32], t0 + Duration::from_secs(23)));
        // Nonces that differ only past the first 16 bytes count as one (documented).
        let mut other = [2; 32];
        other[31] = 9;
        assert!(!c.first_use(other, t0 + Duration::from_secs(24)));
    }

    #[test]
    fn replay_cache_holds_about_one_window_and_a_quarter_of_logins() {
        let t0 = Instant::now();
        let c = ReplayCache::new(Duration::from_secs(24));
        // 100 logins a second for four windows: never more than 1.25 windows' worth plus the
        // current step, and never less than one window's.
        let mut most = 0;
        for tick in 0..(96 * 100u32) {
            let now = t0 + Duration::from_millis(u64::from(tick) * 10);
            let mut nonce = [0u8; 32];
            nonce[..4].copy_from_slice(&tick.to_le_bytes());
            assert!(c.first_use(nonce, now));
            if tick >= 2_400 {
                assert!(c.len() >= 2_400, "forgot nonces inside the window");
            }
            most = most.max(c.len());
        }
        assert!(most <= 3_000 + 1, "held {most} entries");
    }

    #[test]
    fn a_table_past_its_size_mark_is_not_walked_on_every_access() {
        let t0 = Instant::now();
        let mut table: Pruned<u32, ()> = Pruned::default();
        let mut walks = 0;
        for k in 0..10_000u32 {
            table.map.insert(k, ());
            // Every entry stays live; the size mark is 1,000.
            table.prune(t0, Duration::from_secs(3600), 1_000, |_, _| {
                walks += 1;
                true
            });
        }
        assert_eq!(table.map.len(), 10_000);
        // The first access prunes (nothing pruned yet), then at 1,001, 2,002, 4,004 and 8,008
        // entries: about 15,000 entries looked at, not 10,000 walks of up to 10,000.
        assert!(walks < 20_000, "{walks} entries looked at");
    }
}
