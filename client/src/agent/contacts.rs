//! Contact setup: asking (INITIATE, networked or not), answering a request under the accept
//! policy, the connect token, block and unblock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::sealed;
use micromsg_wire::message::event::{ContactAccepted, ContactConnecting, ContactRequest};
use micromsg_wire::message::request::{
    Answer, ContactAnswerArgs, InitiateNetworkedArgs, InitiateNewArgs, TargetArgs,
};
use micromsg_wire::message::response::Home;
use micromsg_wire::{Address, Blob, Hex16, Hex32, Number, Request, ResponseData};
use rand_core::OsRng;

use crate::account::unix_now;
use crate::link::LinkError;
use crate::p2p::{self};
use crate::relay::Path;

use super::{AcceptPolicy, Agent, Asked, HandshakeDone, Notice, Outgoing, Output, Waiter, refused};

impl Agent {
    /// A rejected caller is blocked at the broker (the seed's rule): the contact list says so.
    pub(super) async fn record_rejected(&mut self, from: &str) {
        let number = from.to_owned();
        let now = unix_now();
        if let Err(e) = self
            .on_disk(move |s| s.set_blocked(&number, true, now))
            .await
        {
            self.warn(format!("recording {from} as blocked: {e}")).await;
        }
    }

    pub(super) async fn on_contact_request(&mut self, r: ContactRequest) {
        let from = r.from.as_str().to_owned();
        let known = matches!(self.store.contact(&from), Ok(Some(c)) if !c.blocked);
        let caller_key = if r.networked {
            match r.pubkey {
                Some(pk) => Some(*pk.as_bytes()),
                None => {
                    self.warn(format!(
                        "networked contact request from {from} without a public key: ignored"
                    ))
                    .await;
                    return;
                }
            }
        } else {
            None
        };
        // A fellow member of a group (docs/groups.md 3, "Sessions between members"): its
        // handshake must then present the key the group carries for it (checked before the
        // pin, in `on_handshake`).
        // Never for a number the user blocked.
        let blocked = matches!(self.store.contact(&from), Ok(Some(c)) if c.blocked);
        let member = !known && !blocked && self.accepts_as_member(&from);
        // One side moved (protocol 12.13): the pair for the current numbers is set up again
        // without asking; the handshake must present the pinned key (checked in
        // `on_handshake`), so only the contact itself gets through.
        let repair = matches!(self.store.contact(&from), Ok(Some(c)) if c.repair && !c.blocked && c.identity.is_some());
        let decision = match self.config.accept {
            _ if member || repair => Some(true),
            AcceptPolicy::Any => Some(true),
            AcceptPolicy::Contacts => Some(known),
            // On one broker the broker answers for us (AUTO-EXISTING); for a peer broker's
            // caller only this device can seal its address, so it answers itself (11.3).
            AcceptPolicy::Ask
                if r.networked
                    && known
                    && self.config.auto_existing
                    && r.kind.as_str() == "EXISTING" =>
            {
                Some(true)
            }
            AcceptPolicy::Ask => None,
        };
        match decision {
            Some(accept) => {
                if let Err(e) = self.answer(r.request, accept, caller_key).await {
                    self.warn(format!("answering {from}: {e}")).await;
                } else if !accept {
                    self.record_rejected(&from).await;
                    self.notify(Notice::ContactRefused { from }).await;
                }
            }
            None => {
                self.asked.insert(
                    *r.request.as_bytes(),
                    Asked {
                        from: from.clone(),
                        caller_key,
                    },
                );
                self.notify(Notice::ContactRequest {
                    from,
                    request: r.request.to_hex(),
                    kind: r.kind.as_str().to_owned(),
                })
                .await;
            }
        }
    }

    /// Answers a contact request. Accepting a networked one seals this device's address to
    /// the caller's broker-keypair public key with a fresh pair of our own (protocol 11.4), so
    /// neither broker learns it.
    pub(super) async fn answer(
        &mut self,
        request: Hex16,
        accept: bool,
        caller_key: Option<[u8; 32]>,
    ) -> Result<(), LinkError> {
        let answer = match (accept, caller_key) {
            (false, _) => Answer::Decline,
            (true, None) => Answer::Accept {
                address: self.address()?,
            },
            (true, Some(caller_key)) => {
                let address = self.reachable_address()?;
                let ours = EphemeralSecret::generate(&mut OsRng);
                let sealed =
                    sealed::seal(&ours, &caller_key, address.as_str().as_bytes(), &mut OsRng)
                        .map_err(|e| LinkError::Protocol(format!("sealing the address: {e}")))?;
                Answer::AcceptNetworked {
                    pubkey: Hex32::from_bytes(ours.public_key()),
                    sealed_address: Blob::new(sealed),
                }
            }
        };
        self.call(Request::ContactAnswer(ContactAnswerArgs {
            request,
            answer,
        }))
        .await
        .map(drop)
    }

    /// The address a peer on another broker can connect to. The broker cannot fill in an
    /// unspecified host for us (it only sees the sealed form), so `0.0.0.0`/`[::]` becomes the
    /// local address of the broker connection: the interface that reaches the network.
    pub(super) fn reachable_address(&self) -> Result<Address, LinkError> {
        let address = self.address()?;
        if !matches!(address.host(), "0.0.0.0" | "[::]") {
            return Ok(address);
        }
        let link = self.link.as_ref().ok_or(LinkError::Offline)?;
        let ip = link.local_ip().ok_or_else(|| {
            LinkError::Protocol("the broker connection has no local address".into())
        })?;
        let text = match ip {
            std::net::IpAddr::V4(v4) => format!("{v4}:{}", address.port()),
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", address.port()),
        };
        Address::new(text).map_err(|e| LinkError::Protocol(format!("local address: {e}")))
    }

    pub(super) fn on_contact_connecting(&mut self, c: ContactConnecting) {
        let token = Secret32::from_bytes(*c.token.as_bytes());
        let id = micromsg_crypto::handshake::token_id(&token);
        let expires = Instant::now() + self.config.answer_timeout;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (token, c.from.as_str().to_owned(), expires));
        if let Some(relay) = &c.relay {
            self.note_target_relay(relay, c.from.as_str());
        }
    }

    pub(super) async fn on_contact_accepted(&mut self, a: ContactAccepted) {
        let request = *a.request.as_bytes();
        let peer = a.target.as_str().to_owned();
        let address = match (a.address, a.sealed_address, a.pubkey) {
            (Some(address), None, _) => address,
            (None, Some(sealed), Some(theirs)) => {
                let opened = self
                    .outgoing
                    .get_mut(&request)
                    .and_then(|o| o.broker_key.take())
                    .ok_or("no networked request of ours has this id")
                    .and_then(|ours| {
                        sealed::open(&ours, theirs.as_bytes(), sealed.as_bytes())
                            .map_err(|_| "it does not open with our key")
                    })
                    .and_then(|plain| {
                        String::from_utf8(plain)
                            .ok()
                            .and_then(|text| Address::new(text).ok())
                            .ok_or("it is not an address")
                    });
                match opened {
                    Ok(address) => address,
                    Err(why) => {
                        // Protocol 11.4: abandon the request; the waiters hear it.
                        let message = format!(
                            "{peer} accepted, but the sealed address is unusable ({why}): the \
                             brokers may be misbehaving"
                        );
                        self.warn(message.clone()).await;
                        if let Some(o) = self.outgoing.remove(&request) {
                            for w in o.waiters {
                                let _ = w.send(Err(refused(message.clone())));
                            }
                            for (_, w) in o.queued {
                                let _ = w.send(Err(refused(message.clone())));
                            }
                        }
                        return;
                    }
                }
            }
            _ => {
                self.warn(format!("{peer} accepted without a usable address"))
                    .await;
                return;
            }
        };
        let token = Secret32::from_bytes(*a.token.as_bytes());
        let identity = Arc::clone(&self.identity);
        let cfg = self.config.session.clone();
        let done = self.handshakes_tx.clone();
        let _ = self
            .store
            .set_address(&peer, Some(address.as_str().to_owned()), unix_now());
        let relay = a
            .relay
            .map(|relay| (relay, self.relays.caller(&relay, &peer)));
        let (profile, direct_timeout) = (self.profile.clone(), self.config.direct_timeout);
        tokio::spawn(async move {
            let (result, path) = match relay {
                // Direct first (protocol.md 6.26); the relay when that fails within the
                // direct timeout, or as soon as the target says it waits there.
                Some((relay, switch)) => {
                    // Only the TCP connection races the switch: once it is made, the handshake
                    // runs to its end on it (an INIT that reached the target has spent the
                    // token, so a relayed INIT after it would be refused).
                    let connect = tokio::time::timeout(
                        direct_timeout,
                        tokio::net::TcpStream::connect(address.as_str()),
                    );
                    let stream = tokio::select! {
                        result = connect => result.ok().and_then(Result::ok),
                        () = switch.notified() => None,
                    };
                    let direct = match stream {
                        Some(stream) => {
                            match p2p::initiate(stream, &token, &identity, cfg.clone(), |_| true)
                                .await
                            {
                                Ok(established) => Some(Ok(established)),
                                // The target refused or failed the handshake itself: the relay
                                // would carry the same refusal.
                                Err(
                                    e @ p2p::P2pError::Handshake(_)
                                    | e @ p2p::P2pError::PeerRefused,
                                ) => Some(Err(e)),
                                Err(_) => None,
                            }
                        }
                        None => None,
                    };
                    match direct {
                        Some(result) => (result, Path::Direct),
                        None => {
                            let result = match crate::relay::open(&profile, &relay).await {
                                Ok(relayed) => {
                                    p2p::initiate(relayed, &token, &identity, cfg, |_| true).await
                                }
                                Err(e) => Err(p2p::P2pError::Relay(e.to_string())),
                            };
                            (result, Path::Relay)
                        }
                    }
                }
                None => (
                    p2p::connect(address.as_str(), &token, &identity, cfg).await,
                    Path::Direct,
                ),
            };
            let _ = done
                .send(HandshakeDone {
                    peer: Some(peer),
                    request: Some(request),
                    result,
                    path,
                })
                .await;
        });
    }

    pub(super) async fn block(&mut self, number: &str, block: bool) -> super::Answer {
        let Ok(target) = Number::new(number.to_owned()) else {
            return Err(refused(crate::store::not_a_number(number)));
        };
        let request = if block {
            Request::Block(TargetArgs { target })
        } else {
            Request::Unblock(TargetArgs { target })
        };
        if let Err(e) = self.call(request).await {
            return Err(refused(e.to_string()));
        }
        let (owned, now) = (number.to_owned(), unix_now());
        if let Err(e) = self
            .on_disk(move |s| s.set_blocked(&owned, block, now))
            .await
        {
            return Err(refused(e.to_string()));
        }
        if block && let Some((sender, _)) = self.sessions.get(number) {
            let _ = sender.close("blocked").await;
        }
        Ok(Output::said(if block { "blocked" } else { "unblocked" }))
    }

    /// Whether `target` lives on a peer broker (IS-NETWORKED, protocol 11.1); an error when no
    /// broker of the network serves it.
    pub(super) async fn is_networked(&mut self, target: &Number) -> Result<bool, String> {
        if let Some(&networked) = self.networked.get(target.as_str()) {
            return Ok(networked);
        }
        let data = match self
            .call(Request::IsNetworked(TargetArgs {
                target: target.clone(),
            }))
            .await
        {
            Ok(ResponseData::IsNetworked(data)) => data,
            Ok(other) => return Err(format!("unexpected answer {}", other.kind().as_str())),
            Err(e) => return Err(e.to_string()),
        };
        if data.home == Home::None {
            return Err(format!(
                "{target} is outside the number space of this broker and its network"
            ));
        }
        self.networked
            .insert(target.as_str().to_owned(), data.networked);
        Ok(data.networked)
    }

    pub(super) async fn initiate(
        &mut self,
        number: String,
        text: Option<String>,
        reply: Waiter,
        existing: bool,
        wait: Option<Duration>,
    ) {
        let Ok(target) = Number::new(number.clone()) else {
            let _ = reply.send(Err(refused(crate::store::not_a_number(&number))));
            return;
        };
        if number == self.info.number {
            let _ = reply.send(Err(refused("that is your own number")));
            return;
        }
        let networked = match self.is_networked(&target).await {
            Ok(networked) => networked,
            Err(message) => {
                let _ = reply.send(Err(refused(message)));
                return;
            }
        };
        // A fresh broker keypair per networked request (protocol 11.2).
        let broker_key = networked.then(|| EphemeralSecret::generate(&mut OsRng));
        let request = match (&broker_key, existing) {
            (None, true) => Request::InitiateExisting(TargetArgs { target }),
            (None, false) => Request::InitiateNew(InitiateNewArgs {
                target,
                address: None,
            }),
            (Some(key), existing) => {
                let args = InitiateNetworkedArgs {
                    target,
                    pubkey: Hex32::from_bytes(key.public_key()),
                };
                if existing {
                    Request::InitiateExistingNetworked(args)
                } else {
                    Request::InitiateNewNetworked(args)
                }
            }
        };
        let id = match self.call(request).await {
            Ok(
                ResponseData::InitiateNew(d)
                | ResponseData::InitiateExisting(d)
                | ResponseData::InitiateNewNetworked(d)
                | ResponseData::InitiateExistingNetworked(d),
            ) => *d.request.as_bytes(),
            Ok(other) => {
                let _ = reply.send(Err(refused(format!(
                    "unexpected answer {}",
                    other.kind().as_str()
                ))));
                return;
            }
            Err(e) => {
                // NOT-NETWORKED for a number ported here from a peer broker, among others:
                // the next request asks IS-NETWORKED again.
                self.networked.remove(&number);
                let _ = reply.send(Err(refused(e.to_string())));
                return;
            }
        };
        let deposit_on_timeout = text.is_some();
        let wait = wait.unwrap_or(if deposit_on_timeout {
            self.config.offline_after
        } else {
            self.config.answer_timeout
        });
        let mut waiting = Outgoing {
            target: number,
            deadline: Instant::now() + wait,
            waiters: Vec::new(),
            queued: Vec::new(),
            deposit_on_timeout,
            broker_key,
        };
        match text {
            Some(text) => waiting.queued.push((text, reply)),
            None => waiting.waiters.push(reply),
        }
        self.outgoing.insert(id, waiting);
    }
}
