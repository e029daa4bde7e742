//! Committed outbox rows handed to the outbox worker in memory.
//!
//! A cross-broker DEPOSIT is acknowledged once its outbox row committed. The same row then goes
//! to the outbox worker through a bounded channel ([`Handoff`]), so the worker does not read
//! back from the table what it was just given. The table stays the truth: the worker reads it
//! at start-up, when a handoff did not happen (the channel was full, a commit's outcome is
//! unknown, a row came from elsewhere: a forward for a ported number), when a retry is due,
//! and every `outbox_poll_ms` as a safety net. A row handed over twice (in memory and by a
//! read) is sent once while it is queued or in flight ([`Queue`]'s known keys); at worst it
//! is sent again later, which the peer's idempotency keys absorb.
//!
//! [`Queue`] is the worker's bookkeeping, without I/O: rows waiting per peer (bounded), the
//! keys it holds (waiting or in flight), and the batches it may start.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use micromsg_store::OutboxItem;
use tokio::sync::{Notify, mpsc};

/// The sending half, held by the broker: [`Handoff::give`] never waits.
#[derive(Debug)]
pub struct Handoff {
    tx: mpsc::Sender<OutboxItem>,
    /// The receiving half until the worker takes it.
    rx: Mutex<Option<mpsc::Receiver<OutboxItem>>>,
}

impl Handoff {
    /// A channel of `capacity` rows (at least 1).
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Hands a committed row to the worker; when the channel is full (or the worker is gone)
    /// the row stays in the table only, and `wake` tells the worker to read the table.
    pub fn give(&self, item: OutboxItem, wake: &Notify) {
        if self.tx.try_send(item).is_err() {
            wake.notify_one();
        }
    }

    /// The receiving half, once (the outbox worker's).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<OutboxItem>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Batch limits of [`Queue::next_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items per batch.
    pub batch: usize,
    /// Most payload bytes per batch (one larger item still goes alone).
    pub batch_bytes: usize,
    /// Most batches in flight per peer.
    pub in_flight: usize,
    /// Most rows waiting per peer (beyond them rows stay in the table until there is room).
    pub waiting: usize,
}

/// Rough protobuf overhead of one item besides its body, for batch sizing.
pub const ITEM_OVERHEAD: usize = 128;

/// What [`Queue::offer`] did with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Queued for its peer.
    Queued,
    /// Already waiting or in flight: ignored.
    Known,
    /// Its peer's queue is full: it stays in the table for a later read.
    Full,
}

/// The outbox worker's rows: waiting per peer, and every key waiting or in flight.
#[derive(Debug)]
pub struct Queue {
    limits: Limits,
    waiting: HashMap<String, VecDeque<OutboxItem>>,
    known: HashSet<[u8; 16]>,
    busy: HashMap<String, usize>,
}

impl Queue {
    /// An empty queue.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Limits {
                batch: limits.batch.max(1),
                in_flight: limits.in_flight.max(1),
                waiting: limits.waiting.max(1),
                ..limits
            },
            waiting: HashMap::new(),
            known: HashSet::new(),
            busy: HashMap::new(),
        }
    }

    /// Takes a row (handed over or read from the table).
    pub fn offer(&mut self, item: OutboxItem) -> Offered {
        if self.known.contains(&item.idempotency_key) {
            return Offered::Known;
        }
        let queue = self.waiting.entry(item.peer_broker.clone()).or_default();
        if queue.len() >= self.limits.waiting {
            return Offered::Full;
        }
        self.known.insert(item.idempotency_key);
        queue.push_back(item);
        Offered::Queued
    }

    /// Keys waiting or in flight (a table read must look past them).
    pub fn known(&self) -> usize {
        self.known.len()
    }

    /// Rows waiting, over all peers.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    /// The next batch some peer can take (it then counts as in flight until [`Queue::settle`]).
    pub fn next_batch(&mut self) -> Option<(String, Vec<OutboxItem>)> {
        let limits = self.limits;
        let busy = &mut self.busy;
        let (peer, queue) = self.waiting.iter_mut().find(|(peer, queue)| {
            !queue.is_empty() && busy.get(peer.as_str()).copied().unwrap_or(0) < limits.in_flight
        })?;
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(item) = queue.front() {
            let size = item.payload.len() + ITEM_OVERHEAD;
            if !batch.is_empty()
                && (batch.len() >= limits.batch || bytes + size > limits.batch_bytes)
            {
                break;
            }
            bytes += size;
            batch.extend(queue.pop_front());
        }
        *busy.entry(peer.clone()).or_insert(0) += 1;
        Some((peer.clone(), batch))
    }

    /// A batch of `peer` finished (its rows removed or rescheduled in the table).
    pub fn settle(&mut self, peer: &str, keys: &[[u8; 16]]) {
        for key in keys {
            self.known.remove(key);
        }
        if let Some(n) = self.busy.get_mut(peer) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn item(peer: &str, n: u8) -> OutboxItem {
        OutboxItem {
            idempotency_key: [n; 16],
            peer_broker: peer.to_owned(),
            payload: vec![n; 10],
            attempts: 0,
            next_attempt_at: 0,
            created_at: 0,
        }
    }

    fn limits() -> Limits {
        Limits {
            batch: 2,
            batch_bytes: 1 << 20,
            in_flight: 1,
            waiting: 3,
        }
    }

    #[test]
    fn a_row_waiting_or_in_flight_is_not_queued_twice() {
        let mut q = Queue::new(limits());
        assert_eq!(q.offer(item("y", 1)), Offered::Queued);
        assert_eq!(q.offer(item("y", 1)), Offered::Known);
        let (peer, batch) = q.next_batch().unwrap();
        assert_eq!((peer.as_str(), batch.len()), ("y", 1));
        // In flight: a table read that sees it again does not queue it.
        assert_eq!(q.offer(item("y", 1)), Offered::Known);
        q.settle("y", &[[1; 16]]);
        // Settled: if it is still in the table (rescheduled), a later read takes it again.
        assert_eq!(q.offer(item("y", 1)), Offered::Queued);
    }

    #[test]
    fn a_full_peer_queue_leaves_rows_to_the_table() {
        let mut q = Queue::new(limits());
        for n in 1..=3 {
            assert_eq!(q.offer(item("y", n)), Offered::Queued);
        }
        assert_eq!(q.offer(item("y", 4)), Offered::Full);
        // Another peer is not held up by y's backlog.
        assert_eq!(q.offer(item("z", 5)), Offered::Queued);
        assert_eq!(q.waiting(), 4);
        assert_eq!(q.known(), 4);
    }

    #[test]
    fn batches_respect_count_bytes_and_calls_in_flight() {
        let mut q = Queue::new(Limits {
            batch_bytes: 2 * (10 + ITEM_OVERHEAD) + 1,
            waiting: 10,
            ..limits()
        });
        for n in 1..=5 {
            q.offer(item("y", n));
        }
        let (_, first) = q.next_batch().unwrap();
        assert_eq!(first.len(), 2);
        // One call in flight per peer: nothing more for y until it settles.
        assert!(q.next_batch().is_none());
        q.settle("y", &[[1; 16], [2; 16]]);
        let (_, second) = q.next_batch().unwrap();
        assert_eq!(
            second
                .iter()
                .map(|i| i.idempotency_key[0])
                .collect::<Vec<_>>(),
            [3, 4],
            "in the order they came"
        );
        // A batch never exceeds the byte bound, but one item always goes.
        let mut q = Queue::new(Limits {
            batch_bytes: 1,
            ..limits()
        });
        q.offer(item("y", 1));
        q.offer(item("y", 2));
        assert_eq!(q.next_batch().unwrap().1.len(), 1);
    }

    #[tokio::test]
    async fn a_full_channel_wakes_the_worker_for_the_table() {
        let handoff = Handoff::new(1);
        let wake = Notify::new();
        let mut rx = handoff.take_receiver().unwrap();
        assert!(handoff.take_receiver().is_none(), "one receiver");
        handoff.give(item("y", 1), &wake);
        // No wake-up yet: the row went through the channel.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), wake.notified())
                .await
                .is_err()
        );
        handoff.give(item("y", 2), &wake);
        // The second did not fit: the worker is told to read the table.
        wake.notified().await;
        assert_eq!(rx.recv().await.unwrap().idempotency_key, [1; 16]);
        assert!(rx.try_recv().is_err());
    }
}
