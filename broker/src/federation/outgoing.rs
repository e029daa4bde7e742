//! Networked contact requests this broker's clients made, waiting for the target broker's
//! `Accepted` call (step 1 of [`super::contact`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use micromsg_wire::Number;

/// Requests kept at most in [`Outgoing`] before expired ones are pruned.
const OUTGOING_PRUNE_AT: usize = 10_000;

/// A networked contact request a client of this broker made.
#[derive(Debug, Clone)]
pub struct OutgoingRequest {
    /// The caller's number.
    pub caller: Number,
    /// The caller's connection (CONTACT-ACCEPTED goes there).
    pub caller_conn: u64,
    /// The target's number.
    pub target: Number,
    /// The peer broker the request went to.
    pub peer: String,
    /// When it lapses.
    pub expires: Instant,
}

/// Networked requests waiting for `Accepted`, by request id.
#[derive(Debug, Default)]
pub struct Outgoing {
    table: Mutex<HashMap<[u8; 16], OutgoingRequest>>,
}

impl Outgoing {
    pub(crate) fn insert(&self, id: [u8; 16], request: OutgoingRequest, now: Instant) {
        let mut table = self.lock();
        if table.len() >= OUTGOING_PRUNE_AT {
            table.retain(|_, r| r.expires > now);
        }
        table.insert(id, request);
    }

    /// Takes request `id` if `peer` is where it went and it names `caller` and `target`.
    pub(crate) fn take_matching(
        &self,
        id: &[u8; 16],
        peer: &str,
        caller: &Number,
        target: &Number,
        now: Instant,
    ) -> Option<OutgoingRequest> {
        let mut table = self.lock();
        let r = table.get(id)?;
        if r.expires <= now {
            table.remove(id);
            return None;
        }
        if r.peer != peer || &r.caller != caller || &r.target != target {
            return None;
        }
        table.remove(id)
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], OutgoingRequest>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}
