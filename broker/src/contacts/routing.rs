//! Routing contact requests: the silent-drop rules, asking the target, handing out the
//! connect token. A request from a peer broker's client (`Origin::Networked`, see
//! `federation::contact`) goes through the same routing, so the silent-drop rules are one
//! piece of code for both.
//!
//! The silent-drop rule: the caller's acknowledgement is produced before any lookup that
//! depends on the target (the handler writes it while [`route_initiate`] runs as its own
//! task), so unknown, offline, blocking and rejecting targets all look the same: the same
//! frame at the same time, then nothing. The one exception is a number whose holder published a
//! forward (FORWARD): a caller it has not blocked gets the forward as a FORWARDED event after
//! the same acknowledgement; a blocked one gets the silence.

use micromsg_crypto::Secret32;
use micromsg_wire::message::event::{
    ContactAccepted, ContactConnecting, ContactKind, ContactRequest, Forwarded,
};
use micromsg_wire::{Address, Blob, Event, Hex16, Hex32, Number};
use rand_core::OsRng;
use tracing::{debug, warn};

use super::Router;
use super::pending::{Initiate, InitiateKind, Origin, Pending};
use crate::clock::Now;
use crate::online::{Delivery, Online, Push};

/// Routes an INITIATE after its ack: drops it silently, answers it (AUTO-EXISTING) or asks the
/// target's most recently active device.
///
/// A networked request (from a peer broker) follows the same rules, with two differences: an
/// INITIATE-EXISTING-NETWORKED from a number that is not a contact pair is dropped, and
/// AUTO-EXISTING does not answer for the target (only the target's client can seal its
/// address), so the target is always asked (protocol.md 11.3).
///
/// `now` is when the request was acknowledged (the routing reads no clock of its own).
pub async fn route_initiate(router: Router, req: Initiate, now: Now) {
    if let Err(e) = try_route(&router, &req, now).await {
        warn!(error = %e, "routing a contact request failed; dropped");
    }
}

async fn try_route(
    router: &Router,
    req: &Initiate,
    now: Now,
) -> Result<(), micromsg_store::StoreError> {
    let store = &router.store;
    if req.caller == req.target {
        return Ok(());
    }
    // A forward the target's holder published (FORWARD) answers a local caller it has not
    // blocked, instead of the request (protocol.md 10.2): after the same acknowledgement, as
    // an event. A blocked caller gets the silence an unknown number gets.
    if let Origin::Local { caller_conn } = &req.origin
        && let Some((notice, expires)) = store
            .forward_for(&req.target, &req.caller, now.unix_i64())
            .await?
    {
        let event = Event::Forwarded(Forwarded {
            request: Hex16::from_bytes(req.request),
            target: req.target.clone(),
            notice: Blob::from(notice),
            expires: expires.max(0) as u64,
        });
        router
            .online
            .push_conn(req.caller.as_str(), *caller_conn, Push::event(event));
        debug!("contact request answered with a forward");
        return Ok(());
    }
    if !store.entity_exists(&req.target).await? {
        if router.remember_unknown_targets && router.numbers.owns(req.target.as_str()) {
            // Noted in memory now, written later with others (see `probes`): no write on
            // this path, so its timing is the other silent drops' timing.
            router.probes.note(&req.caller, &req.target);
        }
        debug!("contact request dropped");
        return Ok(());
    }
    if router.probes.contains(&req.caller, &req.target)
        || store.is_poisoned(&req.caller, &req.target).await?
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
        && let Some((_device, conn, address)) = router.online.top_announced(req.target.as_str())
    {
        hand_out(
            &router.online,
            &router.relays,
            &req.request,
            Side {
                number: &req.caller,
                conn: *caller_conn,
            },
            Side {
                number: &req.target,
                conn,
            },
            &address,
        );
        return Ok(());
    }
    let Some((_device, target_conn)) = router.online.top_device(req.target.as_str()) else {
        debug!("contact request dropped");
        return Ok(());
    };
    router.pending.insert(
        req.request,
        Pending {
            caller: req.caller.clone(),
            origin: req.origin.clone(),
            target: req.target.clone(),
            expires: now.instant + router.request_ttl,
        },
        now.instant,
    );
    let pubkey = match &req.origin {
        Origin::Local { .. } => None,
        Origin::Networked(origin) => {
            // The seed: brokers hold the pubkeys of contacted clients, with an expiry.
            let expires = now.unix + router.pubkey_ttl_secs;
            store
                .put_peer_pubkey(&req.caller, &origin.caller_pubkey, expires as i64)
                .await?;
            Some(Hex32::from_bytes(origin.caller_pubkey))
        }
    };
    let event = Event::ContactRequest(ContactRequest {
        request: Hex16::from_bytes(req.request),
        from: req.caller.clone(),
        kind: match req.kind {
            InitiateKind::New => ContactKind::New,
            InitiateKind::Existing => ContactKind::Existing,
        },
        networked: pubkey.is_some(),
        pubkey,
    });
    if router
        .online
        .push_conn(req.target.as_str(), target_conn, Push::event(event))
        != Delivery::Queued
    {
        debug!("target's event queue unavailable; contact request dropped");
    }
    Ok(())
}

/// One side of an accepted request: the entity and the connection it is on.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// The entity.
    pub number: &'a Number,
    /// Its connection that asked or answered.
    pub conn: u64,
}

/// Accepts: gives both sides the token and the relay id (and the caller the target's address).
pub fn hand_out(
    online: &Online,
    relays: &crate::relay::Relays,
    request: &[u8; 16],
    caller: Side<'_>,
    target: Side<'_>,
    address: &str,
) {
    let token = Secret32::generate(&mut OsRng);
    let Ok(address) = Address::new(address.to_owned()) else {
        return;
    };
    let request = Hex16::from_bytes(*request);
    let party = |side: Side<'_>| {
        online
            .device_of(side.number.as_str(), side.conn)
            .map(|device| crate::relay::Party::local(side.number.as_str(), device))
    };
    let relay = relays.offer(party(caller), party(target));
    let accepted = Event::ContactAccepted(ContactAccepted {
        request,
        target: target.number.clone(),
        address: Some(address),
        sealed_address: None,
        token: Hex32::from_bytes(*token.expose()),
        pubkey: None,
        relay,
    });
    let connecting = Event::ContactConnecting(ContactConnecting {
        request,
        from: caller.number.clone(),
        token: Hex32::from_bytes(*token.expose()),
        relay,
    });
    // The target hears first, so it knows the token before the caller can connect.
    online.push_conn(target.number.as_str(), target.conn, Push::event(connecting));
    online.push_conn(caller.number.as_str(), caller.conn, Push::event(accepted));
}
