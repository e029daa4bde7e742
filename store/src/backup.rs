//! Client-encrypted key backups: one opaque blob per entity with an optimistic version.

use super::{Backup, Number, Store, StoreError, on_pool};

impl Store {
    /// Writes `number`'s backup if its stored version is `expected_prev_version` (0 = there
    /// is no backup yet); the stored version becomes `new_version`. Otherwise
    /// [`StoreError::Conflict`]: another device wrote first, fetch and merge. The wire rule
    /// "VERSION must be previous + 1" is the caller passing `new_version - 1` as expected.
    pub async fn put_backup(
        &self,
        number: &Number,
        expected_prev_version: i64,
        new_version: i64,
        blob: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        if new_version <= expected_prev_version {
            return Err(StoreError::InvalidArgument("backup version must increase"));
        }
        let n = on_pool!(self, pool => {
            if expected_prev_version == 0 {
                sqlx::query(
                    "INSERT INTO key_backups (number, version, blob, updated_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (number) DO NOTHING",
                )
                .bind(number)
                .bind(new_version)
                .bind(blob)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
            } else {
                sqlx::query(
                    "UPDATE key_backups SET version = $3, blob = $4, updated_at = $5 \
                     WHERE number = $1 AND version = $2",
                )
                .bind(number)
                .bind(expected_prev_version)
                .bind(new_version)
                .bind(blob)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
            }
        });
        if n == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    /// `number`'s backup, if it has one.
    pub async fn get_backup(&self, number: &Number) -> Result<Option<Backup>, StoreError> {
        let number = number.as_str();
        let row: Option<(i64, Vec<u8>, i64)> = on_pool!(self, pool => {
            sqlx::query_as("SELECT version, blob, updated_at FROM key_backups WHERE number = $1")
                .bind(number)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(version, blob, updated_at)| Backup {
            version,
            blob,
            updated_at,
        }))
    }
}
