//! Relays between two clients that cannot reach each other directly (protocol.md 6.26,
//! docs/architecture.md "Relays").
//!
//! With each accepted contact request the broker offers a relay: a random id sent to both
//! parties with CONTACT-ACCEPTED and CONTACT-CONNECTING. A party that needs it opens a new TLS
//! connection to the client port, logs in as its device, and sends `RELAY` with the id; after
//! the OK the connection is a byte pipe. The first half waits (the other device is told with
//! RELAY-WAITING); the second is spliced to it ([`splice`]). The bytes are the section-12
//! session, end-to-end encrypted: the broker copies and counts them and learns nothing else.
//!
//! [`registry`] keeps the rules (who may join what, the limits) without I/O; this module
//! holds it under a lock, runs the splices and tells the clients when a relay closes.

pub mod registry;
pub mod remote;
pub mod splice;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use micromsg_wire::message::event::{RelayClosed, RelayWaiting};
use micromsg_wire::{Event, Hex16, Number};
use rand_core::{OsRng, RngCore};
use tracing::debug;

use crate::config::RelayConfig;
use crate::online::{Online, Push};
pub use registry::Refused;
use registry::{Attached, Registry, RegistryLimits};
pub use registry::{Party, RelayId, Reservation};
pub use splice::Half;
use splice::SpliceLimits;

/// The relay counters (`micromsg-broker status`, metrics).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes copied, both directions, since start.
    pub bytes: Arc<AtomicU64>,
    /// Relays spliced since start.
    pub spliced: AtomicU64,
    /// Joins refused by `max_per_device` or `max_total`, since start.
    pub refused_by_limit: AtomicU64,
}

/// The broker's relays. See the module docs.
#[derive(Debug)]
pub struct Relays {
    config: RelayConfig,
    registry: Mutex<Registry<Half>>,
    online: Arc<Online>,
    /// The network's links, for relays whose other client is on a peer broker.
    federation: Option<Arc<crate::federation::Federation>>,
    /// `RelayWaiting` calls that came before the `Accepted` call that makes their offer (two
    /// calls from a peer are not ordered): by id, the peer and when; bounded like the offers.
    early_waiting: Mutex<std::collections::HashMap<RelayId, (String, Instant)>>,
    max_offers: usize,
    /// Turns true at the broker's shutdown ([`Relays::stop_all`]): every splice ends.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The counters.
    pub stats: RelayStats,
}

impl Relays {
    /// Relays under `config`; offers live `offer_ttl` (the contact request's lifetime) and at
    /// most `max_offers` are kept.
    pub fn new(
        config: RelayConfig,
        online: Arc<Online>,
        federation: Option<Arc<crate::federation::Federation>>,
        offer_ttl: Duration,
        max_offers: usize,
    ) -> Self {
        let limits = RegistryLimits {
            max_per_device: config.max_per_device,
            max_total: config.max_total,
            max_offers,
            offer_ttl,
        };
        Self {
            config,
            registry: Mutex::new(Registry::new(limits)),
            online,
            federation,
            early_waiting: Mutex::default(),
            max_offers,
            stopping: tokio::sync::watch::Sender::new(false),
            stats: RelayStats::default(),
        }
    }

    /// For a graceful shutdown: ends every relay. A spliced one closes both sides in order
    /// (TLS `close_notify`), a waiting half is dropped, and both parties' devices that are
    /// still connected are told why (RELAY-CLOSED). A relay that joins later ends at once.
    pub fn stop_all(&self) {
        self.stopping.send_replace(true);
        let waiting = self.lock().stale_waiting(Duration::ZERO, Instant::now());
        let reason = splice::Ended::Shutdown.reason(Duration::ZERO);
        for id in waiting {
            self.closed(&id, &reason);
        }
    }

    /// Relays with a joined half right now.
    pub fn open(&self) -> u32 {
        self.lock().open()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry<Half>> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A relay id for the accepted contact request between `caller` and `target` (a device
    /// on this broker each, or the caller on a peer broker), or `None` when relays are off or a
    /// device is unknown.
    pub fn offer(&self, caller: Option<Party>, target: Option<Party>) -> Option<Hex16> {
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        self.offer_with_id(id, caller, target)
    }

    /// Records the relay a peer broker offered (`AcceptedRequest.relay`) for this broker's
    /// `caller` and the `target` on that peer; `None` when relays are off here.
    pub fn offer_with_id(
        &self,
        id: RelayId,
        caller: Option<Party>,
        target: Option<Party>,
    ) -> Option<Hex16> {
        if !self.config.enabled {
            return None;
        }
        let (caller, target) = (caller?, target?);
        self.lock().offer(id, caller, target, Instant::now());
        Some(Hex16::from_bytes(id))
    }

    /// After the offer of a peer's relay was recorded and the caller told (CONTACT-ACCEPTED): a
    /// `RelayWaiting` that came before it is delivered now.
    pub fn deliver_early_waiting(&self, id: RelayId, peer: &str) {
        let early = self
            .early_waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        if matches!(early, Some((from, _)) if from == peer) {
            self.remote_waiting(id, peer);
        }
    }

    /// The half of the client on peer broker `peer` arrived over the federation link (`Relay`).
    pub fn attach_remote(
        self: &Arc<Self>,
        id: RelayId,
        peer: &str,
        half: Half,
    ) -> Result<(), Refused> {
        let reservation = self.lock().reserve_remote(&id, peer, Instant::now())?;
        self.attach(reservation, half);
        Ok(())
    }

    /// The peer broker `peer` says its client (the target) joined relay `id` first: tell the
    /// caller here.
    pub fn remote_waiting(&self, id: RelayId, peer: &str) {
        let parties = self.lock().parties(&id).cloned();
        let Some([caller, target]) = parties else {
            // Its offer may be on its way (`Accepted`): keep the call for a moment.
            let mut early = self
                .early_waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            early.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(30));
            if early.len() < self.max_offers {
                early.insert(id, (peer.to_owned(), now));
            }
            return;
        };
        if target.broker.as_deref() != Some(peer) || caller.broker.is_some() {
            return;
        }
        let Ok(from) = Number::new(target.number.clone()) else {
            return;
        };
        self.push(
            &caller,
            Event::RelayWaiting(RelayWaiting {
                relay: Hex16::from_bytes(id),
                from,
            }),
        );
    }

    /// RELAY from `who`: may it join relay `id`? The connection answers a refusal with its
    /// typed error (protocol.md 6.26); [`Self::describe`] says it for people.
    pub fn reserve(&self, id: &Hex16, who: Party) -> Result<Reservation, Refused> {
        let reserved = self.lock().reserve(id.as_bytes(), &who, Instant::now());
        if matches!(reserved, Err(Refused::DeviceLimit | Refused::BrokerLimit)) {
            self.stats.refused_by_limit.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// A refusal, for people.
    pub fn describe(&self, refused: Refused) -> String {
        match refused {
            Refused::Unknown => {
                "no such relay for this device (unknown, expired, already joined or not yours)"
                    .into()
            }
            Refused::DeviceLimit => format!(
                "this device has {} relays open (relay.max_per_device); close one or try again \
                 later",
                self.config.max_per_device
            ),
            Refused::BrokerLimit => format!(
                "this broker has {} relays open (relay.max_total); try again later",
                self.config.max_total
            ),
        }
    }

    /// The reserved half's connection is now a pipe: it waits for the other, or is spliced to
    /// it.
    pub fn attach(self: &Arc<Self>, reservation: Reservation, half: Half) {
        let attached = self.lock().attach(&reservation, half, Instant::now());
        match attached {
            Attached::Waiting => {
                debug!(side = reservation.side, "relay half waiting");
                match reservation.other.broker.clone() {
                    // The other client is here: tell its device.
                    None => {
                        if let Some(me) = self.party_of(&reservation) {
                            self.push(
                                &reservation.other,
                                Event::RelayWaiting(RelayWaiting {
                                    relay: Hex16::from_bytes(reservation.id),
                                    from: me,
                                }),
                            );
                        }
                    }
                    // Our client is the caller: this broker opens the stream to the target's,
                    // which stands for the target's half here.
                    Some(peer) if reservation.side == 0 => self.dial(peer, reservation.id),
                    // Our client is the target: the caller's broker tells its client.
                    Some(peer) => {
                        if let Some(federation) = &self.federation {
                            remote::notify_waiting(federation, &peer, reservation.id);
                        }
                    }
                }
                let relays = Arc::clone(self);
                let id = reservation.id;
                let wait = Duration::from_secs(self.config.join_timeout_secs);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    relays.give_up_waiting(&id, wait);
                });
            }
            Attached::Pair([a, b]) => {
                debug!("relay spliced");
                self.stats.spliced.fetch_add(1, Ordering::Relaxed);
                let relays = Arc::clone(self);
                let limits = SpliceLimits {
                    bytes_per_sec: self.config.bytes_per_sec,
                    idle: Duration::from_secs(self.config.idle_timeout_secs),
                    buffer: self.config.buffer_bytes as usize,
                };
                let bytes = Arc::clone(&self.stats.bytes);
                let id = reservation.id;
                let stopping = self.stopping.subscribe();
                tokio::spawn(async move {
                    let ended = splice::splice(a, b, limits, bytes, stopping).await;
                    debug!(?ended, "relay ended");
                    relays.closed(&id, &ended.reason(limits.idle));
                });
            }
            Attached::Gone(_half) => {
                // Dropping the half closes its connection; the counts were released with
                // the offer.
            }
        }
    }

    /// Opens the federation stream of relay `id` to `peer` and attaches it as the target's
    /// half; a failure closes the relay with the reason.
    fn dial(self: &Arc<Self>, peer: String, id: RelayId) {
        let relays = Arc::clone(self);
        tokio::spawn(async move {
            let Some(federation) = relays.federation.clone() else {
                relays.closed(&id, "this broker is in no network");
                return;
            };
            match remote::dial(&federation, &peer, id).await {
                Ok(half) => {
                    if relays.attach_remote(id, &peer, half).is_err() {
                        relays.closed(&id, "the relay went away while the peer broker answered");
                    }
                }
                Err(why) => relays.closed(&id, &why),
            }
        });
    }

    /// The number of the reserving side (the one that is not `other`).
    fn party_of(&self, reservation: &Reservation) -> Option<Number> {
        // The reserving party is not stored in the reservation; the registry knows both, but
        // the RELAY-WAITING event only needs the number, which the caller gave to reserve.
        // Kept here so the event names who joined without another lock.
        self.lock()
            .parties(&reservation.id)
            .and_then(|p| Number::new(p[reservation.side].number.clone()).ok())
    }

    fn give_up_waiting(&self, id: &RelayId, waited: Duration) {
        let stale = self.lock().stale_waiting(waited, Instant::now());
        if stale.contains(id) {
            self.closed(
                id,
                &format!(
                    "the other side did not join within {} s (relay.join_timeout_secs)",
                    waited.as_secs()
                ),
            );
        }
    }

    /// Forgets relay `id` (dropping a waiting half closes it) and tells both parties why.
    fn closed(&self, id: &RelayId, reason: &str) {
        let Some((parties, _waiting)) = self.lock().close(id) else {
            return;
        };
        for party in &parties {
            self.push(
                party,
                Event::RelayClosed(RelayClosed {
                    relay: Hex16::from_bytes(*id),
                    reason: reason.to_owned(),
                }),
            );
        }
    }

    /// Sends `event` to `party`'s device, when it is on this broker.
    fn push(&self, party: &Party, event: Event) {
        if party.broker.is_some() {
            return;
        }
        let event = &event;
        self.online.push_all(&party.number, Some(party.device), || {
            Push::event(event.clone())
        });
    }
}
