//! The registry of logged-in devices: number → devices, each with its bounded event queue.
//!
//! Critical sections are a few map operations under a `std::sync::Mutex` and never span an
//! `.await`. Events are pushed with `try_send`: a connection whose queue is full is too slow to
//! keep up, and is told to close rather than letting the broker buffer without bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use micromsg_wire::Event;

use crate::event_queue::{self, TrySendError};

/// What a connection task receives besides frames.
///
/// Events are boxed: every connection's queue allocates its first block of slots when it is
/// made, so a small slot keeps an idle connection small (docs/performance.md).
#[derive(Debug)]
pub enum Push {
    /// Send this event to the client.
    Event(Box<Event>),
    /// Close the connection after sending this event (e.g. the device was revoked).
    Close(Box<Event>),
}

impl Push {
    /// Send `event`.
    pub fn event(event: Event) -> Self {
        Self::Event(Box::new(event))
    }

    /// Send `event`, then close the connection.
    pub fn close(event: Event) -> Self {
        Self::Close(Box::new(event))
    }
}

/// One logged-in connection.
#[derive(Debug, Clone)]
struct Entry {
    conn: u64,
    device: u32,
    queue: event_queue::Sender<Push>,
    last_active: Instant,
    /// Where this device listens for peers, if it announced it on this connection.
    address: Option<String>,
}

/// Logged-in devices by number.
#[derive(Debug, Default)]
pub struct Online {
    table: Mutex<HashMap<String, Vec<Entry>>>,
    next_conn: AtomicU64,
}

/// Result of pushing to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued.
    Queued,
    /// No such device online.
    Offline,
    /// The device's queue is full; it will be disconnected.
    Overflow,
}

impl Online {
    /// A fresh connection id (also used before login, for logs).
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a logged-in connection.
    pub fn insert(
        &self,
        number: &str,
        device: u32,
        conn: u64,
        queue: event_queue::Sender<Push>,
        now: Instant,
    ) {
        let mut table = self.lock();
        table.entry(number.to_owned()).or_default().push(Entry {
            conn,
            device,
            queue,
            last_active: now,
            address: None,
        });
    }

    /// Removes a connection (on close).
    pub fn remove(&self, number: &str, conn: u64) {
        let mut table = self.lock();
        if let Some(list) = table.get_mut(number) {
            list.retain(|e| e.conn != conn);
            if list.is_empty() {
                table.remove(number);
            }
        }
    }

    /// Marks a connection active (it made a request), for choosing the top device.
    pub fn touch(&self, number: &str, conn: u64, now: Instant) {
        let mut table = self.lock();
        if let Some(e) = table
            .get_mut(number)
            .and_then(|l| l.iter_mut().find(|e| e.conn == conn))
        {
            e.last_active = now;
        }
    }

    /// Records where the device on connection `conn` listens for peers.
    pub fn set_address(&self, number: &str, conn: u64, address: String) {
        let mut table = self.lock();
        if let Some(e) = table
            .get_mut(number)
            .and_then(|l| l.iter_mut().find(|e| e.conn == conn))
        {
            e.address = Some(address);
        }
    }

    /// The most recently active device of `number` that announced a listening address:
    /// (device, connection, address).
    pub fn top_announced(&self, number: &str) -> Option<(u32, u64, String)> {
        let table = self.lock();
        table
            .get(number)?
            .iter()
            .filter(|e| e.address.is_some())
            .max_by_key(|e| (e.last_active, e.conn))
            .and_then(|e| e.address.clone().map(|a| (e.device, e.conn, a)))
    }

    /// The device logged in on connection `conn` of `number`.
    pub fn device_of(&self, number: &str, conn: u64) -> Option<u32> {
        self.lock()
            .get(number)?
            .iter()
            .find(|e| e.conn == conn)
            .map(|e| e.device)
    }

    /// True when any device of `number` is online.
    pub fn is_online(&self, number: &str) -> bool {
        self.lock().contains_key(number)
    }

    /// The most recently active device of `number`, if any is online.
    pub fn top_device(&self, number: &str) -> Option<(u32, u64)> {
        let table = self.lock();
        table
            .get(number)?
            .iter()
            .max_by_key(|e| (e.last_active, e.conn))
            .map(|e| (e.device, e.conn))
    }

    /// Pushes to one connection.
    pub fn push_conn(&self, number: &str, conn: u64, push: Push) -> Delivery {
        let queue = {
            let table = self.lock();
            table
                .get(number)
                .and_then(|l| l.iter().find(|e| e.conn == conn))
                .map(|e| e.queue.clone())
        };
        Self::send(queue, push)
    }

    /// Pushes to every connection of `number` (optionally only those of one device);
    /// returns how many were queued.
    pub fn push_all(&self, number: &str, device: Option<u32>, make: impl Fn() -> Push) -> usize {
        let queues: Vec<_> = {
            let table = self.lock();
            table
                .get(number)
                .map(|l| {
                    l.iter()
                        .filter(|e| device.is_none_or(|d| d == e.device))
                        .map(|e| e.queue.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        queues
            .into_iter()
            .filter(|q| Self::send(Some(q.clone()), make()) == Delivery::Queued)
            .count()
    }

    /// Online connections in total.
    pub fn connection_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Distinct numbers online.
    pub fn entity_count(&self) -> usize {
        self.lock().len()
    }

    fn send(queue: Option<event_queue::Sender<Push>>, push: Push) -> Delivery {
        match queue {
            None => Delivery::Offline,
            Some(q) => match q.try_send(push) {
                Ok(()) => Delivery::Queued,
                Err(TrySendError::Full(_)) => Delivery::Overflow,
                Err(TrySendError::Closed(_)) => Delivery::Offline,
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}
