//! Networked contact setup (protocol.md section 11, from the brokers' side).
//!
//! Caller A on broker X, target B on broker Y:
//!
//! 1. X answers A's INITIATE-*-NETWORKED with `REQUEST: r` at once (only configuration and
//!    local link state decide NOT-NETWORKED / PEER-UNAVAILABLE), remembers r in [`Outgoing`](super::outgoing::Outgoing)
//!    and forwards `Initiate(r, A, B, kind, pk_A)` to Y ([`forward_initiate`]).
//! 2. Y acknowledges the call before it looks at B ([`receive_initiate`]), then applies the
//!    silent-drop rules of a local INITIATE (`contacts::route_initiate`): unknown, offline,
//!    blocked, probed-before-allocation, not a contact pair for EXISTING: nothing, ever. Else
//!    B's device gets CONTACT-REQUEST `{REQUEST: r', NETWORKED: true, PUBKEY: pk_A}`, and Y
//!    holds pk_A with an expiry.
//! 3. B answers with `PUBKEY: pk_B` and `SEALED-ADDRESS: s` (its address sealed to pk_A). Y
//!    records the pair {B, A}, makes the connect token t, sends B CONTACT-CONNECTING and calls
//!    `Accepted(r, A, B, pk_B, s, t)` on X (`send_accepted`).
//! 4. X checks that the call comes from the broker it forwarded r to and names the same
//!    numbers ([`receive_accepted`]), records the pair {A, B}, holds pk_B with an expiry, and
//!    sends A CONTACT-ACCEPTED `{REQUEST: r, TARGET: B, SEALED-ADDRESS: s, TOKEN: t,
//!    PUBKEY: pk_B}`.
//!
//! Neither broker ever has B's address in clear: B seals it before it leaves B. A decline, a
//! timeout or any drop at Y produces no call at all, so X (and A) learn nothing.

use std::sync::Arc;
use std::time::Duration;

use micromsg_wire::message::event::{ContactAccepted, ContactConnecting};
use micromsg_wire::{Blob, Event, Hex16, Hex32, Number};
use tracing::{Instrument, Span, debug, info_span, warn};

use super::outgoing::OutgoingRequest;
use super::proto::{AcceptedRequest, InitiateKind as WireKind, InitiateRequest};
use super::{Counters, Federation, Home};
use crate::clock::Now;
use crate::contacts::Router;
use crate::contacts::pending::{Initiate, InitiateKind, NetworkOrigin, Origin, new_request_id};
use crate::online::Push;

/// Tries of an `Accepted` call (the connect token lives for the request lifetime anyway).
const ACCEPTED_TRIES: u32 = 3;

/// Smallest and largest SEALED-ADDRESS: nonce (24) + tag (16) + an Address of 1..=255 bytes.
pub const SEALED_MIN: usize = 24 + 16 + 1;
/// See [`SEALED_MIN`].
pub const SEALED_MAX: usize = 24 + 16 + 255;

/// Why a networked INITIATE is refused before its acknowledgement (decided from configuration
/// and local link state only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardRefusal {
    /// The target is not in a peer's share, or this broker is in no network.
    NotNetworked,
    /// The peer owning the target is unreachable right now; try after this many seconds.
    PeerUnavailable(u64),
}

/// A client's INITIATE-*-NETWORKED, as [`forward_initiate`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// The calling entity (a client of this broker).
    pub caller: &'a Number,
    /// The caller's connection, which hears CONTACT-ACCEPTED.
    pub caller_conn: u64,
    /// The target, in a peer's share.
    pub target: &'a Number,
    /// NEW or EXISTING.
    pub kind: InitiateKind,
    /// The caller's broker-keypair public key (pk_A).
    pub caller_pubkey: [u8; 32],
}

/// Step 1: checks what may be checked before the ack, then forwards in the background and
/// returns the request id to acknowledge. The request waits `request_ttl` for `Accepted`.
pub fn forward_initiate(
    federation: &Arc<Federation>,
    forward: Forward<'_>,
    request_ttl: Duration,
    now: Now,
) -> Result<[u8; 16], ForwardRefusal> {
    let Forward {
        caller,
        caller_conn,
        target,
        kind,
        caller_pubkey,
    } = forward;
    let Home::Peer(peer) = federation.home_of(target.as_str()) else {
        return Err(ForwardRefusal::NotNetworked);
    };
    let Some(link) = federation.link(&peer.id) else {
        return Err(ForwardRefusal::NotNetworked);
    };
    if !link.is_available() {
        return Err(ForwardRefusal::PeerUnavailable(
            federation.config.probe_interval_secs.max(1),
        ));
    }
    let request = new_request_id();
    federation.outgoing.insert(
        request,
        OutgoingRequest {
            caller: caller.clone(),
            caller_conn,
            target: target.clone(),
            peer: peer.id.clone(),
            expires: now.instant + request_ttl,
        },
        now.instant,
    );
    // Bounded: beyond max_forwards_in_flight the request is dropped, which the caller cannot
    // tell from any other silent outcome.
    let Ok(permit) = Arc::clone(&federation.forwards).try_acquire_owned() else {
        Counters::bump(&federation.counters.initiates_overflow);
        warn!(peer = %peer.id, "too many networked contact requests in flight; one dropped");
        return Ok(request);
    };
    let call = InitiateRequest {
        request: request.to_vec(),
        caller: caller.as_str().to_owned(),
        target: target.as_str().to_owned(),
        kind: match kind {
            InitiateKind::New => WireKind::New,
            InitiateKind::Existing => WireKind::Existing,
        } as i32,
        caller_pubkey: caller_pubkey.to_vec(),
    };
    let link = Arc::clone(link);
    let timeout = federation.request_timeout();
    let federation = Arc::clone(federation);
    let span = info_span!("federation.initiate", peer = %peer.id);
    tokio::spawn(
        async move {
            let mut client = link.client();
            let result = match tokio::time::timeout(timeout, client.initiate(call)).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(tonic::Status::deadline_exceeded("initiate timed out")),
            };
            match link.record(result) {
                Ok(()) => Counters::bump(&federation.counters.initiates_forwarded),
                Err(_) => Counters::bump(&federation.counters.initiates_failed),
            }
            drop(permit);
        }
        .instrument(span),
    );
    Ok(request)
}

/// A fixed-length field of a peer's call, or INVALID_ARGUMENT naming it.
fn fixed<const N: usize>(bytes: &[u8], field: &str) -> Result<[u8; N], tonic::Status> {
    bytes
        .try_into()
        .map_err(|_| invalid(&format!("{field} must be {N} bytes")))
}

/// Why a peer's call was refused (malformed, or about numbers the calling peer does not
/// serve). Says nothing about whether a target exists.
fn invalid(what: &str) -> tonic::Status {
    tonic::Status::invalid_argument(what.to_owned())
}

/// Step 2: a peer forwards a networked INITIATE. Validates what does not depend on the
/// target, then routes in the background; the acknowledgement is the same in every case.
pub fn receive_initiate(
    router: &Router,
    federation: &Federation,
    peer: &str,
    call: InitiateRequest,
    now: Now,
) -> Result<(), tonic::Status> {
    let request: [u8; 16] = fixed(&call.request, "request")?;
    let caller_pubkey: [u8; 32] = fixed(&call.caller_pubkey, "caller_pubkey")?;
    let caller = Number::new(call.caller).map_err(|_| invalid("caller is not a number"))?;
    let target = Number::new(call.target).map_err(|_| invalid("target is not a number"))?;
    if !matches!(federation.home_of(caller.as_str()), Home::Peer(p) if p.id == peer) {
        return Err(tonic::Status::permission_denied(
            "caller is not in the calling broker's prefixes",
        ));
    }
    if federation.home_of(target.as_str()) != Home::Own {
        return Err(invalid("target is not in this broker's prefixes"));
    }
    let kind = match WireKind::try_from(call.kind) {
        Ok(WireKind::New) => InitiateKind::New,
        Ok(WireKind::Existing) => InitiateKind::Existing,
        _ => return Err(invalid("kind must be NEW or EXISTING")),
    };
    Counters::bump(&federation.counters.initiates_received);
    let initiate = Initiate {
        // The target sees a fresh id: ids chosen by a peer must not collide with local ones.
        request: new_request_id(),
        caller,
        origin: Origin::Networked(NetworkOrigin {
            broker: peer.to_owned(),
            request,
            caller_pubkey,
            span: Span::current(),
        }),
        target,
        kind,
    };
    tokio::spawn(
        crate::contacts::routing::route_initiate(router.clone(), initiate, now).in_current_span(),
    );
    Ok(())
}

/// What the target's accepting CONTACT-ANSWER carried, for `send_accepted`.
#[derive(Debug, Clone)]
pub struct Acceptance {
    /// The local request id (r').
    pub local_request: [u8; 16],
    /// The caller.
    pub caller: Number,
    /// The accepting target (a local entity).
    pub target: Number,
    /// The target's connection that answered.
    pub target_conn: u64,
    /// The target's broker-keypair public key.
    pub target_pubkey: [u8; 32],
    /// The target's sealed address.
    pub sealed_address: Vec<u8>,
}

/// Step 3 (at the target's broker): the target accepted. Records the pair, makes the token,
/// tells the target, and hands pk_B, the sealed address and the token to the caller's broker.
pub async fn accept_networked(
    router: &Router,
    federation: &Federation,
    origin: &NetworkOrigin,
    acceptance: Acceptance,
    now: Now,
) -> Result<(), micromsg_store::StoreError> {
    let now = now.unix_i64();
    router
        .store
        .add_contact(&acceptance.target, &acceptance.caller, now)
        .await?;
    let token = micromsg_crypto::Secret32::generate(&mut rand_core::OsRng);
    // The relay, should the two clients not reach each other: the caller's broker will open
    // the stream (federation.proto, `Relay`).
    let target_device = router
        .online
        .device_of(acceptance.target.as_str(), acceptance.target_conn);
    let relay = router.relays.offer(
        Some(crate::relay::Party::remote(
            acceptance.caller.as_str(),
            origin.broker.as_str(),
        )),
        target_device.map(|d| crate::relay::Party::local(acceptance.target.as_str(), d)),
    );
    let connecting = Event::ContactConnecting(ContactConnecting {
        request: Hex16::from_bytes(acceptance.local_request),
        from: acceptance.caller.clone(),
        token: Hex32::from_bytes(*token.expose()),
        relay,
    });
    router.online.push_conn(
        acceptance.target.as_str(),
        acceptance.target_conn,
        Push::event(connecting),
    );
    let call = AcceptedRequest {
        request: origin.request.to_vec(),
        caller: acceptance.caller.as_str().to_owned(),
        target: acceptance.target.as_str().to_owned(),
        target_pubkey: acceptance.target_pubkey.to_vec(),
        sealed_address: acceptance.sealed_address,
        token: token.expose().to_vec(),
        relay: relay.map(|r| r.as_bytes().to_vec()).unwrap_or_default(),
    };
    send_accepted(federation, &origin.broker, call);
    Ok(())
}

/// Calls `Accepted` on the caller's broker in the background, a few times if the link fails.
fn send_accepted(federation: &Federation, peer: &str, call: AcceptedRequest) {
    let Some(link) = federation.link(peer).cloned() else {
        return;
    };
    let timeout = federation.request_timeout();
    let retry_gap = Duration::from_secs(federation.config.retry_initial_secs.max(1));
    tokio::spawn(
        async move {
            for attempt in 1..=ACCEPTED_TRIES {
                let mut client = link.client();
                let result =
                    match tokio::time::timeout(timeout, client.accepted(call.clone())).await {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(tonic::Status::deadline_exceeded("accepted timed out")),
                    };
                match link.record(result) {
                    Ok(()) => return,
                    Err(status) if attempt < ACCEPTED_TRIES => {
                        debug!(attempt, error = %super::peers::describe(&status), "accepted call failed; retrying");
                        tokio::time::sleep(retry_gap).await;
                    }
                    Err(_) => warn!("could not hand a contact acceptance to the caller's broker"),
                }
            }
        }
        .in_current_span(),
    );
}

/// Step 4 (at the caller's broker): the peer says the target accepted.
pub async fn receive_accepted(
    router: &Router,
    federation: &Federation,
    peer: &str,
    call: AcceptedRequest,
    now: Now,
) -> Result<(), tonic::Status> {
    let request: [u8; 16] = fixed(&call.request, "request")?;
    let target_pubkey: [u8; 32] = fixed(&call.target_pubkey, "target_pubkey")?;
    let token: [u8; 32] = fixed(&call.token, "token")?;
    if !(SEALED_MIN..=SEALED_MAX).contains(&call.sealed_address.len()) {
        return Err(invalid("sealed_address has an impossible length"));
    }
    let (Ok(target), Ok(caller)) = (
        Number::new(call.target.clone()),
        Number::new(call.caller.clone()),
    ) else {
        return Err(invalid("caller and target must be numbers"));
    };
    let Some(waiting) =
        federation
            .outgoing
            .take_matching(&request, peer, &caller, &target, now.instant)
    else {
        // Unknown, expired, or not this peer's to answer: ignored, like a late answer.
        debug!("acceptance for no waiting request ignored");
        return Ok(());
    };
    let now = now.unix;
    let store = &router.store;
    store
        .add_contact(&waiting.caller, &waiting.target, now as i64)
        .await
        .map_err(internal)?;
    store
        .put_peer_pubkey(
            &waiting.target,
            &target_pubkey,
            (now + federation.config.pubkey_ttl_secs) as i64,
        )
        .await
        .map_err(internal)?;
    // The relay the target's broker offered (none from a broker that offers none).
    let relay = <[u8; 16]>::try_from(call.relay.as_slice())
        .ok()
        .and_then(|id| {
            let caller_device = router
                .online
                .device_of(waiting.caller.as_str(), waiting.caller_conn);
            router.relays.offer_with_id(
                id,
                caller_device.map(|d| crate::relay::Party::local(waiting.caller.as_str(), d)),
                Some(crate::relay::Party::remote(target.as_str(), peer)),
            )
        });
    let accepted = Event::ContactAccepted(ContactAccepted {
        request: Hex16::from_bytes(request),
        target,
        address: None,
        sealed_address: Some(Blob::new(call.sealed_address)),
        token: Hex32::from_bytes(token),
        pubkey: Some(Hex32::from_bytes(target_pubkey)),
        relay,
    });
    router.online.push_conn(
        waiting.caller.as_str(),
        waiting.caller_conn,
        Push::event(accepted),
    );
    if let Some(relay) = relay {
        // The target may have joined already, its broker's word overtaking this call.
        router.relays.deliver_early_waiting(*relay.as_bytes(), peer);
    }
    Counters::bump(&federation.counters.accepted_relayed);
    Ok(())
}

fn internal(e: micromsg_store::StoreError) -> tonic::Status {
    warn!(error = %e, "store error in a federation call");
    tonic::Status::internal("internal error")
}
