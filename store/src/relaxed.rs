//! Writes that need not wait for the disk: those whose loss in a crash or a power failure only
//! repeats work that is already safe to repeat.
//!
//! Two kinds use them. An inbox acknowledgement (both stores): a lost one is a redelivery,
//! which clients drop by message id (protocol.md 13.2). The removal of delivered outbox items
//! (SQLite only, `federation.rs` says why): a lost one sends the delivery again, and the peer
//! answers it DONE from the idempotency key it keeps until the delivery expires
//! (docs/federation.md, "At the recipient's home"). A deposit, a delivery received from a peer,
//! or anything else whose loss would lose a message always waits for its flush.

use sqlx::SqliteConnection;

use crate::StoreError;

/// A condition, always true, that makes the Postgres transaction of the statement holding it
/// commit without waiting for its WAL flush: a crash can only lose the last few hundred
/// milliseconds of such commits. `set_config(…, true)` is local to the transaction, which for
/// a statement sent on its own is that statement's, so nothing carries over to the next user of
/// the pooled connection. The uncorrelated subquery runs once.
pub(crate) const COMMIT_WITHOUT_FLUSH: &str =
    "(SELECT set_config('synchronous_commit', 'off', true)) = 'off'";

/// A pooled SQLite connection with `synchronous = NORMAL` (commits without an fsync), for
/// writes whose loss in a power failure only repeats work. It goes back to
/// the pool with `synchronous = FULL` through [`RelaxedSqlite::restore`]; dropped without
/// that (an error, a cancelled future) it is closed instead, so no durable write can ever
/// run on it.
pub(crate) struct RelaxedSqlite {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>,
}

impl RelaxedSqlite {
    pub(crate) async fn acquire(pool: &sqlx::SqlitePool) -> Result<Self, StoreError> {
        // Held by the guard before the setting changes, so that from then on a drop closes it.
        let mut relaxed = Self {
            conn: Some(pool.acquire().await?),
        };
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(relaxed.conn()?)
            .await?;
        Ok(relaxed)
    }

    pub(crate) fn conn(&mut self) -> Result<&mut SqliteConnection, StoreError> {
        self.conn.as_deref_mut().ok_or(StoreError::Invariant(
            "a relaxed connection used after restore",
        ))
    }

    /// Sets `synchronous = FULL` again and returns the connection to the pool.
    pub(crate) async fn restore(mut self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(self.conn()?)
            .await?;
        // Durable again: back to the pool (dropped as an ordinary pooled connection).
        drop(self.conn.take());
        Ok(())
    }
}

impl Drop for RelaxedSqlite {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}

/// What the tests of the relaxed writes share.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]

    use crate::{Backend, Store};

    /// A SQLite store in `dir` with one pooled connection, so that each next statement runs on
    /// the connection the last write used.
    pub(crate) async fn one_connection_sqlite(dir: &std::path::Path) -> Store {
        Store::open_sqlite_with(dir.join("s.db"), 1).await.unwrap()
    }

    /// `synchronous` of the connection `store`'s pool hands out next (2 = FULL, 1 = NORMAL).
    pub(crate) async fn next_synchronous(store: &Store) -> i64 {
        let Backend::Sqlite(pool) = &store.backend else {
            panic!("a SQLite store");
        };
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .unwrap()
    }
}
