//! In-memory rate limiters: token buckets per connection, sliding counts per IP and per entity.
//!
//! They take `now` as an argument (sans-clock), so tests drive them deterministically. Tables
//! keyed by IP or entity are bounded twice: by pruning entries that no longer limit anything,
//! and by a hard cap on entries (`limits.max_table_entries`), so that a flood of distinct keys
//! costs bounded memory (docs/operations.md gives the bytes per entry).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
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

/// Where a client connects from, as far as limits count it: an IPv4 address, or the /64 of an
/// IPv6 address (one subscriber usually holds a whole /64, so counting single IPv6 addresses
/// would let one host use 2^64 of them). An IPv4-mapped IPv6 address counts as its IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` belongs to.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !(u128::from(u64::MAX));
                    Self(IpAddr::V6(prefix.into()))
                }
            },
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

/// At most `max` events per `window` for each key (a fixed window per key, reset when it ends),
/// for at most `max_entries` keys at once: a new key beyond them is refused as over the limit
/// (fail closed), until pruning makes room.
#[derive(Debug)]
pub struct WindowLimiter<K> {
    max: u32,
    window: Duration,
    max_entries: usize,
    table: Mutex<Pruned<K, (Instant, u32)>>,
}

impl<K: Eq + Hash + Clone> WindowLimiter<K> {
    /// `max` events per `window`, for at most `max_entries` keys.
    pub fn new(max: u32, window: Duration, max_entries: usize) -> Self {
        Self {
            max,
            window,
            max_entries: max_entries.max(1),
            table: Mutex::new(Pruned::default()),
        }
    }

    /// `Err(retry_after)` when `key` is over the limit now; counts nothing.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.map.get(key) {
            Some((start, count))
                if *count >= self.max && now.saturating_duration_since(*start) < self.window =>
            {
                Err(self
                    .window
                    .saturating_sub(now.saturating_duration_since(*start)))
            }
            _ => Ok(()),
        }
    }

    /// Counts one event for `key`; `Err(retry_after)` when over the limit (not counted), or
    /// when `key` is new and the table is full.
    pub fn hit(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.window;
        table.prune(now, window, self.max_entries / 2, |_, (start, _)| {
            now.saturating_duration_since(*start) < window
        });
        if table.map.len() >= self.max_entries && !table.map.contains_key(key) {
            // The oldest entry ends within a window; a quarter window is when pruning next runs.
            return Err(window / PRUNES_PER_PERIOD);
        }
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

/// Most sources one entity's failure record remembers; failures from further sources still
/// count toward the entity's total, but those sources are not locked (the per-source failure
/// limit still throttles each of them).
pub const MAX_SOURCES_PER_ENTITY: usize = 16;

/// Counts login failures per entity and per source, and locks an entity after too many, but
/// only against the sources that failed (protocol.md 9.5): whoever floods wrong logins for a
/// number locks themselves out, not the number's owner, who logs in from elsewhere.
#[derive(Debug)]
pub struct FailureLock {
    max_failures: u32,
    lock_for: Duration,
    max_entries: usize,
    table: Mutex<Pruned<String, Failures>>,
}

#[derive(Debug, Clone)]
struct Failures {
    /// Failures from every source since the record started.
    count: u32,
    locked_until: Option<Instant>,
    last: Instant,
    /// The sources that failed, with their failures.
    sources: HashMap<Source, u32>,
}

impl FailureLock {
    /// Locks for `lock_for` after `max_failures` failures in a row, keeping at most
    /// `max_entries` entities.
    pub fn new(max_failures: u32, lock_for: Duration, max_entries: usize) -> Self {
        Self {
            max_failures: max_failures.max(1),
            lock_for,
            max_entries: max_entries.max(1),
            table: Mutex::new(Pruned::default()),
        }
    }

    /// `Err(retry_after)` while `entity` is locked against `source`: the entity has failed
    /// too often, and `source` is one of those that failed.
    pub fn check(&self, entity: &str, source: Source, now: Instant) -> Result<(), Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.map.get(entity) {
            Some(f) if f.sources.contains_key(&source) => match f.locked_until {
                Some(until) if until > now => Err(until - now),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Records a failure from `source`; returns true when this failure locked the entity.
    /// With the table full, a failure for an entity not in it is not recorded.
    pub fn fail(&self, entity: &str, source: Source, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let lock_for = self.lock_for;
        table.prune(now, lock_for, self.max_entries / 2, |_, f| {
            now.saturating_duration_since(f.last) < lock_for
                || f.locked_until.is_some_and(|until| until > now)
        });
        if table.map.len() >= self.max_entries && !table.map.contains_key(entity) {
            return false;
        }
        let fresh = || Failures {
            count: 0,
            locked_until: None,
            last: now,
            sources: HashMap::new(),
        };
        let f = table.map.entry(entity.to_owned()).or_insert_with(fresh);
        if f.locked_until.is_some_and(|until| until <= now) {
            *f = fresh();
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.sources.len() < MAX_SOURCES_PER_ENTITY || f.sources.contains_key(&source) {
            *f.sources.entry(source).or_insert(0) += 1;
        }
        if f.count >= self.max_failures && f.locked_until.is_none() {
            f.locked_until = Some(now + self.lock_for);
            return true;
        }
        false
    }

    /// A successful login of `entity` from `source`: that source's failures are forgotten.
    /// Other sources stay as they are (a lock against them holds), and the record goes once
    /// no source is left in it.
    pub fn succeed(&self, entity: &str, source: Source) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = table.map.get_mut(entity) {
            f.sources.remove(&source);
            if f.sources.is_empty() {
                table.map.remove(entity);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }
}

/// The answers given to deposits that were discarded (the recipient blocked the sender), so
/// that a repeat is answered as a kept deposit's repeat is (protocol.md 6.20): the same EXPIRES
/// for the same body, CONFLICT for another body. Without it a blocked sender could tell by
/// retrying later: a kept deposit answers its stored expiry, a discarded one a new one.
/// Entries go once their message would have expired; at most `max_entries` (then a repeat of
/// an unremembered one gets a fresh answer, as after a broker restart).
#[derive(Debug)]
pub struct DiscardedDeposits {
    max_entries: usize,
    /// (sender, target, id) → (the EXPIRES answered, SHA-256 of the body).
    table: Mutex<HashMap<DiscardKey, (u64, [u8; 32])>>,
}

type DiscardKey = (String, String, [u8; 16]);

/// Another body under an ID a discarded deposit already used: answered CONFLICT, as a kept
/// deposit's would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdConflict;

impl DiscardedDeposits {
    /// A log of at most `max_entries` discarded deposits.
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The EXPIRES to answer a discarded deposit of `id` from `sender` to `target` with:
    /// the first answer's for the same body, `fresh` for a new one; `Err` for another body
    /// under an id already answered (a kept deposit's CONFLICT).
    pub fn answer(
        &self,
        sender: &str,
        target: &str,
        id: [u8; 16],
        body: &[u8],
        fresh: u64,
        now_unix: u64,
    ) -> Result<u64, IdConflict> {
        use subtle::ConstantTimeEq;
        let digest = micromsg_crypto::kdf::sha256(&[body]);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let key = (sender.to_owned(), target.to_owned(), id);
        if let Some((expires, stored)) = table.get(&key) {
            return if bool::from(stored.ct_eq(&digest)) {
                Ok(*expires)
            } else {
                Err(IdConflict)
            };
        }
        if table.len() >= self.max_entries {
            table.retain(|_, (expires, _)| *expires > now_unix);
        }
        if table.len() < self.max_entries {
            table.insert(key, (fresh, digest));
        }
        Ok(fresh)
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

    /// A source (a client address).
    const A: Source = Source(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
    const B: Source = Source(IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7)));

    #[test]
    fn an_entity_is_locked_only_against_the_sources_that_failed() {
        let t0 = Instant::now();
        let l = FailureLock::new(3, Duration::from_secs(300), 1_000);
        for _ in 0..10 {
            l.fail("owner", A, t0);
        }
        assert!(
            l.check("owner", A, t0).is_err(),
            "the attacker is locked out"
        );
        assert!(
            l.check("owner", B, t0).is_ok(),
            "the owner elsewhere is not"
        );
        // Failures from many sources lock every one of them, and still not the owner's.
        let many: Vec<Source> = (0..5u8)
            .map(|i| Source::of(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, i))))
            .collect();
        for s in &many {
            l.fail("spread", *s, t0);
        }
        assert!(many.iter().all(|s| l.check("spread", *s, t0).is_err()));
        assert!(l.check("spread", B, t0).is_ok());
        // The owner logging in forgets only the owner's own failures.
        l.fail("owner", B, t0);
        assert!(
            l.check("owner", B, t0).is_err(),
            "B failed too, so B is locked now"
        );
        l.succeed("owner", A);
        assert!(l.check("owner", B, t0).is_err());
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(Source::of(mapped), A);
    }

    #[test]
    fn the_tables_hold_at_most_their_entries() {
        let t0 = Instant::now();
        let failures = FailureLock::new(10, Duration::from_secs(300), 100);
        for i in 0..10_000u32 {
            failures.fail(&format!("555{i:07}"), A, t0);
        }
        assert_eq!(failures.len(), 100, "a flood of numbers is capped");
        // An entity already in the table still counts.
        for _ in 0..10 {
            failures.fail("5550000000", A, t0);
        }
        assert!(failures.check("5550000000", A, t0).is_err());
        // Window limiters refuse a new key while full (fail closed), and keep counting old ones.
        let l = WindowLimiter::new(2, Duration::from_secs(60), 3);
        for k in 0..3u32 {
            assert!(l.hit(&k, t0).is_ok());
        }
        assert!(l.hit(&99, t0).is_err());
        assert!(l.hit(&0, t0).is_ok());
        // Once the window has passed, pruning makes room.
        assert!(l.hit(&99, t0 + Duration::from_secs(60)).is_ok());
        // Sources per entity are capped too.
        let wide = FailureLock::new(u32::MAX, Duration::from_secs(300), 10);
        for i in 0..1_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            wide.fail("5550000001", Source::of(ip), t0);
        }
        let table = wide.table.lock().unwrap();
        assert_eq!(
            table.map["5550000001"].sources.len(),
            MAX_SOURCES_PER_ENTITY
        );
        assert_eq!(table.map["5550000001"].count, 1_000);
    }

    #[test]
    fn pruned_table_forgets_expired_keys_once_a_period() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let limiter = WindowLimiter::new(5, every, 1_000_000);
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
        let l = WindowLimiter::new(2, window, 1_000_000);
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
        let l = FailureLock::new(2, lock_for, 1_000);
        assert!(!l.fail("a", A, t0));
        assert!(
            l.check("a", A, t0 + Duration::from_secs(1)).is_ok(),
            "not yet"
        );
        assert!(
            l.fail("a", A, t0 + Duration::from_secs(1)),
            "the second failure locks"
        );
        let locked_at = t0 + Duration::from_secs(1);
        assert_eq!(
            l.check("a", A, locked_at + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        let just_before = locked_at + lock_for - Duration::from_nanos(1);
        assert_eq!(l.check("a", A, just_before), Err(Duration::from_nanos(1)));
        assert!(l.check("a", A, locked_at + lock_for).is_ok());
        // Once the lock is over the count starts again: one failure does not lock.
        assert!(!l.fail("a", A, locked_at + lock_for));
        assert!(l.check("a", A, locked_at + lock_for).is_ok());
    }

    #[test]
    fn window_limits_per_key_and_resets() {
        let t0 = Instant::now();
        let l = WindowLimiter::new(2, Duration::from_secs(60), 1_000_000);
        assert!(l.hit(&1, t0).is_ok());
        assert!(l.hit(&1, t0).is_ok());
        assert!(l.hit(&1, t0).is_err());
        assert!(l.hit(&2, t0).is_ok());
        assert!(l.hit(&1, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn failures_lock_and_expire() {
        let t0 = Instant::now();
        let l = FailureLock::new(3, Duration::from_secs(10), 1_000);
        assert!(!l.fail("a", A, t0));
        assert!(!l.fail("a", A, t0));
        assert!(l.fail("a", A, t0));
        assert!(l.check("a", A, t0).is_err());
        assert!(l.check("b", A, t0).is_ok());
        assert!(l.check("a", A, t0 + Duration::from_secs(10)).is_ok());
        l.succeed("a", A);
        assert!(l.check("a", A, t0).is_ok());
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
