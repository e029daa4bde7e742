//! Contact setup: [`pending`] requests waiting for an answer (state) and their [`routing`]
//! (the silent-drop rules, asking the target, handing out the connect token).

pub mod pending;
pub mod probes;
pub mod routing;

use std::sync::Arc;
use std::time::Duration;

use micromsg_store::Store;

use crate::numbers::NumberAllocator;
use crate::online::Online;
use pending::PendingRequests;

/// What routing a contact request uses: owned handles, because the routing runs as its own
/// task after the acknowledgement.
#[derive(Debug, Clone)]
pub struct Router {
    /// Entities, contact pairs, block lists.
    pub store: Store,
    /// Where the target's devices are.
    pub online: Arc<Online>,
    /// Requests waiting for the target's answer.
    pub pending: Arc<PendingRequests>,
    /// This broker's share of the number space (`remember_unknown_targets` applies to it).
    pub numbers: Arc<NumberAllocator>,
    /// `contacts.remember_unknown_targets`.
    pub remember_unknown_targets: bool,
    /// Probes of unallocated numbers, noted until they are written.
    pub probes: Arc<probes::ProbeLog>,
    /// `contacts.request_ttl_secs`: how long a request waits for its answer.
    pub request_ttl: Duration,
    /// `federation.pubkey_ttl_secs`: how long a networked caller's pubkey is kept (0 when the
    /// broker is in no network).
    pub pubkey_ttl_secs: u64,
    /// Relays offered with accepted requests.
    pub relays: Arc<crate::relay::Relays>,
}
