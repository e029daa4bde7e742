//! Contact requests waiting for the target's answer, and the values that describe a request
//! (who asked whom, from where). State only: routing a request is [`super::routing`].

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use micromsg_wire::{Address, Number};
use rand_core::{OsRng, RngCore};

use crate::limits::Pruned;

/// A contact request waiting for the target's answer.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The caller's number.
    pub caller: Number,
    /// Where the caller is: a connection of this broker, or a peer broker.
    pub origin: Origin,
    /// The target's number.
    pub target: Number,
    /// When the request lapses.
    pub expires: Instant,
}

/// Where a contact request came from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A client of this broker.
    Local {
        /// The caller's connection (the accepted event goes there).
        caller_conn: u64,
    },
    /// A client of a peer broker (INITIATE-*-NETWORKED, forwarded over federation).
    Networked(NetworkOrigin),
}

/// The caller's side of a networked contact request.
#[derive(Debug, Clone)]
pub struct NetworkOrigin {
    /// The caller's home broker (from its certificate).
    pub broker: String,
    /// The caller broker's request id, quoted back in `Accepted`.
    pub request: [u8; 16],
    /// The caller's broker-keypair public key.
    pub caller_pubkey: [u8; 32],
    /// The span of the incoming call, so the answer continues the same trace.
    pub span: tracing::Span,
}

/// Contact requests waiting for an answer, by request id.
#[derive(Debug, Default)]
pub struct PendingRequests {
    table: Mutex<Pruned<[u8; 16], Pending>>,
}

/// How often expired contact requests are pruned from [`PendingRequests`].
const PENDING_PRUNE_EVERY: Duration = Duration::from_secs(10);

impl PendingRequests {
    /// Holds a request until it is answered or `pending.expires`; prunes expired ones every
    /// few seconds (and when the table is large).
    pub fn insert(&self, id: [u8; 16], pending: Pending, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.prune(now, PENDING_PRUNE_EVERY, 10_000, |_, p| p.expires > now);
        table.map.insert(id, pending);
    }

    /// A copy of the request `id` if it is addressed to `target` and still live (to check an
    /// answer before [`PendingRequests::take`] consumes it).
    pub fn peek(&self, id: &[u8; 16], target: &Number, now: Instant) -> Option<Pending> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .map
            .get(id)
            .filter(|p| &p.target == target && p.expires > now)
            .cloned()
    }

    /// Takes the request `id` if it is addressed to `target` and still live.
    pub fn take(&self, id: &[u8; 16], target: &Number, now: Instant) -> Option<Pending> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.map.get(id) {
            Some(p) if &p.target == target && p.expires > now => table.map.remove(id),
            Some(p) if p.expires <= now => {
                table.map.remove(id);
                None
            }
            _ => None,
        }
    }
}

/// A fresh random request id.
pub fn new_request_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    id
}

/// Resolves an announced address: an unspecified host (`0.0.0.0`, `[::]`) becomes the IP the
/// broker sees for the connection (protocol.md 10.7).
pub fn resolve_address(address: &Address, observed: IpAddr) -> String {
    let host = address.host();
    if host == "0.0.0.0" || host == "::" {
        match observed {
            IpAddr::V4(ip) => format!("{ip}:{}", address.port()),
            IpAddr::V6(ip) => format!("[{ip}]:{}", address.port()),
        }
    } else {
        address.as_str().to_owned()
    }
}

/// Whether the caller asked as a new or an existing contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitiateKind {
    /// INITIATE-NEW.
    New,
    /// INITIATE-EXISTING.
    Existing,
}

/// Everything [`super::routing::route_initiate`] needs, captured when the ack was produced.
#[derive(Debug, Clone)]
pub struct Initiate {
    /// The request id already acknowledged to the caller.
    pub request: [u8; 16],
    /// The caller's number.
    pub caller: Number,
    /// Where the caller is.
    pub origin: Origin,
    /// The target number.
    pub target: Number,
    /// New or existing.
    pub kind: InitiateKind,
}
