//! Cross-broker offline delivery.
//!
//! **Sending** ([`enqueue_deposit`], [`run_outbox`]). A DEPOSIT whose target is homed at a peer
//! is written to the durable `outbox` table (with the encoded [`Delivery`] as payload) if the
//! sender and the target are a contact pair, read in the same transaction, and acknowledged to
//! the client once that write committed, and handed to the outbox worker in
//! memory ([`super::handoff`]; the worker reads the table only for what it was not handed,
//! for retries and after a restart). The worker groups items per peer into `Deliver` batches (bounded in count and bytes, a bounded number in
//! flight per peer), and removes what
//! the peer confirmed; a failed call or a RETRY answer reschedules the item with exponential
//! backoff (`retry_initial_secs` doubling up to `retry_max_secs`, plus up to a quarter of
//! jitter). Items older than the message lifetime are dropped (they would have expired in the
//! inbox). The outbox survives restarts of either broker: nothing is lost.
//!
//! **Idempotency.** The outbox key is `SHA-256("micromsg/outbox/v1" || sender || 0 ||
//! recipient || 0 || message id)[0..16]`, so a client's retried DEPOSIT does not queue twice;
//! the receiver stores under the inbox's own key (recipient, device, message id, same sender),
//! so a batch re-sent after a lost answer changes nothing: nothing twice.
//!
//! **Receiving** ([`receive`]). The whole batch is stored in one transaction (group commit)
//! and answered only after the commit. Per item the answer is DONE or RETRY only: a block, a
//! missing contact pair or an unknown recipient are DONE as well, so the sending broker cannot
//! learn them (as a blocked DEPOSIT on one broker is acknowledged and discarded).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use micromsg_wire::message::event::InboxNotice;
use micromsg_wire::{DeviceId, Event, Number};
use prost::Message as _;
use rand_core::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use super::handoff::{Limits, Offered, Queue};
use super::proto::{DeliverRequest, Delivery, DeliveryResult, DeliveryStatus};
use super::{Counters, Federation, Home};
use crate::broker::Broker;
use crate::clock::unix_now;
use crate::config::InboxMode;
use crate::online::Push;
use micromsg_store::{
    DepositOutcome, NewInboxItem, OutboxBatcher, OutboxEntry, OutboxItem, ReceivedDelivery,
    StoreError,
};

/// The outbox key of a message (see the module docs).
pub fn idempotency_key(sender: &str, recipient: &str, message_id: &[u8; 16]) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(b"micromsg/outbox/v1")
        .chain_update(sender.as_bytes())
        .chain_update([0])
        .chain_update(recipient.as_bytes())
        .chain_update([0])
        .chain_update(message_id)
        .finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// A deposit for a peer's number, as the DEPOSIT handler hands it over.
#[derive(Debug, Clone)]
pub struct PeerDeposit {
    /// The depositing entity.
    pub sender: Number,
    /// Its device.
    pub sender_device: u32,
    /// The recipient (homed at `peer`); it must be a contact of `sender`.
    pub recipient: Number,
    /// The peer broker's id.
    pub peer: String,
    /// The client's message id.
    pub message_id: [u8; 16],
    /// Deposit time.
    pub created_at: u64,
    /// Expiry.
    pub expires_at: u64,
    /// Opaque ciphertext.
    pub body: Vec<u8>,
}

/// Writes a deposit for a peer into the outbox (committed when this returns) and wakes the
/// worker. A repeat of the same message is a no-op. [`StoreError::NotFound`] when the sender
/// and the recipient are not a contact pair at commit (nothing is queued).
pub async fn enqueue_deposit(
    outbox: &OutboxBatcher,
    federation: &Federation,
    deposit: PeerDeposit,
) -> Result<(), StoreError> {
    let key = idempotency_key(
        deposit.sender.as_str(),
        deposit.recipient.as_str(),
        &deposit.message_id,
    );
    let payload = Delivery {
        idempotency_key: key.to_vec(),
        message_id: deposit.message_id.to_vec(),
        sender: deposit.sender.as_str().to_owned(),
        sender_device: deposit.sender_device,
        recipient: deposit.recipient.as_str().to_owned(),
        created_at: deposit.created_at,
        expires_at: deposit.expires_at,
        body: deposit.body,
        moved: false,
    }
    .encode_to_vec();
    let now = deposit.created_at as i64;
    let item = OutboxItem {
        idempotency_key: key,
        peer_broker: deposit.peer.clone(),
        payload: payload.clone(),
        attempts: 0,
        next_attempt_at: now,
        created_at: now,
    };
    let fresh = outbox
        .enqueue(OutboxEntry {
            idempotency_key: key,
            peer_broker: deposit.peer,
            payload,
            now,
            contact: Some((deposit.sender, deposit.recipient)),
        })
        .await;
    match fresh {
        // Committed: the worker gets the row in memory (or, its channel full, from the table).
        Ok(true) => federation
            .outbox_handoff
            .give(item, &federation.outbox_wake),
        // Queued before (a client's retry): the first one was handed over.
        Ok(false) => {}
        // Not a contact pair: nothing was queued.
        Err(StoreError::NotFound) => {}
        // The batch may have committed all the same (a timeout): let the worker look.
        Err(_) => federation.outbox_wake.notify_one(),
    }
    fresh.map(|_| ())
}

/// The delay before attempt `attempts + 1`: initial · 2^attempts, capped, plus jitter.
pub fn backoff(initial: u64, max: u64, attempts: i64) -> u64 {
    backoff_with(initial, max, attempts, rand_core::OsRng.next_u64())
}

/// [`backoff`] with the random draw for the jitter given, so that the delay sequence, its cap
/// and the jitter's bounds can be tested without the randomness: the base delay plus
/// `draw % (base / 4 + 1)`, i.e. up to a quarter more.
fn backoff_with(initial: u64, max: u64, attempts: i64, draw: u64) -> u64 {
    let exp = u32::try_from(attempts.clamp(0, 32)).unwrap_or(32);
    let base = initial.saturating_mul(1u64 << exp.min(40)).min(max).max(1);
    let jitter = draw % (base / 4 + 1);
    base + jitter
}

/// The outbox worker: runs until shutdown (items in flight then are simply retried after the
/// next start: the peer stores idempotently).
///
/// Rows come in memory from [`enqueue_deposit`] ([`super::handoff`]) and from the table: at
/// start-up, when woken (a row it was not handed), when a retry falls due, and every
/// `outbox_poll_ms`. A read looks past the rows it already holds, so nothing waiting or in
/// flight is sent twice.
pub async fn run_outbox(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let Some(federation) = broker.federation.as_ref() else {
        return;
    };
    let Some(mut handed) = federation.outbox_handoff.take_receiver() else {
        warn!("a second outbox worker; not started");
        return;
    };
    let cfg = &federation.config;
    let poll = Duration::from_millis(cfg.outbox_poll_ms.max(10));
    let limits = Limits {
        batch: cfg.outbox_batch.max(1),
        batch_bytes: cfg.outbox_batch_bytes,
        in_flight: cfg.outbox_batches_in_flight.max(1),
        waiting: super::handoff_waiting(cfg),
    };
    // Room for a read beyond the rows held: a full queue for every peer.
    let room = limits.waiting * federation.links.len().max(1);
    let mut queue = Queue::new(limits);
    let mut tasks: JoinSet<Settled> = JoinSet::new();
    // Start with a read: rows of before a restart, and rows nobody handed over.
    let mut read_table = true;
    // Rows were left in the table for lack of room: read again once a batch settles.
    let mut behind = false;
    let mut next_poll = tokio::time::Instant::now() + poll;
    // When the next rescheduled row falls due (Unix seconds): from the batches that failed, and
    // from the table after each read (rows rescheduled before a restart).
    let mut next_due: Option<i64> = None;
    loop {
        let now = unix_now() as i64;
        if next_due.is_some_and(|at| at <= now) {
            // The read below looks up the next one.
            next_due = None;
            read_table = true;
        }
        // A read waits while the queue is more than half full (say the channel overflowed and
        // every DEPOSIT since woke the worker): it would find nothing to take.
        if read_table && queue.waiting() <= room / 2 {
            read_table = false;
            next_poll = tokio::time::Instant::now() + poll;
            let limit = u32::try_from(queue.known() + room).unwrap_or(u32::MAX);
            match broker.store.due_outbox(now, limit).await {
                Ok(items) => {
                    let full_page = items.len() as u64 >= u64::from(limit);
                    let mut left = false;
                    for item in items {
                        left |= queue.offer(item) == Offered::Full;
                    }
                    behind = left || full_page;
                }
                Err(e) => warn!(error = %e, "reading the outbox failed; will retry"),
            }
            match broker.store.next_outbox_attempt(now).await {
                Ok(Some(at)) => next_due = Some(next_due.map_or(at, |n| n.min(at))),
                Ok(None) => {}
                // Looked up again at the next read (the poll at the latest).
                Err(e) => warn!(error = %e, "reading the outbox failed; will retry"),
            }
        }
        while let Some((peer, batch)) = queue.next_batch() {
            let broker = Arc::clone(&broker);
            let span = info_span!("federation.deliver", peer = %peer, items = batch.len());
            tasks.spawn(
                async move {
                    let keys: Vec<[u8; 16]> = batch.iter().map(|i| i.idempotency_key).collect();
                    let retry_at = deliver_batch(&broker, &peer, batch).await;
                    Settled {
                        peer,
                        keys,
                        retry_at,
                    }
                }
                .instrument(span),
            );
        }
        let retry_sleep = next_due.map(|next| {
            tokio::time::Instant::now()
                + Duration::from_secs(u64::try_from(next - unix_now() as i64).unwrap_or(0))
        });
        // Take handed rows only while there is room; beyond it they wait in the channel (and,
        // the channel full, in the table).
        let open = queue.waiting() < room;
        tokio::select! {
            item = handed.recv(), if open => {
                let Some(item) = item else { break };
                behind |= queue.offer(item) == Offered::Full;
                // Whatever else is in the channel joins the same round.
                while queue.waiting() < room {
                    let Ok(item) = handed.try_recv() else { break };
                    behind |= queue.offer(item) == Offered::Full;
                }
            }
            Some(done) = tasks.join_next() => {
                if let Ok(settled) = done {
                    queue.settle(&settled.peer, &settled.keys);
                    if let Some(at) = settled.retry_at {
                        next_due = Some(next_due.map_or(at, |n| n.min(at)));
                    }
                }
                read_table |= behind;
            }
            () = federation.outbox_wake.notified() => read_table = true,
            () = tokio::time::sleep_until(next_poll) => read_table = true,
            () = sleep_until_opt(retry_sleep) => {}
            () = crate::shutdown::stopped(&mut shutdown) => break,
        }
    }
    // Calls in flight finish (or time out) so their outcome is recorded; anything unsettled is
    // simply due again after the next start.
    let wait = federation.request_timeout() + Duration::from_secs(1);
    if tokio::time::timeout(wait, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tasks.shutdown().await;
    }
}

/// What a delivery task reports back to the worker.
struct Settled {
    peer: String,
    keys: Vec<[u8; 16]>,
    /// The earliest time a row of the batch was rescheduled to.
    retry_at: Option<i64>,
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends one batch and settles every item: removed when the peer is done with it,
/// rescheduled otherwise. Returns the earliest time a row was rescheduled to.
async fn deliver_batch(broker: &Broker, peer: &str, batch: Vec<OutboxItem>) -> Option<i64> {
    let federation = broker.federation.as_ref()?;
    let cfg = &federation.config;
    let now = unix_now();
    let mut done: Vec<[u8; 16]> = Vec::new();
    let mut retry: Vec<&OutboxItem> = Vec::new();
    let mut request = DeliverRequest { items: Vec::new() };
    let mut sent: Vec<&OutboxItem> = Vec::new();
    for item in &batch {
        match Delivery::decode(item.payload.as_slice()) {
            Ok(d) if d.expires_at <= now => {
                Counters::bump(&federation.counters.delivery_expired);
                done.push(item.idempotency_key);
            }
            Ok(d) => {
                request.items.push(d);
                sent.push(item);
            }
            Err(_) => {
                warn!("undecodable outbox item dropped");
                done.push(item.idempotency_key);
            }
        }
    }
    if !request.items.is_empty() {
        match federation.link(peer) {
            None => {
                // The peer left the network file: nobody can take these any more.
                warn!(
                    peer,
                    items = sent.len(),
                    "outbox items for a broker not in the network; dropped"
                );
                done.extend(sent.iter().map(|i| i.idempotency_key));
            }
            Some(link) => {
                let mut client = link.client();
                let call =
                    tokio::time::timeout(federation.request_timeout(), client.deliver(request));
                let result = match call.await {
                    Ok(r) => r.map(tonic::Response::into_inner),
                    Err(_) => Err(tonic::Status::deadline_exceeded("deliver timed out")),
                };
                match link.record(result) {
                    Ok(answer) => {
                        let statuses: HashMap<Vec<u8>, i32> = answer
                            .results
                            .into_iter()
                            .map(|r| (r.idempotency_key, r.status))
                            .collect();
                        for item in sent {
                            match statuses
                                .get(item.idempotency_key.as_slice())
                                .and_then(|s| DeliveryStatus::try_from(*s).ok())
                            {
                                Some(DeliveryStatus::Done) => {
                                    Counters::bump(&federation.counters.delivered);
                                    done.push(item.idempotency_key);
                                }
                                _ => retry.push(item),
                            }
                        }
                    }
                    Err(status) => {
                        debug!(peer, error = %super::peers::describe(&status), "deliver failed; rescheduled");
                        retry.extend(sent);
                    }
                }
            }
        }
    }
    if !done.is_empty()
        && let Err(e) = broker.store.complete_outbox_many(&done).await
    {
        // They stay due and go again; the peer de-duplicates.
        warn!(error = %e, "removing delivered outbox items failed");
    }
    let mut due: Option<i64> = None;
    for item in retry {
        Counters::bump(&federation.counters.delivery_retries);
        let delay = backoff(cfg.retry_initial_secs, cfg.retry_max_secs, item.attempts);
        let at = now as i64 + delay as i64;
        // Due again at `at` either way (not rescheduled: due at once).
        due = Some(due.map_or(at, |d| d.min(at)));
        if let Err(e) = broker.store.retry_outbox(&item.idempotency_key, at).await {
            warn!(error = %e, "rescheduling an outbox item failed");
        }
    }
    due
}

/// A delivery of a `Deliver` batch that passed the peer's rules, waiting for the store's
/// answer about its (recipient, sender) pair.
struct Accepted {
    /// Its index in the answer.
    index: usize,
    /// Its pair's index in the batch's lookup.
    route: usize,
    key: [u8; 16],
    id: [u8; 16],
    sender_device: DeviceId,
    delivery: Delivery,
}

/// The receiving end of `Deliver`: checks the batch's routes in one statement, stores it
/// through the deposit batcher (each delivery whole, exactly once by its key) and answers per
/// item.
pub async fn receive(
    broker: &Broker,
    peer: &str,
    request: DeliverRequest,
) -> Result<Vec<DeliveryResult>, tonic::Status> {
    let Some(federation) = broker.federation.as_ref() else {
        return Err(tonic::Status::failed_precondition("not networked"));
    };
    let now = unix_now();
    let ttl = broker.config.inbox.ttl_secs;
    let max_body = broker.config.inbox.max_message_bytes as usize;
    let store = &broker.store;
    let mut results: Vec<DeliveryResult> = Vec::with_capacity(request.items.len());
    // Deliveries with copies to store, and for each its index in `results`, its recipient and
    // its message id (for the INBOX notice).
    let mut received: Vec<ReceivedDelivery> = Vec::new();
    let mut answering: Vec<(usize, Number, [u8; 16])> = Vec::new();
    // The distinct (recipient, sender) pairs of the batch, and the deliveries that passed the
    // rules and wait for their pair's lookup.
    let mut pairs: Vec<(Number, Number)> = Vec::new();
    let mut pair_index: HashMap<(Number, Number), usize> = HashMap::new();
    let mut accepted: Vec<Accepted> = Vec::new();
    // Deliveries for numbers ported away from here, to pass on: (index in `results`, row).
    let mut forward: Vec<(usize, OutboxEntry)> = Vec::new();
    for d in request.items {
        let index = results.len();
        results.push(DeliveryResult {
            idempotency_key: d.idempotency_key.clone(),
            status: DeliveryStatus::Done as i32,
        });
        let (Ok(id), Ok(key), Ok(sender), Ok(recipient), Ok(sender_device)) = (
            <[u8; 16]>::try_from(d.message_id.as_slice()),
            <[u8; 16]>::try_from(d.idempotency_key.as_slice()),
            Number::new(d.sender.clone()),
            Number::new(d.recipient.clone()),
            DeviceId::new(d.sender_device),
        ) else {
            debug!("malformed delivery discarded");
            continue;
        };
        // A peer may only deliver for its own numbers (or numbers ported away from it, whose
        // deposits it still holds), to this broker's numbers; a message that was waiting at
        // the peer for a number ported from it to here may come from anyone.
        let recipient_route = federation.route(recipient.as_str());
        let moved_here = d.moved
            && recipient_route
                .as_ref()
                .is_some_and(|r| r.from == peer && r.to == federation.me.id);
        let sender_ok = moved_here
            || matches!(federation.home_of(sender.as_str()), Home::Peer(p) if p.id == peer)
            || federation
                .route(sender.as_str())
                .is_some_and(|r| r.from == peer);
        if d.moved && !moved_here && d.expires_at > now {
            // The losing broker sends what waited there as soon as it agreed, possibly before
            // this broker has recorded the port: keep it coming until it has.
            results[index].status = DeliveryStatus::Retry as i32;
            continue;
        }
        if !sender_ok || d.body.len() > max_body || d.expires_at <= now {
            debug!("delivery outside the rules discarded");
            continue;
        }
        match federation.home_of(recipient.as_str()) {
            Home::Own => {}
            // Ported away from here (the sender's broker has not learnt it yet): the message
            // goes on to the number's new home through this broker's outbox.
            Home::Peer(home) if recipient_route.is_some() && home.id != peer => {
                let mut onward = d.clone();
                onward.moved = true;
                forward.push((
                    index,
                    OutboxEntry {
                        idempotency_key: key,
                        peer_broker: home.id.clone(),
                        payload: onward.encode_to_vec(),
                        now: now as i64,
                        contact: None,
                    },
                ));
                continue;
            }
            _ => {
                debug!("delivery outside the rules discarded");
                continue;
            }
        }
        // Checked below, all pairs of the batch in one statement.
        let pair = (recipient, sender);
        let next = pairs.len();
        let route = *pair_index.entry(pair.clone()).or_insert_with(|| {
            pairs.push(pair);
            next
        });
        accepted.push(Accepted {
            index,
            route,
            key,
            id,
            sender_device,
            delivery: d,
        });
    }
    // A batch usually holds many messages of few conversations: each pair is looked up once.
    let routes = match pairs.is_empty() {
        true => Vec::new(),
        false => match store.delivery_routes(&pairs).await {
            Ok(routes) => routes,
            Err(e) => {
                warn!(error = %e, "store error checking a delivery batch");
                for a in &accepted {
                    results[a.index].status = DeliveryStatus::Retry as i32;
                }
                accepted.clear();
                Vec::new()
            }
        },
    };
    for a in accepted {
        let (Some(route), Some((recipient, sender))) = (routes.get(a.route), pairs.get(a.route))
        else {
            results[a.index].status = DeliveryStatus::Retry as i32;
            continue;
        };
        if !route.exists || !route.contact || route.blocked {
            continue;
        }
        let devices: Vec<Option<DeviceId>> = match broker.config.inbox.mode {
            InboxMode::Number => vec![None],
            InboxMode::Entity => route.devices.iter().copied().map(Some).collect(),
        };
        if devices.is_empty() {
            // No active device to hold it: nothing to store (and nothing to deliver later).
            continue;
        }
        let d = a.delivery;
        let expires = d.expires_at.min(now + ttl);
        answering.push((a.index, recipient.clone(), a.id));
        received.push(ReceivedDelivery {
            key: a.key,
            // Kept as long as the sender may still re-send it (its own expiry).
            keep_until: d.expires_at as i64,
            copies: devices
                .into_iter()
                .map(|device| NewInboxItem {
                    id: a.id,
                    recipient_number: recipient.clone(),
                    recipient_device: device,
                    sender_number: sender.clone(),
                    sender_device: a.sender_device,
                    created_at: d.created_at.min(now) as i64,
                    expires_at: expires as i64,
                    body: d.body.clone(),
                })
                .collect(),
        });
    }
    if !forward.is_empty() {
        let rows: Vec<OutboxEntry> = forward.iter().map(|(_, e)| e.clone()).collect();
        match store.enqueue_outbox_batch(&rows).await {
            Ok(outcomes) => {
                for ((index, _), outcome) in forward.iter().zip(outcomes) {
                    if outcome.is_err() {
                        results[*index].status = DeliveryStatus::Retry as i32;
                    }
                }
                federation.outbox_wake.notify_one();
            }
            Err(e) => {
                warn!(error = %e, "queueing deliveries for a ported number failed; retry");
                for (index, _) in &forward {
                    results[*index].status = DeliveryStatus::Retry as i32;
                }
            }
        }
    }
    if received.is_empty() {
        return Ok(results);
    }
    // Through the deposit batcher: the deliveries share commits (and, on Postgres, the
    // batches in flight) with this broker's own deposits and with other Deliver calls, instead
    // of a transaction of their own that locks their inboxes against every other writer.
    let outcomes = match broker
        .batchers
        .deposits
        .receive(received)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, StoreError>>()
    {
        Ok(outcomes) => outcomes,
        Err(e) => {
            // A batch failed as a whole (the batcher has retried what can be): nothing of its
            // deliveries was stored. The peer sends the call again; what was stored is a
            // repeat then.
            warn!(error = %e, "storing a delivery batch failed; the peer will retry");
            return Err(tonic::Status::unavailable("store unavailable; retry"));
        }
    };
    // New messages per recipient (an item per device in ENTITY mode counts once).
    let mut notify: HashMap<Number, HashSet<[u8; 16]>> = HashMap::new();
    for (copies, (index, number, id)) in outcomes.into_iter().zip(answering) {
        let mut stored = false;
        for outcome in copies {
            match outcome {
                Ok(DepositOutcome::Stored) => stored = true,
                Ok(DepositOutcome::AlreadyStored { .. } | DepositOutcome::Discarded)
                | Err(StoreError::DuplicateId) => {}
                Err(_) => results[index].status = DeliveryStatus::Retry as i32,
            }
        }
        if stored {
            notify.entry(number).or_default().insert(id);
        }
    }
    let done = results
        .iter()
        .filter(|r| r.status == DeliveryStatus::Done as i32)
        .count();
    federation
        .counters
        .received
        .fetch_add(done as u64, std::sync::atomic::Ordering::Relaxed);
    for (number, ids) in notify {
        let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        broker.online.push_all(number.as_str(), None, || {
            Push::event(Event::Inbox(InboxNotice { count }))
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{backoff, backoff_with};

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap() {
        // Without jitter (a draw of 0): initial · 2^attempts, capped at the maximum.
        let delays: Vec<u64> = (0..9).map(|a| backoff_with(5, 300, a, 0)).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        // The test networks' timings (1 s doubling to 2 s): too short for any jitter.
        let delays: Vec<u64> = (0..4).map(|a| backoff_with(1, 2, a, u64::MAX)).collect();
        assert_eq!(delays, [1, 2, 2, 2]);
        // Far past the cap, a negative count and a zero initial delay stay in bounds.
        assert_eq!(backoff_with(5, 300, 10_000, 0), 300);
        assert_eq!(backoff_with(5, 300, -3, 0), 5);
        assert_eq!(backoff_with(0, 300, 4, 0), 1, "never zero");
    }

    #[test]
    fn backoff_jitter_adds_up_to_a_quarter() {
        for attempts in 0..8 {
            let base = backoff_with(8, 600, attempts, 0);
            let quarter = base / 4;
            assert_eq!(backoff_with(8, 600, attempts, quarter), base + quarter);
            assert_eq!(backoff_with(8, 600, attempts, quarter + 1), base);
            for draw in [1, 7, 1 << 40, u64::MAX] {
                let d = backoff_with(8, 600, attempts, draw);
                assert!((base..=base + quarter).contains(&d), "{d} for {base}");
            }
        }
        // The jitter is added to the cap too.
        assert_eq!(backoff_with(8, 600, 20, 150), 750);
        // And the random draw stays inside the same bounds.
        for _ in 0..1_000 {
            let d = backoff(8, 600, 2);
            assert!((32..=40).contains(&d), "{d}");
        }
    }
}
