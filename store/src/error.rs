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
    /// A port token is unknown, expired, used, or was issued for another broker.
    #[error("port token is unknown, expired, used or not for this broker")]
    BadPortToken,
    /// The message id is already stored for this recipient as another message (a different
    /// sender, or a different body).
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
    /// A task or thread of the store has stopped (the runtime is shutting down, the store was
    /// closed, or a login reader's job panicked).
    #[error("store task closed")]
    Closed,
    /// A thread of the store could not be started (a login reader, at start): the system's
    /// limit on threads or memory.
    #[error("starting a store thread")]
    Spawn(#[source] std::io::Error),
    /// The whole deposit batch this item was part of failed (shared by all its items).
    #[error("deposit batch failed")]
    BatchFailed(#[source] Arc<StoreError>),
    /// The database failed. Log it; never show it to a peer.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// The database failed under a login reader (SQLite read-only connections of their own,
    /// `login_reader.rs`). Log it; never show it to a peer.
    #[error("database error in a login reader")]
    Reader(#[source] rusqlite::Error),
    /// The database did not answer within the store's timeout (see
    /// [`crate::DEFAULT_STORE_TIMEOUT`]); the operation may or may not have taken effect, so
    /// only idempotent operations are retried by callers.
    #[error("the database did not answer in time")]
    TimedOut,
    /// Applying the schema migrations failed.
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether retrying the whole operation at once may succeed: a serialisation failure or
    /// deadlock (Postgres), a busy or locked database (SQLite). A group-commit loop retries its
    /// batch on these. Not a database that is down or a disk that is full
    /// ([`StoreError::is_unavailable`]): retrying at once would only make the client wait.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::BatchFailed(inner) => inner.is_retryable(),
            StoreError::Database(sqlx::Error::Database(e)) => matches!(
                e.code().as_deref(),
                // Postgres: serialization_failure, deadlock_detected, lock_not_available.
                Some("40001" | "40P01" | "55P03")
                // SQLite: BUSY, LOCKED, BUSY_RECOVERY, LOCKED_SHAREDCACHE, BUSY_SNAPSHOT.
                | Some("5" | "6" | "261" | "262" | "517")
            ),
            StoreError::Reader(e) => {
                sqlite_code(e).is_some_and(|code| matches!(code, 5 | 6 | 261 | 262 | 517))
            }
            _ => false,
        }
    }
}

impl StoreError {
    /// Whether the storage cannot take the request now but may later: the disk is full or
    /// failing (SQLite `FULL`, `IOERR`), the database cannot be reached or is shutting down
    /// (a pool timeout, an I/O or TLS error, Postgres classes 08 and 53, `57P01`–`57P03`, a
    /// statement timeout `57014`), or [`StoreError::TimedOut`]. The broker answers these with a
    /// typed, retryable UNAVAILABLE, never INTERNAL.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::TimedOut => true,
            StoreError::BatchFailed(inner) => inner.is_unavailable(),
            StoreError::Database(e) => match e {
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
                sqlx::Error::Database(db) => {
                    let code = db.code().unwrap_or_default();
                    match code.parse::<i32>() {
                        // SQLite: the primary code is the low byte of the extended one.
                        Ok(n) => matches!(n & 0xff, 10 | 13),
                        // Postgres SQLSTATE.
                        Err(_) => {
                            code.starts_with("08")
                                || code.starts_with("53")
                                || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "57014")
                        }
                    }
                }
                _ => false,
            },
            StoreError::Reader(e) => {
                sqlite_code(e).is_some_and(|code| matches!(code & 0xff, 10 | 13))
            }
            _ => false,
        }
    }
}

/// The extended result code of a SQLite failure under a login reader.
fn sqlite_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => Some(failure.extended_code),
        _ => None,
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
