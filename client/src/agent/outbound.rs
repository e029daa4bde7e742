//! Messages out: on a live session, or sealed with a stored session and deposited at the
//! broker, and the copies for the entity's other devices (protocol 12.11, 13).

use micromsg_crypto::message::OfflineEnvelope;
use micromsg_wire::message::request::{DepositArgs, SyncCopyArgs};
use micromsg_wire::{Blob, ErrorCode, Number, Request, ResponseData};

use crate::account::unix_now;
use crate::inbox::new_message_id;
use crate::keys::{self, SharedSession};
use crate::link::LinkError;
use crate::p2p::SessionSender;
use crate::store::{Direction, Entry};

use super::{Agent, Reply};

/// A DEPOSIT refusal, for people.
pub(super) fn deposit_error(peer: &str, e: &LinkError) -> String {
    match e.code() {
        Some(ErrorCode::QuotaExceeded) => format!(
            "{peer}'s inbox at the broker is full (QUOTA-EXCEEDED): the message was not \
             deposited; nothing already held there was lost; try again later"
        ),
        Some(ErrorCode::NotFound) => format!(
            "the broker holds no contact pair with {peer} (NOT-FOUND): messages can be left \
             only for contacts set up with `contact add`"
        ),
        _ => format!("depositing the message for {peer} failed: {e}"),
    }
}

/// "in 30 days", "in 5 hours", … for an expiry time.
pub(super) fn describe_expiry(expires: u64, now: u64) -> String {
    let secs = expires.saturating_sub(now);
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 120 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("in {n} {unit}, at unix time {expires}")
}

impl Agent {
    /// Seals `text` with this device's latest session with `peer` (never a live one) and
    /// deposits it; the history gets it once the broker has committed it.
    pub(super) async fn send_offline(&mut self, peer: &str, text: &str) -> Reply {
        let Ok(target) = Number::new(peer.to_owned()) else {
            return Reply::err(format!("{peer:?} is not a number"));
        };
        if self.sessions.contains_key(peer) {
            return Reply::err(format!(
                "{peer} has a live session; refusing to seal an offline message with live keys"
            ));
        }
        let mut stored = match self.store.load_session(peer) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Reply::err(format!(
                    "{peer} did not come online, and this device has no earlier session with {peer} \
                     to seal an offline message with (a device sends offline only with sessions \
                     it set up itself); try again when {peer} is online"
                ));
            }
            Err(e) => return Reply::err(format!("reading the session with {peer}: {e}")),
        };
        let now = unix_now();
        let envelope = match stored.seal_offline_text(now, text) {
            Ok(e) => e,
            Err(e) => return Reply::err(format!("sealing for {peer}: {e}")),
        };
        let counter = stored.next_send_counter.saturating_sub(1);
        // The counter is on disk before the envelope leaves the device (12.7).
        if let Err(e) = self.store.save_session(peer, &stored) {
            return Reply::err(format!("saving the send counter: {e}"));
        }
        let id = new_message_id();
        let deposit = Request::Deposit(DepositArgs {
            target,
            id,
            body: Blob::new(envelope.clone()),
        });
        let expires = match self.call(deposit).await {
            Ok(ResponseData::Deposit(d)) => d.expires,
            Ok(other) => {
                return Reply::err(format!("unexpected answer {}", other.kind().as_str()));
            }
            Err(e) => return Reply::err(deposit_error(peer, &e)),
        };
        let entry = Entry {
            direction: Direction::Out,
            time: now,
            text: text.to_owned(),
            session: stored.session_id,
            counter,
            offline: true,
        };
        if let Err(e) = self.store.append_history(peer, &entry) {
            self.warn(format!("saving history failed: {e}")).await;
        }
        self.sync_copy(peer, envelope).await;
        Reply::ok(format!(
            "{peer} is offline; message deposited at the broker (expires {})",
            describe_expiry(expires, now)
        ))
        .with(serde_json::json!({
            "delivered": "deposited",
            "id": id.to_hex(),
            "expires": expires,
        }))
    }

    /// Copies what this device sent to the entity's other devices (13.3). Failures are only
    /// warnings: the message itself went out.
    pub(super) async fn sync_copy(&mut self, peer: &str, body: Vec<u8>) {
        if !self.config.copies {
            return;
        }
        let Ok(peer_number) = Number::new(peer.to_owned()) else {
            return;
        };
        let request = Request::SyncCopy(SyncCopyArgs {
            id: new_message_id(),
            body: Blob::new(body),
            peer: peer_number,
        });
        if let Err(e) = self.call(request).await {
            self.warn(format!(
                "copying to this entity's other devices failed: {e}"
            ))
            .await;
        }
    }

    /// Deposits the envelope of a message sent live for the contact's other devices (13: the
    /// device with the live session gets it live; the broker's copy reaches the others, and
    /// the live device drops it as a repeat). Failures are only warnings.
    pub(super) async fn deposit_copy(&mut self, peer: &str, body: Vec<u8>) {
        let Ok(target) = Number::new(peer.to_owned()) else {
            return;
        };
        let request = Request::Deposit(DepositArgs {
            target,
            id: new_message_id(),
            body: Blob::new(body),
        });
        if let Err(e) = self.call(request).await {
            self.warn(format!(
                "leaving a copy for {peer}'s other devices failed: {}",
                deposit_error(peer, &e)
            ))
            .await;
        }
    }

    /// Shares a new session's keys with the entity's other devices (`MMK1`, 13.4).
    pub(super) async fn share_session(&mut self, peer: &str, session: &crate::p2p::StoredSession) {
        if !self.config.copies {
            return;
        }
        let shared = SharedSession {
            peer: peer.to_owned(),
            device: self.info.device,
            session: session.clone(),
        };
        match keys::seal_session_sync(&self.identity.seed(), &shared) {
            Ok(blob) => self.sync_copy(peer, blob).await,
            Err(e) => self.warn(format!("sharing session keys failed: {e}")).await,
        }
    }

    pub(super) async fn send_on(
        &mut self,
        peer: &str,
        sender: &SessionSender,
        session_id: [u8; 16],
        text: String,
    ) -> Reply {
        match sender.send_text_tracked(text.clone()).await {
            Ok(sealed) => match sealed.await {
                Ok(sealed) => {
                    let envelope = OfflineEnvelope {
                        session_id,
                        frame: &sealed.frame,
                    }
                    .encode();
                    let entry = Entry {
                        direction: Direction::Out,
                        time: sealed.unix,
                        text,
                        session: session_id,
                        counter: sealed.counter,
                        offline: false,
                    };
                    if let Err(e) = self.store.append_history(peer, &entry) {
                        self.warn(format!("saving history failed: {e}")).await;
                    }
                    if self.config.copies {
                        self.deposit_copy(peer, envelope.clone()).await;
                        self.sync_copy(peer, envelope).await;
                    }
                    Reply::ok(format!("sent to {peer}"))
                        .with(serde_json::json!({"delivered": "live"}))
                }
                Err(_) => Reply::err(format!("the session with {peer} ended before sending")),
            },
            Err(e) => Reply::err(format!("sending to {peer}: {e}")),
        }
    }
}
