//! The relay, as this agent uses it (protocol.md 6.26): which relay ids came with this
//! device's contact requests, when to join one, and what the broker says about them.
//!
//! - The **caller** (CONTACT-ACCEPTED) tries the direct connection first, for at most
//!   `direct_timeout`; if it fails, or the target has already joined the relay (RELAY-WAITING),
//!   it joins the relay and runs the same handshake there.
//! - The **target** (CONTACT-CONNECTING) joins at once when it cannot be reached directly
//!   ([`Reach`](crate::relay::Reach)), and otherwise when the caller has joined (RELAY-WAITING).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use micromsg_wire::Hex16;
use micromsg_wire::message::event::{RelayClosed, RelayWaiting};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::relay::{self, Path};

use super::{Agent, HandshakeDone};

/// How long a relay id is remembered (a contact request's lifetime at the broker, 120 s by
/// default, and a margin).
const RELAY_NOTE_TTL: Duration = Duration::from_secs(180);

/// Relay ids this device was given, by id.
#[derive(Debug, Default)]
pub(super) struct RelayTable {
    notes: HashMap<[u8; 16], Note>,
}

#[derive(Debug)]
struct Note {
    peer: String,
    role: Role,
    expires: Instant,
}

#[derive(Debug)]
enum Role {
    /// We asked: the connect task waits on this to give up the direct attempt.
    Caller(Arc<Notify>),
    /// We accepted; `joined` once our half is open.
    Target { joined: bool },
}

impl RelayTable {
    fn forget_expired(&mut self) {
        let now = Instant::now();
        self.notes.retain(|_, n| n.expires > now);
    }

    /// The caller's note: returns what the connect task waits on.
    pub(super) fn caller(&mut self, relay: &Hex16, peer: &str) -> Arc<Notify> {
        self.forget_expired();
        let switch = Arc::new(Notify::new());
        self.notes.insert(
            *relay.as_bytes(),
            Note {
                peer: peer.to_owned(),
                role: Role::Caller(Arc::clone(&switch)),
                expires: Instant::now() + RELAY_NOTE_TTL,
            },
        );
        switch
    }

    fn target(&mut self, relay: &Hex16, peer: &str) {
        self.forget_expired();
        self.notes.insert(
            *relay.as_bytes(),
            Note {
                peer: peer.to_owned(),
                role: Role::Target { joined: false },
                expires: Instant::now() + RELAY_NOTE_TTL,
            },
        );
    }
}

/// `status`: the broker link and the live sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// This entity's number.
    pub number: String,
    /// This device.
    pub device: u32,
    /// `connected` or `offline`.
    pub broker: String,
    /// Messages waiting in the outbox.
    pub outbox: usize,
    /// The live sessions, by peer.
    pub sessions: Vec<LiveSession>,
}

/// One live session in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSession {
    /// The contact.
    pub peer: String,
    /// `direct` or `relay`.
    pub path: Path,
}

impl Agent {
    /// CONTACT-CONNECTING carried a relay id: remember it, and join at once when this device
    /// cannot be reached directly.
    pub(super) fn note_target_relay(&mut self, relay: &Hex16, caller: &str) {
        self.relays.target(relay, caller);
        let seen_unchanged = self.link.as_ref().and_then(|l| l.seen_unchanged());
        if self.config.reach.relay_at_once(seen_unchanged) {
            self.join_as_target(relay);
        }
    }

    /// Opens this device's half of `relay` as the target and answers the handshake on it.
    fn join_as_target(&mut self, relay: &Hex16) {
        let Some(note) = self.relays.notes.get_mut(relay.as_bytes()) else {
            return;
        };
        let Role::Target { joined } = &mut note.role else {
            return;
        };
        if *joined {
            return;
        }
        *joined = true;
        let peer = note.peer.clone();
        let profile = self.profile.clone();
        let relay = *relay;
        let done = self.handshakes_tx.clone();
        let responder = self.responder();
        tokio::spawn(async move {
            match relay::open(&profile, &relay).await {
                Ok(relayed) => responder.run(relayed.into(), Path::Relay).await,
                Err(e) => {
                    let _ = done
                        .send(HandshakeDone {
                            peer: Some(peer),
                            request: None,
                            result: Err(crate::p2p::P2pError::Relay(e.to_string())),
                            path: Path::Relay,
                        })
                        .await;
                }
            }
        });
    }

    /// RELAY-WAITING: the other side joined. The caller gives up its direct attempt; the target
    /// joins.
    pub(super) async fn on_relay_waiting(&mut self, w: RelayWaiting) {
        let Some(note) = self.relays.notes.get(w.relay.as_bytes()) else {
            return;
        };
        if note.peer != w.from.as_str() {
            return;
        }
        match &note.role {
            Role::Caller(switch) => switch.notify_one(),
            Role::Target { .. } => self.join_as_target(&w.relay),
        }
    }

    /// RELAY-CLOSED: the broker ended a relay. A normal end says nothing (the session's own
    /// end is reported); anything else is shown.
    pub(super) async fn on_relay_closed(&mut self, c: RelayClosed) {
        let Some(note) = self.relays.notes.remove(c.relay.as_bytes()) else {
            return;
        };
        // A relay the other side gave up on while this session went direct is no news.
        let direct = self.paths.get(&note.peer) == Some(&Path::Direct);
        if c.reason != "the session ended" && !direct {
            self.warn(format!(
                "the relay with {} was closed by the broker: {}",
                note.peer, c.reason
            ))
            .await;
        }
    }

    /// `status`.
    pub(super) fn status(&self) -> Status {
        let mut sessions: Vec<LiveSession> = self
            .sessions
            .keys()
            .map(|peer| LiveSession {
                peer: peer.clone(),
                path: self.paths.get(peer).copied().unwrap_or(Path::Direct),
            })
            .collect();
        sessions.sort_by(|a, b| a.peer.cmp(&b.peer));
        Status {
            number: self.info.number.clone(),
            device: self.info.device,
            broker: if self.link.is_some() {
                "connected"
            } else {
                "offline"
            }
            .into(),
            outbox: self.outbox.len(),
            sessions,
        }
    }
}
