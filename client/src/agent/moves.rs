//! Moves to another broker (protocol.md 12.13) from the agent's side: announcing this
//! entity's move to every contact (and group), following a contact's signed *moved* notice,
//! setting up the broker-level contact pair again for the new numbers, and the old broker's
//! FORWARDED answer to a request for a number whose holder moved.

use std::collections::BTreeMap;

use micromsg_wire::message::event::Forwarded;

use crate::account::unix_now;
use crate::moving::{Moved, MovedError};
use crate::store::{FollowError, StoreError};

use super::outbound::Outbound;
use super::reply::MoveReport;
use super::{Agent, Answer, Delivered, Notice, Output, refused};

impl Agent {
    /// `announce-move`: sends the signed notice (made by [`crate::move_account`]) to every
    /// contact with a pinned key, live when a session is up, else deposited through the
    /// contact's inbox, and announces the new number in every group (docs/groups.md).
    pub(super) async fn announce_move(&mut self, notice_hex: &str) -> Answer {
        let bytes = micromsg_crypto::hex::decode(notice_hex)
            .map_err(|e| refused(format!("the notice is not hex: {e}")))?;
        let moved = Moved::open(&bytes, &self.identity.public_key())
            .map_err(|e| refused(format!("the notice is not ours: {e}")))?;
        if moved.old != self.info.number {
            return Err(refused(format!(
                "the notice moves {}, but this device is {}",
                moved.old, self.info.number
            )));
        }
        let contacts = self.store.contacts().map_err(|e| refused(e.to_string()))?;
        let mut notified = BTreeMap::new();
        for (number, contact) in contacts {
            if contact.identity.is_none() || contact.blocked || number == moved.new {
                continue;
            }
            let how = match self.deliver_to(&number, Outbound::Moved(&bytes)).await {
                Ok(Delivered::Live) => "live".to_owned(),
                Ok(Delivered::Deposited { .. }) => "deposited".to_owned(),
                Ok(Delivered::Queued { reason, .. }) => format!("queued: {reason}"),
                Err(reason) => format!("failed: {reason}"),
            };
            notified.insert(number, how);
        }
        let groups = self.announce_move_in_groups(&moved).await;
        let reached = notified
            .values()
            .filter(|h| *h == "live" || *h == "deposited")
            .count();
        Ok(Output::said(format!(
            "told {reached} of {} contact(s) and {} group(s) about the new number {}",
            notified.len(),
            groups.len(),
            moved.new
        ))
        .with(MoveReport {
            new_number: moved.new.clone(),
            notified,
            groups,
        }))
    }

    /// FORWARDED: the broker answered a request of ours for a number whose holder moved with
    /// the holder's signed notice (protocol.md 6.28). For a contact with a pinned key it is
    /// followed exactly as a notice from the contact (verified under that key, or refused); for
    /// any other number it is only shown (nothing to verify it against). The waiting request
    /// ends either way: the old number will not answer.
    pub(super) async fn on_forwarded(&mut self, forwarded: Forwarded) {
        let old = forwarded.target.as_str().to_owned();
        let waiting = self.outgoing.remove(forwarded.request.as_bytes());
        let pinned = match self.store.contact(&old) {
            Ok(c) => c.and_then(|c| c.identity).is_some(),
            Err(e) => {
                self.warn(format!("reading the contact {old}: {e}")).await;
                false
            }
        };
        let outcome = if pinned {
            self.on_moved(&old, forwarded.notice.as_bytes()).await;
            match self.store.contact(&old) {
                // Still filed under the old number: the notice was refused (and shown).
                Ok(Some(_)) => Err(format!(
                    "{old}'s old broker answered with a moved notice that was refused; see the                      warning"
                )),
                _ => Ok(format!(
                    "{old} has moved (notice verified with the pinned key); the contact now                      has its new number"
                )),
            }
        } else {
            match Moved::read_unverified(forwarded.notice.as_bytes()) {
                Ok(moved) if moved.old == old => {
                    let text = format!(
                        "{old} moved to {} at {}, says its old broker (not verified: no key is                          pinned for {old}); to reach it: micromsg contact add {}",
                        moved.new, moved.broker, moved.new
                    );
                    self.notify(Notice::NumberForwarded {
                        old: old.clone(),
                        new: moved.new,
                        broker: moved.broker,
                    })
                    .await;
                    Err(text)
                }
                Ok(moved) => Err(format!(
                    "{old}'s old broker answered with a notice about {}; ignored",
                    moved.old
                )),
                Err(e) => Err(format!(
                    "{old}'s old broker answered with an unreadable moved notice: {e}"
                )),
            }
        };
        let Some(waiting) = waiting else { return };
        let reply = |w: super::Waiter| {
            let _ = w.send(match &outcome {
                Ok(text) => Ok(Output::said(text.clone())),
                Err(text) => Err(refused(text.clone())),
            });
        };
        waiting.waiters.into_iter().for_each(reply);
        // A message waiting for the session is not sent to a number that has moved.
        let why = match &outcome {
            Ok(text) | Err(text) => format!("nothing was sent: {text}"),
        };
        for (_, w) in waiting.queued {
            let _ = w.send(Err(refused(why.clone())));
        }
    }

    /// A MOVED notice from `peer` (live or from the inbox): followed only if it verifies under
    /// the key pinned for `peer`, names `peer` and is newer than the last one followed;
    /// otherwise a warning, and nothing changes. False when the store failed before the
    /// notice was followed or refused (an inbox notice is then kept to be tried again, at the
    /// next start).
    pub(super) async fn on_moved(&mut self, peer: &str, payload: &[u8]) -> bool {
        let contact = match self.store.contact(peer) {
            Ok(c) => c,
            Err(e) => {
                self.warn(format!("reading the contact {peer}: {e}")).await;
                return false;
            }
        };
        let Some(pinned) = contact.as_ref().and_then(|c| c.identity) else {
            match self.followed_already(peer, payload) {
                Ok(Some(moved)) => {
                    // Followed by a run that stopped before it finished: redo what is safe
                    // to do twice and tells no one (the notice was shown then, or the user
                    // sees the new number in the contact list now).
                    self.retarget_outbox(&moved.old, &moved.new).await;
                    self.ask_for_session(&moved.new).await;
                }
                Ok(None) => {
                    self.refuse_move(peer, "no identity key is pinned for it".into())
                        .await;
                }
                Err(e) => {
                    self.warn(format!("reading the contact {peer} moved to: {e}"))
                        .await;
                    return false;
                }
            }
            return true;
        };
        let last = contact.as_ref().and_then(|c| c.moved_at);
        let moved = match Moved::open(payload, &pinned) {
            Ok(m) => m,
            Err(e) => {
                self.refuse_move(peer, e.to_string()).await;
                return true;
            }
        };
        // A move already followed: the broker's copy of its notice, or the notice sent again by
        // a `move` that was interrupted and run again; it arrives under the new number.
        let former = contact
            .as_ref()
            .is_some_and(|c| c.former.contains(&moved.old));
        if moved.new == peer && former {
            return true;
        }
        if let Err(e) = moved.check_for(peer, last) {
            let reason = match e {
                MovedError::Stale => format!("{e} (signed at {})", moved.time),
                other => other.to_string(),
            };
            self.refuse_move(peer, reason).await;
            return true;
        }
        // The live session belongs to the old number; messages go to the new one from now on.
        if let Some((sender, _)) = self.sessions.remove(peer) {
            let _ = sender.close("moved to another number").await;
            self.paths.remove(peer);
        }
        let (old, new, time) = (moved.old.clone(), moved.new.clone(), moved.time);
        let followed = self.on_disk(move |s| s.follow_move(&old, &new, time)).await;
        let contact = match followed {
            Ok(c) => c,
            Err(e @ (FollowError::KeyConflict { .. } | FollowError::NotAContact(_))) => {
                self.refuse_move(peer, e.to_string()).await;
                return true;
            }
            Err(e) => {
                self.warn(format!("following {peer}'s move: {e}")).await;
                return false;
            }
        };
        self.retarget_outbox(&moved.old, &moved.new).await;
        self.networked.remove(&moved.new);
        self.notify(Notice::ContactMoved {
            old: moved.old.clone(),
            new: moved.new.clone(),
            name: contact.name,
            broker: moved.broker.clone(),
        })
        .await;
        self.ask_for_session(&moved.new).await;
        true
    }

    /// Messages queued for `old` go to `new` (saved when any did).
    async fn retarget_outbox(&mut self, old: &str, new: &str) {
        let mut renamed = false;
        for q in &mut self.outbox {
            if q.to == old {
                new.clone_into(&mut q.to);
                renamed = true;
            }
        }
        if renamed && let Err(e) = self.persist_outbox().await {
            self.warn(format!("saving the outbox: {e}")).await;
        }
    }

    /// The notice in `payload`, when it is one this device followed already: `peer` moved,
    /// and the contact it moved to lists it as a former number and holds the key that signed
    /// it. (A notice kept in the inbox state is tried again at the next start when the agent
    /// stopped between following it and recording that it did.)
    fn followed_already(&self, peer: &str, payload: &[u8]) -> Result<Option<Moved>, StoreError> {
        let Ok(moved) = Moved::read_unverified(payload) else {
            return Ok(None);
        };
        let Some(contact) = self.store.contact(&moved.new)? else {
            return Ok(None);
        };
        let verified = contact
            .identity
            .and_then(|key| Moved::open(payload, &key).ok())
            .filter(|m| m.old == peer && contact.former.iter().any(|f| f == peer));
        Ok(verified)
    }

    async fn refuse_move(&self, from: &str, reason: String) {
        self.notify(Notice::MoveRefused {
            from: from.to_owned(),
            reason,
        })
        .await;
    }

    /// Contacts whose broker-level pair must be set up again (one side moved): asked for a
    /// session with INITIATE-NEW now, by a long-lived agent.
    pub(super) async fn ask_repairs(&mut self) {
        let Ok(contacts) = self.store.contacts() else {
            return;
        };
        for (number, c) in contacts {
            if c.repair && !c.blocked && c.identity.is_some() {
                self.ask_for_session(&number).await;
            }
        }
    }

    /// A session with the pinned key is up: the pair exists again for these numbers.
    pub(super) async fn mark_repaired(&self, peer: &str) {
        let owned = peer.to_owned();
        if let Err(e) = self.on_disk(move |s| s.repaired(&owned, unix_now())).await {
            self.warn(format!("recording the contact pair with {peer}: {e}"))
                .await;
        }
    }
}
