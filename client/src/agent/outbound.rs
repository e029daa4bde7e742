//! Messages out. [`Agent::deliver_to`] is the one path every message to one peer takes, a
//! text or a group frame alike: on the live session when one is up (with the copies for the
//! contact's other devices and for this entity's, protocol 13.3), else sealed with this
//! device's stored session through the durable outbox (deposited now, or queued until the
//! broker takes it, protocol 12.11). The `send` command ([`Agent::deliver`]) and group sends
//! are built on it.

use micromsg_crypto::message::{Kind, OfflineEnvelope};
use micromsg_wire::message::request::{DepositArgs, SyncCopyArgs};
use micromsg_wire::{Blob, ErrorCode, Number, Request};

use crate::groups::{Frame, Payload};
use crate::inbox::new_message_id;
use crate::keys::{self, SharedSession};
use crate::link::LinkError;
use crate::outbox::CopyFor;
use crate::p2p::{Sealed, SendError};
use crate::store::{Direction, Entry};
use crate::when::describe_expiry;

use super::queue::Attempt;
use super::{Agent, Answer, Delivered, Output, Waiter, refused};

/// One message for one peer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Outbound<'a> {
    /// A text to a contact (kept in the history with them).
    Text(&'a str),
    /// A group frame to a member (the group layer keeps its own history).
    Group(&'a Frame),
    /// A signed *moved* notice (protocol.md 12.13) to a contact; no history line.
    Moved(&'a [u8]),
}

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

impl Agent {
    /// Why nothing can go to `number` yet, for people, with the command that fixes it (for
    /// this profile).
    pub(super) fn not_a_contact(&self, number: &str) -> String {
        format!(
            "{number} is not a contact of yours yet (no session with {number} on this device); \
             add them first: {}",
            self.profile.command(&format!("contact add {number}"))
        )
    }

    /// `send`: the one way a message to a contact goes out.
    /// - Live on the session with the contact when one is up (and copied to the contact's
    ///   other devices and this entity's).
    /// - Else sealed with this device's stored session, queued durably and deposited at once
    ///   (or later, when the broker cannot take it now); a long-lived agent also asks the
    ///   contact for a session in the background, so the next message can go live.
    /// - Else, for a known contact this device has no session with, a session is asked for
    ///   and the message waits for it (up to `offline_after`).
    /// - A number that is not a contact is told so at once.
    pub(super) async fn deliver(&mut self, to: String, text: String, reply: Waiter) {
        if Number::new(to.clone()).is_err() {
            let _ = reply.send(Err(refused(crate::store::not_a_number(&to))));
            return;
        }
        if to == self.info.number {
            let _ = reply.send(Err(refused("that is your own number")));
            return;
        }
        if self.sessions.contains_key(&to) {
            let r = self.send_text(&to, &text).await;
            let _ = reply.send(r);
            return;
        }
        if let Ok(Some(contact)) = self.store.contact(&to)
            && contact.presented.is_some()
        {
            let _ = reply.send(Err(refused(format!(
                "{to}'s identity key CHANGED since it was pinned: nothing was sent. Compare \
                 safety numbers with {to} out of band before trusting the new key."
            ))));
            return;
        }
        // One side moved (protocol 12.13): the brokers hold no contact pair for these numbers
        // yet, so a deposit would be refused; ask for a session (INITIATE-NEW) first.
        if matches!(self.store.contact(&to), Ok(Some(c)) if c.repair)
            && !self.config.offline_after.is_zero()
        {
            self.initiate(to, Some(text), reply, false, None).await;
            return;
        }
        match self.store.send_session(&to) {
            Ok(Some(_)) => {
                let r = self.send_text(&to, &text).await;
                let _ = reply.send(r);
                self.ask_for_session(&to).await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = reply.send(Err(refused(format!("reading the session with {to}: {e}"))));
                return;
            }
        }
        if !matches!(self.store.contact(&to), Ok(Some(_))) {
            let _ = reply.send(Err(refused(self.not_a_contact(&to))));
            return;
        }
        if self.config.offline_after.is_zero() {
            let r = self.send_text(&to, &text).await;
            let _ = reply.send(r);
        } else {
            let existing = !matches!(self.store.contact(&to), Ok(Some(c)) if c.repair);
            self.initiate(to, Some(text), reply, existing, None).await;
        }
    }

    /// Asks `peer` for a session without waiting for it (INITIATE-EXISTING for a contact,
    /// INITIATE-NEW for a fellow group member who is not one yet), unless one is already asked
    /// for or this is the short-lived agent of a one-shot command.
    pub(super) async fn ask_for_session(&mut self, peer: &str) {
        let asked = self.outgoing.values().any(|o| o.target == peer);
        if asked || !self.config.announce || self.link.is_none() {
            return;
        }
        // A contact whose pair a move undid asks anew (INITIATE-NEW, protocol 12.13).
        let existing = matches!(self.store.contact(peer), Ok(Some(c)) if !c.repair);
        // Nobody waits for the answer: the session, if it comes, carries the next message.
        self.initiate(peer.to_owned(), None, Waiter::detached(), existing, None)
            .await;
    }

    /// Copies what this device sent to the entity's other devices (13.3). The message itself
    /// went out: a copy the broker cannot take now waits in the outbox (under the same id) and
    /// goes when it can; one it refuses for good is a warning.
    pub(super) async fn sync_copy(&mut self, peer: &str, body: Vec<u8>) {
        if !self.config.copies {
            return;
        }
        let Ok(peer_number) = Number::new(peer.to_owned()) else {
            return;
        };
        let id = new_message_id();
        let request = Request::SyncCopy(SyncCopyArgs {
            id,
            body: Blob::new(body.clone()),
            peer: peer_number,
        });
        if let Err(e) = self.call(request).await {
            self.copy_failed(peer, CopyFor::OwnDevices, id, &body, &e)
                .await;
        }
    }

    /// Deposits the envelope of a message sent live for the contact's other devices (13: the
    /// device with the live session gets it live; the broker's copy reaches the others, and
    /// the live device drops it as a repeat). As for [`Self::sync_copy`], a copy the broker
    /// cannot take now waits in the outbox.
    pub(super) async fn deposit_copy(&mut self, peer: &str, body: Vec<u8>) {
        let Ok(target) = Number::new(peer.to_owned()) else {
            return;
        };
        let id = new_message_id();
        let request = Request::Deposit(DepositArgs {
            target,
            id,
            body: Blob::new(body.clone()),
        });
        if let Err(e) = self.call(request).await {
            self.copy_failed(peer, CopyFor::Contact, id, &body, &e)
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

    /// A text to `peer` through [`Self::deliver_to`], answered for the `send` command.
    pub(super) async fn send_text(&mut self, peer: &str, text: &str) -> Answer {
        let delivered = self
            .deliver_to(peer, Outbound::Text(text))
            .await
            .map_err(refused)?;
        let message = match &delivered {
            Delivered::Live => format!("sent to {peer}"),
            Delivered::Deposited { expires, .. } => format!(
                // Not "not online": a stored session seals at once, without asking whether
                // the contact is there (it may be, and fetch it within the second).
                "no live session with {peer}; message deposited at the broker (expires {})",
                describe_expiry(*expires, crate::account::unix_now())
            ),
            Delivered::Queued { reason, .. } => {
                // A running `listen` sends it by itself; the short-lived agent of a one-shot
                // command stops with the command.
                let when = if self.config.announce {
                    "it goes out by itself, once, in order, when the broker takes it".to_owned()
                } else {
                    format!(
                        "it goes out with the next command that reaches the broker, or with `{}`",
                        self.profile.command("listen")
                    )
                };
                format!(
                    "queued on this device ({reason}); {when} (`{}` lists what waits)",
                    self.profile.command("outbox")
                )
            }
        };
        Ok(Output::said(message).with(delivered))
    }

    /// The one outbound path: sends `outbound` to `peer` on the live session when there is
    /// one, else seals it with this device's stored session and puts it through the outbox.
    /// `Ok` with how it left, `Err` with why it did not (for people; then nothing left).
    pub(super) async fn deliver_to(
        &mut self,
        peer: &str,
        outbound: Outbound<'_>,
    ) -> Result<Delivered, String> {
        if let Some((sender, session_id)) = self.sessions.get(peer).cloned() {
            let sent = match outbound {
                Outbound::Text(text) => sender.send_text_tracked(text.to_owned()).await,
                Outbound::Group(frame) => sender.send_group(frame.encode()).await,
                Outbound::Moved(notice) => sender.send_moved(notice.to_vec()).await,
            };
            // A session that ended just now falls through to the outbox; any other failure
            // is final (the stored keys are the live session's while it runs, and must not
            // seal offline).
            let sealed = match sent {
                Ok(rx) => rx.await.ok(),
                Err(SendError::Closed) => None,
                Err(e) => return Err(format!("sending to {peer}: {e}")),
            };
            if let Some(sealed) = sealed {
                self.sent_live(peer, session_id, outbound, sealed).await;
                return Ok(Delivered::Live);
            }
            // The session ended: its keys are free for sealing offline now.
            if self
                .sessions
                .get(peer)
                .is_some_and(|(_, id)| *id == session_id)
            {
                self.sessions.remove(peer);
                self.paths.remove(peer);
            }
        }
        self.deposit_or_queue(peer, outbound).await
    }

    /// After a message went out live: the history line for a text, and the copies for the
    /// contact's other devices (DEPOSIT) and this entity's (SYNC-COPY).
    async fn sent_live(
        &mut self,
        peer: &str,
        session_id: [u8; 16],
        outbound: Outbound<'_>,
        sealed: Sealed,
    ) {
        if let Outbound::Text(text) = outbound {
            let entry = Entry {
                direction: Direction::Out,
                time: sealed.unix,
                text: text.to_owned(),
                session: session_id,
                counter: sealed.counter,
                offline: false,
            };
            let owned = peer.to_owned();
            if let Err(e) = self
                .on_disk(move |s| s.append_history(&owned, &entry))
                .await
            {
                self.warn(format!("saving history failed: {e}")).await;
            }
        }
        if self.config.copies {
            let envelope = OfflineEnvelope {
                session_id,
                frame: &sealed.frame,
            }
            .encode();
            self.deposit_copy(peer, envelope.clone()).await;
            self.sync_copy(peer, envelope).await;
        }
    }

    /// Seals `outbound` with the stored session, queues it durably, and tries to deposit it
    /// now (after what is queued before it for `peer`).
    async fn deposit_or_queue(
        &mut self,
        peer: &str,
        outbound: Outbound<'_>,
    ) -> Result<Delivered, String> {
        let id = match outbound {
            Outbound::Text(text) => {
                self.queue_sealed(peer, Kind::Text, text.as_bytes(), text, None)
                    .await?
            }
            Outbound::Group(frame) => {
                let shown = match &frame.payload {
                    Payload::Message { text, .. } => text.as_str(),
                    Payload::Op(_) | Payload::State(_) => "(a change to the group)",
                };
                // A member who is not a contact (or whose only session is unconfirmed): the
                // frame waits for a session.
                if !matches!(self.store.send_session(peer), Ok(Some(_))) {
                    return self.queue_for_session(peer, frame, shown).await;
                }
                self.queue_sealed(
                    peer,
                    Kind::Group,
                    &frame.encode(),
                    shown,
                    Some(&frame.group),
                )
                .await?
            }
            Outbound::Moved(notice) => {
                self.queue_sealed(peer, Kind::Moved, notice, "(moved notice)", None)
                    .await?
            }
        };
        match self.flush_outbox(Some((peer, &id))).await.remove(&id) {
            Some(Attempt::Deposited { expires }) => Ok(Delivered::Deposited { id, expires }),
            Some(Attempt::Failed { reason }) => Err(reason),
            Some(Attempt::Waiting { reason }) => Ok(Delivered::Queued { id, reason }),
            None => {
                let reason = if self.link.is_none() {
                    "the broker cannot be reached now"
                } else {
                    "messages queued before it go first"
                };
                Ok(Delivered::Queued {
                    id,
                    reason: reason.to_owned(),
                })
            }
        }
    }
}
