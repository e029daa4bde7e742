//! Group commit: [`GroupCommit`] gathers single writes from many connections and stores them
//! one transaction per batch. [`DepositBatcher`] does it for offline deposits
//! ([`Store::deposit_batch`]), [`OutboxBatcher`] for cross-broker deposits entering the
//! federation outbox ([`Store::enqueue_outbox_batch`]). A DEPOSIT reads its route in its
//! batch's own transaction: a DEPOSIT stored here its contact pair, block and devices
//! ([`DepositBatcher::deposit_routed`]), one for a peer broker's number its contact pair
//! ([`OutboxEntry::contact`]).
//!
//! The first write starts a batch at once, and whatever arrives while batches are committing
//! (up to `max_in_flight` at a time) forms the next one. Idle load gives one-item batches with
//! no added latency; heavy load gives large batches and few commits. The one wait is
//! [`BatcherConfig::gather`]: shortly after a batch was answered, the next one waits for the
//! writers it answered, so that writers who write again at once share a commit instead of
//! splitting into groups that take turns.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::inbox::Lane;
use super::routed::{DepositJob, ReceivedDelivery, RoutedDeposit, RoutedOutcome};
use super::{DepositOutcome, NewInboxItem, Number, Store, StoreError};

/// How long a group-commit batch's statements take and how long its commit, the wait for the
/// WAL flush, takes (moving averages over recent batches, microseconds). A second batch in
/// flight pays only while the first waits for its flush: its statements run meanwhile. Where
/// flushes are short beside the statements (a fast disk, and a busy CPU), two batches side by
/// side only halve each other's size, and each batch costs a transaction of its own
/// (docs/performance.md: about 15% more CPU per deposit with two than with one there).
#[derive(Debug, Default)]
pub(crate) struct CommitClock {
    statements_us: AtomicU64,
    flush_us: AtomicU64,
}

impl CommitClock {
    /// Adds one committed batch: `statements` from its transaction's start to its commit,
    /// `flush` the commit itself. Each average moves an eighth of the way to the new figure.
    pub(crate) fn record(&self, statements: Duration, flush: Duration) {
        fn blend(avg: &AtomicU64, new: Duration) {
            let new = u64::try_from(new.as_micros()).unwrap_or(u64::MAX);
            let old = avg.load(Ordering::Relaxed);
            let next = if old == 0 {
                new
            } else {
                old - old / 8 + new / 8
            };
            avg.store(next, Ordering::Relaxed);
        }
        blend(&self.statements_us, statements);
        blend(&self.flush_us, flush);
    }

    /// Whether a batch should start beside one in flight: while nothing is known yet, and
    /// while the flush takes at least half as long as the statements (the other batch's
    /// statements then fit in its wait; a flush of 5 ms beside statements of 2 ms, say, where
    /// a fast disk flushes in a fraction of a millisecond).
    pub(crate) fn overlap_pays(&self) -> bool {
        let statements = self.statements_us.load(Ordering::Relaxed);
        let flush = self.flush_us.load(Ordering::Relaxed);
        statements == 0 || flush.saturating_mul(2) >= statements
    }

    /// How long a batch waits for the ones in flight before it starts beside them anyway:
    /// twice an average batch's time, at least a millisecond. A batch that stalls (waiting for
    /// a lock a port-in holds, say) must not hold back the deposits of every other inbox.
    pub(crate) fn patience(&self) -> Duration {
        let batch = self
            .statements_us
            .load(Ordering::Relaxed)
            .saturating_add(self.flush_us.load(Ordering::Relaxed));
        Duration::from_micros(batch.saturating_mul(2).max(1_000))
    }
}

/// Tuning of a [`DepositBatcher`] (and, but for the quota, of an [`OutboxBatcher`]).
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most items in one transaction.
    pub max_batch: usize,
    /// Most transactions committing at once (each holds one pooled connection). With 1 (this
    /// struct's default) items are stored in the order they reached the batcher; with more,
    /// items pending at the same time may land in either order (a connection answers a
    /// DEPOSIT before it reads the next, so one sender's deposits keep theirs). On Postgres
    /// the broker keeps two deposit batches in flight (`database.deposit_batches_in_flight`):
    /// one batch's statements run while the other waits for its WAL flush. SQLite has one
    /// writer at a time; the broker keeps 1 there.
    pub max_in_flight: usize,
    /// Deposits waiting beyond this make [`DepositBatcher::deposit`] wait (back-pressure).
    pub queue: usize,
    /// Inbox quota per recipient device (see [`Store::deposit_batch`]).
    pub quota_per_device: u32,
    /// Retries of a whole batch that failed with a retryable error (deadlock, busy).
    pub retries: u32,
    /// How long one batch's transaction may take before its items fail with
    /// [`StoreError::TimedOut`] (the database is down or stuck); see
    /// [`crate::DEFAULT_STORE_TIMEOUT`]. An item that timed out may have been stored: its
    /// retry with the same id is idempotent.
    pub timeout: Duration,
    /// The longest a batch waits, after the last batch was answered, for the writers it
    /// answered to write again (and never longer than half that batch's commit took). Writers
    /// that each wait for their answer before writing again otherwise split into groups that
    /// take turns, each waiting for the other's commit as well as its own: on a disk whose
    /// flushes take milliseconds that doubles their wait. Writers count by call (a
    /// [`GroupCommit::submit_all`] is one), and those who submitted again since their answer
    /// are back already: the wait ends once the rest are; zero never waits. (tokio's timers
    /// step in milliseconds, so a shorter wait may last up to one.)
    pub gather: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch: 512,
            max_in_flight: 1,
            queue: 8192,
            quota_per_device: 10_000,
            retries: 3,
            timeout: crate::DEFAULT_STORE_TIMEOUT,
            gather: Duration::ZERO,
        }
    }
}

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;

/// An item, where its outcome goes, and whether it is the first of its writer's call (a
/// [`GroupCommit::submit_all`] is one writer however many items it has).
type Job<T, O> = (T, Reply<O>, bool);

/// A handle to a group-commit task for items `T` with per-item outcomes `O`. Cheap to clone;
/// the task ends when every handle is dropped (after finishing what it has).
#[derive(Debug)]
pub struct GroupCommit<T, O> {
    tx: mpsc::Sender<Job<T, O>>,
    /// Calls to submit so far (for [`BatcherConfig::gather`]: which writers came after an
    /// answer).
    submitted: Arc<AtomicUsize>,
}

impl<T, O> Clone for GroupCommit<T, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            submitted: Arc::clone(&self.submitted),
        }
    }
}

impl<T: Send + Sync + 'static, O: Send + 'static> GroupCommit<T, O> {
    /// Starts the batching task on the current tokio runtime. `commit` stores one batch in one
    /// transaction and returns one outcome per item, in order; it is also given the batch's
    /// slot, `0..max_in_flight`, which no other batch in flight has. A whole-batch error that
    /// is retryable is retried `config.retries` times.
    pub fn spawn<F, Fut>(config: BatcherConfig, commit: F) -> Self
    where
        F: Fn(Arc<Vec<T>>, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
    {
        Self::spawn_clocked(config, commit, None)
    }

    /// [`Self::spawn`], where `clock` (which `commit` feeds) decides whether a batch starts
    /// beside one in flight ([`CommitClock::overlap_pays`]); while it does not, the next batch
    /// waits for the batches in flight to end, and grows meanwhile (for at most
    /// [`CommitClock::patience`]).
    pub(crate) fn spawn_clocked<F, Fut>(
        config: BatcherConfig,
        commit: F,
        clock: Option<Arc<CommitClock>>,
    ) -> Self
    where
        F: Fn(Arc<Vec<T>>, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let submitted = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(
            config,
            Arc::new(commit),
            rx,
            Arc::clone(&submitted),
            clock,
        ));
        Self { tx, submitted }
    }

    /// Submits one item; resolves once its batch has committed (or failed).
    pub async fn submit(&self, item: T) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submitted.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send((item, reply, true))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Submits several items, all before waiting for any, so they can share a batch; resolves
    /// once each has its outcome, in order.
    pub async fn submit_all(&self, items: Vec<T>) -> Vec<Result<O, StoreError>> {
        let mut answers = Vec::with_capacity(items.len());
        if !items.is_empty() {
            self.submitted.fetch_add(1, Ordering::Relaxed);
        }
        for (n, item) in items.into_iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            answers.push(match self.tx.send((item, reply, n == 0)).await {
                Ok(()) => Some(answer),
                Err(_) => None,
            });
        }
        let mut outcomes = Vec::with_capacity(answers.len());
        for answer in answers {
            outcomes.push(match answer {
                Some(answer) => answer.await.unwrap_or(Err(StoreError::Closed)),
                None => Err(StoreError::Closed),
            });
        }
        outcomes
    }
}

async fn run<T, O, F, Fut>(
    config: BatcherConfig,
    commit: Arc<F>,
    mut rx: mpsc::Receiver<Job<T, O>>,
    submitted: Arc<AtomicUsize>,
    clock: Option<Arc<CommitClock>>,
) where
    T: Send + Sync + 'static,
    O: Send + 'static,
    F: Fn(Arc<Vec<T>>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
{
    let max_batch = config.max_batch.max(1);
    // The free slots: a batch takes one to commit and gives it back when done.
    let slots = config.max_in_flight.max(1);
    let (free_tx, mut free_rx) = mpsc::channel::<usize>(slots);
    for slot in 0..slots {
        let _ = free_tx.try_send(slot);
    }
    let answered = Arc::new(std::sync::Mutex::new(Answered::default()));
    // Batches committing now, and a wake-up when one ends.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(Notify::new());
    while let Some(first) = rx.recv().await {
        // Beside a batch in flight only where that pays (see `CommitClock`); otherwise after
        // it, like a batch that waits for a slot. Items arriving meanwhile join this batch.
        if let Some(clock) = &clock {
            let enough = Instant::now() + clock.patience();
            while in_flight.load(Ordering::Acquire) > 0 && !clock.overlap_pays() {
                if tokio::time::timeout_at(enough, ended.notified())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        // Wait for a commit slot first: items arriving meanwhile join this batch.
        let Some(slot) = free_rx.recv().await else {
            return;
        };
        in_flight.fetch_add(1, Ordering::AcqRel);
        let mut batch = Vec::with_capacity(max_batch.min(64));
        batch.push(first);
        take_waiting(&mut rx, &mut batch, max_batch);
        if !config.gather.is_zero() {
            let returning = answered
                .lock()
                .map(|mut a| std::mem::take(&mut *a))
                .unwrap_or_default();
            let now_submitted = submitted.load(Ordering::Relaxed);
            if let Some((count, deadline)) = returning.deadline(config.gather, now_submitted) {
                let expected = batch.len().saturating_add(count).min(max_batch);
                while batch.len() < expected {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(job)) => batch.push(job),
                        _ => break,
                    }
                }
                // And whatever else is waiting by now.
                take_waiting(&mut rx, &mut batch, max_batch);
            }
        }
        let commit = Arc::clone(&commit);
        let retries = config.retries;
        let timeout = config.timeout;
        let slot = FreedOnDrop {
            slot,
            free: free_tx.clone(),
            in_flight: Arc::clone(&in_flight),
            ended: Arc::clone(&ended),
        };
        let answered = Arc::clone(&answered);
        let submitted = Arc::clone(&submitted);
        let gather = !config.gather.is_zero();
        tokio::spawn(async move {
            let writers = batch.iter().filter(|(_, _, first)| *first).count();
            let (items, replies): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|(item, reply, _)| (item, reply))
                .unzip();
            let started = Instant::now();
            let items = Arc::new(items);
            let mut attempt = 0;
            let result = loop {
                let attempt_result =
                    tokio::time::timeout(timeout, commit(Arc::clone(&items), slot.slot))
                        .await
                        .unwrap_or(Err(StoreError::TimedOut));
                match attempt_result {
                    Err(e) if e.is_retryable() && attempt < retries => attempt += 1,
                    other => break other,
                }
            };
            match result {
                Ok(outcomes) => {
                    if gather {
                        // Before the answers: a writer answered may submit again at once, and
                        // must then count as back.
                        let before = submitted.load(Ordering::Relaxed);
                        if let Ok(mut a) = answered.lock() {
                            a.add(writers, before, started, Instant::now());
                        }
                    }
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(outcome);
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::BatchFailed(e.clone())));
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Moves into `batch` what is already queued, up to `max_batch` items.
fn take_waiting<J>(rx: &mut mpsc::Receiver<J>, batch: &mut Vec<J>, max_batch: usize) {
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// The writers answered since the last batch started, who may be about to write again (a
/// failed batch's are not: they were told to retry later).
#[derive(Debug, Default)]
struct Answered {
    count: usize,
    /// Calls to submit before the first of them was answered: any since may be theirs.
    submitted_before: usize,
    /// When the latest of them was answered, and how long its batch's commit took.
    latest: Option<(Instant, Duration)>,
}

impl Answered {
    fn add(&mut self, count: usize, submitted: usize, started: Instant, answered: Instant) {
        if self.count == 0 {
            self.submitted_before = submitted;
        }
        self.count += count;
        self.latest = Some((answered, answered.saturating_duration_since(started)));
    }

    /// How many more writers to wait for (those answered, less the calls to submit since),
    /// and until when: `gather` after the latest answer, or half its commit's time if shorter
    /// (a wait must not cost more than it can save).
    fn deadline(&self, gather: Duration, submitted: usize) -> Option<(usize, Instant)> {
        let (at, took) = self.latest?;
        let back = submitted.wrapping_sub(self.submitted_before);
        let missing = self.count.saturating_sub(back);
        (missing > 0).then(|| (missing, at + gather.min(took / 2)))
    }
}

/// A batch's commit slot, given back when the batch is done (or its task unwinds).
struct FreedOnDrop {
    slot: usize,
    free: mpsc::Sender<usize>,
    in_flight: Arc<AtomicUsize>,
    ended: Arc<Notify>,
}

impl Drop for FreedOnDrop {
    fn drop(&mut self) {
        // Never full: the channel has a place for every slot.
        let _ = self.free.try_send(self.slot);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        // A permit is kept if the batching loop is not waiting yet: it cannot miss this.
        self.ended.notify_one();
    }
}

/// The quota counter lane of each deposit batch slot. One batch in flight runs alone, as every
/// batch did before slots; with more, each runs beside the others in a counter slot of its own
/// (1 and up), allowing for what the others may add unseen: a whole batch each.
fn lanes(config: &BatcherConfig) -> Vec<Lane> {
    let slots = config.max_in_flight.max(1);
    if slots == 1 {
        return vec![Lane::Alone];
    }
    let others = i64::try_from(slots - 1).unwrap_or(i64::MAX);
    let slack = others.saturating_mul(i64::try_from(config.max_batch).unwrap_or(i64::MAX));
    (1..=slots)
        .map(|slot| Lane::Beside {
            slot: i16::try_from(slot).unwrap_or(i16::MAX),
            slack,
        })
        .collect()
}

/// Group commit of offline deposits into the inbox.
#[derive(Debug, Clone)]
pub struct DepositBatcher(GroupCommit<DepositJob, RoutedOutcome>);

impl DepositBatcher {
    /// Starts the batching task on the current tokio runtime.
    pub fn spawn(store: Store, config: BatcherConfig) -> Self {
        let quota = config.quota_per_device;
        let lanes = lanes(&config);
        let clock = Arc::new(CommitClock::default());
        let timed = Arc::clone(&clock);
        Self(GroupCommit::spawn_clocked(
            config,
            move |jobs: Arc<Vec<DepositJob>>, slot: usize| {
                let store = store.clone();
                let lane = lanes.get(slot).copied().unwrap_or(Lane::Alone);
                let clock = Arc::clone(&timed);
                async move {
                    Ok(store
                        .deposit_jobs(&jobs, quota, lane, Some(&clock))
                        .await?
                        .into_iter()
                        .map(Ok)
                        .collect())
                }
            },
            Some(clock),
        ))
    }

    /// Stores a DEPOSIT whose route (contact pair, block, the target's devices) is read in
    /// its batch's transaction ([`Store::deposit_routed_batch`]); resolves once the batch has
    /// committed (or failed).
    pub async fn deposit_routed(
        &self,
        deposit: RoutedDeposit,
    ) -> Result<RoutedOutcome, StoreError> {
        self.0.submit(DepositJob::Routed(deposit)).await
    }

    /// Stores deliveries received from a peer broker, exactly once each by its key, in the
    /// batches of this broker's own deposits (as [`Store::receive_deliveries`] does, but beside
    /// other batches in flight, where one `Deliver` call no longer waits for another's commit
    /// in the same inboxes). All are submitted before any is waited for; one answer per
    /// delivery, in order: its copies' outcomes, or the error of the batch that held it
    /// (nothing of it was stored).
    pub async fn receive(
        &self,
        deliveries: Vec<ReceivedDelivery>,
    ) -> Vec<Result<Vec<Result<DepositOutcome, StoreError>>, StoreError>> {
        let jobs = deliveries.into_iter().map(DepositJob::Received).collect();
        self.0
            .submit_all(jobs)
            .await
            .into_iter()
            .map(|outcome| match outcome? {
                RoutedOutcome::Kept(copies) => Ok(copies),
                _ => Err(StoreError::Invariant(
                    "a received delivery is kept or a repeat",
                )),
            })
            .collect()
    }

    /// One copy's outcome from the batch's answer to a [`DepositJob::Copy`].
    fn copy_outcome(outcome: RoutedOutcome) -> Result<DepositOutcome, StoreError> {
        match outcome {
            RoutedOutcome::Discarded => Ok(DepositOutcome::Discarded),
            RoutedOutcome::Kept(mut one) if one.len() == 1 => one.remove(0),
            _ => Err(StoreError::Invariant("one outcome per deposited copy")),
        }
    }

    /// Deposits one item; resolves once its batch has committed (or failed).
    pub async fn deposit(&self, item: NewInboxItem) -> Result<DepositOutcome, StoreError> {
        self.copy(item, false).await
    }

    /// Deposits several items (a message's copies for several devices), all submitted before
    /// any is waited for, so they can share a batch; one outcome per item, in order.
    pub async fn deposit_all(
        &self,
        items: Vec<NewInboxItem>,
    ) -> Vec<Result<DepositOutcome, StoreError>> {
        let jobs = items
            .into_iter()
            .map(|item| DepositJob::Copy {
                item,
                discard: false,
            })
            .collect();
        self.0
            .submit_all(jobs)
            .await
            .into_iter()
            .map(|outcome| outcome.and_then(Self::copy_outcome))
            .collect()
    }

    /// Takes one item that is not to be kept (its sender is blocked by the recipient) the way
    /// [`Self::deposit`] takes one that is: it waits for a batch and its durable commit, in
    /// which it does the writes a kept deposit does and undoes them, storing nothing
    /// ([`Store::deposit_batch_discarding`]). So the answer costs what a stored deposit's
    /// costs, and its timing does not tell the sender it is blocked.
    pub async fn discard(&self, item: NewInboxItem) -> Result<DepositOutcome, StoreError> {
        self.copy(item, true).await
    }

    /// One copy through the next batch, kept or (`discard`) written and undone.
    async fn copy(&self, item: NewInboxItem, discard: bool) -> Result<DepositOutcome, StoreError> {
        Self::copy_outcome(self.0.submit(DepositJob::Copy { item, discard }).await?)
    }
}

/// One delivery entering the federation outbox (see [`Store::enqueue_outbox_batch`]).
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// The delivery's idempotency key.
    pub idempotency_key: [u8; 16],
    /// The peer broker it goes to.
    pub peer_broker: String,
    /// The encoded delivery.
    pub payload: Vec<u8>,
    /// When it was queued (Unix seconds); it is due at once.
    pub now: i64,
    /// `(sender, target)`: queue the entry only if they are a contact pair, read in the
    /// transaction that inserts it (a DEPOSIT to a peer broker's client); `None` for a delivery
    /// passed on as it is (a ported number's).
    pub contact: Option<(Number, Number)>,
}

/// Group commit of cross-broker deposits into the outbox. The outbox has no order to keep
/// (deliveries are not ordered across brokers), so several batches may commit at once.
#[derive(Debug, Clone)]
pub struct OutboxBatcher(GroupCommit<OutboxEntry, bool>);

impl OutboxBatcher {
    /// Starts the batching task on the current tokio runtime.
    pub fn spawn(store: Store, config: BatcherConfig) -> Self {
        let clock = Arc::new(CommitClock::default());
        let timed = Arc::clone(&clock);
        Self(GroupCommit::spawn_clocked(
            config,
            move |items: Arc<Vec<OutboxEntry>>, _slot: usize| {
                let store = store.clone();
                let clock = Arc::clone(&timed);
                async move { store.enqueue_outbox_clocked(&items, Some(&clock)).await }
            },
            Some(clock),
        ))
    }

    /// Queues one delivery; resolves once its batch has committed. `true` when it was new
    /// (`false`: the key was already queued).
    pub async fn enqueue(&self, entry: OutboxEntry) -> Result<bool, StoreError> {
        self.0.submit(entry).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;

    /// A group commit whose every commit takes `flush`, recording the size of each batch.
    fn recording(
        gather: Duration,
        flush: Duration,
    ) -> (GroupCommit<u32, ()>, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let commit = GroupCommit::spawn(
            BatcherConfig {
                gather,
                ..BatcherConfig::default()
            },
            move |items: Arc<Vec<u32>>, _slot| {
                seen.lock().unwrap().push(items.len());
                async move {
                    tokio::time::sleep(flush).await;
                    Ok(items.iter().map(|_| Ok(())).collect())
                }
            },
        );
        (commit, sizes)
    }

    /// Ten writers that each write again 5 ms (a round trip) after their answer, four times;
    /// the first starts alone, the other nine while its batch commits.
    async fn ten_writers(commit: &GroupCommit<u32, ()>) {
        let writers: Vec<_> = (0..10u32)
            .map(|w| {
                let commit = commit.clone();
                tokio::spawn(async move {
                    if w > 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    for _ in 0..4 {
                        commit.submit(w).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    }

    /// The most batches committing at once when 20 writers write 5 times each, without pause,
    /// through a batcher with two slots whose every commit takes 5 ms and tells its clock that
    /// `statements` and `flush` of it were statements and flush.
    async fn most_in_flight(statements: Duration, flush: Duration) -> usize {
        let clock = Arc::new(CommitClock::default());
        // Known from before: the first batches decide as the later ones do.
        clock.record(statements, flush);
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (timed, counting, seen) = (Arc::clone(&clock), Arc::clone(&now), Arc::clone(&most));
        let commit = GroupCommit::spawn_clocked(
            BatcherConfig {
                max_in_flight: 2,
                ..BatcherConfig::default()
            },
            move |items: Arc<Vec<u32>>, _slot| {
                let (clock, now, most) =
                    (Arc::clone(&timed), Arc::clone(&counting), Arc::clone(&seen));
                async move {
                    let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(at_once, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    clock.record(statements, flush);
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(items.iter().map(|_| Ok(())).collect())
                }
            },
            Some(clock),
        );
        let writers: Vec<_> = (0..20u32)
            .map(|w| {
                let commit = commit.clone();
                tokio::spawn(async move {
                    for _ in 0..5 {
                        commit.submit(w).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        most.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_batch_commits_beside_the_first_only_while_flushes_are_slow() {
        let ms = Duration::from_millis;
        // A fast disk: the flush is short beside the statements, so a second batch would only
        // split the first; it waits and grows instead. (The clock's batches are longer than
        // the 5 ms these take, so that the wait's patience, 100 ms, outlasts any scheduling
        // delay on a busy machine.)
        assert_eq!(most_in_flight(ms(40), ms(10)).await, 1);
        // A slow disk: one batch's statements fit in the other's flush.
        assert_eq!(most_in_flight(ms(2), ms(5)).await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_batch_does_not_hold_the_next_one_back() {
        // Flushes are fast (no overlap), batches take about 5 ms; the first one stalls for 2 s.
        let clock = Arc::new(CommitClock::default());
        clock.record(Duration::from_millis(4), Duration::from_millis(1));
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let commit = GroupCommit::spawn_clocked(
            BatcherConfig {
                max_in_flight: 2,
                ..BatcherConfig::default()
            },
            move |items: Arc<Vec<u32>>, _slot| {
                let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    let took = if first { 2_000 } else { 5 };
                    tokio::time::sleep(Duration::from_millis(took)).await;
                    Ok(items.iter().map(|_| Ok(())).collect())
                }
            },
            Some(clock),
        );
        let stalled = {
            let commit = commit.clone();
            tokio::spawn(async move { commit.submit(1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The next writer is answered long before the stalled batch ends: its batch waited
        // about 10 ms for the first, then started beside it.
        let started = Instant::now();
        commit.submit(2).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            started.elapsed()
        );
        assert!(!stalled.is_finished());
        stalled.await.unwrap().unwrap();
    }

    #[test]
    fn the_commit_clock_lets_batches_overlap_until_it_knows_better() {
        let clock = CommitClock::default();
        assert!(clock.overlap_pays(), "nothing known yet");
        clock.record(Duration::from_millis(4), Duration::from_millis(2));
        assert!(
            clock.overlap_pays(),
            "a flush half as long as the statements"
        );
        // Fast flushes from now on: the average moves an eighth of the way each time.
        for _ in 0..20 {
            clock.record(Duration::from_millis(4), Duration::from_micros(200));
        }
        assert!(!clock.overlap_pays());
        for _ in 0..20 {
            clock.record(Duration::from_millis(4), Duration::from_millis(6));
        }
        assert!(clock.overlap_pays(), "the disk slowed down");
    }

    #[tokio::test]
    async fn writers_that_write_again_share_one_commit_when_the_batcher_gathers() {
        let flush = Duration::from_millis(100);
        // Without gathering, the first writer's batch and the other nine's take turns.
        let (commit, sizes) = recording(Duration::ZERO, flush);
        ten_writers(&commit).await;
        assert_eq!(*sizes.lock().unwrap(), [1, 9, 1, 9, 1, 9, 1, 9]);

        // Gathering (up to half of the commit before) waits for the answered writer's next
        // write, so from the second batch on they all share one; the last batch waits in vain
        // for the first writer, who is done.
        let (commit, sizes) = recording(Duration::from_secs(1), flush);
        ten_writers(&commit).await;
        assert_eq!(*sizes.lock().unwrap(), [1, 10, 10, 10, 9]);
    }

    #[tokio::test]
    async fn a_batch_waits_for_returning_writers_at_most_half_the_last_commit() {
        // Writer 1 is answered and never writes again; writer 2's item, submitted while writer
        // 1's batch committed, waits for it: at least until half the 40 ms commit before has
        // passed after the answer, but not for the whole `gather` (10 s).
        let starts = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&starts);
        let commit = GroupCommit::spawn(
            BatcherConfig {
                gather: Duration::from_secs(10),
                ..BatcherConfig::default()
            },
            move |items: Arc<Vec<u32>>, _slot| {
                seen.lock().unwrap().push(std::time::Instant::now());
                async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    Ok(items.iter().map(|_| Ok(())).collect())
                }
            },
        );
        let first = tokio::spawn({
            let commit = commit.clone();
            async move { commit.submit(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        commit.submit(2).await.unwrap();
        first.await.unwrap().unwrap();
        let starts = starts.lock().unwrap().clone();
        assert_eq!(starts.len(), 2);
        // Without gathering the second batch starts when the first is answered (40 ms).
        let gap = starts[1] - starts[0];
        assert!(gap >= Duration::from_millis(58), "no wait: {gap:?}");
        assert!(gap < Duration::from_secs(5), "waited {gap:?}");
    }

    #[test]
    fn the_wait_counts_the_answered_writers_not_yet_back() {
        let t0 = Instant::now();
        let gather = Duration::from_millis(2);
        assert_eq!(Answered::default().deadline(gather, 5), None);

        // Ten answered at t0 + 10 ms by a commit of 10 ms, with 100 items submitted before.
        let mut answered = Answered::default();
        answered.add(10, 100, t0, t0 + Duration::from_millis(10));
        let at = t0 + Duration::from_millis(10);
        assert_eq!(answered.deadline(gather, 100), Some((10, at + gather)));
        // Four submitted since: six to wait for; all ten back: none.
        assert_eq!(answered.deadline(gather, 104), Some((6, at + gather)));
        assert_eq!(answered.deadline(gather, 110), None);
        // A later answer adds its writers and moves the deadline; a short commit shortens it.
        answered.add(5, 104, at, at + Duration::from_millis(1));
        let later = at + Duration::from_millis(1);
        assert_eq!(
            answered.deadline(gather, 104),
            Some((11, later + Duration::from_micros(500)))
        );
        assert_eq!(std::mem::take(&mut answered).count, 15);
        assert_eq!(answered.deadline(gather, 104), None);
    }
}
