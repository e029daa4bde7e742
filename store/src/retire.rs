//! Deleting an entity (ACCOUNT-DELETE): everything it holds at this broker goes in one
//! transaction, and its number is retired for good.
//!
//! Why a tombstone: others keep contact pairs, pinned identity keys and blocks under the
//! number, so a new entity given it would inherit them. `retired_numbers` keeps the number out
//! of the pool ([`Store::create_entity`] treats it as taken) after the `entities` row is gone.

use super::{DeviceId, Number, PoolExt, Store, StoreError};
use super::{device_id, on_pool};

/// The statements that remove an entity's rows, children before parents (the foreign keys
/// hold at every step). Each takes the number as `$1`. Also used to replace the entity a
/// broker kept for a number it ported away, when the number comes back (`Store::port_in`).
pub(crate) const DELETE_ROWS: &[&str] = &[
    // Acknowledgements go with their number-mode items (explicitly: Postgres clears them by a
    // trigger, SQLite by its cascade; saying it here keeps both obviously right).
    "DELETE FROM inbox_acks WHERE item_seq IN \
     (SELECT seq FROM inbox_items WHERE recipient_number = $1 AND recipient_device = 0)",
    "DELETE FROM inbox_items WHERE recipient_number = $1",
    "DELETE FROM inbox_counters WHERE recipient_number = $1",
    "DELETE FROM key_backups WHERE number = $1",
    "DELETE FROM contacts WHERE owner = $1",
    "DELETE FROM blocks WHERE owner = $1",
    "DELETE FROM poisoned_initiates WHERE caller = $1",
    "DELETE FROM entity_settings WHERE number = $1",
    "DELETE FROM registration_secrets WHERE number = $1",
    "DELETE FROM devices WHERE number = $1",
    "DELETE FROM entities WHERE number = $1",
];

impl Store {
    /// Deletes the entity `number` with its devices, inbox items and their acknowledgements,
    /// inbox counters, contacts, blocks, settings, key backup and registration secrets, and
    /// retires the number, all in one transaction. A live forward stays until its expiry, with
    /// the block list kept beside it. Returns the devices that were active (their
    /// sessions are to be ended), or [`StoreError::NotFound`] for an unknown entity.
    pub async fn delete_entity(
        &self,
        number: &Number,
        now: i64,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        let ids: Vec<i64> = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // Lock the entity row first (Postgres), so a racing DEVICE-JOIN or ADD-DEVICE
            // waits and then finds nothing.
            crate::lock_entity!(tx, number);
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT device_id FROM devices \
                 WHERE number = $1 AND revoked_at IS NULL ORDER BY device_id",
            )
            .bind(number)
            .fetch_all(&mut *tx)
            .await?;
            // A live forward keeps answering after the delete; so that a blocked caller
            // still learns nothing, the block list stays with it (removed with it).
            sqlx::query(
                "INSERT INTO forward_blocks (number, target) \
                 SELECT owner, target FROM blocks WHERE owner = $1 \
                 AND EXISTS (SELECT 1 FROM forwards WHERE number = $1 AND expires_at > $2) \
                 ON CONFLICT (number, target) DO NOTHING",
            )
            .bind(number)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for sql in DELETE_ROWS {
                sqlx::query(sql).bind(number).execute(&mut *tx).await?;
            }
            sqlx::query(
                "INSERT INTO retired_numbers (number, retired_at) VALUES ($1, $2) \
                 ON CONFLICT (number) DO NOTHING",
            )
            .bind(number)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            ids
        });
        ids.into_iter().map(device_id).collect()
    }

    /// Whether `number` belonged to an entity that was deleted here (it is never handed out
    /// again).
    pub async fn number_retired(&self, number: &Number) -> Result<bool, StoreError> {
        let number = number.as_str();
        let retired: bool = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM retired_numbers WHERE number = $1)")
                .bind(number)
                .fetch_one(pool)
                .await?
        });
        Ok(retired)
    }
}
