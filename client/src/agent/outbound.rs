//! Messages out: on a live session, or sealed with a stored session and deposited at the
//! broker, and the copies for the entity's other devices (protocol 12.11, 13).

use micromsg_crypto::message::OfflineEnvelope;
use micromsg_wire::message::request::{DepositArgs, SyncCopyArgs};
use micromsg_wire::{Blob, ErrorCode, Number, Request};

use crate::inbox::new_message_id;
use crate::keys::{self, SharedSession};
use crate::link::LinkError;
use crate::p2p::SessionSender;
use crate::store::{Direction, Entry};

use super::{Agent, Reply, Waiter};

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
            let _ = reply.send(Reply::err(format!("{to:?} is not a number")));
            return;
        }
        if to == self.info.number {
            let _ = reply.send(Reply::err("that is your own number"));
            return;
        }
        if let Some((sender, id)) = self.sessions.get(&to).cloned() {
            let r = self.send_on(&to, &sender, id, text).await;
            let _ = reply.send(r);
            return;
        }
        if let Ok(Some(contact)) = self.store.contact(&to)
            && contact.presented.is_some()
        {
            let _ = reply.send(Reply::err(format!(
                "{to}'s identity key CHANGED since it was pinned: nothing was sent. Compare \
                 safety numbers with {to} out of band before trusting the new key."
            )));
            return;
        }
        match self.store.load_session(&to) {
            Ok(Some(_)) => {
                let r = self.send_offline(&to, &text).await;
                let _ = reply.send(r);
                self.ask_for_session(&to).await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = reply.send(Reply::err(format!("reading the session with {to}: {e}")));
                return;
            }
        }
        if !matches!(self.store.contact(&to), Ok(Some(_))) {
            let _ = reply.send(Reply::err(self.not_a_contact(&to)));
            return;
        }
        if self.config.offline_after.is_zero() {
            let r = self.send_offline(&to, &text).await;
            let _ = reply.send(r);
        } else {
            self.initiate(to, Some(text), reply, true, None).await;
        }
    }

    /// Asks `peer` for a session (INITIATE-EXISTING) without waiting for it, unless one is
    /// already asked for or this is the short-lived agent of a one-shot command.
    async fn ask_for_session(&mut self, peer: &str) {
        let asked = self.outgoing.values().any(|o| o.target == peer);
        if asked || !self.config.announce || self.link.is_none() {
            return;
        }
        // Nobody waits for the answer: the session, if it comes, carries the next message.
        self.initiate(peer.to_owned(), None, Waiter::detached(), true, None)
            .await;
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
                    let owned = peer.to_owned();
                    if let Err(e) = self
                        .on_disk(move |s| s.append_history(&owned, &entry))
                        .await
                    {
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
