//! A bounded single-consumer queue that costs almost nothing while empty: one connection's
//! events.
//!
//! Every logged-in connection holds one, and most connections are idle, so its empty size is
//! per-connection memory. tokio's `mpsc` channel allocates a 32-slot block and a
//! cache-padded channel head up front (about 1 KiB per connection, found with heaptrack;
//! docs/performance.md); this queue is one small `Arc` and allocates slots only while events
//! wait, releasing them when it drains.
//!
//! Senders never wait: [`Sender::try_send`] fails when the queue holds `capacity` items or its
//! receiver is gone, as `mpsc::Sender::try_send` did.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Slots kept after the queue drains; more are released (a burst does not pin memory).
const KEEP_SLOTS: usize = 4;

/// Why [`Sender::try_send`] did not queue the item (which it gives back).
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The receiver is gone (the connection ended).
    Closed(T),
}

#[derive(Debug)]
struct Shared<T> {
    items: Mutex<VecDeque<T>>,
    ready: Notify,
    capacity: usize,
    closed: AtomicBool,
}

/// The sending side; cheap to clone.
#[derive(Debug)]
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The receiving side; dropping it closes the queue.
#[derive(Debug)]
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `capacity` items (at least 1).
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
        capacity: capacity.max(1),
        closed: AtomicBool::new(false),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

impl<T> Shared<T> {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> Sender<T> {
    /// Queues `item` without waiting.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(item));
        }
        {
            let mut items = self.shared.items();
            if items.len() >= self.shared.capacity {
                return Err(TrySendError::Full(item));
            }
            items.push_back(item);
        }
        // `notify_one` keeps a permit when the receiver is not waiting yet, so an item queued
        // between its look at the queue and its wait is not missed.
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one. Cancel-safe: an item is taken only when it is returned.
    pub async fn recv(&mut self) -> T {
        loop {
            if let Some(item) = self.try_recv() {
                return item;
            }
            self.shared.ready.notified().await;
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut items = self.shared.items();
        let item = items.pop_front();
        if items.is_empty() && items.capacity() > KEEP_SLOTS {
            *items = VecDeque::new();
        }
        item
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // Items still queued are dropped with the last sender.
        self.shared.items().clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn items_come_out_in_order_and_a_full_queue_refuses() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, 1);
        tx.try_send(4).unwrap();
        assert_eq!(rx.recv().await, 2);
        assert_eq!(rx.recv().await, 4);
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_an_item() {
        let (tx, mut rx) = channel(4);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.try_send(7).unwrap();
        assert_eq!(waiter.await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_dropped_wait_loses_no_item() {
        let (tx, mut rx) = channel(4);
        // A wait cut short (as in a `select!`) before the item arrives...
        let cut = tokio::time::timeout(Duration::from_millis(5), rx.recv()).await;
        assert!(cut.is_err());
        tx.try_send(9).unwrap();
        // ...does not eat the item or its wake-up.
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.unwrap(), 9);
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails_closed() {
        let (tx, rx) = channel(4);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(TrySendError::Closed(1)));
    }

    #[test]
    fn a_drained_queue_gives_its_slots_back() {
        let (tx, mut rx) = channel(100);
        for i in 0..50 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.shared.items().capacity(), 0);
    }
}
