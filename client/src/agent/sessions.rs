//! The session table: handshakes (outgoing and incoming) and what live sessions report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::account::unix_now;
use crate::inbox::LiveRecv;
use crate::p2p::{self, PeerEvent};
use crate::store::{Direction, Entry, PinResult};

use super::{Agent, HandshakeDone, Notice, Outgoing, Output, SessionEvent, TOKEN_GRACE, refused};

impl Agent {
    pub(super) fn spawn_respond(&self, stream: tokio::net::TcpStream) {
        self.spawn_respond_on(stream.into(), crate::relay::Path::Direct);
    }

    /// The responder's handshake on `stream`, a direct connection or this device's half of a
    /// relay (the same section-12 handshake either way).
    pub(super) fn spawn_respond_on(&self, stream: p2p::PeerStream, path: crate::relay::Path) {
        tokio::spawn(self.responder().run(stream, path));
    }

    /// What a responder's handshake needs from the agent, to run on its own task.
    pub(super) fn responder(&self) -> Responder {
        Responder {
            tokens: Arc::clone(&self.tokens),
            identity: Arc::clone(&self.identity),
            cfg: self.config.session.clone(),
            done: self.handshakes_tx.clone(),
        }
    }

    pub(super) async fn on_handshake(&mut self, done: HandshakeDone) {
        let mut waiting = done.request.and_then(|r| self.outgoing.remove(&r));
        let fail = |waiting: Option<Outgoing>, message: String| {
            if let Some(o) = waiting {
                for w in o.waiters {
                    let _ = w.send(Err(refused(message.clone())));
                }
                for (_, w) in o.queued {
                    let _ = w.send(Err(refused(message.clone())));
                }
            }
        };
        let path = done.path;
        let (peer, established) = match (done.peer, done.result) {
            (Some(peer), Ok(established)) => (peer, established),
            // A relay half whose other side never came (it reached us directly instead):
            // nothing to report.
            (_, Err(crate::p2p::P2pError::Closed)) if path == crate::relay::Path::Relay => {
                fail(
                    waiting,
                    "the relayed connection closed before the handshake".into(),
                );
                return;
            }
            (peer, Err(e)) => {
                let who = peer.unwrap_or_else(|| "an unknown peer".into());
                let message = format!("session setup with {who} failed: {e}");
                self.warn(message.clone()).await;
                fail(waiting, message);
                return;
            }
            (None, Ok(established)) => {
                established.close();
                return;
            }
        };
        let now = unix_now();
        if let Err(message) = self.check_member_key(&peer, &established.peer_identity) {
            established.close();
            self.warn(message.clone()).await;
            fail(waiting, message);
            return;
        }
        let (owned, key) = (peer.clone(), established.peer_identity);
        let pinned = match self
            .on_disk(move |s| s.pin_identity(&owned, &key, now))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                established.close();
                let message = format!("pinning {peer}'s identity failed: {e}");
                self.warn(message.clone()).await;
                fail(waiting, message);
                return;
            }
        };
        if let PinResult::Changed { old } = pinned {
            let message = format!(
                "{peer}'s identity key CHANGED: refusing the session. Compare safety numbers \
                 out of band before trusting the new key."
            );
            self.notify(Notice::IdentityChanged {
                peer: peer.clone(),
                pinned: old.to_hex(),
                presented: established.peer_identity.to_hex(),
            })
            .await;
            established.close();
            fail(waiting, message);
            return;
        }
        self.mark_repaired(&peer).await;
        let contact = self.store.contact(&peer).ok().flatten();
        let safety_number = crate::store::safety_number_with(
            &self.info.number,
            &self.identity.public_key(),
            &peer,
            &established.peer_identity,
            contact.as_ref(),
        )
        .unwrap_or_default();
        let stored = established.stored_session(now);
        let (owned, saved) = (peer.clone(), stored.clone());
        // Unconfirmed until the peer's first DATA frame shows it holds the keys too (12.3):
        // until then offline messages are sealed with the last session it confirmed.
        if let Err(e) = self
            .on_disk(move |s| s.save_new_session(&owned, &saved))
            .await
        {
            established.close();
            let message = format!("saving the session keys for {peer} failed: {e}");
            self.warn(message.clone()).await;
            fail(waiting, message);
            return;
        }
        let persist = self.store.counter_persister(&peer).ok();
        let session_id = established.session_id();
        self.live.insert(session_id, LiveRecv::default());
        let handle = established.start(persist);
        let (sender, mut events) = handle.into_parts();
        // A newer session with the same peer replaces the old one.
        if let Some((old, _)) = self
            .sessions
            .insert(peer.clone(), (sender.clone(), session_id))
        {
            let _ = old.close("replaced by a new session").await;
        }
        self.paths.insert(peer.clone(), path);
        let forward = self.events_tx.clone();
        let tag = peer.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if forward
                    .send(SessionEvent {
                        peer: tag.clone(),
                        session_id,
                        event,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        self.notify(Notice::SessionStarted {
            peer: peer.clone(),
            first_contact: pinned == PinResult::FirstUse,
            safety_number,
            path,
        })
        .await;
        self.share_session(&peer, &stored).await;
        if let Some(o) = waiting.as_mut() {
            for w in std::mem::take(&mut o.waiters) {
                let _ = w.send(Ok(Output::said(format!(
                    "session with {peer} is up ({})",
                    path.as_str()
                ))
                .with(super::Detail::Session {
                    peer: peer.clone(),
                    path,
                })));
            }
        }
        // What waited for this session (group frames for a first session with this member,
        // the request's messages) goes out once the peer confirms the keys (12.3): sent now,
        // it would hold this loop until then, and a peer doing the same towards us would
        // wait for this loop in turn.
        self.confirming.insert(session_id, (peer, waiting));
    }

    /// The peer confirmed session `session_id` (`confirmed`), or the session ended before it
    /// did: what waited for it goes out, live or through the outbox. Group frames waiting for
    /// a first session stay queued for the next session when this one never came up.
    async fn release_waiting(&mut self, session_id: [u8; 16], confirmed: bool) {
        let Some((peer, waiting)) = self.confirming.remove(&session_id) else {
            return;
        };
        if confirmed {
            self.send_awaiting(&peer).await;
        }
        let Some(o) = waiting else {
            return;
        };
        for (text, w) in o.queued {
            if w.cancelled() {
                let _ = w.send(super::cancelled_reply(
                    "nothing was sent (the session came up after the cancel)",
                ));
                continue;
            }
            let reply = self.send_text(&peer, &text).await;
            let _ = w.send(reply);
        }
    }

    pub(super) async fn on_session_event(&mut self, event: SessionEvent) {
        let SessionEvent {
            peer,
            session_id,
            event,
        } = event;
        match event {
            PeerEvent::Text {
                counter,
                unix,
                text,
            } => {
                let live = self.live.entry(session_id).or_default();
                live.last = Some(counter);
                if live.offline.remove(&counter) {
                    // Its broker copy arrived first and is already stored and shown.
                    return;
                }
                let entry = Entry {
                    direction: Direction::In,
                    time: unix,
                    text: text.clone(),
                    session: session_id,
                    counter,
                    offline: false,
                };
                let owned = peer.clone();
                if let Err(e) = self
                    .on_disk(move |s| s.append_history(&owned, &entry))
                    .await
                {
                    self.warn(format!("saving history failed: {e}")).await;
                }
                self.notify(Notice::Message {
                    from: peer,
                    text,
                    time: unix,
                    offline: false,
                })
                .await;
            }
            PeerEvent::Group {
                counter,
                unix,
                payload,
            } => {
                let live = self.live.entry(session_id).or_default();
                live.last = Some(counter);
                if live.offline.remove(&counter) {
                    return;
                }
                self.on_group_frame(&peer, Direction::In, &payload, unix, false)
                    .await;
            }
            PeerEvent::Confirmed => {
                // Offline messages may be sealed with this session from now on (12.11).
                if let Err(e) = self.on_disk(move |s| s.confirm_session(&session_id)).await {
                    self.warn(format!(
                        "recording that {peer} confirmed the session failed: {e}"
                    ))
                    .await;
                }
                self.release_waiting(session_id, true).await;
            }
            PeerEvent::Moved {
                counter, payload, ..
            } => {
                let live = self.live.entry(session_id).or_default();
                live.last = Some(counter);
                if live.offline.remove(&counter) {
                    return;
                }
                self.on_moved(&peer, &payload).await;
            }
            PeerEvent::Ended(end) => {
                if self
                    .sessions
                    .get(&peer)
                    .is_some_and(|(_, id)| *id == session_id)
                {
                    self.sessions.remove(&peer);
                    self.paths.remove(&peer);
                }
                if let Ok(Some(mut stored)) = self.store.load_session(&peer)
                    && stored.session_id == session_id
                {
                    stored.record_end(&end, unix_now());
                    let owned = peer.clone();
                    if let Err(e) = self.on_disk(move |s| s.save_session(&owned, &stored)).await {
                        self.warn(format!("saving the session end failed: {e}"))
                            .await;
                    }
                }
                self.notify(Notice::SessionEnded {
                    peer,
                    reason: end.reason.to_string(),
                })
                .await;
                self.release_waiting(session_id, false).await;
            }
        }
    }
}

/// A responder's handshake, detached from the agent (see [`Agent::responder`]).
pub(super) struct Responder {
    tokens: super::TokenTable,
    identity: Arc<micromsg_crypto::identity::IdentityKey>,
    cfg: p2p::SessionConfig,
    done: tokio::sync::mpsc::Sender<HandshakeDone>,
}

impl Responder {
    /// Answers the handshake on `stream` and reports it to the agent.
    pub(super) async fn run(self, stream: p2p::PeerStream, path: crate::relay::Path) {
        let Responder {
            tokens,
            identity,
            cfg,
            done,
        } = self;
        let peer_slot: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&peer_slot);
        let table = Arc::clone(&tokens);
        let lookup = async move |id: [u8; 16]| {
            // The broker's CONTACT-CONNECTING may still be on its way (or waiting while
            // this agent finishes a request): give it a moment before refusing.
            let deadline = Instant::now() + TOKEN_GRACE;
            loop {
                // Looked at, not taken: an INIT that does not verify must not spend the
                // token, or anyone who reaches this port first could block the session.
                let found = table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .map(|(token, peer, _)| (token.clone(), peer.clone()));
                if let Some((token, peer)) = found {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
                    return Some(token);
                }
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        // The INIT verified (protocol 12.3, step 4): it spends the token, once. A second
        // INIT that verified at the same moment finds it spent and is refused.
        let spend = |id: &[u8; 16], _: &_| {
            tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id)
                .is_some()
        };
        let result = p2p::respond(stream, lookup, &identity, cfg, spend).await;
        let peer = peer_slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = done
            .send(HandshakeDone {
                peer,
                request: None,
                result,
                path,
            })
            .await;
    }
}
