//! Federation state: broker-held pubkeys of peer brokers' clients, and the durable outbox of
//! cross-broker deliveries.

use super::{Number, OutboxItem, PoolExt, Store, StoreError, array, bulk_rows, on_pool};

/// Outbox rows per INSERT statement (5 parameters each; SQLite allows 32,766).
const OUTBOX_CHUNK: usize = 256;

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
    /// was already queued.
    pub async fn enqueue_outbox_batch(
        &self,
        entries: &[super::OutboxEntry],
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        let _writing = self.writing().await;
        let mut fresh: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for chunk in entries.chunks(OUTBOX_CHUNK) {
                let values = bulk_rows(&self.backend, chunk.len(), 5);
                let sql = format!(
                    "INSERT INTO outbox \
                     (idempotency_key, peer_broker, payload, next_attempt_at, created_at) \
                     VALUES {values} \
                     ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key"
                );
                let mut q = sqlx::query_scalar::<_, Vec<u8>>(&sql).persistent(false);
                for e in chunk {
                    q = q
                        .bind(&e.idempotency_key[..])
                        .bind(e.peer_broker.as_str())
                        .bind(e.payload.as_slice())
                        .bind(e.now)
                        .bind(e.now);
                }
                fresh.extend(q.fetch_all(&mut *tx).await?);
            }
            tx.commit().await?;
        });
        // A key twice in one batch: the first is new, the second is not.
        let mut seen = std::collections::HashSet::new();
        Ok(entries
            .iter()
            .map(|e| Ok(fresh.contains(&e.idempotency_key[..]) && seen.insert(e.idempotency_key)))
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

    /// Removes many delivered items in one transaction. Returns how many were there.
    pub async fn complete_outbox_many(&self, keys: &[[u8; 16]]) -> Result<u64, StoreError> {
        let _writing = self.writing().await;
        if keys.is_empty() {
            return Ok(0);
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut n = 0;
            for key in keys {
                n += sqlx::query("DELETE FROM outbox WHERE idempotency_key = $1")
                    .bind(&key[..])
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            Ok(n)
        })
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
