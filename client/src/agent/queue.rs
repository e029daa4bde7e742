//! The agent's side of the local outbox ([`crate::outbox`]): a message for a contact without a
//! live session is sealed with the stored session, written to the outbox (durably, before the
//! command answers), and deposited from there, now if the broker takes it, later if it does
//! not: the link is down, the broker is rate limiting, the inbox is full, or it failed
//! internally. Items go out in order per contact, each with the deposit id it was given when it
//! was queued, so a retry is never a second message.

use std::collections::HashSet;
use std::time::Duration;

use micromsg_crypto::hex;
use micromsg_crypto::message::Kind;
use micromsg_wire::message::request::{DepositArgs, SyncCopyArgs};
use micromsg_wire::{Blob, ErrorCode, Hex16, Number, Request, ResponseData};

use crate::account::unix_now;
use crate::inbox::new_message_id;
use crate::link::LinkError;
use crate::outbox::{CopyFor, Queued};
use crate::store::{Direction, Entry};

use super::outbound::deposit_error;
use super::reconnect::is_connection_loss;
use super::{Agent, Notice};

/// The longest wait before a queued item is tried again (the link coming back tries at once).
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What one attempt at a queued item did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Attempt {
    /// The broker committed it; it expires then.
    Deposited { expires: u64 },
    /// Still queued: why, for people.
    Waiting { reason: String },
    /// Refused for good (kept in the outbox, marked failed).
    Failed { reason: String },
}

/// True when the broker may take the item later.
fn retryable(e: &LinkError) -> bool {
    is_connection_loss(e)
        || matches!(
            e.code(),
            Some(
                ErrorCode::RateLimited
                    | ErrorCode::QuotaExceeded
                    | ErrorCode::PeerUnavailable
                    | ErrorCode::Internal
                    | ErrorCode::ShuttingDown
                    | ErrorCode::Unavailable
            )
        )
}

/// When to try an item again after its `attempts`-th failure: the broker's Retry-After, or
/// 2^attempts seconds up to [`RETRY_MAX`]; a lost link is retried when it comes back.
fn next_attempt(e: &LinkError, attempts: u32, now: u64) -> u64 {
    if is_connection_loss(e) {
        return now;
    }
    let backoff = 1u64 << attempts.min(16);
    let wait = match e {
        LinkError::Refused {
            retry_after: Some(secs),
            ..
        } => u64::from(*secs).max(1),
        _ => backoff,
    };
    now + wait.min(RETRY_MAX.as_secs())
}

/// Removes the item whose id is `id` or starts with it (at least 4 digits, one match);
/// `list` is the command that lists the outbox, for the hints.
pub(super) fn cancel(items: &mut Vec<Queued>, id: &str, list: &str) -> Result<Queued, String> {
    let id = id.trim().to_ascii_lowercase();
    if id.len() < 4 {
        return Err(format!(
            "give at least the first 4 digits of the id (`{list}` lists them)"
        ));
    }
    let matches: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, q)| q.id.starts_with(&id))
        .map(|(i, _)| i)
        .collect();
    match matches.as_slice() {
        [one] => Ok(items.remove(*one)),
        [] => Err(format!(
            "no queued message with id {id} (it may have gone out already; `{list}` lists what \
             waits)"
        )),
        _ => Err(format!(
            "{id} matches {} queued messages; give more digits",
            matches.len()
        )),
    }
}

impl Agent {
    /// Writes the outbox file as it is in memory, off the agent's task; returns once it is on
    /// disk.
    pub(super) async fn persist_outbox(&self) -> Result<(), String> {
        let file = self.outbox_file.clone();
        let items = self.outbox.clone();
        match tokio::task::spawn_blocking(move || file.save(&items)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("writing the outbox: {e}")),
            Err(e) => Err(format!("writing the outbox: {e}")),
        }
    }

    /// Seals `payload` (of `kind`) for `peer` with the stored session and queues it durably;
    /// `text` is what the outbox shows, `group` the group of a group frame.
    pub(super) async fn queue_sealed(
        &mut self,
        peer: &str,
        kind: Kind,
        payload: &[u8],
        text: &str,
        group: Option<&str>,
    ) -> Result<String, String> {
        // The stored keys of a peer with a live session are that session's: sealing with them
        // here could reuse a counter the session uses (12.7).
        if self.sessions.contains_key(peer) {
            return Err(format!(
                "{peer} has a live session; refusing to seal an offline message with its keys"
            ));
        }
        // The newest session the peer is known to hold (12.11): a session whose handshake was
        // cut off half-way may exist on this side only.
        let mut found = match self.store.send_session(peer) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(format!(
                    "{peer} is not online, and this device has no earlier session with {peer} \
                     that {peer} is known to hold, to seal an offline message with (a device \
                     sends offline only with sessions it set up itself, once the contact has \
                     confirmed them); try again when {peer} is online"
                ));
            }
            Err(e) => return Err(format!("reading the session with {peer}: {e}")),
        };
        let now = unix_now();
        let envelope = found
            .session_mut()
            .seal_offline(now, kind, payload)
            .map_err(|e| format!("sealing for {peer}: {e}"))?;
        let stored = found.session().clone();
        let counter = stored.next_send_counter.saturating_sub(1);
        // The counter is on disk before the envelope can leave the device (12.7).
        self.on_disk(move |s| s.save_found(&found))
            .await
            .map_err(|e| format!("saving the send counter: {e}"))?;
        let id = new_message_id().to_hex();
        self.outbox.push(Queued {
            id: id.clone(),
            to: peer.to_owned(),
            text: text.to_owned(),
            queued_at: now,
            session: hex::encode(&stored.session_id),
            counter,
            envelope: hex::encode(&envelope),
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            failed: None,
            group: group.map(str::to_owned),
            moved: kind == Kind::Moved,
            unsealed: None,
            copy: None,
        });
        if let Err(e) = self.persist_outbox().await {
            self.outbox.retain(|q| q.id != id);
            return Err(e);
        }
        Ok(id)
    }

    /// A copy for other devices (`copy`, with its `id` and `body`: a message that went out live,
    /// or a new session's keys) was not taken by the broker (`error`). If the broker may take it
    /// later, it is queued in the outbox under the same id, so that it goes exactly once when
    /// the broker is back, with a warning only when no other copy was waiting already; a
    /// refusal for good is only a warning (the message itself went out).
    pub(super) async fn copy_failed(
        &mut self,
        peer: &str,
        copy: CopyFor,
        id: Hex16,
        body: &[u8],
        error: &LinkError,
    ) {
        let whose = match copy {
            CopyFor::Contact => format!("{peer}'s other devices"),
            CopyFor::OwnDevices => "this entity's other devices".to_owned(),
        };
        let reason = match copy {
            _ if is_connection_loss(error) => "the broker cannot be reached now".to_owned(),
            CopyFor::Contact => deposit_error(peer, error),
            CopyFor::OwnDevices => error.to_string(),
        };
        if !retryable(error) {
            self.warn(format!("leaving a copy for {whose} failed: {reason}"))
                .await;
            return;
        }
        // One notice while copies wait, not one per copy: during an outage every live message
        // queues two (this entity's other devices, the contact's), which said twice per
        // message drowned the conversation in warnings.
        let others_waiting = self.outbox.iter().any(|q| q.copy.is_some());
        let now = unix_now();
        let id = id.to_hex();
        self.outbox.push(Queued {
            id: id.clone(),
            to: peer.to_owned(),
            // Not only a sent message's envelope: a new session's keys (MMK1) go this way too.
            text: format!("(a copy for {whose})"),
            queued_at: now,
            session: String::new(),
            counter: 0,
            envelope: hex::encode(body),
            attempts: 1,
            next_attempt: next_attempt(error, 0, now),
            last_error: Some(reason.clone()),
            failed: None,
            group: None,
            unsealed: None,
            moved: false,
            copy: Some(copy),
        });
        match self.persist_outbox().await {
            Ok(()) if others_waiting => {}
            Ok(()) => {
                self.warn(format!(
                    "the copy for {whose} could not be left now ({reason}); it is queued on this \
                     device and goes out by itself when the broker takes it (copies queued \
                     while it waits are not announced again: `micromsg outbox` lists them)"
                ))
                .await;
            }
            Err(e) => {
                self.outbox.retain(|q| q.id != id);
                self.warn(format!(
                    "leaving a copy for {whose} failed ({reason}), and queueing it failed too: {e}"
                ))
                .await;
            }
        }
    }

    /// Tries the items that are due, in order per contact; a contact's later items wait while
    /// an earlier one does. With `only = (peer, id)`, only `peer`'s items, and item `id` is
    /// the one the current command reports itself. What happened to each item tried, by id;
    /// the others that go out are reported as notices.
    pub(super) async fn flush_outbox(
        &mut self,
        only: Option<(&str, &str)>,
    ) -> std::collections::HashMap<String, Attempt> {
        let peer = only.map(|(peer, _)| peer);
        let reported = only.map(|(_, id)| id);
        let mut outcomes = std::collections::HashMap::new();
        if self.link.is_none() {
            return outcomes;
        }
        let now = unix_now();
        let mut held: HashSet<String> = HashSet::new();
        let mut changed = false;
        let mut index = 0;
        while index < self.outbox.len() {
            let item = self.outbox[index].clone();
            // A frame waiting for a first session holds the member's later items back (they
            // go out in order), and goes out over that session, not here.
            if item.awaits_session() {
                held.insert(item.to.clone());
                index += 1;
                continue;
            }
            let skip = !item.pending()
                || peer.is_some_and(|p| p != item.to)
                || held.contains(&item.to)
                || self.link.is_none();
            if skip {
                index += 1;
                continue;
            }
            if item.next_attempt > now {
                held.insert(item.to.clone());
                index += 1;
                continue;
            }
            changed = true;
            let attempt = self.deposit_queued(&item).await;
            match &attempt {
                Attempt::Deposited { .. } => {
                    self.outbox.remove(index);
                    self.after_deposit(&item, reported != Some(item.id.as_str()))
                        .await;
                }
                Attempt::Waiting { reason } => {
                    let q = &mut self.outbox[index];
                    q.attempts = q.attempts.saturating_add(1);
                    q.last_error = Some(reason.clone());
                    held.insert(item.to.clone());
                    index += 1;
                }
                Attempt::Failed { reason } => {
                    self.outbox[index].failed = Some(reason.clone());
                    index += 1;
                    self.warn(format!(
                        "a queued message to {} cannot go out and stays in the outbox, marked \
                         failed: {reason}",
                        item.to
                    ))
                    .await;
                }
            }
            outcomes.insert(item.id.clone(), attempt);
        }
        if changed && let Err(e) = self.persist_outbox().await {
            self.warn(e).await;
        }
        outcomes
    }

    /// One DEPOSIT of a queued item, with its fixed id and envelope.
    async fn deposit_queued(&mut self, item: &Queued) -> Attempt {
        let failed = |reason: String| Attempt::Failed { reason };
        let Ok(target) = Number::new(item.to.clone()) else {
            return failed(crate::store::not_a_number(&item.to));
        };
        let id = match hex::decode_array::<16>(&item.id) {
            Ok(id) => Hex16::from_bytes(id),
            Err(e) => return failed(format!("outbox item id {:?}: {e}", item.id)),
        };
        let envelope = match item.envelope_bytes() {
            Ok(e) => e,
            Err(reason) => return failed(reason),
        };
        let request = if item.copy == Some(CopyFor::OwnDevices) {
            Request::SyncCopy(SyncCopyArgs {
                id,
                body: Blob::new(envelope),
                peer: target,
            })
        } else {
            Request::Deposit(DepositArgs {
                target,
                id,
                body: Blob::new(envelope),
            })
        };
        match self.call(request).await {
            Ok(ResponseData::Deposit(d)) => Attempt::Deposited { expires: d.expires },
            // A copy for this entity's devices has no expiry in its answer; it is not shown.
            Ok(ResponseData::SyncCopy(_)) => Attempt::Deposited { expires: 0 },
            Ok(other) => failed(format!("unexpected answer {}", other.kind().as_str())),
            Err(e) if retryable(&e) => {
                let now = unix_now();
                if let Some(q) = self.outbox.iter_mut().find(|q| q.id == item.id) {
                    q.next_attempt = next_attempt(&e, q.attempts, now);
                }
                Attempt::Waiting {
                    reason: deposit_error(&item.to, &e),
                }
            }
            Err(e) => failed(deposit_error(&item.to, &e)),
        }
    }

    /// A queued item went out: into the history, a copy to this entity's other devices, and a
    /// notice when an earlier command queued it.
    async fn after_deposit(&mut self, item: &Queued, notify: bool) {
        if item.copy.is_some() {
            // A copy of what went out live: its history line was written then.
            return;
        }
        if item.group.is_some() || item.moved {
            // The group history has it already (a notice has none); its copy goes to this
            // entity's other devices.
            if let Ok(envelope) = item.envelope_bytes() {
                self.sync_copy(&item.to, envelope).await;
            }
            return;
        }
        let session = hex::decode_array::<16>(&item.session).unwrap_or_default();
        let entry = Entry {
            direction: Direction::Out,
            time: item.queued_at,
            text: item.text.clone(),
            session,
            counter: item.counter,
            offline: true,
        };
        let to = item.to.clone();
        if let Err(e) = self.on_disk(move |s| s.append_history(&to, &entry)).await {
            self.warn(format!("saving history failed: {e}")).await;
        }
        if let Ok(envelope) = item.envelope_bytes() {
            self.sync_copy(&item.to, envelope).await;
        }
        if notify {
            self.notify(Notice::QueuedSent {
                to: item.to.clone(),
                id: item.id.clone(),
                queued_at: item.queued_at,
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: ErrorCode, retry_after: Option<u32>) -> LinkError {
        LinkError::Refused {
            code,
            message: String::new(),
            retry_after,
        }
    }

    #[test]
    fn outages_and_pressure_are_retried_and_refusals_are_final() {
        for e in [
            LinkError::Offline,
            LinkError::Closed,
            refused(ErrorCode::RateLimited, Some(3)),
            refused(ErrorCode::QuotaExceeded, None),
            refused(ErrorCode::PeerUnavailable, Some(30)),
            refused(ErrorCode::Internal, None),
        ] {
            assert!(retryable(&e), "{e}");
        }
        for e in [
            refused(ErrorCode::NotFound, None),
            refused(ErrorCode::BadArgs, None),
            refused(ErrorCode::Conflict, None),
        ] {
            assert!(!retryable(&e), "{e}");
        }
    }

    #[test]
    fn the_next_attempt_follows_retry_after_or_doubles_up_to_the_cap() {
        assert_eq!(next_attempt(&LinkError::Offline, 5, 100), 100);
        assert_eq!(
            next_attempt(&refused(ErrorCode::RateLimited, Some(7)), 0, 100),
            107
        );
        let quota = refused(ErrorCode::QuotaExceeded, None);
        assert_eq!(next_attempt(&quota, 0, 100), 101);
        assert_eq!(next_attempt(&quota, 3, 100), 108);
        assert_eq!(next_attempt(&quota, 40, 100), 400);
    }
}
