//! The relays' bookkeeping, without I/O: the offers made with accepted contact requests, who
//! may join which half, the half that waits for the other, and the counts the limits are
//! checked against. Time is passed in; a half is any value (`H`), so the rules are tested
//! without sockets.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A relay id (protocol.md 6.26): 16 random bytes handed to the two parties of one accepted
/// contact request.
pub type RelayId = [u8; 16];

/// A party to a relay: one device of one entity on this broker, or an entity on a peer
/// broker (whose half arrives over the federation link).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Party {
    /// The entity's number.
    pub number: String,
    /// Its device (0 for a party on a peer broker: that broker knows which).
    pub device: u32,
    /// The peer broker the party is on; `None` for this broker.
    pub broker: Option<String>,
}

impl Party {
    /// A device on this broker.
    pub fn local(number: impl Into<String>, device: u32) -> Self {
        Self {
            number: number.into(),
            device,
            broker: None,
        }
    }

    /// An entity on peer broker `broker`.
    pub fn remote(number: impl Into<String>, broker: impl Into<String>) -> Self {
        Self {
            number: number.into(),
            device: 0,
            broker: Some(broker.into()),
        }
    }
}

/// What the registry is bounded by.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    /// Relays one device may have joined (open or waiting) at once.
    pub max_per_device: u32,
    /// Relays with at least one joined half at once.
    pub max_total: u32,
    /// Offers not yet joined that are kept; past it the oldest are forgotten.
    pub max_offers: usize,
    /// How long an offer may wait for its first half (the contact request's lifetime).
    pub offer_ttl: Duration,
}

/// Why a join is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No such offer, expired, not this device's, or this side joined already. One answer for
    /// all, so a stranger learns nothing about other people's relays.
    Unknown,
    /// This device has `max_per_device` relays open.
    DeviceLimit,
    /// The broker has `max_total` relays open.
    BrokerLimit,
}

/// A join that was accepted: the holder may attach its half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The relay.
    pub id: RelayId,
    /// Which side of the offer (0: the caller, 1: the target).
    pub side: usize,
    /// The other party.
    pub other: Party,
}

/// What attaching a half did.
#[derive(Debug)]
pub enum Attached<H> {
    /// The first half: it waits; tell `other` to join.
    Waiting,
    /// The second half: both are here, `[caller's, target's]`, ready to splice.
    Pair([H; 2]),
    /// The offer went away in between (expired or closed): the half is handed back.
    Gone(H),
}

struct Offer<H> {
    parties: [Party; 2],
    expires: Instant,
    joined: [bool; 2],
    waiting: Option<(usize, H, Instant)>,
    /// Counted in `open` (a half joined).
    counted: bool,
}

/// The registry. See the module docs.
pub struct Registry<H> {
    offers: HashMap<RelayId, Offer<H>>,
    per_device: HashMap<Party, u32>,
    open: u32,
    limits: RegistryLimits,
}

impl<H> std::fmt::Debug for Registry<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("offers", &self.offers.len())
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl<H> Registry<H> {
    /// An empty registry.
    pub fn new(limits: RegistryLimits) -> Self {
        Self {
            offers: HashMap::new(),
            per_device: HashMap::new(),
            open: 0,
            limits,
        }
    }

    /// Relays with at least one joined half.
    pub fn open(&self) -> u32 {
        self.open
    }

    /// The two parties of relay `id`, caller first.
    pub fn parties(&self, id: &RelayId) -> Option<&[Party; 2]> {
        self.offers.get(id).map(|o| &o.parties)
    }

    /// Records an offer for an accepted contact request between `caller` and `target`.
    pub fn offer(&mut self, id: RelayId, caller: Party, target: Party, now: Instant) {
        if self.offers.len() >= self.limits.max_offers {
            self.forget_expired(now);
        }
        if self.offers.len() >= self.limits.max_offers {
            // Still full of live offers: forget the one closest to expiry that nobody joined.
            if let Some(oldest) = self
                .offers
                .iter()
                .filter(|(_, o)| !o.counted)
                .min_by_key(|(_, o)| o.expires)
                .map(|(id, _)| *id)
            {
                self.offers.remove(&oldest);
            } else {
                return;
            }
        }
        self.offers.insert(
            id,
            Offer {
                parties: [caller, target],
                expires: now + self.limits.offer_ttl,
                joined: [false; 2],
                waiting: None,
                counted: false,
            },
        );
    }

    /// The half of the party on peer broker `peer` asks to join relay `id` (it arrived over
    /// the federation link; only the broker the offer names may bring it).
    pub fn reserve_remote(
        &mut self,
        id: &RelayId,
        peer: &str,
        now: Instant,
    ) -> Result<Reservation, Refused> {
        let who = self
            .offers
            .get(id)
            .and_then(|o| o.parties.iter().find(|p| p.broker.as_deref() == Some(peer)))
            .cloned()
            .ok_or(Refused::Unknown)?;
        self.reserve(id, &who, now)
    }

    /// `who` asks to join relay `id`.
    pub fn reserve(
        &mut self,
        id: &RelayId,
        who: &Party,
        now: Instant,
    ) -> Result<Reservation, Refused> {
        let limits = self.limits;
        let open = self.open;
        let Some(offer) = self.offers.get_mut(id) else {
            return Err(Refused::Unknown);
        };
        let Some(side) = offer.parties.iter().position(|p| p == who) else {
            return Err(Refused::Unknown);
        };
        if offer.joined[side] || (!offer.counted && offer.expires <= now) {
            return Err(Refused::Unknown);
        }
        // A remote party's device limit is its own broker's to keep.
        if who.broker.is_none()
            && self.per_device.get(who).copied().unwrap_or(0) >= limits.max_per_device
        {
            return Err(Refused::DeviceLimit);
        }
        if !offer.counted && open >= limits.max_total {
            return Err(Refused::BrokerLimit);
        }
        offer.joined[side] = true;
        if !offer.counted {
            offer.counted = true;
            self.open += 1;
        }
        if who.broker.is_none() {
            *self.per_device.entry(who.clone()).or_default() += 1;
        }
        Ok(Reservation {
            id: *id,
            side,
            other: offer.parties[1 - side].clone(),
        })
    }

    /// Attaches the reserved half.
    pub fn attach(&mut self, reservation: &Reservation, half: H, now: Instant) -> Attached<H> {
        let Some(offer) = self.offers.get_mut(&reservation.id) else {
            return Attached::Gone(half);
        };
        match offer.waiting.take() {
            None => {
                offer.waiting = Some((reservation.side, half, now));
                Attached::Waiting
            }
            Some((side, first, _)) if side != reservation.side => {
                // Joined: the offer has done its job; the counts stay until `close`.
                let pair = if side == 0 {
                    [first, half]
                } else {
                    [half, first]
                };
                Attached::Pair(pair)
            }
            Some(same) => {
                offer.waiting = Some(same);
                Attached::Gone(half)
            }
        }
    }

    /// The relay ended (or its waiting half gave up): releases its counts and forgets it.
    /// Returns its parties, and the half that was still waiting, if any.
    pub fn close(&mut self, id: &RelayId) -> Option<([Party; 2], Option<H>)> {
        let offer = self.offers.remove(id)?;
        if offer.counted {
            self.open = self.open.saturating_sub(1);
        }
        for (side, party) in offer.parties.iter().enumerate() {
            if offer.joined[side]
                && let Some(count) = self.per_device.get_mut(party)
            {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_device.remove(party);
                }
            }
        }
        Some((offer.parties, offer.waiting.map(|(_, h, _)| h)))
    }

    /// Relays whose first half has waited `join_timeout` for the second.
    pub fn stale_waiting(&self, join_timeout: Duration, now: Instant) -> Vec<RelayId> {
        self.offers
            .iter()
            .filter(|(_, o)| {
                matches!(&o.waiting, Some((_, _, since)) if now.saturating_duration_since(*since) >= join_timeout)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets offers that nobody joined before they expired.
    pub fn forget_expired(&mut self, now: Instant) {
        self.offers.retain(|_, o| o.counted || o.expires > now);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn party(n: &str, d: u32) -> Party {
        Party::local(n, d)
    }

    fn registry(max_per_device: u32, max_total: u32) -> Registry<&'static str> {
        Registry::new(RegistryLimits {
            max_per_device,
            max_total,
            max_offers: 4,
            offer_ttl: Duration::from_secs(120),
        })
    }

    #[test]
    fn the_two_parties_join_once_each_and_are_paired_caller_first() {
        let now = Instant::now();
        let mut r = registry(8, 100);
        let (a, b) = (party("5550001", 1), party("5550002", 1));
        r.offer([1; 16], a.clone(), b.clone(), now);
        let rb = r.reserve(&[1; 16], &b, now).unwrap();
        assert_eq!(rb.other, a);
        assert!(matches!(r.attach(&rb, "b", now), Attached::Waiting));
        // The same side cannot join twice; a stranger or another device cannot join at all.
        assert_eq!(r.reserve(&[1; 16], &b, now), Err(Refused::Unknown));
        assert_eq!(
            r.reserve(&[1; 16], &party("5550002", 2), now),
            Err(Refused::Unknown)
        );
        assert_eq!(
            r.reserve(&[1; 16], &party("5550003", 1), now),
            Err(Refused::Unknown)
        );
        assert_eq!(r.reserve(&[2; 16], &a, now), Err(Refused::Unknown));
        let ra = r.reserve(&[1; 16], &a, now).unwrap();
        match r.attach(&ra, "a", now) {
            Attached::Pair(pair) => assert_eq!(pair, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.open(), 1);
        let (parties, waiting) = r.close(&[1; 16]).unwrap();
        assert_eq!(parties, [a.clone(), b]);
        assert!(waiting.is_none());
        assert_eq!(r.open(), 0);
        // Spent: the id cannot be joined again.
        assert_eq!(r.reserve(&[1; 16], &a, now), Err(Refused::Unknown));
    }

    #[test]
    fn an_offer_expires_unjoined_and_a_waiting_half_goes_stale() {
        let now = Instant::now();
        let mut r = registry(8, 100);
        let (a, b) = (party("5550001", 1), party("5550002", 1));
        r.offer([1; 16], a.clone(), b.clone(), now);
        let later = now + Duration::from_secs(121);
        assert_eq!(r.reserve(&[1; 16], &a, later), Err(Refused::Unknown));
        r.offer([2; 16], a.clone(), b, now);
        let ra = r.reserve(&[2; 16], &a, now).unwrap();
        assert!(matches!(r.attach(&ra, "a", now), Attached::Waiting));
        assert!(
            r.stale_waiting(Duration::from_secs(30), now + Duration::from_secs(29))
                .is_empty()
        );
        assert_eq!(
            r.stale_waiting(Duration::from_secs(30), now + Duration::from_secs(30)),
            vec![[2; 16]]
        );
        let (_, waiting) = r.close(&[2; 16]).unwrap();
        assert_eq!(waiting, Some("a"));
        assert_eq!(r.open(), 0);
    }

    #[test]
    fn limits_per_device_and_per_broker_are_enforced_and_released() {
        let now = Instant::now();
        let mut r = registry(1, 2);
        let a = party("5550001", 1);
        for i in 0..3u8 {
            r.offer([i; 16], a.clone(), party(&format!("555001{i}"), 1), now);
        }
        r.reserve(&[0; 16], &a, now).unwrap();
        assert_eq!(r.reserve(&[1; 16], &a, now), Err(Refused::DeviceLimit));
        r.reserve(&[1; 16], &party("5550011", 1), now).unwrap();
        assert_eq!(
            r.reserve(&[2; 16], &party("5550012", 1), now),
            Err(Refused::BrokerLimit)
        );
        r.close(&[0; 16]).unwrap();
        r.reserve(&[2; 16], &party("5550012", 1), now).unwrap();
        assert_eq!(r.open(), 2);
    }

    #[test]
    fn a_remote_half_comes_only_from_the_broker_the_offer_names() {
        let now = Instant::now();
        let mut r = registry(8, 100);
        let (caller, target) = (Party::remote("5560001", "y"), party("5550002", 1));
        r.offer([1; 16], caller.clone(), target, now);
        assert_eq!(r.reserve_remote(&[1; 16], "z", now), Err(Refused::Unknown));
        let remote = r.reserve_remote(&[1; 16], "y", now).unwrap();
        assert_eq!(remote.side, 0);
        assert!(matches!(
            r.attach(&remote, "from y", now),
            Attached::Waiting
        ));
        assert_eq!(r.reserve_remote(&[1; 16], "y", now), Err(Refused::Unknown));
        let (parties, _) = r.close(&[1; 16]).unwrap();
        assert_eq!(parties[0], caller);
    }

    #[test]
    fn offers_are_bounded() {
        let now = Instant::now();
        let mut r = registry(8, 100);
        for i in 0..10u8 {
            r.offer(
                [i; 16],
                party("5550001", 1),
                party("5550002", 1),
                now + Duration::from_secs(u64::from(i)),
            );
        }
        assert!(r.offers.len() <= 4);
        // The newest are kept.
        assert!(r.offers.contains_key(&[9; 16]));
    }
}
