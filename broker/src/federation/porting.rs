//! Number portability inside a network (docs/federation.md 12).
//!
//! A user moves number N from broker X to broker Y of the same network and keeps N:
//!
//! 1. At X, logged in, the user asks PORT-OUT {TO: Y}: X stores the SHA-256 of a fresh
//!    single-use token (handlers::port).
//! 2. At Y the user sends PORT-IN with the token and a statement signed by its identity key.
//!    Y verifies the statement and calls [`PortOut`](super::proto::PortOutRequest) on X.
//! 3. X ([`receive_port_out`]) checks the statement and spends the token (unused, unexpired,
//!    issued for Y, compared in constant time), records the entry, moves what waits in N's
//!    inbox into its outbox towards Y, closes N's connections, and answers with the entry's
//!    seq and N's contacts and blocks. From then on X refuses N's logins (PORTED) and routes
//!    N to Y.
//! 4. Y creates N with the new device, signs the entry with its identity key, and announces
//!    it to every peer ([`run_announcer`], durable, retried with the outbox's backoff).
//! 5. Every receiver ([`receive_ported`]) checks that the caller is the entry's `to`, verifies
//!    both signatures, keeps the entry with the highest seq per number and routes N to Y.
//!
//! The routing itself is [`Federation::home_of`], which consults the entries first.

use std::sync::Arc;
use std::time::Duration;

use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey};
use micromsg_crypto::kdf;
use micromsg_store::{PortOut, PortedAway, PortedEntry, PortedOutcome, StoreError, WaitingItem};
use micromsg_wire::message::event::DeviceRevoked;
use micromsg_wire::{Event, Number, port_statement, ported_entry_bytes};
use prost::Message as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::outbox::{backoff, idempotency_key};
use super::proto::{
    Delivery, PortOutRequest, PortOutResponse, PortedContact, PortedEntry as ProtoEntry,
};
use super::{Federation, Home, Route};
use crate::broker::Broker;
use crate::clock::unix_now;
use crate::online::Push;

/// Announcements sent per round of the announcer.
const ANNOUNCE_BATCH: u32 = 64;

/// Updates the in-memory routes with `entry` unless a newer one is held.
pub fn remember(federation: &Federation, entry: &PortedEntry) {
    let mut routes = federation.ported.write().unwrap_or_else(|e| e.into_inner());
    let newer = routes
        .get(entry.number.as_str())
        .is_none_or(|r| r.seq <= entry.seq);
    if newer {
        routes.insert(
            entry.number.as_str().to_owned(),
            Route {
                seq: entry.seq,
                from: entry.from_broker.clone(),
                to: entry.to_broker.clone(),
            },
        );
    }
}

/// Loads every entry of the store into the routes (at start).
pub async fn load_routes(broker: &Broker) -> Result<usize, StoreError> {
    let Some(f) = broker.federation.as_ref() else {
        return Ok(0);
    };
    let entries = broker.store.ported_entries().await?;
    for e in &entries {
        remember(f, e);
    }
    Ok(entries.len())
}

/// Whether `signature` by `identity_key` over the port statement verifies (`verify_strict`).
pub fn statement_verifies(
    number: &str,
    from: &str,
    to: &str,
    time: u64,
    identity_key: &[u8; 32],
    signature: &[u8; 64],
) -> bool {
    IdentityPublicKey::from_bytes(identity_key)
        .and_then(|k| k.verify(&port_statement(number, from, to, time), signature))
        .is_ok()
}

/// The bytes the gaining broker signs for `entry`.
pub fn entry_bytes(entry: &PortedEntry) -> Vec<u8> {
    ported_entry_bytes(
        entry.number.as_str(),
        &entry.from_broker,
        &entry.to_broker,
        entry.seq,
        entry.time,
        &entry.identity_key,
        &entry.user_signature,
    )
}

/// Signs `entry` with this (the gaining) broker's identity key.
pub fn sign_entry(identity: &IdentityKey, entry: &mut PortedEntry) {
    entry.broker_key = identity.public_key().as_bytes().to_vec();
    entry.broker_signature = identity.sign(&entry_bytes(entry)).to_vec();
}

/// Why an announced entry is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// A field has the wrong length or form.
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
    /// The user's signature over the statement does not verify.
    #[error("the user's signature does not verify")]
    UserSignature,
    /// The gaining broker's signature does not verify.
    #[error("the gaining broker's signature does not verify")]
    BrokerSignature,
    /// The entry was announced by another broker than the one it names as `to`.
    #[error("announced by a broker other than the entry's to_broker")]
    WrongAnnouncer,
}

/// Checks an announced entry: its form, that `announcer` (the caller's certificate id) is its
/// `to_broker`, the user's signature and the gaining broker's signature.
pub fn verify_announced(announcer: &str, entry: ProtoEntry) -> Result<PortedEntry, EntryError> {
    let number = Number::new(entry.number).map_err(|_| EntryError::Malformed("number"))?;
    let identity_key: [u8; 32] = entry
        .identity_key
        .as_slice()
        .try_into()
        .map_err(|_| EntryError::Malformed("identity_key must be 32 bytes"))?;
    let user_signature: [u8; 64] = entry
        .user_signature
        .as_slice()
        .try_into()
        .map_err(|_| EntryError::Malformed("user_signature must be 64 bytes"))?;
    let broker_key: [u8; 32] = entry
        .broker_key
        .as_slice()
        .try_into()
        .map_err(|_| EntryError::Malformed("broker_key must be 32 bytes"))?;
    let broker_signature: [u8; 64] = entry
        .broker_signature
        .as_slice()
        .try_into()
        .map_err(|_| EntryError::Malformed("broker_signature must be 64 bytes"))?;
    if entry.seq == 0 || entry.from_broker == entry.to_broker {
        return Err(EntryError::Malformed(
            "seq 0, or from_broker equal to to_broker",
        ));
    }
    if entry.to_broker != announcer {
        return Err(EntryError::WrongAnnouncer);
    }
    let parsed = PortedEntry {
        number,
        seq: entry.seq,
        from_broker: entry.from_broker,
        to_broker: entry.to_broker,
        time: entry.time,
        identity_key,
        user_signature,
        broker_key: broker_key.to_vec(),
        broker_signature: broker_signature.to_vec(),
    };
    if !statement_verifies(
        parsed.number.as_str(),
        &parsed.from_broker,
        &parsed.to_broker,
        parsed.time,
        &identity_key,
        &user_signature,
    ) {
        return Err(EntryError::UserSignature);
    }
    IdentityPublicKey::from_bytes(&broker_key)
        .and_then(|k| k.verify(&entry_bytes(&parsed), &broker_signature))
        .map_err(|_| EntryError::BrokerSignature)?;
    Ok(parsed)
}

/// The entry as it travels.
pub fn to_proto(entry: &PortedEntry) -> ProtoEntry {
    ProtoEntry {
        number: entry.number.as_str().to_owned(),
        seq: entry.seq,
        from_broker: entry.from_broker.clone(),
        to_broker: entry.to_broker.clone(),
        time: entry.time,
        identity_key: entry.identity_key.to_vec(),
        user_signature: entry.user_signature.to_vec(),
        broker_key: entry.broker_key.clone(),
        broker_signature: entry.broker_signature.clone(),
    }
}

/// The outbox row that carries a message waiting at this broker for a number being ported
/// to `to`: the original sender and message id, marked `moved`.
fn moved_delivery(recipient: &str, item: &WaitingItem) -> ([u8; 16], Vec<u8>) {
    let key = idempotency_key(item.sender.as_str(), recipient, &item.id);
    let payload = Delivery {
        idempotency_key: key.to_vec(),
        message_id: item.id.to_vec(),
        sender: item.sender.as_str().to_owned(),
        sender_device: item.sender_device,
        recipient: recipient.to_owned(),
        created_at: u64::try_from(item.created_at).unwrap_or(0),
        expires_at: u64::try_from(item.expires_at).unwrap_or(0),
        body: item.body.clone(),
        moved: true,
    }
    .encode_to_vec();
    (key, payload)
}

/// The losing broker's side of `PortOut` (step 3 of the module docs), called by `peer`.
pub async fn receive_port_out(
    broker: &Broker,
    peer: &str,
    request: PortOutRequest,
    now: u64,
) -> Result<PortOutResponse, tonic::Status> {
    let Some(f) = broker.federation.as_ref() else {
        return Err(tonic::Status::failed_precondition("not networked"));
    };
    let invalid = tonic::Status::invalid_argument;
    let number = Number::new(request.number).map_err(|_| invalid("number"))?;
    let identity_key: [u8; 32] = request
        .identity_key
        .as_slice()
        .try_into()
        .map_err(|_| invalid("identity_key must be 32 bytes"))?;
    let signature: [u8; 64] = request
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| invalid("signature must be 64 bytes"))?;
    let token: [u8; 32] = request
        .token
        .as_slice()
        .try_into()
        .map_err(|_| invalid("token must be 32 bytes"))?;
    if let Some(route) = f.route(number.as_str())
        && route.from == f.me.id
        && route.to == peer
    {
        return repeat_port_out(broker, &number, request.time, &identity_key, &signature).await;
    }
    if f.home_of(number.as_str()) != Home::Own {
        return Err(tonic::Status::not_found("the number is not served here"));
    }
    // The token says X agreed; the statement says the user wants this very move.
    if !statement_verifies(
        number.as_str(),
        &f.me.id,
        peer,
        request.time,
        &identity_key,
        &signature,
    ) {
        return Err(invalid("the user's statement does not verify"));
    }
    let entry = PortedEntry {
        number: number.clone(),
        seq: 0,
        from_broker: f.me.id.clone(),
        to_broker: peer.to_owned(),
        time: request.time,
        identity_key,
        user_signature: signature,
        broker_key: Vec::new(),
        broker_signature: Vec::new(),
    };
    let port = PortOut {
        entry,
        token_hash: kdf::sha256(&[&token]),
        now: now as i64,
    };
    let recipient = number.as_str().to_owned();
    let away: PortedAway = match broker
        .store
        .port_out(&port, &move |item| moved_delivery(&recipient, item))
        .await
    {
        Ok(away) => away,
        Err(StoreError::BadPortToken) => {
            debug!(peer, "port refused: bad token");
            return Err(tonic::Status::permission_denied(
                "port token unknown, expired, used or not issued for the calling broker",
            ));
        }
        Err(StoreError::InvalidArgument(_)) => {
            debug!(peer, "port refused: not the identity key named at PORT-OUT");
            return Err(invalid(
                "the statement is not signed by the identity key named at PORT-OUT",
            ));
        }
        Err(e) => {
            warn!(error = %e, "store error porting a number out");
            return Err(tonic::Status::unavailable("store error; nothing changed"));
        }
    };
    let mut recorded = port.entry;
    recorded.seq = away.seq;
    remember(f, &recorded);
    // Every device of the number at this broker is done here: its connections get
    // DEVICE-REVOKED and close, and its logins are refused with PORTED from now on.
    if let Ok(devices) = broker.store.list_devices(&number).await {
        for d in devices {
            let device = d.device_id;
            broker
                .online
                .push_all(number.as_str(), Some(device.get()), || {
                    Push::close(Event::DeviceRevoked(DeviceRevoked { device }))
                });
        }
    }
    f.outbox_wake.notify_one();
    info!(
        peer,
        seq = away.seq,
        moved = away.moved,
        "number ported out"
    );
    Ok(response(away.seq, away.contacts, away.blocks))
}

/// A `PortOut` for a port this broker agreed to already, from the broker it went to: the
/// answer to the first was lost (the gaining broker then has no entity yet). The very same
/// statement (time, key and signature) gets the same answer again, so the port completes; the
/// token is spent, so anything else is refused.
async fn repeat_port_out(
    broker: &Broker,
    number: &Number,
    time: u64,
    identity_key: &[u8; 32],
    signature: &[u8; 64],
) -> Result<PortOutResponse, tonic::Status> {
    let unavailable = |e: StoreError| {
        warn!(error = %e, "store error answering a repeated port");
        tonic::Status::unavailable("store error; try again")
    };
    let held = broker
        .store
        .ported_entry(number)
        .await
        .map_err(unavailable)?;
    let same = held.as_ref().is_some_and(|e| {
        e.time == time && e.identity_key == *identity_key && e.user_signature == *signature
    });
    let Some(held) = held.filter(|_| same) else {
        return Err(tonic::Status::permission_denied(
            "port token unknown, expired, used or not issued for the calling broker",
        ));
    };
    let (contacts, blocks) = broker
        .store
        .handover_of(number)
        .await
        .map_err(unavailable)?;
    debug!(seq = held.seq, "repeated port answered again");
    Ok(response(held.seq, contacts, blocks))
}

fn response(
    seq: u64,
    contacts: Vec<micromsg_store::ContactRecord>,
    blocks: Vec<Number>,
) -> PortOutResponse {
    PortOutResponse {
        seq,
        contacts: contacts
            .into_iter()
            .map(|c| PortedContact {
                peer: c.peer.as_str().to_owned(),
                auto_existing: c.auto_existing,
                brokered: c.brokered,
                created_at: u64::try_from(c.created_at).unwrap_or(0),
            })
            .collect(),
        blocks: blocks.into_iter().map(|b| b.as_str().to_owned()).collect(),
    }
}

/// A receiver's side of `Ported` (step 5 of the module docs), called by `peer`.
pub async fn receive_ported(
    broker: &Broker,
    peer: &str,
    entry: ProtoEntry,
    now: u64,
) -> Result<(), tonic::Status> {
    let Some(f) = broker.federation.as_ref() else {
        return Err(tonic::Status::failed_precondition("not networked"));
    };
    let entry = verify_announced(peer, entry).map_err(|e| {
        warn!(peer, error = %e, "ported-number entry refused");
        tonic::Status::invalid_argument(e.to_string())
    })?;
    if f.network.broker(&entry.from_broker).is_none() {
        return Err(tonic::Status::invalid_argument(
            "from_broker is not a broker of the network",
        ));
    }
    match broker.store.record_ported(&entry, now as i64).await {
        Ok(PortedOutcome::Recorded | PortedOutcome::Unchanged) => {
            remember(f, &entry);
            Ok(())
        }
        Ok(PortedOutcome::Stale) => Ok(()),
        Ok(PortedOutcome::Conflict) => {
            warn!(
                peer,
                seq = entry.seq,
                "conflicting ported-number entry refused"
            );
            Err(tonic::Status::failed_precondition(
                "another entry with this seq is held for the number",
            ))
        }
        Err(e) => {
            warn!(error = %e, "store error recording a ported-number entry");
            Err(tonic::Status::unavailable("store error; try again"))
        }
    }
}

/// Sends due announcements until shutdown: each entry this broker gained goes to every peer
/// until the peer confirms (or refuses it for good: a conflict), with the outbox's backoff
/// between attempts; a peer that was down gets it when it is back.
pub async fn run_announcer(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let Some(f) = broker.federation.as_ref() else {
        return;
    };
    let poll = Duration::from_millis(f.config.outbox_poll_ms.max(10));
    loop {
        announce_round(&broker, f).await;
        tokio::select! {
            () = f.announce_wake.notified() => {}
            () = tokio::time::sleep(poll) => {}
            () = crate::shutdown::stopped(&mut shutdown) => break,
        }
    }
}

async fn announce_round(broker: &Broker, f: &Federation) {
    let now = unix_now();
    let due = match broker
        .store
        .due_port_announcements(now as i64, ANNOUNCE_BATCH)
        .await
    {
        Ok(due) => due,
        Err(e) => {
            warn!(error = %e, "reading the port announcements failed; will retry");
            return;
        }
    };
    for (number, peer, attempts) in due {
        let entry = match broker.store.ported_entry(&number).await {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "reading a ported-number entry failed");
                continue;
            }
        };
        let Some(link) = f.link(&peer) else {
            // The peer left the network file: nobody to tell.
            let _ = broker
                .store
                .complete_port_announcement(&number, &peer, entry.seq)
                .await;
            continue;
        };
        let mut client = link.client();
        let call = tokio::time::timeout(f.request_timeout(), client.ported(to_proto(&entry)));
        let result = match call.await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded("ported timed out")),
        };
        let settled = match link.record(result) {
            Ok(_) => true,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                warn!(
                    peer,
                    seq = entry.seq,
                    "peer holds a conflicting entry; not retried"
                );
                true
            }
            Err(status) => {
                debug!(peer, error = %super::peers::describe(&status), "announcement failed; rescheduled");
                false
            }
        };
        let stored = if settled {
            broker
                .store
                .complete_port_announcement(&number, &peer, entry.seq)
                .await
        } else {
            let delay = backoff(
                f.config.retry_initial_secs,
                f.config.retry_max_secs,
                attempts,
            );
            broker
                .store
                .retry_port_announcement(&number, &peer, now as i64 + delay as i64)
                .await
        };
        if let Err(e) = stored {
            warn!(error = %e, "updating a port announcement failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use micromsg_crypto::identity::IdentityKey;
    use micromsg_store::PortedEntry;
    use micromsg_wire::{Number, port_statement};
    use rand_core::OsRng;

    use super::{EntryError, sign_entry, to_proto, verify_announced};

    /// An entry moving 5551234567 from x to y, signed by the user and by y.
    fn signed(user: &IdentityKey, y: &IdentityKey) -> PortedEntry {
        let time = 1_700_000_000;
        let mut entry = PortedEntry {
            number: Number::new("5551234567").unwrap(),
            seq: 1,
            from_broker: "x".into(),
            to_broker: "y".into(),
            time,
            identity_key: *user.public_key().as_bytes(),
            user_signature: user.sign(&port_statement("5551234567", "x", "y", time)),
            broker_key: Vec::new(),
            broker_signature: Vec::new(),
        };
        sign_entry(y, &mut entry);
        entry
    }

    #[test]
    fn a_genuine_entry_from_its_gaining_broker_verifies() {
        let (user, y) = (
            IdentityKey::generate(&mut OsRng),
            IdentityKey::generate(&mut OsRng),
        );
        let entry = signed(&user, &y);
        assert_eq!(verify_announced("y", to_proto(&entry)).unwrap(), entry);
    }

    #[test]
    fn only_the_gaining_broker_may_announce() {
        let (user, y) = (
            IdentityKey::generate(&mut OsRng),
            IdentityKey::generate(&mut OsRng),
        );
        let entry = to_proto(&signed(&user, &y));
        assert_eq!(
            verify_announced("x", entry.clone()),
            Err(EntryError::WrongAnnouncer)
        );
        assert_eq!(
            verify_announced("z", entry),
            Err(EntryError::WrongAnnouncer)
        );
    }

    #[test]
    fn every_signed_field_is_covered() {
        let (user, y) = (
            IdentityKey::generate(&mut OsRng),
            IdentityKey::generate(&mut OsRng),
        );
        let entry = to_proto(&signed(&user, &y));
        // The user's statement covers number, from, to and time.
        let mut e = entry.clone();
        e.number = "5551234568".into();
        assert_eq!(verify_announced("y", e), Err(EntryError::UserSignature));
        let mut e = entry.clone();
        e.from_broker = "z".into();
        assert_eq!(verify_announced("y", e), Err(EntryError::UserSignature));
        let mut e = entry.clone();
        e.time += 1;
        assert_eq!(verify_announced("y", e), Err(EntryError::UserSignature));
        // The broker's signature covers the seq (a replayed entry cannot claim to be newer).
        let mut e = entry.clone();
        e.seq = 2;
        assert_eq!(verify_announced("y", e), Err(EntryError::BrokerSignature));
        // Another broker key signing the same entry is checked against its own signature:
        // a signature by y with a key swapped in fails.
        let mut e = entry.clone();
        e.broker_key = IdentityKey::generate(&mut OsRng)
            .public_key()
            .as_bytes()
            .to_vec();
        assert_eq!(verify_announced("y", e), Err(EntryError::BrokerSignature));
    }

    #[test]
    fn malformed_entries_are_refused_before_any_signature_check() {
        let (user, y) = (
            IdentityKey::generate(&mut OsRng),
            IdentityKey::generate(&mut OsRng),
        );
        let entry = to_proto(&signed(&user, &y));
        let mut e = entry.clone();
        e.user_signature.pop();
        assert!(matches!(
            verify_announced("y", e),
            Err(EntryError::Malformed(_))
        ));
        let mut e = entry.clone();
        e.broker_key.clear();
        assert!(matches!(
            verify_announced("y", e),
            Err(EntryError::Malformed(_))
        ));
        let mut e = entry.clone();
        e.seq = 0;
        assert!(matches!(
            verify_announced("y", e),
            Err(EntryError::Malformed(_))
        ));
        let mut e = entry;
        e.number = "12ab".into();
        assert!(matches!(
            verify_announced("y", e),
            Err(EntryError::Malformed(_))
        ));
    }
}
