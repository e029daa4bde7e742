//! [`StoreError`]: domain outcomes of store operations, plus the wrapped database error.

use std::sync::Arc;

/// Why a store operation failed.
///
/// The domain variants map onto wire error codes (`DEVICE-LIMIT`, `BAD-SECRET`,
/// `QUOTA-EXCEEDED`, `NOT-FOUND`, `CONFLICT`, …). [`StoreError::Database`] and
/// [`StoreError::Migrate`] carry driver details for the log only: a peer sees `INTERNAL`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The entity number is already registered (the caller retries with a new random number).
    #[error("entity number is already taken")]
    NumberTaken,
    /// The message id is already stored for this recipient, from a different sender.
    #[error("message id is already in use")]
    DuplicateId,
    /// The entity, device or record does not exist.
    #[error("not found")]
    NotFound,
    /// The entity has as many devices (and pending registration secrets) as it may.
    #[error("device limit reached")]
    DeviceLimit,
    /// A registration secret is unknown, expired or already used (deliberately one error).
    #[error("registration secret is unknown, expired or used")]
    BadSecret,
    /// The recipient device's inbox is full.
    #[error("inbox quota exceeded")]
    QuotaExceeded,
    /// An optimistic version check failed (key backup).
    #[error("version conflict")]
    Conflict,
    /// A condition the store itself guarantees did not hold: a batch statement answered for
    /// fewer items than it was given, a random 256-bit key collided, or a row that blocked an
    /// insert was gone when it was read back. A bug or a concurrent change under the store, not
    /// a domain outcome; log it, a peer sees `INTERNAL`.
    #[error("store invariant did not hold: {0}")]
    Invariant(&'static str),
    /// The caller passed a value the store cannot hold.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A stored value does not have the expected shape.
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    /// The deposit batcher has stopped (the runtime is shutting down).
    #[error("store task closed")]
    Closed,
    /// The whole deposit batch this item was part of failed (shared by all its items).
    #[error("deposit batch failed")]
    BatchFailed(#[source] Arc<StoreError>),
    /// The database failed. Log it; never show it to a peer.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether retrying the whole operation may succeed: a serialisation failure or deadlock
    /// (Postgres), a busy or locked database (SQLite), or a pool timeout. A group-commit loop
    /// retries its batch on these.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::PoolTimedOut) => true,
            StoreError::BatchFailed(inner) => inner.is_retryable(),
            StoreError::Database(sqlx::Error::Database(e)) => matches!(
                e.code().as_deref(),
                // Postgres: serialization_failure, deadlock_detected, lock_not_available.
                Some("40001" | "40P01" | "55P03")
                // SQLite: BUSY, LOCKED, BUSY_RECOVERY, LOCKED_SHAREDCACHE, BUSY_SNAPSHOT.
                | Some("5" | "6" | "261" | "262" | "517")
            ),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    /// Every foreign key of the schema points at an entity (or at an inbox item selected in
    /// the same statement), so a foreign key violation means the entity does not exist.
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::NotFound,
            _ => StoreError::Database(e),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e)
    }
}
