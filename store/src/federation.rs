//! Federation state: broker-held pubkeys of peer brokers' clients, and the durable outbox of
//! cross-broker deliveries.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::batcher::CommitClock;
use super::relaxed::RelaxedSqlite;
use super::{
    Backend, DeviceId, Number, OutboxItem, PoolExt, Store, StoreError, array, device_id, on_pool,
    sqlite_list, sqlite_pair_values,
};

/// What [`Store::delivery_routes`] answers for one `(recipient, sender)` pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryRoute {
    /// The recipient is registered here.
    pub exists: bool,
    /// The recipient holds a contact pair with the sender.
    pub contact: bool,
    /// The recipient has blocked the sender.
    pub blocked: bool,
    /// The recipient's active devices, ascending.
    pub devices: Vec<DeviceId>,
}

/// Outbox rows per INSERT statement (5 parameters each; SQLite allows 32,766).
const OUTBOX_CHUNK: usize = 256;

/// Inserts outbox rows on either backend, skipping keys already queued; returns the keys
/// inserted. Postgres gets the rows as arrays, so that the statement's text is the same for
/// any number of rows and is prepared once per connection (a VALUES list was parsed and planned
/// again for every batch); SQLite, which has no arrays, gets a VALUES list.
trait OutboxIo {
    fn insert_outbox(
        &mut self,
        rows: &[&super::OutboxEntry],
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, StoreError>> + Send;
}

impl OutboxIo for sqlx::SqliteConnection {
    async fn insert_outbox(
        &mut self,
        rows: &[&super::OutboxEntry],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let values = super::sqlite_rows(rows.len(), 5);
        let sql = format!(
            "INSERT INTO outbox \
             (idempotency_key, peer_broker, payload, next_attempt_at, created_at) \
             VALUES {values} \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key"
        );
        let mut q = sqlx::query_scalar::<_, Vec<u8>>(&sql).persistent(false);
        for e in rows {
            q = q
                .bind(&e.idempotency_key[..])
                .bind(e.peer_broker.as_str())
                .bind(e.payload.as_slice())
                .bind(e.now)
                .bind(e.now);
        }
        Ok(q.fetch_all(&mut *self).await?)
    }
}

impl OutboxIo for sqlx::PgConnection {
    async fn insert_outbox(
        &mut self,
        rows: &[&super::OutboxEntry],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let keys: Vec<&[u8]> = rows.iter().map(|e| &e.idempotency_key[..]).collect();
        let peers: Vec<&str> = rows.iter().map(|e| e.peer_broker.as_str()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|e| e.payload.as_slice()).collect();
        let nows: Vec<i64> = rows.iter().map(|e| e.now).collect();
        Ok(sqlx::query_scalar::<_, Vec<u8>>(
            "INSERT INTO outbox \
             (idempotency_key, peer_broker, payload, next_attempt_at, created_at) \
             SELECT k, p, b, n, n FROM UNNEST($1::bytea[], $2::text[], $3::bytea[], $4::int8[]) \
             AS u (k, p, b, n) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key",
        )
        .bind(keys)
        .bind(peers)
        .bind(payloads)
        .bind(nows)
        .fetch_all(&mut *self)
        .await?)
    }
}

impl Store {
    /// Holds the pubkey of `peer_number` (a client at a peer broker) until `expires_at`,
    /// replacing any previous one.
    pub async fn put_peer_pubkey(
        &self,
        peer_number: &Number,
        pubkey: &[u8; 32],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let peer_number = peer_number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO broker_pubkeys (peer_number, pubkey, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (peer_number) DO UPDATE \
                 SET pubkey = excluded.pubkey, expires_at = excluded.expires_at",
            )
            .bind(peer_number)
            .bind(&pubkey[..])
            .bind(expires_at)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The unexpired pubkey held for `peer_number`.
    pub async fn peer_pubkey(
        &self,
        peer_number: &Number,
        now: i64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let peer_number = peer_number.as_str();
        let key: Option<Vec<u8>> = on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT pubkey FROM broker_pubkeys WHERE peer_number = $1 AND expires_at > $2",
            )
            .bind(peer_number)
            .bind(now)
            .fetch_optional(pool)
            .await?
        });
        key.map(|k| array(&k, "pubkey length")).transpose()
    }

    /// Enqueues many deliveries to peer brokers in ONE transaction, each due at once; one
    /// result per entry, in order: `true` when it was new, `false` when its idempotency key
    /// was already queued, [`StoreError::NotFound`] when the entry names a contact pair
    /// ([`super::OutboxEntry::contact`]) that does not exist when the batch commits (then it is
    /// not queued). The pairs are read in the same transaction: one statement for the batch.
    pub async fn enqueue_outbox_batch(
        &self,
        entries: &[super::OutboxEntry],
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        self.enqueue_outbox_clocked(entries, None).await
    }

    /// [`Store::enqueue_outbox_batch`], timing its statements and its commit into `clock`.
    pub(crate) async fn enqueue_outbox_clocked(
        &self,
        entries: &[super::OutboxEntry],
        clock: Option<&CommitClock>,
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        let _writing = self.writing().await;
        // One route per distinct pair (a sender's deposits often repeat it).
        let mut index: HashMap<(&Number, &Number), usize> = HashMap::new();
        let mut pairs: Vec<(Number, Number)> = Vec::new();
        let which: Vec<Option<usize>> = entries
            .iter()
            .map(|e| {
                e.contact.as_ref().map(|(sender, target)| {
                    *index.entry((sender, target)).or_insert_with(|| {
                        pairs.push((sender.clone(), target.clone()));
                        pairs.len() - 1
                    })
                })
            })
            .collect();
        let mut fresh: HashSet<Vec<u8>> = HashSet::new();
        let allowed: Vec<bool> = on_pool!(self, pool => {
            let started = Instant::now();
            let mut tx = pool.begin_write().await?;
            let routes = match pairs.is_empty() {
                true => Vec::new(),
                false => super::social::routes_on(&mut *tx, &pairs).await?,
            };
            let allowed: Vec<bool> = which
                .iter()
                .map(|w| w.is_none_or(|i| routes.get(i).is_some_and(|r| r.contact)))
                .collect();
            let queued: Vec<&super::OutboxEntry> = entries
                .iter()
                .zip(&allowed)
                .filter_map(|(e, &ok)| ok.then_some(e))
                .collect();
            for chunk in queued.chunks(OUTBOX_CHUNK) {
                fresh.extend(OutboxIo::insert_outbox(&mut *tx, chunk).await?);
            }
            let flushing = Instant::now();
            tx.commit().await?;
            if let Some(clock) = clock {
                clock.record(flushing - started, flushing.elapsed());
            }
            allowed
        });
        // A key twice in one batch: the first is new, the second is not.
        let mut seen = HashSet::new();
        Ok(entries
            .iter()
            .zip(allowed)
            .map(|(e, allowed)| match allowed {
                false => Err(StoreError::NotFound),
                true => {
                    Ok(fresh.contains(&e.idempotency_key[..]) && seen.insert(e.idempotency_key))
                }
            })
            .collect())
    }

    /// Up to `limit` deliveries due at `now`, earliest first.
    pub async fn due_outbox(&self, now: i64, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        type Row = (Vec<u8>, String, Vec<u8>, i64, i64, i64);
        let rows: Vec<Row> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT idempotency_key, peer_broker, payload, attempts, next_attempt_at, \
                 created_at FROM outbox WHERE next_attempt_at <= $1 \
                 ORDER BY next_attempt_at, created_at LIMIT $2",
            )
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(
                |(key, peer_broker, payload, attempts, next_attempt_at, created_at)| {
                    Ok(OutboxItem {
                        idempotency_key: array(&key, "idempotency key length")?,
                        peer_broker,
                        payload,
                        attempts,
                        next_attempt_at,
                        created_at,
                    })
                },
            )
            .collect()
    }

    /// When the next delivery that is not due at `now` falls due (the earliest
    /// `next_attempt_at` after `now`), if any.
    pub async fn next_outbox_attempt(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let at: Option<i64> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM outbox WHERE next_attempt_at > $1")
                .bind(now)
                .fetch_one(pool)
                .await?
        });
        Ok(at)
    }

    /// Records a failed attempt and schedules the next one. Returns whether the item exists.
    pub async fn retry_outbox(
        &self,
        idempotency_key: &[u8; 16],
        next_attempt_at: i64,
    ) -> Result<bool, StoreError> {
        let _writing = self.writing().await;
        let n = on_pool!(self, pool => {
            sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2 \
                 WHERE idempotency_key = $1",
            )
            .bind(&idempotency_key[..])
            .bind(next_attempt_at)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Removes a delivered item. Returns whether it was there.
    pub async fn complete_outbox(&self, idempotency_key: &[u8; 16]) -> Result<bool, StoreError> {
        let _writing = self.writing().await;
        let n = on_pool!(self, pool => {
            sqlx::query("DELETE FROM outbox WHERE idempotency_key = $1")
                .bind(&idempotency_key[..])
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Number of queued deliveries.
    pub async fn outbox_depth(&self) -> Result<i64, StoreError> {
        let n: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox").fetch_one(pool).await?
        });
        Ok(n)
    }

    /// Removes many delivered items: one statement (one per chunk of keys on SQLite), one
    /// transaction. Returns how many were there.
    ///
    /// On SQLite the transaction commits without an fsync (`relaxed.rs`): it holds the store's
    /// one write lock until it commits, so an fsync there held back every outbox insert and
    /// deposit behind it (on a disk whose flush takes 5 ms, cross-broker deposits ran at 3.6k/s
    /// with it and 5.6–5.9k/s without). A removal a crash loses sends those deliveries again,
    /// and the peer answers them DONE from the keys it keeps, storing nothing twice. On Postgres
    /// no lock is held through the flush, and committing without it gained 5% on a fast disk but
    /// cost 2–7% on a slow one, with 40% more CPU per message (docs/performance.md), so the
    /// removal waits for its flush there.
    pub async fn complete_outbox_many(&self, keys: &[[u8; 16]]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let _writing = self.writing().await;
        match &self.backend {
            Backend::Postgres(pool) => {
                let list: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
                Ok(
                    sqlx::query("DELETE FROM outbox WHERE idempotency_key = ANY($1)")
                        .bind(list)
                        .execute(pool)
                        .await?
                        .rows_affected(),
                )
            }
            Backend::Sqlite(pool) => {
                let mut relaxed = RelaxedSqlite::acquire(pool).await?;
                let mut tx =
                    sqlx::Connection::begin_with(relaxed.conn()?, "BEGIN IMMEDIATE").await?;
                let mut n = 0;
                for chunk in keys.chunks(OUTBOX_CHUNK) {
                    let sql = format!(
                        "DELETE FROM outbox WHERE idempotency_key IN ({})",
                        sqlite_list(chunk.len())
                    );
                    let mut q = sqlx::query(&sql).persistent(false);
                    for key in chunk {
                        q = q.bind(&key[..]);
                    }
                    n += q.execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                relaxed.restore().await?;
                Ok(n)
            }
        }
    }

    /// What a batch of deliveries from a peer needs to know, for many `(recipient, sender)`
    /// pairs in one statement, one answer per pair, in order: whether the recipient is
    /// registered here, holds a contact pair with the sender, has blocked it, and its active
    /// devices. (A `Deliver` batch used to cost three lookups per distinct pair and one per
    /// recipient; each is a round trip to the database, on SQLite to its worker thread.)
    pub async fn delivery_routes(
        &self,
        pairs: &[(Number, Number)],
    ) -> Result<Vec<DeliveryRoute>, StoreError> {
        let mut routes = vec![DeliveryRoute::default(); pairs.len()];
        // (index into `pairs`, exists, contact, blocked, device). Keyed probes only.
        let mut rows: Vec<(i64, bool, bool, bool, Option<i64>)> = Vec::new();
        const SELECT: &str = "SELECT k.ord, \
             EXISTS (SELECT 1 FROM entities AS e WHERE e.number = k.r), \
             EXISTS (SELECT 1 FROM contacts AS c WHERE c.owner = k.r AND c.peer = k.s), \
             EXISTS (SELECT 1 FROM blocks AS b WHERE b.owner = k.r AND b.target = k.s), \
             d.device_id \
             FROM k LEFT JOIN devices AS d ON d.number = k.r AND d.revoked_at IS NULL \
             ORDER BY k.ord, d.device_id";
        match &self.backend {
            Backend::Postgres(pool) => {
                let recipients: Vec<&str> = pairs.iter().map(|(r, _)| r.as_str()).collect();
                let senders: Vec<&str> = pairs.iter().map(|(_, s)| s.as_str()).collect();
                let sql = format!(
                    "WITH k (r, s, ord) AS (SELECT r, s, ord - 1 FROM \
                     UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS u (r, s, ord)) {SELECT}"
                );
                rows = sqlx::query_as(&sql)
                    .bind(recipients)
                    .bind(senders)
                    .fetch_all(pool)
                    .await?;
            }
            Backend::Sqlite(pool) => {
                for (chunk_no, chunk) in pairs.chunks(OUTBOX_CHUNK).enumerate() {
                    // Anonymous parameters (see `sqlite_rows`), the row number inline.
                    let values = sqlite_pair_values(chunk_no * OUTBOX_CHUNK, chunk.len());
                    let sql = format!("WITH k (ord, r, s) AS (VALUES {values}) {SELECT}");
                    let mut q = sqlx::query_as::<_, (i64, bool, bool, bool, Option<i64>)>(&sql)
                        .persistent(false);
                    for (recipient, sender) in chunk {
                        q = q.bind(recipient.as_str()).bind(sender.as_str());
                    }
                    rows.extend(q.fetch_all(pool).await?);
                }
            }
        }
        for (ord, exists, contact, blocked, device) in rows {
            let Some(route) = usize::try_from(ord).ok().and_then(|i| routes.get_mut(i)) else {
                return Err(StoreError::Invariant(
                    "a route row for a pair that was not asked",
                ));
            };
            route.exists = exists;
            route.contact = contact;
            route.blocked = blocked;
            if let Some(d) = device {
                route.devices.push(device_id(d)?);
            }
        }
        Ok(routes)
    }

    /// Queued deliveries per peer broker.
    pub async fn outbox_depth_by_peer(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT peer_broker, COUNT(*) FROM outbox GROUP BY peer_broker")
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::OutboxEntry;
    use crate::relaxed::testing::{next_synchronous, one_connection_sqlite};

    async fn enqueue(store: &Store, keys: &[[u8; 16]]) {
        let entries: Vec<OutboxEntry> = keys
            .iter()
            .map(|key| OutboxEntry {
                idempotency_key: *key,
                peer_broker: "y".to_owned(),
                payload: b"p".to_vec(),
                now: 1,
                contact: None,
            })
            .collect();
        for inserted in store.enqueue_outbox_batch(&entries).await.unwrap() {
            assert!(inserted.unwrap());
        }
    }

    /// On SQLite the removal commits on a connection set to `synchronous = NORMAL`, which goes
    /// back to the pool at FULL: the next outbox insert on it waits for its fsync again.
    #[tokio::test]
    async fn a_sqlite_outbox_removal_leaves_the_pool_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = one_connection_sqlite(dir.path()).await;
        assert_eq!(next_synchronous(&store).await, 2, "FULL");
        enqueue(&store, &[[1; 16], [2; 16], [3; 16]]).await;
        assert_eq!(
            store
                .complete_outbox_many(&[[1; 16], [3; 16]])
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            next_synchronous(&store).await,
            2,
            "FULL again after the removal"
        );
        assert_eq!(store.outbox_depth().await.unwrap(), 1);
        store.close().await;
    }
}
