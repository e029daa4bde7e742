//! Contact setup: routing INITIATE requests, pending requests, answers, tokens. A request from
//! a peer broker's client (`Origin::Networked`, see `federation::contact`) goes through the
//! same routing, so the silent-drop rules are one piece of code for both.
//!
//! The silent-drop rule: the caller's acknowledgement is produced before any lookup that
//! depends on the target (the connection writes it while [`route_initiate`] runs as its own
//! task), so unknown, offline, blocking and rejecting targets all look the same: the same
//! frame at the same time, then nothing.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use micromsg_crypto::Secret32;
use micromsg_wire::message::event::{
    ContactAccepted, ContactConnecting, ContactKind, ContactRequest,
};
use micromsg_wire::{Address, Event, Hex16, Hex32, Number};
use rand_core::{OsRng, RngCore};
use tracing::{debug, warn};

use crate::broker::{Broker, unix_now};
use crate::limits::Pruned;
use crate::online::{Delivery, Push};

/// A contact request waiting for the target's answer.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The caller's number.
    pub caller: String,
    /// Where the caller is: a connection of this broker, or a peer broker.
    pub origin: Origin,
    /// The target's number.
    pub target: String,
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
    pub fn peek(&self, id: &[u8; 16], target: &str, now: Instant) -> Option<Pending> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .map
            .get(id)
            .filter(|p| p.target == target && p.expires > now)
            .cloned()
    }

    /// Takes the request `id` if it is addressed to `target` and still live.
    pub fn take(&self, id: &[u8; 16], target: &str, now: Instant) -> Option<Pending> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.map.get(id) {
            Some(p) if p.target == target && p.expires > now => table.map.remove(id),
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

/// Everything [`route_initiate`] needs, captured when the ack was produced.
#[derive(Debug, Clone)]
pub struct Initiate {
    /// The request id already acknowledged to the caller.
    pub request: [u8; 16],
    /// The caller's number.
    pub caller: String,
    /// Where the caller is.
    pub origin: Origin,
    /// The target number.
    pub target: String,
    /// New or existing.
    pub kind: InitiateKind,
}

/// Routes an INITIATE after its ack: drops it silently, answers it (AUTO-EXISTING) or asks the
/// target's most recently active device.
///
/// A networked request (from a peer broker) follows the same rules, with two differences: an
/// INITIATE-EXISTING-NETWORKED from a number that is not a contact pair is dropped, and
/// AUTO-EXISTING does not answer for the target (only the target's client can seal its
/// address), so the target is always asked (protocol.md 11.3).
pub async fn route_initiate(broker: Arc<Broker>, req: Initiate) {
    if let Err(e) = try_route(&broker, &req).await {
        warn!(error = %e, "routing a contact request failed; dropped");
    }
}

async fn try_route(broker: &Broker, req: &Initiate) -> Result<(), micromsg_store::StoreError> {
    let store = &broker.store;
    if req.caller == req.target {
        return Ok(());
    }
    if !store.entity_exists(&req.target).await? {
        if broker.config.contacts.remember_unknown_targets && broker.numbers.owns(&req.target) {
            store
                .remember_unknown_target(&req.caller, &req.target, unix_now() as i64)
                .await?;
        }
        debug!("contact request dropped");
        return Ok(());
    }
    if store.is_poisoned(&req.caller, &req.target).await?
        || store.is_blocked(&req.target, &req.caller).await?
    {
        debug!("contact request dropped");
        return Ok(());
    }
    // INITIATE-EXISTING is only for a contact pair (protocol.md 10.2); anything else is dropped.
    if req.kind == InitiateKind::Existing && !store.is_contact(&req.target, &req.caller).await? {
        debug!("contact request dropped");
        return Ok(());
    }
    if let Origin::Local { caller_conn } = &req.origin
        && req.kind == InitiateKind::Existing
        && store.auto_existing(&req.target).await?
        && let Some((_device, conn, address)) = broker.online.top_announced(&req.target)
    {
        hand_out(
            broker,
            &req.request,
            &req.caller,
            *caller_conn,
            &req.target,
            conn,
            &address,
        );
        return Ok(());
    }
    let Some((_device, target_conn)) = broker.online.top_device(&req.target) else {
        debug!("contact request dropped");
        return Ok(());
    };
    let now = Instant::now();
    let ttl = Duration::from_secs(broker.config.contacts.request_ttl_secs);
    broker.contacts.insert(
        req.request,
        Pending {
            caller: req.caller.clone(),
            origin: req.origin.clone(),
            target: req.target.clone(),
            expires: now + ttl,
        },
        now,
    );
    let pubkey = match &req.origin {
        Origin::Local { .. } => None,
        Origin::Networked(origin) => {
            // The seed: brokers hold the pubkeys of contacted clients, with an expiry.
            let expires = unix_now()
                + broker
                    .federation
                    .as_ref()
                    .map_or(0, |f| f.config.pubkey_ttl_secs);
            store
                .put_peer_pubkey(&req.caller, &origin.caller_pubkey, expires as i64)
                .await?;
            Some(Hex32::from_bytes(origin.caller_pubkey))
        }
    };
    let (Ok(from), request) = (
        Number::new(req.caller.clone()),
        Hex16::from_bytes(req.request),
    ) else {
        return Ok(());
    };
    let event = Event::ContactRequest(ContactRequest {
        request,
        from,
        kind: match req.kind {
            InitiateKind::New => ContactKind::New,
            InitiateKind::Existing => ContactKind::Existing,
        },
        networked: pubkey.is_some(),
        pubkey,
    });
    if broker
        .online
        .push_conn(&req.target, target_conn, Push::event(event))
        != Delivery::Queued
    {
        debug!("target's event queue unavailable; contact request dropped");
    }
    Ok(())
}

/// Accepts: records the contact pair and gives both sides the token (and the caller the
/// target's address).
pub fn hand_out(
    broker: &Broker,
    request: &[u8; 16],
    caller: &str,
    caller_conn: u64,
    target: &str,
    target_conn: u64,
    address: &str,
) {
    let token = Secret32::generate(&mut OsRng);
    let (Ok(caller_number), Ok(target_number), Ok(address)) = (
        Number::new(caller.to_owned()),
        Number::new(target.to_owned()),
        Address::new(address.to_owned()),
    ) else {
        return;
    };
    let request = Hex16::from_bytes(*request);
    let accepted = Event::ContactAccepted(ContactAccepted {
        request,
        target: target_number,
        address: Some(address),
        sealed_address: None,
        token: Hex32::from_bytes(*token.expose()),
        pubkey: None,
    });
    let connecting = Event::ContactConnecting(ContactConnecting {
        request,
        from: caller_number,
        token: Hex32::from_bytes(*token.expose()),
    });
    // The target hears first, so it knows the token before the caller can connect.
    broker
        .online
        .push_conn(target, target_conn, Push::event(connecting));
    broker
        .online
        .push_conn(caller, caller_conn, Push::event(accepted));
}
