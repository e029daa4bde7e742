//! Entities, devices, registration secrets and login replay steps.

use super::{DeviceId, DeviceInfo, DeviceRecord, NewDevice, Number, PoolExt, Store, StoreError};
use super::{array, device_id, number as to_number, on_pool};

/// Columns of `devices` in the order [`device_record`] reads them.
type DeviceRow = (
    String,
    i64,
    Option<String>,
    Vec<u8>,
    Vec<u8>,
    i64,
    Option<i64>,
    Option<i64>,
);

const SELECT_DEVICE: &str = "SELECT number, device_id, name, client_secret, server_secret, \
     created_at, last_seen, revoked_at \
     FROM devices WHERE number = $1 AND device_id = $2";

/// A LOGIN that the caller's check admitted ([`Store::device_for_login`]).
#[derive(Debug)]
pub struct AdmittedLogin<T> {
    /// The device, with its secrets.
    pub record: DeviceRecord,
    /// What the check said.
    pub verdict: T,
    /// The device's pending items, or why they could not be counted.
    pub pending: Result<i64, StoreError>,
}

/// Runs the caller's check on what the device read found (always, so that a missing device
/// costs the same check); the login is admitted only with a device and a verdict.
fn admitted<T>(
    record: Option<DeviceRecord>,
    admit: impl FnOnce(Option<&DeviceRecord>) -> Option<T>,
) -> Option<(DeviceRecord, T)> {
    let verdict = admit(record.as_ref());
    Some((record?, verdict?))
}

/// [`Store::device_for_login`] on a login reader's connection: the same two statements.
fn read_login<T>(
    conn: &rusqlite::Connection,
    number: &str,
    device: i64,
    now: i64,
    admit: impl FnOnce(Option<&DeviceRecord>) -> Option<T>,
) -> Result<Option<AdmittedLogin<T>>, StoreError> {
    use rusqlite::OptionalExtension as _;
    let row: Option<DeviceRow> = conn
        .prepare_cached(SELECT_DEVICE)
        .and_then(|mut select| {
            select
                .query_row(rusqlite::named_params! {"$1": number, "$2": device}, |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })
                .optional()
        })
        .map_err(StoreError::Reader)?;
    let Some((record, verdict)) = admitted(row.map(device_record).transpose()?, admit) else {
        return Ok(None);
    };
    let pending = conn
        .prepare_cached(crate::inbox::COUNT_PENDING)
        .and_then(|mut count| {
            count.query_row(
                rusqlite::named_params! {"$1": number, "$2": device, "$3": now},
                |r| r.get(0),
            )
        })
        .map_err(StoreError::Reader);
    Ok(Some(AdmittedLogin {
        record,
        verdict,
        pending,
    }))
}

fn device_record(row: DeviceRow) -> Result<DeviceRecord, StoreError> {
    let (number, id, name, client, server, created_at, last_seen, revoked_at) = row;
    Ok(DeviceRecord {
        number: to_number(number)?,
        device_id: device_id(id)?,
        name,
        client_secret: array(&client, "client secret length")?,
        server_secret: array(&server, "server secret length")?,
        created_at,
        last_seen,
        revoked_at,
    })
}

pub(crate) const INSERT_DEVICE: &str = "INSERT INTO devices \
     (number, device_id, name, client_secret, server_secret, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6)";

const COUNT_ACTIVE: &str = "SELECT COUNT(*) FROM devices WHERE number = $1 AND revoked_at IS NULL";

impl Store {
    /// Registers a new entity with its first device (id 1), atomically.
    ///
    /// Fails with [`StoreError::NumberTaken`] when `number` exists or was retired by a
    /// deletion; the caller draws another random number and retries.
    pub async fn create_entity(
        &self,
        number: &Number,
        device: &NewDevice,
        now: i64,
    ) -> Result<DeviceId, StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // A retired number (ACCOUNT-DELETE) is as taken as a live one.
            let inserted = sqlx::query(
                "INSERT INTO entities (number, created_at, next_device) \
                 SELECT $1, $2, 2 WHERE NOT EXISTS \
                 (SELECT 1 FROM retired_numbers WHERE number = $1) \
                 ON CONFLICT (number) DO NOTHING",
            )
            .bind(number)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::NumberTaken);
            }
            sqlx::query(INSERT_DEVICE)
                .bind(number)
                .bind(1_i64)
                .bind(device.name.as_deref())
                .bind(&device.client_secret[..])
                .bind(&device.server_secret[..])
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(DeviceId::FIRST)
    }

    /// Whether `number` is a registered entity.
    pub async fn entity_exists(&self, number: &Number) -> Result<bool, StoreError> {
        let number = number.as_str();
        let exists: bool = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM entities WHERE number = $1)")
                .bind(number)
                .fetch_one(pool)
                .await?
        });
        Ok(exists)
    }

    /// Number of registered entities.
    pub async fn entity_count(&self) -> Result<i64, StoreError> {
        let n: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM entities").fetch_one(pool).await?
        });
        Ok(n)
    }

    /// Number of active (not revoked) devices over all entities.
    pub async fn device_count(&self) -> Result<i64, StoreError> {
        let n: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE revoked_at IS NULL")
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }

    /// The device `(number, device_id)` with its secrets, revoked or not.
    pub async fn device(
        &self,
        number: &Number,
        device_id: DeviceId,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let number = number.as_str();
        let device_id = device_id.get();
        let row: Option<DeviceRow> = on_pool!(self, pool => {
            sqlx::query_as(SELECT_DEVICE)
                .bind(number)
                .bind(i64::from(device_id))
                .fetch_optional(pool)
                .await?
        });
        row.map(device_record).transpose()
    }

    /// A LOGIN's reads: the device `(number, device_id)` (as [`Store::device`]), handed to
    /// `admit`, the caller's check of the login (pure CPU: the nonce), which says why it admits
    /// it (`Some`) or refuses (`None`); only if it admits an existing device, how many
    /// unexpired items [`Store::fetch_inbox`] would return for the device at `now` (LOGIN's
    /// pending count), whose own failure comes back apart: the login stands without it.
    /// `None` when the check refused, or admitted a device that does not exist.
    ///
    /// A refused login reads the device row and nothing else, whether the device exists or
    /// not, so its timing still tells nothing about which numbers exist (the count grows with
    /// the inbox). Both reads share one connection: on a SQLite store with login readers
    /// ([`Store::start_login_readers`]), a reader's, with `admit` run on its thread; otherwise
    /// a pooled one (sqlx tests every connection it takes back: a ping, a hop to SQLite's
    /// worker thread or a round trip to Postgres, so one per LOGIN rather than one per read).
    pub async fn device_for_login<T: Send + 'static>(
        &self,
        number: &Number,
        device_id: DeviceId,
        now: i64,
        admit: impl FnOnce(Option<&DeviceRecord>) -> Option<T> + Send + 'static,
    ) -> Result<Option<AdmittedLogin<T>>, StoreError> {
        let device = i64::from(device_id.get());
        if let Some(readers) = &self.login_readers {
            let number = number.as_str().to_owned();
            return readers
                .run(move |conn| read_login(conn, &number, device, now, admit))
                .await?;
        }
        let number = number.as_str();
        on_pool!(self, pool => {
            let mut conn = pool.acquire().await?;
            let row: Option<DeviceRow> = sqlx::query_as(SELECT_DEVICE)
                .bind(number)
                .bind(device)
                .fetch_optional(&mut *conn)
                .await?;
            let Some((record, verdict)) = admitted(row.map(device_record).transpose()?, admit)
            else {
                return Ok(None);
            };
            let pending = sqlx::query_scalar::<_, i64>(crate::inbox::COUNT_PENDING)
                .bind(number)
                .bind(device)
                .bind(now)
                .fetch_one(&mut *conn)
                .await
                .map_err(StoreError::from);
            Ok(Some(AdmittedLogin { record, verdict, pending }))
        })
    }

    /// Records activity of an active device. Returns `false` if it is unknown or revoked.
    pub async fn touch_device(
        &self,
        number: &Number,
        device_id: DeviceId,
        now: i64,
    ) -> Result<bool, StoreError> {
        let number = number.as_str();
        let device_id = device_id.get();
        let _writing = self.writing().await;
        let n = on_pool!(self, pool => {
            sqlx::query(
                "UPDATE devices SET last_seen = $3 \
                 WHERE number = $1 AND device_id = $2 AND revoked_at IS NULL",
            )
            .bind(number)
            .bind(i64::from(device_id))
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// All devices of `number` (revoked ones included, with `revoked_at`), by id.
    pub async fn list_devices(&self, number: &Number) -> Result<Vec<DeviceInfo>, StoreError> {
        let number = number.as_str();
        type Row = (i64, Option<String>, i64, Option<i64>, Option<i64>);
        let rows: Vec<Row> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT device_id, name, created_at, last_seen, revoked_at FROM devices \
                 WHERE number = $1 ORDER BY device_id",
            )
            .bind(number)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(id, name, created_at, last_seen, revoked_at)| {
                Ok(DeviceInfo {
                    device_id: device_id(id)?,
                    name,
                    created_at,
                    last_seen,
                    revoked_at,
                })
            })
            .collect()
    }

    /// Number of active devices of `number`.
    pub async fn active_device_count(&self, number: &Number) -> Result<i64, StoreError> {
        let number = number.as_str();
        let n: i64 = on_pool!(self, pool => {
            sqlx::query_scalar(COUNT_ACTIVE).bind(number).fetch_one(pool).await?
        });
        Ok(n)
    }

    /// Revokes an active device. Returns `false` if it is unknown or already revoked.
    ///
    /// In the same transaction, the device's own inbox items are deleted, and number-mode
    /// items that every remaining active device has acknowledged are deleted too.
    pub async fn revoke_device(
        &self,
        number: &Number,
        device_id: DeviceId,
        now: i64,
    ) -> Result<bool, StoreError> {
        let number = number.as_str();
        let device_id = device_id.get();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query(
                "UPDATE devices SET revoked_at = $3 \
                 WHERE number = $1 AND device_id = $2 AND revoked_at IS NULL",
            )
            .bind(number)
            .bind(i64::from(device_id))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                return Ok(false);
            }
            sqlx::query(
                "DELETE FROM inbox_items WHERE recipient_number = $1 AND recipient_device = $2",
            )
            .bind(number)
            .bind(i64::from(device_id))
            .execute(&mut *tx)
            .await?;
            sqlx::query(super::inbox::DELETE_FULLY_ACKED_ALL)
                .bind(number)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Stores a single-use registration secret (ADD-DEVICE) by its SHA-256 `secret_hash`.
    ///
    /// Fails with [`StoreError::DeviceLimit`] when active devices plus unexpired unused
    /// secrets already reach `max_devices`, and [`StoreError::NotFound`] for an unknown entity.
    pub async fn create_registration_secret(
        &self,
        number: &Number,
        secret_hash: &[u8; 32],
        name: Option<&str>,
        now: i64,
        expires_at: i64,
        max_devices: u32,
    ) -> Result<(), StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // Lock the entity row (Postgres) so racing ADD-DEVICEs count each other.
            crate::lock_entity!(tx, number);
            let used: i64 = sqlx::query_scalar(
                "SELECT (SELECT COUNT(*) FROM devices WHERE number = $1 AND revoked_at IS NULL) \
                 + (SELECT COUNT(*) FROM registration_secrets \
                    WHERE number = $1 AND used_at IS NULL AND expires_at > $2)",
            )
            .bind(number)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            if used >= i64::from(max_devices) {
                return Err(StoreError::DeviceLimit);
            }
            let n = sqlx::query(
                "INSERT INTO registration_secrets \
                 (number, secret_hash, name, created_at, expires_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (number, secret_hash) DO NOTHING",
            )
            .bind(number)
            .bind(&secret_hash[..])
            .bind(name)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                // The hash of a fresh random 256-bit secret.
                return Err(StoreError::Invariant("registration secret hash collided"));
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Redeems a registration secret (DEVICE-JOIN) and creates the device, in one transaction.
    ///
    /// The secret must exist for `number`, be unused and unexpired, else
    /// [`StoreError::BadSecret`] (the same error for all three). If the entity already has
    /// `max_devices` active devices: [`StoreError::DeviceLimit`], and the secret stays unused.
    /// The new id is one more than any id the entity ever had. Of concurrent redeems of one
    /// secret exactly one succeeds.
    pub async fn redeem_registration_secret(
        &self,
        number: &Number,
        secret_hash: &[u8; 32],
        device: &NewDevice,
        now: i64,
        max_devices: u32,
    ) -> Result<DeviceId, StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        let id = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // The conditional UPDATE is the single-use gate: on Postgres a racing redeem waits
            // on the row lock and then matches nothing; on SQLite BEGIN IMMEDIATE serialises.
            let secret_name: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE registration_secrets SET used_at = $3 \
                 WHERE number = $1 AND secret_hash = $2 AND used_at IS NULL AND expires_at > $3 \
                 RETURNING name",
            )
            .bind(number)
            .bind(&secret_hash[..])
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(secret_name) = secret_name else {
                return Err(StoreError::BadSecret);
            };
            // Allocate the id; this also locks the entity row for the count below.
            let id: Option<i64> = sqlx::query_scalar(
                "UPDATE entities SET next_device = next_device + 1 WHERE number = $1 \
                 RETURNING next_device - 1",
            )
            .bind(number)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(id) = id else {
                return Err(StoreError::BadSecret);
            };
            let active: i64 = sqlx::query_scalar(COUNT_ACTIVE)
                .bind(number)
                .fetch_one(&mut *tx)
                .await?;
            if active >= i64::from(max_devices) {
                return Err(StoreError::DeviceLimit);
            }
            let name = device.name.as_deref().or(secret_name.as_deref());
            sqlx::query(INSERT_DEVICE)
                .bind(number)
                .bind(id)
                .bind(name)
                .bind(&device.client_secret[..])
                .bind(&device.server_secret[..])
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            id
        });
        device_id(id)
    }
}
