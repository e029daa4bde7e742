//! Offline delivery (protocol 13.2): fetch the inbox page by page, open each item, store it,
//! and only then acknowledge it.
//!
//! ```text
//! INBOX-FETCH {AFTER}  ->  items  ->  Delivery::open (open, de-duplicate)
//!                      ->  Delivery::commit (on the blocking pool): session seen-sets,
//!                          inbox-copies.json, history, inbox.json (each synced)
//!                      ->  INBOX-ACK (only what is now stored)  -> repeat while MORE
//! ```
//!
//! What an item can be, by its `FROM` and its magic:
//!
//! | from | magic | what |
//! |---|---|---|
//! | a contact | `MMO1` | an offline message (or the copy of a live one for this device) |
//! | own number, other device | `MMO1` | a copy of a message that device sent (13.3) |
//! | own number, other device | `MMK1` | session keys that device set up (13.4) |
//! | own number, other device | `MML1` | a link transfer for a new device (13.4) |
//! | own number, this device | any | its own SYNC-COPY in NUMBER mode: nothing to do |
//!
//! De-duplication: by message id (kept until the item's expiry), then by (session, counter)
//! for messages from a contact (12.7), including counters already received live. A copy from
//! another device has no counter set here; its id is written before its history line, and
//! only an item with such an id that comes again is looked up in the history. An envelope
//! whose session is unknown is kept in `inbox.json` and opened when the keys arrive. A group
//! frame or a MOVED notice is kept there too, until the agent has applied it
//! ([`Delivery::frames_done`]): it is acknowledged before the agent sees it.

use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use micromsg_crypto::handshake::SESSION_ID_LEN;
use micromsg_crypto::message::{Kind, OFFLINE_MAGIC, OfflineEnvelope};
use micromsg_crypto::{Secret32, hex};
use micromsg_wire::message::request::{InboxAckArgs, InboxFetchArgs};
use micromsg_wire::message::response::InboxMessage;
use micromsg_wire::{ErrorCode, Hex16, Request, ResponseData};

use crate::keys::{self, KeyBundle, LINK_MAGIC, SYNC_MAGIC};
use crate::link::{BrokerLink, LinkError};
use crate::profile::Profile;
use crate::store::{
    Direction, Entry, FoundSession, InboxState, KeptFrame, KeptKind, PendingItem, Store, StoreError,
};

/// Messages asked for per INBOX-FETCH (the broker may return fewer).
pub const FETCH_LIMIT: u32 = 250;

/// Why delivery stopped. Whatever was acknowledged before is stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The broker link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The local store failed; nothing of the current page was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the device does with messages it received live, so the broker's copy of the same
/// message is not shown twice (and the reverse).
#[derive(Debug, Clone, Default)]
pub struct LiveRecv {
    /// The last counter received live in this session.
    pub last: Option<u64>,
    /// Counters above `last` that arrived through the inbox first.
    pub offline: BTreeSet<u64>,
}

/// Live receive state per session id.
pub type LiveTable = HashMap<[u8; SESSION_ID_LEN], LiveRecv>;

/// Something delivery produced, in inbox order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Arrived {
    /// A message was opened and stored in the history with `peer`.
    Message {
        /// The contact of the conversation.
        peer: String,
        /// `In` from the contact; `Out` a copy of what another device of this entity sent.
        direction: Direction,
        /// The sending device (of the contact, or of this entity).
        from_device: u32,
        /// The text.
        text: String,
        /// The sender's clock when sealing.
        time: u64,
    },
    /// A GROUP frame (docs/groups.md), not stored here: the agent hands it to the group layer.
    Group {
        /// The inbox item's id (hex), for [`Delivery::frames_done`].
        id: String,
        /// The contact whose session carried it.
        peer: String,
        /// `In` from the contact; `Out` a copy of what another device of this entity sent.
        direction: Direction,
        /// The JSON payload.
        payload: Vec<u8>,
        /// The sender's clock when sealing.
        time: u64,
    },
    /// A MOVED notice (protocol.md 12.13) from the contact `peer`, not checked yet: the
    /// agent checks it against the pinned key before following it. Kept in the inbox state
    /// like a group frame until [`Delivery::frames_done`].
    Moved {
        /// The inbox item's id (hex), for [`Delivery::frames_done`].
        id: String,
        /// The contact whose session carried it.
        peer: String,
        /// The notice.
        payload: Vec<u8>,
    },
    /// Another device of this entity shared a session's keys.
    KeysSynced {
        /// The contact of that session.
        peer: String,
        /// The device that set it up.
        device: u32,
    },
    /// A link transfer for this device was opened (see [`Delivery::with_link_key`]).
    Linked(Box<KeyBundle>),
    /// An item was dropped (unreadable, not for us, or the contact's key changed).
    Dropped {
        /// Why, for people (no secret, no body).
        reason: String,
    },
}

/// Delivery for one device: who it is, its keys, and its store.
#[derive(Debug)]
pub struct Delivery {
    store: Store,
    number: String,
    device: u32,
    identity_seed: Secret32,
    link_key: Option<Secret32>,
    /// While this profile is marked awaiting keys, leave this entity's link transfers that do
    /// not open in the inbox, unacknowledged ([`Delivery::leaving_link_transfers_while_awaiting`]).
    awaiting: Option<Profile>,
    state: InboxState,
    /// What `inbox-copies.json` holds ([`Store::copies_in_flight`]).
    copies_in_flight: BTreeSet<String>,
}

impl Delivery {
    /// Delivery for device `device` of `number`, with the entity's identity seed.
    pub fn new(
        store: Store,
        number: &str,
        device: u32,
        identity_seed: Secret32,
    ) -> Result<Self, StoreError> {
        let state = store.inbox_state()?;
        let copies_in_flight = store.copies_in_flight()?;
        Ok(Self {
            store,
            number: number.to_owned(),
            device,
            identity_seed,
            link_key: None,
            awaiting: None,
            state,
            copies_in_flight,
        })
    }

    /// Also open a link transfer (`MML1`) sealed with this transfer key.
    pub fn with_link_key(mut self, transfer_key: Secret32) -> Self {
        self.link_key = Some(transfer_key);
        self
    }

    /// While `profile` is marked awaiting keys ([`Profile::awaiting_keys`]: the device joined
    /// and has not installed the entity's keys), leaves this entity's link transfers (`MML1`)
    /// that do not open in the inbox, unacknowledged, instead of dropping them: one may be the
    /// device's own, which `device receive-keys` opens with the transfer key. The mark is read
    /// for each page, so keys installed meanwhile by another process count at once.
    pub fn leaving_link_transfers_while_awaiting(mut self, profile: Profile) -> Self {
        self.awaiting = Some(profile);
        self
    }

    /// Replaces the identity seed (after a link transfer or restore).
    pub fn set_identity_seed(&mut self, seed: Secret32) {
        self.identity_seed = seed;
    }

    /// Envelopes still waiting for their keys.
    pub fn pending(&self) -> usize {
        self.state.pending.len()
    }

    /// Group frames and MOVED notices taken from the inbox that the agent has not finished
    /// with (left by an agent that stopped or crashed in between), oldest first, to process
    /// again.
    pub fn unfinished_frames(&self) -> Vec<Arrived> {
        self.state
            .frames
            .iter()
            .filter_map(|g| Some(kept_arrived(g, BASE64.decode(&g.payload).ok()?)))
            .collect()
    }

    /// The agent has applied (or for good dropped) these group frames and MOVED notices: they
    /// leave the state (written on the blocking pool).
    pub async fn frames_done(&mut self, ids: &[String], now_unix: u64) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.state.frames.retain(|g| !ids.contains(&g.id));
        self.commit(Batch::default(), now_unix).await.map(drop)
    }

    /// Fetches and stores everything in the inbox, acknowledging page by page.
    pub async fn fetch_all(
        &mut self,
        link: &mut BrokerLink,
        live: &mut LiveTable,
        now_unix: u64,
    ) -> Result<Vec<Arrived>, InboxError> {
        let mut arrived = Vec::new();
        if !self.state.pending.is_empty() {
            // Keys may have come another way since (a restore, a link transfer).
            let mut batch = Batch::default();
            self.retry_pending(&mut batch, live)?;
            arrived.append(&mut self.commit(batch, now_unix).await?);
        }
        // Pipelined: the FETCH of page n+1 goes out before page n is opened and stored, and
        // the ACK of page n after that; the ACK's answer is read after page n+1's. The broker
        // answers a connection's requests in order, so it reads page n+1 while this end stores
        // page n, and commits ACK n while this end waits for page n+1.
        let fetch = |after: Option<Hex16>| {
            Request::InboxFetch(InboxFetchArgs {
                limit: Some(FETCH_LIMIT),
                after,
            })
        };
        let mut after: Option<Hex16> = None;
        let mut next = link.send(&fetch(after)).await?;
        let mut unanswered_acks: Vec<u32> = Vec::new();
        loop {
            let page = match link.answer(next).await {
                Ok(ResponseData::InboxFetch(page)) => page,
                Ok(other) => {
                    let _ = answer_all(link, &mut unanswered_acks).await;
                    return Err(LinkError::Protocol(format!(
                        "INBOX-FETCH answered with {}",
                        other.kind().as_str()
                    ))
                    .into());
                }
                // The cursor was acknowledged and removed meanwhile: start over.
                Err(LinkError::Refused {
                    code: ErrorCode::NotFound,
                    ..
                }) if after.is_some() => {
                    answer_all(link, &mut unanswered_acks).await?;
                    after = None;
                    next = link.send(&fetch(after)).await?;
                    continue;
                }
                Err(e) => {
                    let _ = answer_all(link, &mut unanswered_acks).await;
                    return Err(e.into());
                }
            };
            let last = page.messages.last().map(|m| m.id);
            let more = page.more && last.is_some();
            if more {
                // The cursor is this page's last item, not yet acknowledged: the next page
                // continues after it (and would start over, harmlessly, were it gone).
                after = last;
                next = link.send(&fetch(after)).await?;
            }
            let taken = match self.open(page.messages, live) {
                Ok((batch, acks)) => self
                    .commit(batch, now_unix)
                    .await
                    .map(|arrived| (arrived, acks)),
                Err(e) => Err(e),
            };
            let (mut got, acks) = match taken {
                Ok(taken) => taken,
                Err(e) => {
                    // Keep the link in step: read what is still owed on it.
                    let _ = answer_all(link, &mut unanswered_acks).await;
                    if more {
                        let _ = link.answer(next).await;
                    }
                    return Err(e.into());
                }
            };
            arrived.append(&mut got);
            let mut sent = Vec::new();
            for chunk in acks.chunks(1000) {
                sent.push(
                    link.send(&Request::InboxAck(InboxAckArgs {
                        ids: chunk.to_vec(),
                    }))
                    .await?,
                );
            }
            if let Err(e) = answer_all(link, &mut unanswered_acks).await {
                if more {
                    let _ = link.answer(next).await;
                }
                let _ = answer_all(link, &mut sent).await;
                return Err(e.into());
            }
            unanswered_acks = sent;
            if !more {
                break;
            }
        }
        answer_all(link, &mut unanswered_acks).await?;
        Ok(arrived)
    }

    /// Opens one page of items into a batch to store ([`Self::commit`]), with the ids that may
    /// be acknowledged once it is stored (everything taken: stored, recognised as a repeat,
    /// kept pending, or dropped as unreadable). On error nothing may be acknowledged.
    fn open(
        &mut self,
        items: Vec<InboxMessage>,
        live: &mut LiveTable,
    ) -> Result<(Batch, Vec<Hex16>), StoreError> {
        let mut batch = Batch::default();
        let mut acks = Vec::with_capacity(items.len());
        let mut keys_arrived = false;
        let leave_link_transfers = self.awaiting.as_ref().is_some_and(Profile::awaiting_keys);
        for item in items {
            if leave_link_transfers
                && item.from.as_str() == self.number
                && item.body.as_bytes().starts_with(LINK_MAGIC)
                && !self.opens_as_link_transfer(item.body.as_bytes())
            {
                // Possibly this device's own keys: left for `device receive-keys` (13.4).
                continue;
            }
            acks.push(item.id);
            let id = item.id.to_hex();
            if self.state.seen.contains_key(&id) {
                continue;
            }
            self.state.seen.insert(id.clone(), item.expires);
            let from = item.from.as_str().to_owned();
            let from_device = item.from_device.get();
            if from == self.number && from_device == self.device {
                continue;
            }
            let body = item.body.into_vec();
            let pending = PendingItem {
                id,
                from,
                from_device,
                time: item.time,
                expires: item.expires,
                body: String::new(),
            };
            if self.take_one(&pending, &body, &mut batch, live)? {
                keys_arrived = true;
            }
        }
        if keys_arrived {
            self.retry_pending(&mut batch, live)?;
        }
        Ok((batch, acks))
    }

    /// Whether `body` opens as a link transfer for this device with the transfer key given
    /// ([`Delivery::with_link_key`]).
    fn opens_as_link_transfer(&self, body: &[u8]) -> bool {
        self.link_key
            .as_ref()
            .is_some_and(|k| keys::open_link(k, self.device, body).is_ok())
    }

    /// Takes one item; true when it brought session keys (pending items may now open).
    fn take_one(
        &mut self,
        item: &PendingItem,
        body: &[u8],
        batch: &mut Batch,
        live: &mut LiveTable,
    ) -> Result<bool, StoreError> {
        let own = item.from == self.number;
        let drop = |batch: &mut Batch, reason: String| {
            batch.arrived.push(Arrived::Dropped { reason });
            Ok(false)
        };
        if body.starts_with(SYNC_MAGIC) {
            if !own {
                return drop(batch, format!("session keys from {}, not ours", item.from));
            }
            let Ok(shared) = keys::open_session_sync(&self.identity_seed, body) else {
                return drop(
                    batch,
                    "session keys that do not open with our identity".into(),
                );
            };
            if shared.device == self.device {
                return Ok(false);
            }
            // Checked here (reads only); the pin and the keys are written with the rest of the
            // page, off the agent's task ([`Delivery::commit`]). The keys go into the page's
            // session cache at once, so later items of the page open with them.
            let key = shared.session.peer_identity;
            let pinned = match batch.pins.iter().find(|(peer, _)| *peer == shared.peer) {
                Some((_, k)) => Some(*k),
                None => self.store.contact(&shared.peer)?.and_then(|c| c.identity),
            };
            match pinned {
                Some(old) if old != key => {
                    return drop(
                        batch,
                        format!(
                            "another device shared keys for {} with an identity key that \
                             differs from the pinned one; ignored",
                            shared.peer
                        ),
                    );
                }
                Some(_) => {}
                None => batch.pins.push((shared.peer.clone(), key)),
            }
            let sid = shared.session.session_id;
            let cached = match batch.sessions.remove(&sid) {
                Some(FoundSession::Shared(old)) => {
                    FoundSession::Shared(crate::store::merge_shared(old, &shared))
                }
                // A session of this device's own under that id is not replaced by a copy.
                Some(own) => own,
                None => FoundSession::Shared(shared.clone()),
            };
            batch.sessions.insert(sid, cached);
            batch.dirty.insert(sid);
            batch.arrived.push(Arrived::KeysSynced {
                peer: shared.peer.clone(),
                device: shared.device,
            });
            return Ok(true);
        }
        if body.starts_with(LINK_MAGIC) {
            let opened = self
                .link_key
                .as_ref()
                .filter(|_| own)
                .and_then(|k| keys::open_link(k, self.device, body).ok());
            return match opened {
                Some(bundle) => {
                    batch.arrived.push(Arrived::Linked(Box::new(bundle)));
                    Ok(true)
                }
                // A transfer for another new device of this entity: not ours to read.
                None => Ok(false),
            };
        }
        if !body.starts_with(OFFLINE_MAGIC) {
            return drop(batch, format!("an unreadable item from {}", item.from));
        }
        let Ok(envelope) = OfflineEnvelope::decode(body) else {
            return drop(batch, format!("a malformed envelope from {}", item.from));
        };
        let sid = envelope.session_id;
        let found = match batch.sessions.entry(sid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match self.store.find_session(&sid)? {
                Some(found) => e.insert(found),
                None => {
                    // Keys not here (yet): keep it until they come or it expires (12.11).
                    let mut kept = item.clone();
                    kept.body = BASE64.encode(body);
                    if !self.state.pending.iter().any(|p| p.id == kept.id) {
                        self.state.pending.push(kept);
                    }
                    return Ok(false);
                }
            },
        };
        let peer = found.peer().to_owned();
        if own {
            // A copy of what another device of ours sent: open with the send keys (13.3).
            let Ok(opened) = found.session().send.open(envelope.frame) else {
                return drop(batch, format!("a copy for {peer} that does not open"));
            };
            if opened.kind == Kind::Group {
                batch.push_kept(item, &peer, Direction::Out, opened);
                return Ok(false);
            }
            if opened.kind != Kind::Text {
                return Ok(false);
            }
            // Its id is unknown here (else it was skipped as a repeat); it may still be in the
            // history if a crash cut the batch that wrote it before its id was stored.
            // (Or it is the same envelope under a second id, earlier in this page.)
            let counter = opened.counter;
            if batch.in_page(&peer, Direction::Out, sid, counter)
                || (self.copies_in_flight.contains(&item.id)
                    && self.in_history(batch, &peer, Direction::Out, sid, counter)?)
            {
                return Ok(false);
            }
            batch.copies.insert(item.id.clone());
            let text = String::from_utf8_lossy(&opened.payload).into_owned();
            batch.push_message(&peer, Direction::Out, item.from_device, sid, opened, text);
            return Ok(false);
        }
        // A deposit the contact left from its number before a move it announced (12.13).
        let former = item.from != peer
            && matches!(self.store.contact(&peer), Ok(Some(c)) if c.former.contains(&item.from));
        if item.from != peer && !former {
            return drop(
                batch,
                format!("an item from {} sealed with a session of {peer}", item.from),
            );
        }
        let counter = match micromsg_crypto::message::frame_counter(envelope.frame) {
            Ok(c) => c,
            Err(_) => return drop(batch, format!("a malformed envelope from {peer}")),
        };
        if let Some(l) = live.get(&sid)
            && (Some(counter) <= l.last || l.offline.contains(&counter))
        {
            // Already received live: this is the broker's copy of the same message.
            return Ok(false);
        }
        let seen_offline = found.session().recv_offline_seen.contains(&counter);
        let opened = found.session_mut().open_offline(envelope.frame);
        if opened.is_ok() {
            // Authentic under the contact's keys: it holds the session (12.3), so this
            // device may seal offline messages with it if it is its own.
            batch.confirmed.insert(sid);
        }
        let opened = match opened {
            Ok(Some(opened)) => opened,
            Ok(None) if seen_offline => {
                // Its counter was taken from the inbox before, but not its message id: the
                // store's steps (`commit_batch`) were cut after the seen-set, before the
                // inbox state (a crash, a SIGKILL). A group frame or a MOVED notice is
                // nowhere then: hand it to the agent again, which drops what it already has.
                // A text may or may not have reached the history, written in between: it is
                // added unless it is there. Only such an item reads the history.
                let Ok(again) = found.session().recv.open(envelope.frame) else {
                    return Ok(false);
                };
                if let Some(l) = live.get_mut(&sid)
                    && matches!(again.kind, Kind::Text | Kind::Group | Kind::Moved)
                {
                    l.offline.insert(again.counter);
                }
                match again.kind {
                    Kind::Group | Kind::Moved => {
                        batch.push_kept(item, &peer, Direction::In, again);
                    }
                    Kind::Text
                        if !self.in_history(batch, &peer, Direction::In, sid, again.counter)? =>
                    {
                        let text = String::from_utf8_lossy(&again.payload).into_owned();
                        batch.push_message(
                            &peer,
                            Direction::In,
                            item.from_device,
                            sid,
                            again,
                            text,
                        );
                    }
                    _ => {}
                }
                return Ok(false);
            }
            Ok(None) => return Ok(false),
            Err(_) => return drop(batch, format!("a message from {peer} that does not open")),
        };
        batch.dirty.insert(sid);
        if !matches!(opened.kind, Kind::Text | Kind::Group | Kind::Moved) {
            return Ok(false);
        }
        // The live session skips it if it comes that way too.
        if let Some(l) = live.get_mut(&sid) {
            l.offline.insert(opened.counter);
        }
        if opened.kind == Kind::Moved {
            // Checked and followed by the agent (against the pin, protocol 12.13), kept until
            // it has.
            batch.push_kept(item, &peer, Direction::In, opened);
            return Ok(false);
        }
        if opened.kind == Kind::Group {
            batch.push_kept(item, &peer, Direction::In, opened);
            return Ok(false);
        }
        let text = String::from_utf8_lossy(&opened.payload).into_owned();
        batch.push_message(&peer, Direction::In, item.from_device, sid, opened, text);
        Ok(false)
    }

    /// Whether the history with `peer` holds message `counter` of session `sid` that went
    /// `direction` (`In` from the contact, `Out` a copy from another device of ours): in its
    /// file (read once per page, and only for an item that may have come again, see
    /// `take_one`), or earlier in this page.
    fn in_history(
        &self,
        batch: &mut Batch,
        peer: &str,
        direction: Direction,
        sid: [u8; SESSION_ID_LEN],
        counter: u64,
    ) -> Result<bool, StoreError> {
        if batch.in_page(peer, direction, sid, counter) {
            return Ok(true);
        }
        let is_it =
            |e: &Entry| e.direction == direction && e.session == sid && e.counter == counter;
        if !batch.stored_history.contains_key(peer) {
            let history = self.store.read_history(peer)?;
            batch.stored_history.insert(peer.to_owned(), history);
        }
        Ok(batch.stored_history[peer].iter().any(is_it))
    }

    /// Tries the pending envelopes again (keys arrived).
    fn retry_pending(&mut self, batch: &mut Batch, live: &mut LiveTable) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut self.state.pending);
        for item in pending {
            let Ok(body) = BASE64.decode(&item.body) else {
                continue;
            };
            // `take_one` puts it back when its keys are still missing.
            self.take_one(&item, &body, batch, live)?;
        }
        Ok(())
    }

    /// Stores what the batch opened: session state first, then the history, then the inbox
    /// state ([`commit_batch`]). Each write syncs to disk, so they run on the blocking pool,
    /// not on the caller's task.
    async fn commit(&mut self, batch: Batch, now_unix: u64) -> Result<Vec<Arrived>, StoreError> {
        let store = self.store.clone();
        let mut state = self.state.clone();
        let copies = batch.copies.clone();
        let written = tokio::task::spawn_blocking(move || {
            let result = commit_batch(&store, &mut state, batch, now_unix);
            (state, result)
        })
        .await;
        if !copies.is_empty() {
            // What `inbox-copies.json` may hold now. After a failed commit the page comes
            // again in this process, so the earlier ids stay too.
            if !matches!(written, Ok((_, Ok(_)))) {
                self.copies_in_flight.extend(copies);
            } else {
                self.copies_in_flight = copies;
            }
        }
        match written {
            Ok((state, Ok(arrived))) => {
                self.state = state;
                Ok(arrived)
            }
            Ok((_, Err(e))) => Err(e),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// [`Delivery::commit`]'s writes, in order: pins, session seen-sets, confirmations, the ids
/// of copies from other devices, history, inbox state.
fn commit_batch(
    store: &Store,
    state: &mut InboxState,
    batch: Batch,
    now_unix: u64,
) -> Result<Vec<Arrived>, StoreError> {
    commit_batch_until(store, state, batch, now_unix, |_| true)
}

/// The steps of [`commit_batch`], each synced; a kill can fall after any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Pins,
    SeenSets,
    Confirmed,
    Copies,
    History,
}

/// [`commit_batch`], going on after each step only while `go_on` says so (the tests stop it
/// there, as a kill would; what is not written then is not acknowledged either).
fn commit_batch_until(
    store: &Store,
    state: &mut InboxState,
    mut batch: Batch,
    now_unix: u64,
    mut go_on: impl FnMut(Step) -> bool,
) -> Result<Vec<Arrived>, StoreError> {
    // Pins before the keys that rely on them (13.4: a first sync of a contact pins it).
    for (peer, key) in &batch.pins {
        store.pin_identity(peer, key, now_unix)?;
    }
    if !go_on(Step::Pins) {
        return Ok(Vec::new());
    }
    // The seen-sets before the history: a history line without its counter in the seen-set
    // would be written a second time when its item comes again (its id is stored last). This
    // way a message that may be in the history always has its counter seen, and an item that
    // comes again with a seen counter but an unknown id is exactly one cut off in between;
    // only that one is looked up in the history (`take_one`), never a page in the steady
    // state, where a counter and its item's id are stored by the same commit.
    for sid in &batch.dirty {
        if let Some(found) = batch.sessions.get_mut(sid) {
            // Opened with just now: a use, which keeps a replaced session's keys
            // (`Store::forget_old_keys`).
            let session = found.session_mut();
            session.last_used = session.last_used.max(now_unix);
            store.save_found(found)?;
        }
    }
    if !go_on(Step::SeenSets) {
        return Ok(Vec::new());
    }
    for sid in &batch.confirmed {
        store.confirm_session(sid)?;
    }
    if !go_on(Step::Confirmed) {
        return Ok(Vec::new());
    }
    // A copy from another device of ours has no seen-set to mark it before its history line
    // (its counter is that device's): its id is, in a file of its own, so that an item that
    // comes again after a cut below is looked up in the history rather than written twice.
    if !batch.copies.is_empty() {
        store.save_copies_in_flight(&batch.copies)?;
    }
    if !go_on(Step::Copies) {
        return Ok(Vec::new());
    }
    for (peer, entries) in &batch.history {
        store.append_history_all(peer, entries)?;
    }
    if !go_on(Step::History) {
        return Ok(Vec::new());
    }
    // Group frames and MOVED notices go into the same durable state as the ids they are
    // acknowledged by, after the seen-sets: a crash in between is made good when the item
    // comes again (`take_one`).
    state.frames.extend(batch.kept);
    store.save_inbox_state(state, now_unix)?;
    Ok(batch.arrived)
}

/// What one page produced, stored together at the end.
#[derive(Default)]
struct Batch {
    arrived: Vec<Arrived>,
    history: Vec<(String, Vec<Entry>)>,
    /// Group frames and MOVED notices, kept in the inbox state until the agent has applied
    /// them.
    kept: Vec<KeptFrame>,
    sessions: HashMap<[u8; SESSION_ID_LEN], FoundSession>,
    dirty: BTreeSet<[u8; SESSION_ID_LEN]>,
    /// Sessions the contact proved it holds (an item under its keys opened).
    confirmed: BTreeSet<[u8; SESSION_ID_LEN]>,
    /// The ids of the texts in `history` that are copies from other devices of ours.
    copies: BTreeSet<String>,
    /// The history with a contact, read when one of its items came again with a counter
    /// already seen ([`Delivery::in_history`]).
    stored_history: HashMap<String, Vec<Entry>>,
    /// Identity keys to pin (contacts first met through another device's session keys).
    pins: Vec<(String, micromsg_crypto::identity::IdentityPublicKey)>,
}

impl Batch {
    /// Whether this page already adds message `counter` of session `sid` that went
    /// `direction` to the history with `peer`.
    fn in_page(
        &self,
        peer: &str,
        direction: Direction,
        sid: [u8; SESSION_ID_LEN],
        counter: u64,
    ) -> bool {
        self.history.iter().any(|(p, entries)| {
            p == peer
                && entries
                    .iter()
                    .any(|e| e.direction == direction && e.session == sid && e.counter == counter)
        })
    }

    /// A GROUP frame or a MOVED notice (`opened.kind`): kept, and handed to the agent.
    fn push_kept(
        &mut self,
        item: &PendingItem,
        peer: &str,
        direction: Direction,
        opened: micromsg_crypto::message::Opened,
    ) {
        let kind = if opened.kind == Kind::Moved {
            KeptKind::Moved
        } else {
            KeptKind::Group
        };
        let frame = KeptFrame {
            id: item.id.clone(),
            kind,
            peer: peer.to_owned(),
            direction,
            time: opened.unix_secs,
            expires: item.expires,
            payload: BASE64.encode(&opened.payload),
        };
        self.arrived.push(kept_arrived(&frame, opened.payload));
        self.kept.push(frame);
    }

    fn push_message(
        &mut self,
        peer: &str,
        direction: Direction,
        from_device: u32,
        session: [u8; SESSION_ID_LEN],
        opened: micromsg_crypto::message::Opened,
        text: String,
    ) {
        let entry = Entry {
            direction,
            time: opened.unix_secs,
            text: text.clone(),
            session,
            counter: opened.counter,
            offline: true,
        };
        match self.history.iter_mut().find(|(p, _)| p == peer) {
            Some((_, entries)) => entries.push(entry),
            None => self.history.push((peer.to_owned(), vec![entry])),
        }
        self.arrived.push(Arrived::Message {
            peer: peer.to_owned(),
            direction,
            from_device,
            text,
            time: opened.unix_secs,
        });
    }
}

/// What a kept frame is handed to the agent as; `payload` is its decoded payload.
fn kept_arrived(frame: &KeptFrame, payload: Vec<u8>) -> Arrived {
    match frame.kind {
        KeptKind::Group => Arrived::Group {
            id: frame.id.clone(),
            peer: frame.peer.clone(),
            direction: frame.direction,
            time: frame.time,
            payload,
        },
        KeptKind::Moved => Arrived::Moved {
            id: frame.id.clone(),
            peer: frame.peer.clone(),
            payload,
        },
    }
}

/// Reads the answers to `ids`, sent in this order, and empties it. A refusal does not stop
/// the reading (the link stays in step); the first one is returned at the end. A failed link
/// stops it.
async fn answer_all(link: &mut BrokerLink, ids: &mut Vec<u32>) -> Result<(), LinkError> {
    let mut refused = None;
    for id in ids.drain(..) {
        match link.answer(id).await {
            Ok(_) => {}
            Err(e @ LinkError::Refused { .. }) => {
                refused.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    refused.map_or(Ok(()), Err)
}

/// A new random message id for DEPOSIT / SYNC-COPY.
pub fn new_message_id() -> Hex16 {
    use rand_core::RngCore;
    let mut id = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut id);
    Hex16::from_bytes(id)
}

/// The session id of an offline envelope, hex (for messages to people).
pub fn session_hex(id: &[u8; SESSION_ID_LEN]) -> String {
    hex::encode(id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use micromsg_crypto::handshake::Role;
    use micromsg_crypto::message::DirectionKeys;
    use micromsg_crypto::{IdentityKey, SessionKeys};
    use micromsg_wire::{Blob, DeviceId, Number};

    use super::*;
    use crate::p2p::StoredSession;
    use crate::profile::Profile;

    const ME: &str = "5550001";
    const PEER: &str = "5550002";
    const NOW: u64 = 1_700_000_000;

    /// This device's profile with one session with PEER, and PEER's side of that session.
    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        peer: StoredSession,
        /// This device's session as another device of ME seals with it (13.3 copies).
        other_device: StoredSession,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&Profile::new(dir.path()));
        let key = |b: u8| DirectionKeys {
            ts_key: Secret32::from_bytes([b; 32]),
            seed: Secret32::from_bytes([b ^ 0x55; 32]),
        };
        let ours = SessionKeys {
            session_id: [9; SESSION_ID_LEN],
            send: key(1),
            recv: key(2),
        };
        let theirs = SessionKeys {
            session_id: [9; SESSION_ID_LEN],
            send: key(2),
            recv: key(1),
        };
        let identity = |b: u8| IdentityKey::from_seed(&Secret32::from_bytes([b; 32])).public_key();
        store.pin_identity(PEER, &identity(3), NOW).unwrap();
        store
            .save_session(
                PEER,
                &StoredSession::new(&ours, Role::Initiator, identity(3), NOW),
            )
            .unwrap();
        let peer = StoredSession::new(&theirs, Role::Responder, identity(4), NOW);
        let other_device = StoredSession::new(&ours, Role::Initiator, identity(3), NOW);
        Fixture {
            _dir: dir,
            store,
            peer,
            other_device,
        }
    }

    impl Fixture {
        /// An inbox item from PEER: `payload` of `kind`, sealed with PEER's next counter.
        fn item(&mut self, id: u8, kind: Kind, payload: &[u8]) -> InboxMessage {
            InboxMessage {
                id: Hex16::from_bytes([id; 16]),
                from: Number::new(PEER).unwrap(),
                from_device: DeviceId::FIRST,
                time: NOW,
                expires: NOW + 3600,
                body: Blob::new(self.peer.seal_offline(NOW, kind, payload).unwrap()),
            }
        }

        /// An inbox item from device 2 of ME: the copy of a text it sent PEER (13.3).
        fn copy(&mut self, id: u8, text: &[u8]) -> InboxMessage {
            InboxMessage {
                id: Hex16::from_bytes([id; 16]),
                from: Number::new(ME).unwrap(),
                from_device: DeviceId::new(2).unwrap(),
                time: NOW,
                expires: NOW + 3600,
                body: Blob::new(
                    self.other_device
                        .seal_offline(NOW, Kind::Text, text)
                        .unwrap(),
                ),
            }
        }

        /// A new delivery (an agent starting), reading what the last one stored.
        fn delivery(&self) -> Delivery {
            Delivery::new(self.store.clone(), ME, 1, Secret32::from_bytes([5; 32])).unwrap()
        }

        /// Opens and stores `items` as a page of `fetch_all` does (the acknowledgement is
        /// not sent here).
        async fn take(&self, delivery: &mut Delivery, items: Vec<InboxMessage>) -> Vec<Arrived> {
            let (batch, _acks) = delivery.open(items, &mut LiveTable::new()).unwrap();
            delivery.commit(batch, NOW).await.unwrap()
        }
    }

    /// The texts in the history with PEER.
    fn texts(store: &Store) -> Vec<String> {
        store
            .read_history(PEER)
            .unwrap()
            .into_iter()
            .map(|e| e.text)
            .collect()
    }

    /// Makes an item with `make` in a fresh fixture, opens it and stores it with the commit
    /// cut after `cut` (a kill there: the page was not acknowledged), then takes it again with
    /// a new delivery, as the next agent would. Returns the fixture, the item, and how many
    /// messages the second take showed.
    async fn cut_then_take_again(
        make: fn(&mut Fixture) -> InboxMessage,
        cut: Step,
    ) -> (Fixture, InboxMessage, usize) {
        let mut fx = fixture();
        let item = make(&mut fx);
        let mut delivery = fx.delivery();
        let (batch, _) = delivery
            .open(vec![item.clone()], &mut LiveTable::new())
            .unwrap();
        assert!(batch.stored_history.is_empty(), "no history read");
        let mut state = delivery.state.clone();
        commit_batch_until(&fx.store, &mut state, batch, NOW, |step| step != cut).unwrap();
        drop(delivery); // killed there

        let arrived = fx.take(&mut fx.delivery(), vec![item.clone()]).await;
        let shown = arrived
            .iter()
            .filter(|a| matches!(a, Arrived::Message { .. }))
            .count();
        (fx, item, shown)
    }

    /// A kill can fall between any two of the commit's steps; the page was not acknowledged,
    /// so its items come again to the next agent. Whatever the point, the text is in the
    /// history once: before the fix, a cut after the history (then written first) and before
    /// the seen-set let it in a second time. And a page in the steady state reads no history.
    #[tokio::test]
    async fn a_text_whose_commit_was_cut_anywhere_is_in_the_history_once() {
        for cut in [Step::Pins, Step::SeenSets, Step::Confirmed, Step::History] {
            let (fx, item, shown) =
                cut_then_take_again(|fx| fx.item(1, Kind::Text, b"hello"), cut).await;
            assert_eq!(texts(&fx.store), ["hello"], "cut after {cut:?}");
            // Shown again when it was not in the history yet (the user may have missed it).
            let written = matches!(cut, Step::History);
            assert_eq!(shown, usize::from(!written), "cut after {cut:?}");
            // And once the page is stored, the item is a repeat by its id.
            fx.take(&mut fx.delivery(), vec![item]).await;
            assert_eq!(texts(&fx.store), ["hello"], "cut after {cut:?}");
        }
    }

    /// The same for a copy of what another device of ours sent, which has no seen-set: before
    /// `inbox-copies.json`, a cut after the history and before `inbox.json` wrote it twice.
    /// A page in the steady state reads no history for copies either.
    #[tokio::test]
    async fn a_copy_whose_commit_was_cut_anywhere_is_in_the_history_once() {
        let all = [
            Step::Pins,
            Step::SeenSets,
            Step::Confirmed,
            Step::Copies,
            Step::History,
        ];
        for cut in all {
            let (mut fx, copy, shown) =
                cut_then_take_again(|fx| fx.copy(1, b"sent elsewhere"), cut).await;
            assert_eq!(texts(&fx.store), ["sent elsewhere"], "cut after {cut:?}");
            let written = matches!(cut, Step::History);
            assert_eq!(shown, usize::from(!written), "cut after {cut:?}");
            fx.take(&mut fx.delivery(), vec![copy]).await;
            assert_eq!(texts(&fx.store), ["sent elsewhere"], "cut after {cut:?}");

            // The next copy, in the steady state, is added without reading the history.
            let later = fx.copy(2, b"later");
            let mut delivery = fx.delivery();
            let (batch, _) = delivery.open(vec![later], &mut LiveTable::new()).unwrap();
            assert!(batch.stored_history.is_empty(), "cut after {cut:?}");
            delivery.commit(batch, NOW).await.unwrap();
            assert_eq!(texts(&fx.store), ["sent elsewhere", "later"]);
        }
    }

    /// A copy deposited twice (one envelope under two inbox ids) in one page: one line.
    #[tokio::test]
    async fn one_copy_under_two_ids_in_a_page_is_in_the_history_once() {
        let mut fx = fixture();
        let first = fx.copy(1, b"sent elsewhere");
        let second = InboxMessage {
            id: Hex16::from_bytes([2; 16]),
            ..first.clone()
        };
        fx.take(&mut fx.delivery(), vec![first, second]).await;
        assert_eq!(texts(&fx.store), ["sent elsewhere"]);
    }

    /// The same envelope under two inbox ids in one page (a deposit made twice): one line.
    #[tokio::test]
    async fn one_envelope_under_two_ids_in_a_page_is_in_the_history_once() {
        let mut fx = fixture();
        let first = fx.item(1, Kind::Text, b"hello");
        let second = InboxMessage {
            id: Hex16::from_bytes([2; 16]),
            ..first.clone()
        };
        fx.take(&mut fx.delivery(), vec![first, second]).await;
        assert_eq!(texts(&fx.store), ["hello"]);
    }

    fn moved_ids(arrived: &[Arrived]) -> Vec<(String, Vec<u8>)> {
        arrived
            .iter()
            .filter_map(|a| match a {
                Arrived::Moved { id, peer, payload } if peer == PEER => {
                    Some((id.clone(), payload.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// A MOVED notice taken from the inbox is stored with the batch that lets its item be
    /// acknowledged, and stays until the agent reports it done: an agent killed between the
    /// two finds it again at its next start.
    #[tokio::test]
    async fn a_moved_notice_is_kept_until_the_agent_is_done_with_it() {
        let mut fx = fixture();
        let item = fx.item(1, Kind::Moved, b"notice");
        let id = item.id.to_hex();
        let mut delivery = fx.delivery();
        let arrived = fx.take(&mut delivery, vec![item]).await;
        let expected = vec![(id.clone(), b"notice".to_vec())];
        assert_eq!(moved_ids(&arrived), expected);
        drop(delivery); // killed before the agent followed it

        let mut next = fx.delivery();
        assert_eq!(moved_ids(&next.unfinished_frames()), expected);
        next.frames_done(std::slice::from_ref(&id), NOW)
            .await
            .unwrap();
        assert!(next.unfinished_frames().is_empty());
        assert!(fx.delivery().unfinished_frames().is_empty(), "for good");
    }

    /// A MOVED notice taken from the inbox first is marked for the live session, as a text
    /// or a group frame is: the same notice coming live after it is not followed twice.
    #[tokio::test]
    async fn a_moved_notice_from_the_inbox_is_marked_for_the_live_session() {
        let mut fx = fixture();
        let live_text = fx.item(1, Kind::Text, b"live");
        let notice = fx.item(2, Kind::Moved, b"notice");
        let counter = |item: &InboxMessage| {
            let body = item.body.clone().into_vec();
            let envelope = OfflineEnvelope::decode(&body).unwrap();
            micromsg_crypto::message::frame_counter(envelope.frame).unwrap()
        };
        let sid = [9; SESSION_ID_LEN];
        let mut live = LiveTable::new();
        live.insert(
            sid,
            LiveRecv {
                last: Some(counter(&live_text)),
                offline: BTreeSet::new(),
            },
        );
        let mut delivery = fx.delivery();
        let (batch, _) = delivery.open(vec![notice.clone()], &mut live).unwrap();
        delivery.commit(batch, NOW).await.unwrap();
        assert_eq!(live[&sid].offline, BTreeSet::from([counter(&notice)]));
    }

    /// The store's steps were cut after the session's seen-set (the notice's counter) and
    /// before the inbox state: the item comes again, and the notice is handed over again
    /// rather than dropped as a repeat.
    #[tokio::test]
    async fn a_moved_notice_whose_counter_was_stored_before_it_is_not_lost() {
        let mut fx = fixture();
        let item = fx.item(1, Kind::Moved, b"notice");
        let id = item.id.to_hex();
        let body = item.body.clone().into_vec();
        let envelope = OfflineEnvelope::decode(&body).unwrap();
        let mut found = fx
            .store
            .find_session(&envelope.session_id)
            .unwrap()
            .unwrap();
        assert!(
            found
                .session_mut()
                .open_offline(envelope.frame)
                .unwrap()
                .is_some()
        );
        fx.store.save_found(&found).unwrap();

        let mut delivery = fx.delivery();
        let arrived = fx.take(&mut delivery, vec![item]).await;
        let expected = vec![(id, b"notice".to_vec())];
        assert_eq!(moved_ids(&arrived), expected);
        assert_eq!(moved_ids(&fx.delivery().unfinished_frames()), expected);
    }

    /// A device waiting for the entity's keys (it joined, `Profile::awaiting_keys`) leaves
    /// this entity's link transfers it cannot open in the inbox, unacknowledged: one may be its
    /// own, for `device receive-keys`. Any other device acknowledges them as before (13.4), and
    /// one that opens with the transfer key given is taken.
    #[test]
    fn a_device_waiting_for_keys_leaves_link_transfers_it_cannot_open() {
        let fx = fixture();
        let bundle = KeyBundle {
            version: 1,
            number: ME.into(),
            identity_seed: hex::encode(&[7u8; 32]),
            contacts: Default::default(),
            sessions: Vec::new(),
            created: NOW,
        };
        let key = Secret32::from_bytes([9; 32]);
        let transfer = InboxMessage {
            id: Hex16::from_bytes([40; 16]),
            from: Number::new(ME).unwrap(),
            from_device: DeviceId::new(2).unwrap(),
            time: NOW,
            expires: NOW + 3600,
            body: Blob::new(keys::seal_link(&key, 1, &bundle).unwrap()),
        };
        let open = |delivery: Delivery| {
            let mut delivery = delivery;
            delivery
                .open(vec![transfer.clone()], &mut LiveTable::new())
                .unwrap()
        };
        let profile = Profile::new(fx._dir.path());
        let watching = || {
            fx.delivery()
                .leaving_link_transfers_while_awaiting(profile.clone())
        };
        let (batch, acks) = open(fx.delivery());
        assert_eq!(acks, vec![transfer.id], "not watching: acknowledged");
        assert!(batch.arrived.is_empty());
        let (_, acks) = open(watching());
        assert_eq!(acks, vec![transfer.id], "not marked: acknowledged");
        profile.set_awaiting_keys(true).unwrap();
        let (batch, acks) = open(watching());
        assert!(acks.is_empty(), "marked: acknowledged {acks:?}");
        assert!(batch.arrived.is_empty());
        let (batch, acks) = open(watching().with_link_key(key.clone()));
        assert_eq!(acks, vec![transfer.id], "opened: not acknowledged");
        assert!(matches!(batch.arrived[..], [Arrived::Linked(_)]));
        // The keys installed meanwhile (the mark cleared): the same delivery acknowledges.
        let mut delivery = watching();
        profile.set_awaiting_keys(false).unwrap();
        let (_, acks) = delivery
            .open(vec![transfer.clone()], &mut LiveTable::new())
            .unwrap();
        assert_eq!(acks, vec![transfer.id], "mark cleared: not acknowledged");
    }

    /// An inbox state written before MOVED notices were kept (group frames without `kind`)
    /// still loads, and what is kept now is written the same way for group frames.
    #[test]
    fn an_inbox_state_without_kinds_loads() {
        let old = r#"{"seen":{},"pending":[],"groups":[{"id":"01","peer":"5550002","direction":"in","time":1,"expires":2,"payload":"e30="}]}"#;
        let state: InboxState = serde_json::from_str(old).unwrap();
        assert_eq!(state.frames.len(), 1);
        assert_eq!(state.frames[0].kind, KeptKind::Group);
        assert_eq!(serde_json::to_string(&state).unwrap(), old);
        let mut moved = state.clone();
        moved.frames[0].kind = KeptKind::Moved;
        let json = serde_json::to_string(&moved).unwrap();
        assert!(json.contains(r#""kind":"moved""#), "{json}");
        assert_eq!(serde_json::from_str::<InboxState>(&json).unwrap(), moved);
    }
}
