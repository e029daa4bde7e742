//! FORWARD records: the signed moved notice an entity leaves for whoever INITIATEs its number,
//! kept until an expiry (protocol.md 6.28). The notice is opaque here; callers' clients verify
//! it. A forward outlives ACCOUNT-DELETE (no foreign key) and is removed by the sweep.

use super::{Number, Store, StoreError, on_pool};

/// The lookup of a live forward for a caller that the number's holder has not blocked (in its
/// block list while it exists, or in the list kept from it when it was deleted).
const FORWARD_FOR: &str = "SELECT notice, expires_at FROM forwards f \
     WHERE f.number = $1 AND f.expires_at > $3 \
     AND NOT EXISTS (SELECT 1 FROM blocks WHERE owner = $1 AND target = $2) \
     AND NOT EXISTS (SELECT 1 FROM forward_blocks WHERE number = $1 AND target = $2)";

impl Store {
    /// Sets (or replaces) the forward of the entity `number`: `notice` until `expires_at`.
    /// [`StoreError::NotFound`] for an unknown entity.
    pub async fn set_forward(
        &self,
        number: &Number,
        notice: &[u8],
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            use super::PoolExt as _;
            let mut tx = pool.begin_write().await?;
            // Only a live entity sets a forward (the row lock orders it with a racing delete).
            crate::lock_entity!(tx, number);
            sqlx::query(
                "INSERT INTO forwards (number, notice, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (number) DO UPDATE SET \
                 notice = excluded.notice, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at",
            )
            .bind(number)
            .bind(notice)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The live forward of `number` (notice, expiry) as `caller` may see it: `None` when there
    /// is none, it expired at `now`, or the number's holder blocked `caller`.
    pub async fn forward_for(
        &self,
        number: &Number,
        caller: &Number,
        now: i64,
    ) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let row: Option<(Vec<u8>, i64)> = on_pool!(self, pool => {
            sqlx::query_as(FORWARD_FOR)
                .bind(number.as_str())
                .bind(caller.as_str())
                .bind(now)
                .fetch_optional(pool)
                .await?
        });
        Ok(row)
    }
}
