//! DEPOSITs whose route is read in the transaction that stores them.
//!
//! A DEPOSIT first needs its route (is there a contact pair, has the target blocked the
//! sender, which devices does the target have) and then a group commit. Read apart, that is a
//! statement and a batch of its own per DEPOSIT group before the commit's; read here, the
//! route of a whole batch is one more statement in the commit's own transaction, and the
//! route is what the deposit is stored against (nothing can change between the two).

use std::collections::HashMap;
use std::time::Instant;

use super::batcher::CommitClock;
use super::inbox::{Lane, Outcome, claim_fresh, deposit_in_lane, stored_device};
use super::social::routes_on;
use super::{DepositOutcome, DeviceId, NewInboxItem, Number, PoolExt, Store, StoreError, on_pool};

/// A DEPOSIT for [`Store::deposit_routed_batch`].
#[derive(Debug, Clone)]
pub struct RoutedDeposit {
    /// The message; `recipient_device` is ignored (the copies are made from the route).
    pub item: NewInboxItem,
    /// Number mode: one copy in the target's shared inbox instead of one per active device.
    pub shared_inbox: bool,
}

/// A delivery received from a peer broker, its route already checked, for
/// [`crate::DepositBatcher::receive`] and [`Store::receive_deliveries`]: stored exactly once
/// over its lifetime, by its idempotency key.
#[derive(Debug, Clone)]
pub struct ReceivedDelivery {
    /// The delivery's idempotency key.
    pub key: [u8; 16],
    /// How long the key is kept: as long as the sender may send the delivery again (its own
    /// expiry).
    pub keep_until: i64,
    /// Its copies: the recipient's shared inbox, or one per active device (each to another
    /// inbox).
    pub copies: Vec<NewInboxItem>,
}

/// What became of a [`RoutedDeposit`].
#[derive(Debug)]
pub enum RoutedOutcome {
    /// No contact pair from the sender to the target: nothing was stored.
    NoContact,
    /// The target blocked the sender: the copies' writes were done and undone in the
    /// transaction, so the answer costs what a kept deposit's costs; nothing was kept.
    Discarded,
    /// One outcome per copy: per active device of the target, ascending (none when it has
    /// none), or the one shared inbox.
    Kept(Vec<Outcome>),
}

/// One job of a deposit batch ([`crate::DepositBatcher`]).
#[derive(Debug, Clone)]
pub(crate) enum DepositJob {
    /// One copy for a known inbox: kept, or acknowledged and discarded (its sender is
    /// blocked); its outcome is `Kept` with one entry, or `Discarded`.
    Copy { item: NewInboxItem, discard: bool },
    /// A DEPOSIT whose route is read in the batch's transaction.
    Routed(RoutedDeposit),
    /// A delivery from a peer broker: its key is claimed in the batch's transaction, and its
    /// copies are stored only if the key is new. Its outcome is `Kept`, one entry per copy
    /// (all `AlreadyStored` for a delivery received before).
    Received(ReceivedDelivery),
}

/// What a deposit turned into, before the outcomes are known.
enum Plan {
    NoContact,
    Discarded,
    /// A delivery received before: its copies' expiries.
    Repeat(Vec<i64>),
    /// Its copies' indexes in the kept items.
    Kept(std::ops::Range<usize>),
}

impl Store {
    /// Reads the routes of `deposits` and stores them, in one transaction: per deposit, no
    /// contact pair gives [`RoutedOutcome::NoContact`]; a target that blocked the sender
    /// [`RoutedOutcome::Discarded`] (the silent-drop rule, as
    /// [`Store::deposit_batch_discarding`]); otherwise a copy per device (or the shared
    /// inbox) is deposited as by [`Store::deposit_batch`], in order. The outer `Err` means
    /// nothing was stored.
    pub async fn deposit_routed_batch(
        &self,
        deposits: &[RoutedDeposit],
        quota_per_device: u32,
    ) -> Result<Vec<RoutedOutcome>, StoreError> {
        let jobs: Vec<DepositJob> = deposits.iter().cloned().map(DepositJob::Routed).collect();
        self.deposit_jobs(&jobs, quota_per_device, Lane::Alone, None)
            .await
    }

    /// Stores a batch of [`DepositJob`]s in one transaction, one outcome per job, in order,
    /// taking the quota counters in `lane`; a batch that finds an inbox near the quota beside
    /// others is rolled back and stored again alone ([`Lane`]).
    pub(crate) async fn deposit_jobs(
        &self,
        jobs: &[DepositJob],
        quota_per_device: u32,
        lane: Lane,
        clock: Option<&CommitClock>,
    ) -> Result<Vec<RoutedOutcome>, StoreError> {
        let _writing = self.writing().await;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // One route per distinct pair (a sender's deposits often repeat it).
        let mut index: HashMap<(&Number, &Number), usize> = HashMap::new();
        let mut pairs: Vec<(Number, Number)> = Vec::new();
        let which: Vec<Option<usize>> = jobs
            .iter()
            .map(|job| match job {
                DepositJob::Copy { .. } | DepositJob::Received(_) => None,
                DepositJob::Routed(d) => {
                    let pair = (&d.item.sender_number, &d.item.recipient_number);
                    Some(*index.entry(pair).or_insert_with(|| {
                        pairs.push((pair.0.clone(), pair.1.clone()));
                        pairs.len() - 1
                    }))
                }
            })
            .collect();
        let claims: Vec<([u8; 16], i64)> = jobs
            .iter()
            .filter_map(|job| match job {
                DepositJob::Received(d) => Some((d.key, d.keep_until)),
                _ => None,
            })
            .collect();
        on_pool!(self, pool => {
            let mut lane = lane;
            loop {
            let started = Instant::now();
            let mut tx = pool.begin_write().await?;
            let routes = match pairs.is_empty() {
                true => Vec::new(),
                false => routes_on(&mut *tx, &pairs).await?,
            };
            // The received deliveries' keys, all in one statement (per chunk on SQLite): which
            // are new.
            let mut fresh = claim_fresh(&mut *tx, &claims).await?.into_iter();
            let mut kept: Vec<NewInboxItem> = Vec::new();
            let mut discarded: Vec<NewInboxItem> = Vec::new();
            let mut plans = Vec::with_capacity(jobs.len());
            for (job, r) in jobs.iter().zip(&which) {
                let deposit = match (job, r) {
                    (DepositJob::Received(d), _) => {
                        if fresh.next().ok_or(StoreError::Invariant("a claim per delivery"))? {
                            let start = kept.len();
                            kept.extend(d.copies.iter().cloned());
                            plans.push(Plan::Kept(start..kept.len()));
                        } else {
                            plans.push(Plan::Repeat(
                                d.copies.iter().map(|c| c.expires_at).collect(),
                            ));
                        }
                        continue;
                    }
                    (DepositJob::Copy { item, discard: true }, _) => {
                        discarded.push(item.clone());
                        plans.push(Plan::Discarded);
                        continue;
                    }
                    (DepositJob::Copy { item, discard: false }, _) => {
                        kept.push(item.clone());
                        plans.push(Plan::Kept(kept.len() - 1..kept.len()));
                        continue;
                    }
                    (DepositJob::Routed(deposit), Some(r)) => (deposit, *r),
                    (DepositJob::Routed(_), None) => {
                        return Err(StoreError::Invariant("a route per routed deposit"));
                    }
                };
                let (deposit, r) = deposit;
                let route = routes
                    .get(r)
                    .ok_or(StoreError::Invariant("a route per deposit pair"))?;
                let devices: Vec<Option<DeviceId>> = match deposit.shared_inbox {
                    true => vec![None],
                    false => route.devices.iter().copied().map(Some).collect(),
                };
                let copies = devices.into_iter().map(|device| NewInboxItem {
                    recipient_device: device,
                    ..deposit.item.clone()
                });
                plans.push(if !route.contact {
                    Plan::NoContact
                } else if route.blocked {
                    discarded.extend(copies);
                    Plan::Discarded
                } else {
                    let start = kept.len();
                    kept.extend(copies);
                    Plan::Kept(start..kept.len())
                });
            }
            let discarded = discarded
                .iter()
                .map(|d| Ok((d, stored_device(d.recipient_device)?)))
                .collect::<Result<Vec<(&NewInboxItem, i64)>, StoreError>>()?;
            let Some(outcomes) =
                deposit_in_lane(&mut *tx, &kept, &discarded, quota_per_device, lane).await?
            else {
                tx.rollback().await?;
                lane = Lane::Alone;
                continue;
            };
            // A delivery with a copy refused (quota, a clashing id) is not received: its sender
            // may send it again.
            for (job, plan) in jobs.iter().zip(&plans) {
                if let (DepositJob::Received(d), Plan::Kept(range)) = (job, plan)
                    && outcomes.get(range.clone()).is_some_and(|o| o.iter().any(Result::is_err))
                {
                    sqlx::query("DELETE FROM received_deliveries WHERE idempotency_key = $1")
                        .bind(&d.key[..])
                        .execute(&mut *tx)
                        .await?;
                }
            }
            let mut outcomes: Vec<Option<Outcome>> = outcomes.into_iter().map(Some).collect();
            let flushing = Instant::now();
            tx.commit().await?;
            if let Some(clock) = clock {
                clock.record(flushing - started, flushing.elapsed());
            }
            return plans
                .into_iter()
                .map(|plan| {
                    Ok(match plan {
                        Plan::NoContact => RoutedOutcome::NoContact,
                        Plan::Discarded => RoutedOutcome::Discarded,
                        Plan::Repeat(expiries) => RoutedOutcome::Kept(
                            expiries
                                .into_iter()
                                .map(|expires_at| Ok(DepositOutcome::AlreadyStored { expires_at }))
                                .collect(),
                        ),
                        Plan::Kept(range) => RoutedOutcome::Kept(
                            outcomes[range]
                                .iter_mut()
                                .map(|o| {
                                    o.take().unwrap_or(Err(StoreError::Invariant(
                                        "an outcome per copy",
                                    )))
                                })
                                .collect(),
                        ),
                    })
                })
                .collect();
            }
        })
    }
}
