//! Contacts: IS-NETWORKED, INITIATE-NEW / -EXISTING (and their -NETWORKED forms),
//! CONTACT-ANSWER, CONTACT-POLICY, BLOCK, UNBLOCK and BLOCK-LIST.
//!
//! An INITIATE is acknowledged before anything about the target is looked up; the routing runs
//! as its own task ([`crate::contacts::routing`]), so the acknowledgement's content and timing
//! say nothing about the target (the silent-drop rule, protocol.md 10).

use std::sync::Arc;
use std::time::Duration;

use micromsg_store::Store;
use micromsg_wire::message::request::{
    Answer, ContactAnswerArgs, ContactPolicyArgs, InitiateNetworkedArgs, SEALED_ADDRESS_MAX,
    SEALED_ADDRESS_MIN,
};
use micromsg_wire::message::response::{BlockListData, Home, InitiateData, IsNetworkedData};
use micromsg_wire::{Address, Blob, ErrorCode, Hex16, Hex32, Number, ResponseData};
use tracing::Instrument;

use super::{Handled, Login, Refusal, Session};
use crate::broker::Broker;
use crate::clock::Now;
use crate::contacts::Router;
use crate::contacts::pending::{
    Initiate, InitiateKind, NetworkOrigin, Origin, new_request_id, resolve_address,
};
use crate::contacts::routing::{Side, hand_out, route_initiate};
use crate::federation::Federation;
use crate::federation::contact::{
    Acceptance, Forward, ForwardRefusal, SEALED_MAX, SEALED_MIN, forward_initiate,
};
use crate::limits::WindowLimiter;
use crate::numbers::NumberAllocator;
use crate::online::Online;

/// What the contact handlers use.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// Contact pairs, block lists, the AUTO-EXISTING policy.
    pub store: &'a Store,
    /// Announced addresses and event queues.
    pub online: &'a Online,
    /// This broker's share of the number space (IS-NETWORKED when standalone).
    pub numbers: &'a NumberAllocator,
    /// `server.broker_id`.
    pub broker_id: &'a str,
    /// INITIATE requests per entity.
    pub initiates: &'a WindowLimiter<String>,
    /// Routes a request after its acknowledgement, and holds the ones waiting for an answer.
    pub router: &'a Router,
    /// Peers, for the -NETWORKED requests; `None` for a standalone broker.
    pub federation: Option<&'a Arc<Federation>>,
}

impl<'a> Cx<'a> {
    /// The contact handlers' part of the broker.
    pub fn of(broker: &'a Broker) -> Self {
        Self {
            store: &broker.store,
            online: &broker.online,
            numbers: &broker.numbers,
            broker_id: &broker.config.server.broker_id,
            initiates: &broker.limiters.initiates,
            router: &broker.router,
            federation: broker.federation.as_ref(),
        }
    }
}

/// Records the address the device listens on (ADDRESS of INITIATE-NEW, CONTACT-ANSWER,
/// CONTACT-POLICY), resolved against the connection's IP.
pub fn announce(cx: Cx<'_>, session: &Session, login: &Login, address: &Address) {
    let resolved = resolve_address(address, session.peer.ip());
    cx.online
        .set_address(login.number().as_str(), session.conn_id, resolved);
}

/// IS-NETWORKED: from configuration only, never a lookup (protocol.md 6.10).
pub fn is_networked(cx: Cx<'_>, target: &Number) -> ResponseData {
    let data = match cx.federation {
        // A standalone broker: its own prefixes are OWN, everything else NONE.
        None => {
            let own = cx.numbers.owns(target.as_str());
            IsNetworkedData {
                networked: false,
                home: if own { Home::Own } else { Home::None },
                broker: own.then(|| cx.broker_id.to_owned()),
            }
        }
        Some(f) => match f.home_of(target.as_str()) {
            crate::federation::Home::Own => IsNetworkedData {
                networked: false,
                home: Home::Own,
                broker: Some(f.me.id.clone()),
            },
            crate::federation::Home::Peer(peer) => IsNetworkedData {
                networked: true,
                home: Home::Peer,
                broker: Some(peer.id.clone()),
            },
            crate::federation::Home::None => IsNetworkedData {
                networked: false,
                home: Home::None,
                broker: None,
            },
        },
    };
    ResponseData::IsNetworked(data)
}

/// INITIATE requests per entity (`contacts.initiates_per_minute`).
fn check_initiate_rate(cx: Cx<'_>, login: &Login, now: Now) -> Result<(), Refusal> {
    cx.initiates
        .hit(&login.number().as_str().to_owned(), now.instant)
        .map_err(|wait| {
            Refusal::retry(
                ErrorCode::RateLimited,
                "too many contact requests; slow down",
                wait,
            )
        })
}

/// INITIATE-NEW / INITIATE-EXISTING: the ack now, the routing in the background.
pub fn initiate(
    cx: Cx<'_>,
    session: &Session,
    login: &Login,
    target: Number,
    kind: InitiateKind,
    now: Now,
) -> Handled {
    check_initiate_rate(cx, login, now)?;
    let request = new_request_id();
    // The ack is decided here, before anything about the target is looked up; the lookup
    // runs as its own task so its cost cannot show in the ack's timing.
    tokio::spawn(route_initiate(
        cx.router.clone(),
        Initiate {
            request,
            caller: login.number().clone(),
            origin: Origin::Local {
                caller_conn: session.conn_id,
            },
            target,
            kind,
        },
        now,
    ));
    let data = InitiateData {
        request: Hex16::from_bytes(request),
    };
    Ok(match kind {
        InitiateKind::New => ResponseData::InitiateNew(data),
        InitiateKind::Existing => ResponseData::InitiateExisting(data),
    })
}

/// INITIATE-*-NETWORKED: NOT-NETWORKED and PEER-UNAVAILABLE come from configuration and
/// local link state; otherwise the ack goes out and the request is forwarded in the
/// background (silent from then on, as INITIATE-NEW).
pub async fn initiate_networked(
    cx: Cx<'_>,
    session: &Session,
    login: &Login,
    args: InitiateNetworkedArgs,
    kind: InitiateKind,
    now: Now,
) -> Handled {
    check_initiate_rate(cx, login, now)?;
    let not_networked = || {
        Refusal::new(
            ErrorCode::NotNetworked,
            "number is not in a peer broker's share",
        )
    };
    let federation = cx.federation.ok_or_else(not_networked)?;
    // A peer marked down gets one more try now: it may have come back since the last probe.
    // (This depends only on the link, never on the target: the silent-drop rule holds.)
    if let crate::federation::Home::Peer(peer) = federation.home_of(args.target.as_str())
        && let Some(link) = federation.link(&peer.id)
        && !link.is_available()
    {
        crate::federation::probe::recheck(link, federation.connect_timeout()).await;
    }
    let forward = Forward {
        caller: login.number(),
        caller_conn: session.conn_id,
        target: &args.target,
        kind,
        caller_pubkey: *args.pubkey.as_bytes(),
    };
    let request =
        forward_initiate(federation, forward, cx.router.request_ttl, now).map_err(|refusal| {
            match refusal {
                ForwardRefusal::NotNetworked => not_networked(),
                ForwardRefusal::PeerUnavailable(secs) => Refusal::retry(
                    ErrorCode::PeerUnavailable,
                    "the broker serving this number cannot be reached now",
                    Duration::from_secs(secs),
                ),
            }
        })?;
    let data = InitiateData {
        request: Hex16::from_bytes(request),
    };
    Ok(match kind {
        InitiateKind::New => ResponseData::InitiateNewNetworked(data),
        InitiateKind::Existing => ResponseData::InitiateExistingNetworked(data),
    })
}

fn not_found() -> Refusal {
    Refusal::new(
        ErrorCode::NotFound,
        "no such contact request (unknown, expired or already answered)",
    )
}

// The codec refuses a SEALED-ADDRESS outside the bounds a peer broker's `Accepted` is held to.
const _: () = assert!(SEALED_MIN == SEALED_ADDRESS_MIN && SEALED_MAX == SEALED_ADDRESS_MAX);

/// What an answer does, once its shape is checked against its request's origin.
enum Outcome {
    /// A decline, whatever the origin.
    Decline,
    /// A request from a client of this broker, accepted with ADDRESS.
    Local { caller_conn: u64, address: Address },
    /// A request from a peer broker's client, accepted with PUBKEY and SEALED-ADDRESS.
    Networked {
        origin: NetworkOrigin,
        pubkey: Hex32,
        sealed_address: Blob,
    },
}

/// Checks that an answer has the shape its request's origin needs (the codec has checked that
/// it is one of the shapes): a networked request is accepted with PUBKEY and SEALED-ADDRESS
/// (the plain address must not reach the caller's broker), a local one with ADDRESS; a decline
/// fits either.
fn check_answer_shape(answer: Answer, origin: Origin) -> Result<Outcome, Refusal> {
    let bad = |message: &str| Err(Refusal::new(ErrorCode::BadArgs, message));
    match (answer, origin) {
        (Answer::Decline, _) => Ok(Outcome::Decline),
        (Answer::Accept { address }, Origin::Local { caller_conn }) => Ok(Outcome::Local {
            caller_conn,
            address,
        }),
        (
            Answer::AcceptNetworked {
                pubkey,
                sealed_address,
            },
            Origin::Networked(origin),
        ) => Ok(Outcome::Networked {
            origin,
            pubkey,
            sealed_address,
        }),
        (Answer::AcceptNetworked { .. }, Origin::Local { .. }) => {
            bad("a request from this broker is accepted with ADDRESS only")
        }
        (Answer::Accept { .. }, Origin::Networked(_)) => bad(
            "a networked request is accepted with PUBKEY and SEALED-ADDRESS, never ADDRESS \
             (the plain address must not reach the caller's broker)",
        ),
    }
}

/// CONTACT-ANSWER: accept (the pair is recorded, both sides get the token) or decline (the
/// caller goes on the target's block list, as the seed says).
pub async fn answer(
    cx: Cx<'_>,
    session: &Session,
    login: &Login,
    args: ContactAnswerArgs,
    now: Now,
) -> Handled {
    let request = *args.request.as_bytes();
    // Check the answer against the request before consuming it: an error has no effects.
    let peeked = cx
        .router
        .pending
        .peek(&request, login.number(), now.instant)
        .ok_or_else(not_found)?;
    // `take` removes the entry `peek` copied (request ids are random and never reused), so
    // the origin checked here is the one consumed.
    let outcome = check_answer_shape(args.answer, peeked.origin)?;
    let Some(pending) = cx
        .router
        .pending
        .take(&request, login.number(), now.instant)
    else {
        // Another device of the entity answered in the meantime.
        return Err(not_found());
    };
    match outcome {
        Outcome::Decline => {
            // The seed: a rejection puts the caller on the target's blacklist.
            cx.store
                .block(login.number(), &pending.caller, now.unix_i64())
                .await?;
        }
        Outcome::Networked {
            origin,
            pubkey,
            sealed_address,
        } => {
            let span = tracing::info_span!(parent: &origin.span, "contact.answer.networked");
            // A networked request came from a peer, so this broker is in a network.
            let federation = cx.federation.ok_or_else(Refusal::internal)?;
            crate::federation::contact::accept_networked(
                cx.router,
                federation,
                &origin,
                Acceptance {
                    local_request: request,
                    caller: pending.caller.clone(),
                    target: login.number().clone(),
                    target_conn: session.conn_id,
                    target_pubkey: *pubkey.as_bytes(),
                    sealed_address: sealed_address.into_vec(),
                },
                now,
            )
            .instrument(span)
            .await?;
        }
        Outcome::Local {
            caller_conn,
            address,
        } => {
            announce(cx, session, login, &address);
            let address = resolve_address(&address, session.peer.ip());
            cx.store
                .add_contact(login.number(), &pending.caller, now.unix_i64())
                .await?;
            cx.store
                .add_contact(&pending.caller, login.number(), now.unix_i64())
                .await?;
            hand_out(
                cx.online,
                &cx.router.relays,
                &request,
                Side {
                    number: &pending.caller,
                    conn: caller_conn,
                },
                Side {
                    number: login.number(),
                    conn: session.conn_id,
                },
                &address,
            );
        }
    }
    Ok(ResponseData::ContactAnswer)
}

/// CONTACT-POLICY: AUTO-EXISTING (and optionally the address to hand out with it).
pub async fn policy(
    cx: Cx<'_>,
    session: &Session,
    login: &Login,
    args: ContactPolicyArgs,
) -> Handled {
    cx.store
        .set_auto_existing(login.number(), args.auto_existing)
        .await?;
    if let Some(address) = &args.address {
        announce(cx, session, login, address);
    }
    Ok(ResponseData::ContactPolicy)
}

/// BLOCK: `target` can no longer reach the entity (silently).
pub async fn block(cx: Cx<'_>, login: &Login, target: &Number, now: Now) -> Handled {
    cx.store
        .block(login.number(), target, now.unix_i64())
        .await?;
    Ok(ResponseData::Block)
}

/// UNBLOCK.
pub async fn unblock(cx: Cx<'_>, login: &Login, target: &Number) -> Handled {
    cx.store.unblock(login.number(), target).await?;
    Ok(ResponseData::Unblock)
}

/// BLOCK-LIST: the numbers the entity blocked.
pub async fn block_list(cx: Cx<'_>, login: &Login) -> Handled {
    let numbers = cx.store.blocked_by(login.number()).await?;
    Ok(ResponseData::BlockList(BlockListData { numbers }))
}
