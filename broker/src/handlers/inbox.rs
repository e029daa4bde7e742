//! Offline messages: DEPOSIT (to a contact, here or through the federation outbox),
//! SYNC-COPY (to the entity's other devices), INBOX-FETCH and INBOX-ACK.
//!
//! A deposit is answered only once every copy is committed (through the group commit,
//! [`micromsg_store::DepositBatcher`]): the acknowledgement means durably stored.

use micromsg_store::{
    DepositBatcher, DepositOutcome, NewInboxItem, OutboxBatcher, RoutedDeposit, RoutedOutcome,
    Store, StoreError,
};
use micromsg_wire::message::event::InboxNotice;
use micromsg_wire::message::request::{DepositArgs, InboxAckArgs, InboxFetchArgs, SyncCopyArgs};
use micromsg_wire::message::response::{
    DepositData, InboxAckData, InboxFetchData, InboxMessage, SyncCopyData,
};
use micromsg_wire::{Blob, DeviceId, ErrorCode, Event, Hex16, Number, ResponseData};

use super::{Handled, Login, Refusal, check_size};
use crate::broker::Broker;
use crate::clock::Now;
use crate::config::{InboxConfig, InboxMode};
use crate::federation::Federation;
use crate::federation::outbox::PeerDeposit;
use crate::limits::DiscardedDeposits;
use crate::online::{Online, Push};

/// What the inbox handlers use.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// Inbox mode, message size, lifetime and quota.
    pub inbox: &'a InboxConfig,
    /// `limits.max_frame_len`: an INBOX-FETCH page fits in one frame.
    pub max_frame_len: u32,
    /// Inboxes and devices.
    pub store: &'a Store,
    /// Who hears of a new message.
    pub online: &'a Online,
    /// Group commit of deposits.
    pub deposits: &'a DepositBatcher,
    /// Group commit into the federation outbox.
    pub outbox: &'a OutboxBatcher,
    /// Where a number outside this broker's share lives; `None` for a standalone broker.
    pub federation: Option<&'a Federation>,
    /// The answers given to discarded deposits, for their repeats.
    pub discarded: &'a DiscardedDeposits,
}

impl<'a> Cx<'a> {
    /// The inbox handlers' part of the broker.
    pub fn of(broker: &'a Broker) -> Self {
        Self {
            inbox: &broker.config.inbox,
            max_frame_len: broker.config.limits.max_frame_len,
            store: &broker.store,
            online: &broker.online,
            deposits: &broker.batchers.deposits,
            outbox: &broker.batchers.outbox,
            federation: broker.federation.as_deref(),
            discarded: &broker.limiters.discarded,
        }
    }
}

/// Room left in a response frame for YAML around the inbox messages.
const FETCH_FRAME_SLACK: usize = 2048;
/// Messages per INBOX-FETCH answer at most (the YAML event budget fits about 290).
const FETCH_MAX_MESSAGES: usize = 250;

/// The devices a message to `number` is stored for: every active device in entity mode,
/// one shared inbox (`None`) in number mode.
async fn recipients(
    cx: Cx<'_>,
    number: &Number,
    except: Option<DeviceId>,
) -> Result<Vec<Option<DeviceId>>, Refusal> {
    Ok(match cx.inbox.mode {
        InboxMode::Number => vec![None],
        InboxMode::Entity => cx
            .store
            .list_devices(number)
            .await?
            .into_iter()
            .filter(|d| d.revoked_at.is_none() && Some(d.device_id) != except)
            .map(|d| Some(d.device_id))
            .collect(),
    })
}

/// CONFLICT for an ID already used in the recipient's inbox by another message: final, a retry
/// with this ID never succeeds (protocol.md 6.20).
fn id_conflict() -> Refusal {
    Refusal::new(
        ErrorCode::Conflict,
        "this ID is already used in the recipient's inbox by another message (another sender \
         or another BODY); send the message again with a new random ID",
    )
}

/// NOT-FOUND for a DEPOSIT without a contact pair.
fn no_contact() -> Refusal {
    Refusal::new(
        ErrorCode::NotFound,
        "no contact pair with TARGET; set one up with INITIATE-NEW first",
    )
}

/// The copies' outcomes of one message, folded into its answer: the expiry to answer with
/// (`fresh` for a new message; a repeat's stored expiry, the earliest should copies differ:
/// 6.20), after telling the recipient's connections of a new message.
fn answer_copies(
    cx: Cx<'_>,
    recipient: &Number,
    outcomes: impl IntoIterator<Item = Result<DepositOutcome, StoreError>>,
    fresh: u64,
) -> Result<u64, Refusal> {
    let (mut quota, mut added, mut repeated) = (false, false, None::<u64>);
    for outcome in outcomes {
        match outcome {
            Ok(DepositOutcome::Stored) => added = true,
            Ok(DepositOutcome::AlreadyStored { expires_at }) => {
                let stored = expires_at.max(0) as u64;
                repeated = Some(repeated.map_or(stored, |e| e.min(stored)));
            }
            Ok(DepositOutcome::Discarded) => {}
            Err(StoreError::QuotaExceeded) => quota = true,
            // Final: a retry with this ID can never succeed (protocol.md 6.20).
            Err(StoreError::DuplicateId) => return Err(id_conflict()),
            Err(e) => return Err(e.into()),
        }
    }
    if quota {
        return Err(Refusal::new(
            ErrorCode::QuotaExceeded,
            "the recipient's inbox is full; nothing already stored was touched, try later",
        ));
    }
    // One new message (protocol 7.5: COUNT is an increment); a repeat added nothing, so it
    // tells nobody (7.5, 6.20).
    if added {
        cx.online.push_all(recipient.as_str(), None, || {
            Push::event(Event::Inbox(InboxNotice { count: 1 }))
        });
    }
    // A retry answers what the first attempt answered: the message expires when the stored
    // copy does.
    Ok(repeated.unwrap_or(fresh))
}

/// Stores one message for each of `devices` through the group commit (for SYNC-COPY, whose
/// devices are the sender's own); answers once every copy is committed (see
/// [`answer_copies`]).
async fn store_copies(
    cx: Cx<'_>,
    login: &Login,
    devices: Vec<Option<DeviceId>>,
    id: [u8; 16],
    body: Vec<u8>,
    now: Now,
) -> Result<u64, Refusal> {
    let expires = now.unix + cx.inbox.ttl_secs;
    let items = devices
        .into_iter()
        .map(|device| NewInboxItem {
            id,
            recipient_number: login.number().clone(),
            recipient_device: device,
            sender_number: login.number().clone(),
            sender_device: login.device,
            created_at: now.unix_i64(),
            expires_at: expires as i64,
            body: body.clone(),
        })
        .collect();
    // All submitted before any is waited for, so the copies share a batch (no task each).
    let outcomes = cx.deposits.deposit_all(items).await;
    answer_copies(cx, login.number(), outcomes, expires)
}

/// DEPOSIT: a message for a contact that is offline (or for its other devices).
pub async fn deposit(cx: Cx<'_>, login: &Login, args: DepositArgs, now: Now) -> Handled {
    check_size(cx.inbox.max_message_bytes, "BODY", args.body.len())?;
    let target = &args.target;
    let expires = now.unix + cx.inbox.ttl_secs;
    if let Some(f) = cx.federation
        && let crate::federation::Home::Peer(peer) = f.home_of(target.as_str())
    {
        // The target's home broker applies its block list; here the message goes into the
        // durable outbox if the two are a contact pair (read in the outbox batch's own
        // transaction), and the ack means "durably accepted by the home broker".
        let queued = crate::federation::outbox::enqueue_deposit(
            cx.outbox,
            f,
            PeerDeposit {
                sender: login.number().clone(),
                sender_device: login.device.get(),
                recipient: target.clone(),
                peer: peer.id.clone(),
                message_id: *args.id.as_bytes(),
                created_at: now.unix,
                expires_at: expires,
                body: args.body.into_vec(),
            },
        )
        .await;
        match queued {
            Err(StoreError::NotFound) => return Err(no_contact()),
            other => other?,
        }
        return Ok(ResponseData::Deposit(DepositData {
            id: args.id,
            expires,
        }));
    }
    // The route (contact pair, block, the target's devices) is read in the transaction that
    // stores the copies: one statement more in the batch, none of its own.
    let body = args.body.into_vec();
    let outcome = cx
        .deposits
        .deposit_routed(RoutedDeposit {
            item: NewInboxItem {
                id: *args.id.as_bytes(),
                recipient_number: target.clone(),
                recipient_device: None,
                sender_number: login.number().clone(),
                sender_device: login.device,
                created_at: now.unix_i64(),
                expires_at: expires as i64,
                body: body.clone(),
            },
            shared_inbox: cx.inbox.mode == InboxMode::Number,
        })
        .await?;
    let expires = match outcome {
        RoutedOutcome::NoContact => return Err(no_contact()),
        RoutedOutcome::Kept(copies) => answer_copies(cx, target, copies, expires)?,
        // Blocked: acknowledged and discarded, through the same group commit and the same
        // writes as a kept deposit, so that neither the answer nor its timing tells the
        // sender (protocol.md 14). A repeat answers as a kept deposit's repeat would: the
        // first EXPIRES, or CONFLICT for another body under the same ID.
        RoutedOutcome::Discarded => cx
            .discarded
            .answer(
                login.number().as_str(),
                target.as_str(),
                *args.id.as_bytes(),
                &body,
                expires,
                now.unix,
            )
            .map_err(|_| id_conflict())?,
    };
    Ok(ResponseData::Deposit(DepositData {
        id: args.id,
        expires,
    }))
}

/// SYNC-COPY: a copy of what this device sent or received, for the entity's other devices.
pub async fn sync_copy(cx: Cx<'_>, login: &Login, args: SyncCopyArgs, now: Now) -> Handled {
    check_size(cx.inbox.max_message_bytes, "BODY", args.body.len())?;
    let devices = recipients(cx, login.number(), Some(login.device)).await?;
    if !devices.is_empty() {
        store_copies(
            cx,
            login,
            devices,
            *args.id.as_bytes(),
            args.body.into_vec(),
            now,
        )
        .await?;
    }
    Ok(ResponseData::SyncCopy(SyncCopyData { id: args.id }))
}

/// INBOX-FETCH: a page of the device's inbox, within the frame limit.
pub async fn fetch(cx: Cx<'_>, login: &Login, args: InboxFetchArgs, now: Now) -> Handled {
    let limit = args.limit_or_default().min(FETCH_MAX_MESSAGES as u32);
    let after = args.after.map(|a| *a.as_bytes());
    let (items, mut more) = cx
        .store
        .fetch_inbox(login.number(), login.device, after, limit, now.unix_i64())
        .await?;
    let budget = (cx.max_frame_len as usize).saturating_sub(FETCH_FRAME_SLACK);
    let mut used = 0;
    let mut messages = Vec::with_capacity(items.len());
    for item in items {
        // base64 grows 4/3; the per-message YAML keys take about 200 bytes.
        let size = item.body.len().div_ceil(3) * 4 + 200;
        if used + size > budget && !messages.is_empty() {
            more = true;
            break;
        }
        used += size;
        messages.push(InboxMessage {
            id: Hex16::from_bytes(item.id),
            from: item.sender_number,
            from_device: item.sender_device,
            time: item.created_at.max(0) as u64,
            expires: item.expires_at.max(0) as u64,
            body: Blob::new(item.body),
        });
    }
    Ok(ResponseData::InboxFetch(InboxFetchData { messages, more }))
}

/// INBOX-ACK: the device has stored these items; they leave its inbox.
pub async fn ack(cx: Cx<'_>, login: &Login, args: InboxAckArgs, now: Now) -> Handled {
    let ids: Vec<[u8; 16]> = args.ids.iter().map(|i| *i.as_bytes()).collect();
    let removed = cx
        .store
        .ack_inbox(login.number(), login.device, &ids, now.unix_i64())
        .await?;
    Ok(ResponseData::InboxAck(InboxAckData { removed }))
}
