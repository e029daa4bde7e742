//! Offline inboxes: batched deposit (group commit), fetch, acknowledge, counts.
//!
//! Storage: one `inbox_items` row per (recipient number, recipient device, message id);
//! `recipient_device = 0` is a number-mode item shared by all devices of the number (device
//! ids start at 1). `seq` is assigned at insert and strictly increases, so ordering by it keeps
//! each sender's order; it is the paging key. Number-mode acknowledgements are rows in
//! `inbox_acks`; the item goes once every active device has acknowledged it.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, SqliteConnection};

use super::relaxed::{COMMIT_WITHOUT_FLUSH, RelaxedSqlite};
use super::routed::{DepositJob, ReceivedDelivery, RoutedOutcome};
use super::{
    Backend, DepositOutcome, DeviceId, InboxItem, MessageId, NewInboxItem, Number, PoolExt, Store,
    StoreError,
};
use super::{array, device_id, number as to_number, on_pool, sqlite_list, sqlite_rows};

/// (recipient number, stored recipient device (0 = number mode), message id).
pub(crate) type Key = (String, i64, MessageId);
/// A recipient inbox: (recipient number, stored recipient device).
pub(crate) type Inbox = (String, i64);
/// Per-item result of a deposit.
pub(crate) type Outcome = Result<DepositOutcome, StoreError>;

/// What is stored under a key, enough to tell a repeat from a clash: the sender (number,
/// device), the body, and the expiry.
pub(crate) type StoredItem = (String, i64, Vec<u8>, i64);

/// A row of a key lookup: the key's three columns, then a [`StoredItem`].
type LookupRow = (String, i64, Vec<u8>, String, i64, Vec<u8>, i64);

/// Items per statement on SQLite (8 parameters each; well under SQLite's 32766).
const SQLITE_CHUNK: usize = 256;

/// How [`DepositIo::counters`] changes a quota counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    /// `items = items + n`.
    Add,
    /// `items = n`.
    Set,
}

impl Counter {
    fn assignment(self) -> &'static str {
        match self {
            Self::Add => "items = inbox_counters.items + excluded.items",
            Self::Set => "items = excluded.items",
        }
    }
}

/// How a deposit transaction takes its inboxes' quota counters (`inbox_counters`, split into
/// slots since `migrations/*/0009_inbox_counter_slots.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Alone: each inbox locked exclusively, so every other deposit writer of those inboxes
    /// waits and the counters it reads are exact upper bounds; it adds to slot 0. A delivery
    /// from a peer broker, a batch near the quota, the only batch in flight.
    Alone,
    /// Beside other deposit batches in flight: each inbox locked shared with them, its own
    /// `slot` for what it adds. What the others add is not visible until they commit: at most
    /// `slack` per inbox (the other slots × the largest batch). A batch whose bound plus
    /// `slack` passes the quota must run [`Lane::Alone`] instead ([`deposit_in_lane`] says so).
    Beside {
        /// This batch's slot (1 and up; 0 is the slot of the writers that run alone).
        slot: i16,
        /// The most the batches beside it can add to one inbox unseen.
        slack: i64,
    },
}

impl Lane {
    fn slot(self) -> i16 {
        match self {
            Self::Alone => 0,
            Self::Beside { slot, .. } => slot,
        }
    }
}

/// The first key of the advisory locks on inboxes ([`DepositIo::lock_inboxes`]), "MM": its own
/// key space, apart from other advisory locks (sqlx's migration lock uses the one-key form).
const INBOX_LOCK_CLASS: i32 = 0x4d4d;

/// Sorted, so that every transaction locks counter rows in the same order.
fn sorted(inboxes: &[(Inbox, i64)]) -> Vec<&(Inbox, i64)> {
    let mut rows: Vec<&(Inbox, i64)> = inboxes.iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Item `i` (of the number `$number`, an SQL expression) is acknowledged by every active device
/// of that number.
macro_rules! fully_acked {
    ($number:literal) => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM devices AS d \
             WHERE d.number = ",
            $number,
            " AND d.revoked_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM inbox_acks AS a \
                 WHERE a.item_seq = i.seq AND a.device_id = d.device_id))"
        )
    };
}

/// Deletes number-mode items of `$1` that every active device has acknowledged.
pub(super) const DELETE_FULLY_ACKED_ALL: &str = concat!(
    "DELETE FROM inbox_items AS i \
     WHERE i.recipient_number = $1 AND i.recipient_device = 0 AND ",
    fully_acked!("$1")
);

/// Deletes the items with ids `$3` of `$1`'s stored device `$2`, committing without waiting
/// for the flush when sent on its own ([`COMMIT_WITHOUT_FLUSH`]); returns their ids. Built
/// once: every drain page's acknowledgement sends it.
fn pg_delete_own() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "DELETE FROM inbox_items WHERE seq = ANY(ARRAY({})) \
             AND {COMMIT_WITHOUT_FLUSH} RETURNING id",
            pg_seqs_of("$2", "")
        )
    });
    &SQL
}

/// Postgres: acknowledges number-mode items `ids` of `number` for `device`, then deletes (by
/// primary key) those now acknowledged by every active device. Returns how many were newly
/// acknowledged. FOR KEY SHARE holds each item until commit and skips one deleted meanwhile, so
/// no acknowledgement outlives its item (what a foreign key did before migration 0005).
async fn ack_number_mode(
    tx: &mut PgConnection,
    number: &str,
    device: i64,
    ids: &[&[u8]],
) -> Result<u64, StoreError> {
    let marked: Vec<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO inbox_acks (item_seq, device_id) SELECT s, $2 \
             FROM ({}) AS x (s) \
             ON CONFLICT (item_seq, device_id) DO NOTHING RETURNING item_seq",
        pg_seqs_of("0", "FOR KEY SHARE")
    ))
    .bind(number)
    .bind(device)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    if !marked.is_empty() {
        sqlx::query(
            // No recipient_number test on `i` (every seq here is one of $1's): it would let a
            // stale planner scan the inbox instead of the primary key.
            concat!(
                "DELETE FROM inbox_items AS i \
                 WHERE i.seq = ANY($2) AND i.recipient_device = 0 AND ",
                fully_acked!("$1")
            ),
        )
        .bind(number)
        .bind(&marked)
        .execute(&mut *tx)
        .await?;
    }
    Ok(marked.len() as u64)
}

/// The stored form of a recipient device: its id, or 0 for a number-mode item (ids start at
/// 1, so 0 is never a device).
pub(crate) fn stored_device(d: Option<DeviceId>) -> Result<i64, StoreError> {
    Ok(d.map_or(0, |d| i64::from(d.get())))
}

/// A deposit whose key is taken: a repeat of the stored message (same sender, same body),
/// which changes nothing and reports the stored expiry, or a clash (protocol 6.20: CONFLICT).
/// The bodies are compared in constant time: what a stored message holds must not leak.
fn repeat_or_clash(item: &NewInboxItem, stored: (&str, i64, &[u8], i64)) -> Outcome {
    let (number, device, body, expires_at) = stored;
    let same_sender =
        item.sender_number.as_str() == number && i64::from(item.sender_device.get()) == device;
    let same_body = item.body.len() == body.len()
        && bool::from(subtle::ConstantTimeEq::ct_eq(item.body.as_slice(), body));
    if same_sender && same_body {
        Ok(DepositOutcome::AlreadyStored { expires_at })
    } else {
        Err(StoreError::DuplicateId)
    }
}

/// The backend-specific statements of a batched deposit, run inside one transaction.
pub(crate) trait DepositIo {
    /// Stored rows among `keys`: key -> what is stored.
    fn lookup(
        &mut self,
        keys: &[Key],
    ) -> impl Future<Output = Result<HashMap<Key, StoredItem>, StoreError>> + Send;
    /// Stored item counts of `inboxes` (absent = 0).
    fn counts(
        &mut self,
        inboxes: &[Inbox],
    ) -> impl Future<Output = Result<HashMap<Inbox, i64>, StoreError>> + Send;
    /// Locks `inboxes` for this transaction, in a fixed order so that writers cannot deadlock:
    /// exclusively when `alone`, else shared with the other batches in flight (see [`Lane`]).
    /// Nothing to do on SQLite, whose writers run one at a time.
    fn lock_inboxes(
        &mut self,
        inboxes: &[Inbox],
        alone: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Adds (`Counter::Add`) or writes (`Counter::Set`) `slot` of the quota counters of
    /// `inboxes` (a row made where missing) and returns each inbox's bound: that slot's new
    /// value plus the other slots as committed. `Counter::Set` also zeroes the other slots,
    /// so it is for a writer that runs alone. Rows are locked in a fixed order, so concurrent
    /// batches cannot deadlock on them.
    fn counters(
        &mut self,
        op: Counter,
        slot: i16,
        inboxes: &[(Inbox, i64)],
    ) -> impl Future<Output = Result<HashMap<Inbox, i64>, StoreError>> + Send;
    /// Deletes the items with `keys`.
    fn delete(&mut self, keys: &[Key]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Inserts `rows` (item, stored device) in order, skipping keys that exist; returns the
    /// keys actually inserted.
    fn insert(
        &mut self,
        rows: &[(&NewInboxItem, i64)],
    ) -> impl Future<Output = Result<HashSet<Key>, StoreError>> + Send;
}

impl DepositIo for SqliteConnection {
    async fn lookup(&mut self, keys: &[Key]) -> Result<HashMap<Key, StoredItem>, StoreError> {
        let mut out = HashMap::new();
        for chunk in keys.chunks(SQLITE_CHUNK) {
            let values = sqlite_rows(chunk.len(), 3);
            let sql = format!(
                "SELECT recipient_number, recipient_device, id, sender_number, sender_device, \
                 body, expires_at \
                 FROM inbox_items WHERE (recipient_number, recipient_device, id) IN \
                 (VALUES {values})"
            );
            let mut q = sqlx::query_as::<_, LookupRow>(&sql).persistent(false);
            for k in chunk {
                q = q.bind(k.0.as_str()).bind(k.1).bind(&k.2[..]);
            }
            for (n, d, id, sn, sd, body, ea) in q.fetch_all(&mut *self).await? {
                out.insert((n, d, array(&id, "message id length")?), (sn, sd, body, ea));
            }
        }
        Ok(out)
    }

    async fn counts(&mut self, inboxes: &[Inbox]) -> Result<HashMap<Inbox, i64>, StoreError> {
        let mut out = HashMap::new();
        for chunk in inboxes.chunks(SQLITE_CHUNK) {
            let values = sqlite_rows(chunk.len(), 2);
            let sql = format!(
                "SELECT recipient_number, recipient_device, COUNT(*) FROM inbox_items \
                 WHERE (recipient_number, recipient_device) IN (VALUES {values}) \
                 GROUP BY recipient_number, recipient_device"
            );
            let mut q = sqlx::query_as::<_, (String, i64, i64)>(&sql).persistent(false);
            for (n, d) in chunk {
                q = q.bind(n.as_str()).bind(*d);
            }
            for (n, d, c) in q.fetch_all(&mut *self).await? {
                out.insert((n, d), c);
            }
        }
        Ok(out)
    }

    async fn lock_inboxes(&mut self, _inboxes: &[Inbox], _alone: bool) -> Result<(), StoreError> {
        Ok(())
    }

    async fn counters(
        &mut self,
        op: Counter,
        _slot: i16,
        inboxes: &[(Inbox, i64)],
    ) -> Result<HashMap<Inbox, i64>, StoreError> {
        // One writer at a time (`Store::writing`, BEGIN IMMEDIATE): every batch runs alone and
        // adds to slot 0. Other slots hold counts only in a database moved here from Postgres
        // (`migrate-store`): they are still part of the bound, and an exact figure clears them.
        let rows = sorted(inboxes);
        let mut out = HashMap::with_capacity(rows.len());
        for chunk in rows.chunks(SQLITE_CHUNK) {
            if op == Counter::Set {
                let sql = format!(
                    "UPDATE inbox_counters SET items = 0 WHERE slot <> 0 AND \
                     (recipient_number, recipient_device) IN (VALUES {})",
                    sqlite_rows(chunk.len(), 2)
                );
                let mut q = sqlx::query(&sql).persistent(false);
                for ((n, d), _) in chunk {
                    q = q.bind(n.as_str()).bind(*d);
                }
                q.execute(&mut *self).await?;
            }
            let values = sqlite_rows(chunk.len(), 3);
            let sql = format!(
                "INSERT INTO inbox_counters (recipient_number, recipient_device, items) \
                 VALUES {values} ON CONFLICT (recipient_number, recipient_device, slot) \
                 DO UPDATE SET {} RETURNING recipient_number, recipient_device, items + \
                 COALESCE((SELECT SUM(o.items) FROM inbox_counters AS o \
                   WHERE o.recipient_number = inbox_counters.recipient_number \
                   AND o.recipient_device = inbox_counters.recipient_device AND o.slot <> 0), 0)",
                op.assignment()
            );
            let mut q = sqlx::query_as::<_, (String, i64, i64)>(&sql).persistent(false);
            for ((n, d), c) in chunk {
                q = q.bind(n.as_str()).bind(*d).bind(*c);
            }
            for (n, d, c) in q.fetch_all(&mut *self).await? {
                out.insert((n, d), c);
            }
        }
        Ok(out)
    }

    async fn delete(&mut self, keys: &[Key]) -> Result<(), StoreError> {
        for chunk in keys.chunks(SQLITE_CHUNK) {
            let values = sqlite_rows(chunk.len(), 3);
            let sql = format!(
                "DELETE FROM inbox_items WHERE (recipient_number, recipient_device, id) IN \
                 (VALUES {values})"
            );
            let mut q = sqlx::query(&sql).persistent(false);
            for k in chunk {
                q = q.bind(k.0.as_str()).bind(k.1).bind(&k.2[..]);
            }
            q.execute(&mut *self).await?;
        }
        Ok(())
    }

    async fn insert(&mut self, rows: &[(&NewInboxItem, i64)]) -> Result<HashSet<Key>, StoreError> {
        let mut out = HashSet::new();
        for chunk in rows.chunks(SQLITE_CHUNK) {
            let values = sqlite_rows(chunk.len(), 8);
            let sql = format!(
                "INSERT INTO inbox_items (id, recipient_number, recipient_device, sender_number, \
                 sender_device, created_at, expires_at, body) VALUES {values} \
                 ON CONFLICT (recipient_number, recipient_device, id) DO NOTHING \
                 RETURNING recipient_number, recipient_device, id"
            );
            let mut q = sqlx::query_as::<_, (String, i64, Vec<u8>)>(&sql).persistent(false);
            for (item, device) in chunk {
                q = q
                    .bind(&item.id[..])
                    .bind(item.recipient_number.as_str())
                    .bind(*device)
                    .bind(item.sender_number.as_str())
                    .bind(i64::from(item.sender_device.get()))
                    .bind(item.created_at)
                    .bind(item.expires_at)
                    .bind(item.body.as_slice());
            }
            for (n, d, id) in q.fetch_all(&mut *self).await? {
                out.insert((n, d, array(&id, "message id length")?));
            }
        }
        Ok(out)
    }
}

/// Keyed lookups in Postgres are written as a LATERAL subquery with `LIMIT 1` per key, not as
/// a join or `= ANY`: after an inbox grows fast (statistics from when it was small say it holds
/// a row or two) the planner otherwise prefers reading the whole inbox through
/// `inbox_items_order` and hashing it, which costs milliseconds per statement at 50,000 items.
/// The LIMIT keeps the subquery from being flattened into such a join. With statistics that put
/// a row or two in the inbox, `inbox_items_order` (number, device, seq) with `id` as a filter
/// and the unique `inbox_items_key` cost the planner the same, and it took the first, reading
/// the whole inbox per probe; that index is partial (`seq > 0`, migration 0008 on Postgres),
/// so a probe, which does not say `seq > 0`, can only use the key. Only [`FETCH`] says it.
const PG_LOOKUP: &str = "SELECT i.recipient_number, i.recipient_device, i.id, \
     i.sender_number, i.sender_device, i.body, i.expires_at \
     FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS k (n, d, id) \
     CROSS JOIN LATERAL (SELECT recipient_number, recipient_device, id, sender_number, \
         sender_device, body, expires_at FROM inbox_items \
         WHERE recipient_number = k.n AND recipient_device = k.d AND id = k.id LIMIT 1) AS i";

/// The seqs of the items with ids `$3` in the inbox of `$1` and stored device `device` (a
/// parameter or a literal), one keyed probe per id (see [`PG_LOOKUP`]). `lock` is a locking
/// clause for the items found, or empty.
fn pg_seqs_of(device: &str, lock: &str) -> String {
    format!(
        "SELECT x.seq FROM UNNEST($3::bytea[]) AS u (id) \
         CROSS JOIN LATERAL (SELECT seq FROM inbox_items \
             WHERE recipient_number = $1 AND recipient_device = {device} AND id = u.id \
             LIMIT 1 {lock}) AS x"
    )
}

const PG_COUNTS: &str = "SELECT i.recipient_number, i.recipient_device, COUNT(*) \
     FROM inbox_items AS i \
     JOIN (SELECT DISTINCT n, d FROM UNNEST($1::text[], $2::bigint[]) AS u (n, d)) AS k \
     ON i.recipient_number = k.n AND i.recipient_device = k.d \
     GROUP BY i.recipient_number, i.recipient_device";

/// One statement for the whole batch; `WITH ORDINALITY … ORDER BY` keeps `seq` in slice order.
const PG_INSERT: &str = "INSERT INTO inbox_items (id, recipient_number, recipient_device, \
     sender_number, sender_device, created_at, expires_at, body) \
     SELECT id, rn, rd, sn, sd, ca, ea, b \
     FROM UNNEST($1::bytea[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], \
                 $6::bigint[], $7::bigint[], $8::bytea[]) \
          WITH ORDINALITY AS u (id, rn, rd, sn, sd, ca, ea, b, ord) \
     ORDER BY ord \
     ON CONFLICT (recipient_number, recipient_device, id) DO NOTHING \
     RETURNING recipient_number, recipient_device, id";

impl DepositIo for PgConnection {
    async fn lookup(&mut self, keys: &[Key]) -> Result<HashMap<Key, StoredItem>, StoreError> {
        let numbers: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let devices: Vec<i64> = keys.iter().map(|k| k.1).collect();
        let ids: Vec<&[u8]> = keys.iter().map(|k| &k.2[..]).collect();
        let rows: Vec<LookupRow> = sqlx::query_as(PG_LOOKUP)
            .bind(numbers)
            .bind(devices)
            .bind(ids)
            .fetch_all(&mut *self)
            .await?;
        rows.into_iter()
            .map(|(n, d, id, sn, sd, body, ea)| {
                Ok(((n, d, array(&id, "message id length")?), (sn, sd, body, ea)))
            })
            .collect()
    }

    async fn counts(&mut self, inboxes: &[Inbox]) -> Result<HashMap<Inbox, i64>, StoreError> {
        let numbers: Vec<&str> = inboxes.iter().map(|k| k.0.as_str()).collect();
        let devices: Vec<i64> = inboxes.iter().map(|k| k.1).collect();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(PG_COUNTS)
            .bind(numbers)
            .bind(devices)
            .fetch_all(&mut *self)
            .await?;
        Ok(rows.into_iter().map(|(n, d, c)| ((n, d), c)).collect())
    }

    async fn lock_inboxes(&mut self, inboxes: &[Inbox], alone: bool) -> Result<(), StoreError> {
        let numbers: Vec<&str> = inboxes.iter().map(|(n, _)| n.as_str()).collect();
        let devices: Vec<i64> = inboxes.iter().map(|(_, d)| *d).collect();
        // Transaction-level advisory locks, one per inbox (hashed: a collision only makes two
        // inboxes wait for each other), taken in the order of their keys so that writers
        // cannot deadlock. Shared among batches in flight; exclusive for a writer alone. Not
        // `FOR SHARE` on a counter row: several transactions sharing a row lock make Postgres
        // write a multixact for each new set of holders, which doubled its CPU per deposit.
        let sql = format!(
            "SELECT {}({INBOX_LOCK_CLASS}, k) FROM \
             (SELECT DISTINCT hashtext(n || '/' || d::text) AS k \
              FROM UNNEST($1::text[], $2::bigint[]) AS u (n, d) ORDER BY k) AS s",
            if alone {
                "pg_advisory_xact_lock"
            } else {
                "pg_advisory_xact_lock_shared"
            }
        );
        sqlx::query(&sql)
            .bind(&numbers)
            .bind(&devices)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    async fn counters(
        &mut self,
        op: Counter,
        slot: i16,
        inboxes: &[(Inbox, i64)],
    ) -> Result<HashMap<Inbox, i64>, StoreError> {
        let rows = sorted(inboxes);
        let numbers: Vec<&str> = rows.iter().map(|((n, _), _)| n.as_str()).collect();
        let devices: Vec<i64> = rows.iter().map(|((_, d), _)| *d).collect();
        let values: Vec<i64> = rows.iter().map(|(_, c)| *c).collect();
        if op == Counter::Set {
            // The exact figure replaces the whole bound: the other slots go to 0 (this writer
            // runs alone, so none of them is in use).
            sqlx::query(
                "UPDATE inbox_counters AS c SET items = 0 \
                 FROM UNNEST($1::text[], $2::bigint[]) AS u (n, d) \
                 WHERE c.recipient_number = u.n AND c.recipient_device = u.d \
                 AND c.slot <> $3 AND c.items <> 0",
            )
            .bind(&numbers)
            .bind(&devices)
            .bind(slot)
            .execute(&mut *self)
            .await?;
        }
        // The other slots as of this statement's snapshot: what the batches beside this one
        // added is not there until they commit (`Lane::Beside`'s slack).
        let sql = format!(
            "WITH bumped AS ( \
                INSERT INTO inbox_counters (recipient_number, recipient_device, slot, items) \
                SELECT n, d, $4, c FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) \
                     WITH ORDINALITY AS u (n, d, c, ord) ORDER BY ord \
                ON CONFLICT (recipient_number, recipient_device, slot) DO UPDATE SET {} \
                RETURNING recipient_number, recipient_device, items) \
             SELECT b.recipient_number, b.recipient_device, (b.items + COALESCE( \
                (SELECT SUM(o.items) FROM inbox_counters AS o \
                 WHERE o.recipient_number = b.recipient_number \
                 AND o.recipient_device = b.recipient_device AND o.slot <> $4), 0))::bigint \
             FROM bumped AS b",
            op.assignment()
        );
        let out: Vec<(String, i64, i64)> = sqlx::query_as(&sql)
            .bind(numbers)
            .bind(devices)
            .bind(values)
            .bind(slot)
            .fetch_all(&mut *self)
            .await?;
        Ok(out.into_iter().map(|(n, d, c)| ((n, d), c)).collect())
    }

    async fn delete(&mut self, keys: &[Key]) -> Result<(), StoreError> {
        let numbers: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let devices: Vec<i64> = keys.iter().map(|k| k.1).collect();
        let ids: Vec<&[u8]> = keys.iter().map(|k| &k.2[..]).collect();
        sqlx::query(
            "DELETE FROM inbox_items AS i \
             USING UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS k (n, d, id) \
             WHERE i.recipient_number = k.n AND i.recipient_device = k.d AND i.id = k.id",
        )
        .bind(numbers)
        .bind(devices)
        .bind(ids)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn insert(&mut self, rows: &[(&NewInboxItem, i64)]) -> Result<HashSet<Key>, StoreError> {
        let ids: Vec<&[u8]> = rows.iter().map(|(i, _)| &i.id[..]).collect();
        let rn: Vec<&str> = rows
            .iter()
            .map(|(i, _)| i.recipient_number.as_str())
            .collect();
        let rd: Vec<i64> = rows.iter().map(|(_, d)| *d).collect();
        let sn: Vec<&str> = rows.iter().map(|(i, _)| i.sender_number.as_str()).collect();
        let sd: Vec<i64> = rows
            .iter()
            .map(|(i, _)| i64::from(i.sender_device.get()))
            .collect();
        let ca: Vec<i64> = rows.iter().map(|(i, _)| i.created_at).collect();
        let ea: Vec<i64> = rows.iter().map(|(i, _)| i.expires_at).collect();
        let body: Vec<&[u8]> = rows.iter().map(|(i, _)| i.body.as_slice()).collect();
        let inserted: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(PG_INSERT)
            .bind(ids)
            .bind(rn)
            .bind(rd)
            .bind(sn)
            .bind(sd)
            .bind(ca)
            .bind(ea)
            .bind(body)
            .fetch_all(&mut *self)
            .await?;
        inserted
            .into_iter()
            .map(|(n, d, id)| Ok((n, d, array(&id, "message id length")?)))
            .collect()
    }
}

/// The deposit logic shared by both backends (the caller owns the transaction).
///
/// The common case costs three statements on Postgres (two on SQLite): lock its inboxes
/// ([`Lane`]), add the batch to its slot of their quota counters (an upper bound on what each holds, see `migrations/*/0004_inbox_counters.sql`
/// and `0009_inbox_counter_slots.sql`), then insert with `ON CONFLICT DO NOTHING`. Only keys
/// the insert skipped are looked up (to tell a repeat from a clash), and only inboxes whose
/// bound passes the quota are counted exactly. This runs [`Lane::Alone`]: every other writer
/// of its inboxes waits.
///
/// `discarded` are deposits that are acknowledged but not kept (a sender the recipient
/// blocked). Each does the writes a kept one does: its inbox's counter row (adding nothing),
/// and its row inserted and deleted again, so that the transaction dirties the same pages
/// and its durable commit costs the same: the answer's timing does not tell the sender it
/// is blocked (protocol.md 14).
pub(crate) async fn deposit_in<C: DepositIo + Send>(
    conn: &mut C,
    items: &[NewInboxItem],
    discarded: &[(&NewInboxItem, i64)],
    quota_per_device: u32,
) -> Result<Vec<Outcome>, StoreError> {
    deposit_in_lane(conn, items, discarded, quota_per_device, Lane::Alone)
        .await?
        .ok_or(StoreError::Invariant("a deposit alone needs no other lane"))
}

/// [`deposit_in`] in `lane`. `None` when a [`Lane::Beside`] batch found an inbox near the
/// quota: it has written nothing the caller may keep (roll the transaction back) and must run
/// again [`Lane::Alone`], where that inbox is counted exactly.
pub(crate) async fn deposit_in_lane<C: DepositIo + Send>(
    conn: &mut C,
    items: &[NewInboxItem],
    discarded: &[(&NewInboxItem, i64)],
    quota_per_device: u32,
    lane: Lane,
) -> Result<Option<Vec<Outcome>>, StoreError> {
    let quota = i64::from(quota_per_device);
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(items.len());
    let mut keys: Vec<Option<Key>> = Vec::with_capacity(items.len());
    for item in items {
        match stored_device(item.recipient_device) {
            Ok(d) => {
                keys.push(Some((
                    item.recipient_number.as_str().to_owned(),
                    d,
                    item.id,
                )));
                outcomes.push(None);
            }
            Err(e) => {
                keys.push(None);
                outcomes.push(Some(Err(e)));
            }
        }
    }
    // The first item of each key, and how many distinct keys each inbox may gain.
    let mut first: HashMap<&Key, usize> = HashMap::with_capacity(items.len());
    let mut need: HashMap<Inbox, i64> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if let Some(key) = key
            && !first.contains_key(key)
        {
            first.insert(key, i);
            *need.entry((key.0.clone(), key.1)).or_insert(0) += 1;
        }
    }
    for (item, device) in discarded {
        need.entry((item.recipient_number.as_str().to_owned(), *device))
            .or_insert(0);
    }
    if need.is_empty() {
        return Ok(Some(
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or(Err(StoreError::Invariant("an outcome per deposit"))))
                .collect(),
        ));
    }
    let need: Vec<(Inbox, i64)> = need.into_iter().collect();
    let inboxes: Vec<Inbox> = need.iter().map(|(inbox, _)| inbox.clone()).collect();
    conn.lock_inboxes(&inboxes, lane == Lane::Alone).await?;
    let bounds = conn.counters(Counter::Add, lane.slot(), &need).await?;
    if let Lane::Beside { slack, .. } = lane
        && bounds
            .values()
            .any(|bound| bound.saturating_add(slack) > quota)
    {
        return Ok(None);
    }
    // Inboxes that might pass the quota with this batch: count them exactly (running alone,
    // each is locked, so no other writer changes them until this one commits).
    let tight: Vec<Inbox> = bounds
        .iter()
        .filter(|(_, bound)| **bound > quota)
        .map(|(inbox, _)| inbox.clone())
        .collect();
    let (existing, mut exact) = if tight.is_empty() {
        (HashMap::new(), HashMap::new())
    } else {
        let tight_set: HashSet<(&str, i64)> = tight.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let tight_keys: Vec<Key> = first
            .keys()
            .filter(|k| tight_set.contains(&(k.0.as_str(), k.1)))
            .map(|k| (*k).clone())
            .collect();
        let existing = conn.lookup(&tight_keys).await?;
        let mut exact = conn.counts(&tight).await?;
        for inbox in &tight {
            exact.entry(inbox.clone()).or_insert(0);
        }
        (existing, exact)
    };

    // Decide each item in order; `pending` holds keys this batch will insert.
    let mut pending: HashMap<&Key, usize> = HashMap::new();
    let mut to_insert: Vec<(usize, i64)> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let Some(key) = key else { continue };
        let item = &items[i];
        let outcome = if let Some((sn, sd, body, ea)) = existing.get(key) {
            repeat_or_clash(item, (sn, *sd, body, *ea))
        } else if let Some(&j) = pending.get(key) {
            let earlier = &items[j];
            repeat_or_clash(
                item,
                (
                    earlier.sender_number.as_str(),
                    i64::from(earlier.sender_device.get()),
                    &earlier.body,
                    earlier.expires_at,
                ),
            )
        } else if let Some(count) = match exact.is_empty() {
            true => None, // the common case: no key to build
            false => exact.get_mut(&(key.0.clone(), key.1)),
        } {
            if *count >= quota {
                Err(StoreError::QuotaExceeded)
            } else {
                *count += 1;
                pending.insert(key, i);
                to_insert.push((i, key.1));
                Ok(DepositOutcome::Stored)
            }
        } else {
            pending.insert(key, i);
            to_insert.push((i, key.1));
            Ok(DepositOutcome::Stored)
        };
        outcomes[i] = Some(outcome);
    }

    if !to_insert.is_empty() {
        let rows: Vec<(&NewInboxItem, i64)> =
            to_insert.iter().map(|&(i, d)| (&items[i], d)).collect();
        let inserted = conn.insert(&rows).await?;
        // A key we meant to insert but did not: stored before (a repeat or a clash), or by a
        // concurrent transaction (Postgres waits for it on the unique index). Classify against
        // what is stored now. (Not in a tight inbox, whose stored keys were looked up above
        // and whose lock keeps other writers out, so `exact` stays exact.)
        let lost: HashSet<Key> = pending
            .keys()
            .filter(|k| !inserted.contains(**k))
            .map(|k| (*k).clone())
            .collect();
        if !lost.is_empty() {
            let lost_keys: Vec<Key> = lost.iter().cloned().collect();
            let now_stored = conn.lookup(&lost_keys).await?;
            for (i, key) in keys.iter().enumerate() {
                let Some(key) = key else { continue };
                if lost.contains(key) {
                    outcomes[i] = Some(match now_stored.get(key) {
                        Some((sn, sd, body, ea)) => {
                            repeat_or_clash(&items[i], (sn, *sd, body, *ea))
                        }
                        None => Err(StoreError::Invariant(
                            "the item that blocked a deposit's insert was gone",
                        )),
                    });
                }
            }
        }
    }
    if !discarded.is_empty() {
        // Only rows this insert made are deleted: a key already stored stays as it was.
        let made = conn.insert(discarded).await?;
        let made: Vec<Key> = made.into_iter().collect();
        conn.delete(&made).await?;
    }
    if !exact.is_empty() {
        // The exact figure (stored + inserted here) replaces the bound of each tight inbox.
        let exact: Vec<(Inbox, i64)> = exact.into_iter().collect();
        conn.counters(Counter::Set, lane.slot(), &exact).await?;
    }
    Ok(Some(
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(StoreError::Invariant("an outcome per deposit"))))
            .collect(),
    ))
}

/// Columns of a fetched item, in [`inbox_item`] order.
type ItemRow = (i64, Vec<u8>, i64, String, i64, i64, i64, Vec<u8>);

fn inbox_item(row: ItemRow) -> Result<InboxItem, StoreError> {
    let (seq, id, rd, sender_number, sd, created_at, expires_at, body) = row;
    Ok(InboxItem {
        seq,
        id: array(&id, "message id length")?,
        recipient_device: if rd == 0 { None } else { Some(device_id(rd)?) },
        sender_number: to_number(sender_number)?,
        sender_device: device_id(sd)?,
        created_at,
        expires_at,
        body,
    })
}

/// Items for device `$2` of `$1`: its own plus number-mode items it has not acknowledged;
/// unexpired at `$4`, after the item with id `$3` (from the start when `$3` is null or no
/// longer there), at most `$5`. Each arm is ordered and limited on its own index range, then
/// merged.
///
/// The cursor's `seq` is found by two keyed probes on the key index (see [`PG_LOOKUP`]), no
/// ORDER BY (ordering by seq would invite a scan of the inbox in seq order), inside the same
/// statement: a page is one round trip to the database, which a drain waits for page after
/// page.
const FETCH: &str = "WITH after_item (s) AS ( \
       SELECT COALESCE(MIN(seq), 0) FROM ( \
         SELECT seq FROM inbox_items \
           WHERE recipient_number = $1 AND recipient_device = $2 AND id = $3 \
         UNION ALL SELECT seq FROM inbox_items \
           WHERE recipient_number = $1 AND recipient_device = 0 AND id = $3) AS c) \
     SELECT seq, id, recipient_device, sender_number, sender_device, \
     created_at, expires_at, body FROM ( \
       SELECT * FROM (SELECT seq, id, recipient_device, sender_number, sender_device, \
              created_at, expires_at, body FROM inbox_items \
         WHERE recipient_number = $1 AND recipient_device = $2 \
           AND seq > (SELECT s FROM after_item) AND seq > 0 AND expires_at > $4 \
         ORDER BY seq LIMIT $5) AS d \
       UNION ALL \
       SELECT * FROM (SELECT i.seq, i.id, i.recipient_device, i.sender_number, \
              i.sender_device, i.created_at, i.expires_at, i.body FROM inbox_items AS i \
         WHERE i.recipient_number = $1 AND i.recipient_device = 0 \
           AND i.seq > (SELECT s FROM after_item) AND i.seq > 0 AND i.expires_at > $4 \
           AND NOT EXISTS (SELECT 1 FROM inbox_acks AS a \
                           WHERE a.item_seq = i.seq AND a.device_id = $2) \
         ORDER BY i.seq LIMIT $5) AS n \
     ) AS u ORDER BY seq LIMIT $5";

/// The number of items [`FETCH`] would return with no cursor and no limit.
pub(crate) const COUNT_PENDING: &str = "SELECT \
       (SELECT COUNT(*) FROM inbox_items \
         WHERE recipient_number = $1 AND recipient_device = $2 AND expires_at > $3) \
     + (SELECT COUNT(*) FROM inbox_items AS i \
         WHERE i.recipient_number = $1 AND i.recipient_device = 0 AND i.expires_at > $3 \
           AND NOT EXISTS (SELECT 1 FROM inbox_acks AS a \
                           WHERE a.item_seq = i.seq AND a.device_id = $2))";

/// Keeps the idempotency keys of received deliveries, skipping those kept before; returns the
/// keys that are new. Postgres gets them as arrays, so that the statement's text is the same for
/// any number of keys and is prepared once per connection; SQLite gets a VALUES list.
pub(crate) trait ReceiveIo {
    fn claim_keys(
        &mut self,
        keys: &[([u8; 16], i64)],
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, StoreError>> + Send;
}

impl ReceiveIo for SqliteConnection {
    async fn claim_keys(&mut self, keys: &[([u8; 16], i64)]) -> Result<Vec<Vec<u8>>, StoreError> {
        let values = sqlite_rows(keys.len(), 2);
        let sql = format!(
            "INSERT INTO received_deliveries (idempotency_key, expires_at) \
             VALUES {values} ON CONFLICT (idempotency_key) DO NOTHING \
             RETURNING idempotency_key"
        );
        let mut q = sqlx::query_scalar::<_, Vec<u8>>(&sql).persistent(false);
        for (key, expires) in keys {
            q = q.bind(&key[..]).bind(*expires);
        }
        Ok(q.fetch_all(&mut *self).await?)
    }
}

impl ReceiveIo for PgConnection {
    async fn claim_keys(&mut self, keys: &[([u8; 16], i64)]) -> Result<Vec<Vec<u8>>, StoreError> {
        let ids: Vec<&[u8]> = keys.iter().map(|(k, _)| &k[..]).collect();
        let expiries: Vec<i64> = keys.iter().map(|(_, e)| *e).collect();
        // In key order: two batches in flight that hold the same keys (a `Deliver` re-sent while
        // the first is still being stored) wait for each other's keys in one order, never in a
        // cycle.
        Ok(sqlx::query_scalar::<_, Vec<u8>>(
            "INSERT INTO received_deliveries (idempotency_key, expires_at) \
             SELECT k, e FROM UNNEST($1::bytea[], $2::int8[]) AS u (k, e) ORDER BY k \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key",
        )
        .bind(ids)
        .bind(expiries)
        .fetch_all(&mut *self)
        .await?)
    }
}

/// Keeps the idempotency keys `claims` (key, kept until) of received deliveries on `conn`;
/// one answer per claim, in order: whether its key is new (false: received before).
pub(crate) async fn claim_fresh<C: ReceiveIo + Send>(
    conn: &mut C,
    claims: &[([u8; 16], i64)],
) -> Result<Vec<bool>, StoreError> {
    let mut fresh = Vec::with_capacity(claims.len());
    for chunk in claims.chunks(SQLITE_CHUNK) {
        let new: HashSet<Vec<u8>> = conn.claim_keys(chunk).await?.into_iter().collect();
        fresh.extend(chunk.iter().map(|(key, _)| new.contains(&key[..])));
    }
    Ok(fresh)
}

impl Store {
    /// Stores a batch of offline messages in ONE transaction (group commit: the caller
    /// gathers deposits from many connections and acknowledges each after this returns).
    ///
    /// Returns one outcome per item, in order. Per item: a new id is
    /// [`DepositOutcome::Stored`]; an id already stored in that inbox from the same sender
    /// (number and device) with the same body is [`DepositOutcome::AlreadyStored`] (with the
    /// stored expiry) and changes nothing; from another sender or with another body it is
    /// [`StoreError::DuplicateId`]; an inbox already holding
    /// `quota_per_device` items (stored ones, expired-but-unswept included, plus this batch's)
    /// gives [`StoreError::QuotaExceeded`] for that item only. The outer `Err` means the
    /// transaction failed and nothing was stored (retry if [`StoreError::is_retryable`]).
    ///
    /// Items are inserted in slice order, so `seq` (the fetch order) follows it. The quota is
    /// exact on both backends: batches for the same inbox take its counter row's lock first,
    /// so on Postgres they commit one after the other.
    pub async fn deposit_batch(
        &self,
        items: &[NewInboxItem],
        quota_per_device: u32,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.deposit_batch_discarding(items, &[], quota_per_device)
            .await
    }

    /// [`Store::deposit_batch`], in a transaction that also does for each of `discarded`
    /// (deposits acknowledged without being kept: the recipient blocked the sender) the
    /// writes a kept deposit does, and undoes them, so that each costs what a stored deposit
    /// costs (the silent-drop rule, protocol.md 14). Nothing of `discarded` is stored.
    /// Outcomes are for `items` only.
    pub async fn deposit_batch_discarding(
        &self,
        items: &[NewInboxItem],
        discarded: &[NewInboxItem],
        quota_per_device: u32,
    ) -> Result<Vec<Outcome>, StoreError> {
        let _writing = self.writing().await;
        if items.is_empty() && discarded.is_empty() {
            return Ok(Vec::new());
        }
        let discarded = discarded
            .iter()
            .map(|d| Ok((d, stored_device(d.recipient_device)?)))
            .collect::<Result<Vec<(&NewInboxItem, i64)>, StoreError>>()?;
        let discarded = &discarded[..];
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let outcomes = deposit_in(&mut *tx, items, discarded, quota_per_device).await?;
            tx.commit().await?;
            Ok(outcomes)
        })
    }

    /// Stores deliveries received from a peer broker, exactly once over their lifetime, in ONE
    /// transaction, alone in their inboxes (the broker's path batches them with its deposits:
    /// [`crate::DepositBatcher::receive`]). A delivery whose key was kept before (a batch
    /// re-sent after a lost answer, even once the recipient has acknowledged and deleted the
    /// message) stores nothing and its copies get `Ok(AlreadyStored)`. The others are stored as
    /// by [`Store::deposit_batch`], one outcome per copy, and their keys are kept until
    /// [`ReceivedDelivery::keep_until`] — except for a delivery with a copy refused (quota,
    /// duplicate id), which the sender may send again. One list of outcomes per delivery, in
    /// order.
    pub async fn receive_deliveries(
        &self,
        deliveries: &[ReceivedDelivery],
        quota_per_device: u32,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let jobs: Vec<DepositJob> = deliveries
            .iter()
            .cloned()
            .map(DepositJob::Received)
            .collect();
        self.deposit_jobs(&jobs, quota_per_device, Lane::Alone, None)
            .await?
            .into_iter()
            .map(|outcome| match outcome {
                RoutedOutcome::Kept(copies) => Ok(copies),
                _ => Err(StoreError::Invariant(
                    "a received delivery is kept or a repeat",
                )),
            })
            .collect()
    }

    /// Up to `limit` unexpired items for `(number, device_id)`: the device's own items and
    /// number-mode items it has not acknowledged, in deposit (`seq`) order; `more` tells
    /// whether further items follow.
    ///
    /// `after` is the id of the last item of the previous page: the page continues after that
    /// item's `seq`. If that item is gone (acknowledged and deleted, or swept), the page starts
    /// from the beginning, which is correct because everything before it that is still here
    /// is still unacknowledged (at-least-once delivery; the client de-duplicates by id).
    pub async fn fetch_inbox(
        &self,
        number: &Number,
        device_id: DeviceId,
        after: Option<MessageId>,
        limit: u32,
        now: i64,
    ) -> Result<(Vec<InboxItem>, bool), StoreError> {
        let number = number.as_str();
        let device = stored_device(Some(device_id))?;
        let limit = i64::from(limit.max(1));
        let rows: Vec<ItemRow> = on_pool!(self, pool => {
            sqlx::query_as(FETCH)
                .bind(number)
                .bind(device)
                .bind(after.as_ref().map(|id| &id[..]))
                .bind(now)
                .bind(limit + 1)
                .fetch_all(pool)
                .await?
        });
        let more = rows.len() as i64 > limit;
        let items = rows
            .into_iter()
            .take(limit as usize)
            .map(inbox_item)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, more))
    }

    /// Acknowledges items for `(number, device_id)`: the device's own items are deleted;
    /// number-mode items get an acknowledgement and are deleted once every active device of
    /// the number has acknowledged them. Returns how many of `ids` this call deleted or newly
    /// marked (unknown ids and repeats count 0).
    pub async fn ack_inbox(
        &self,
        number: &Number,
        device_id: DeviceId,
        ids: &[MessageId],
        _now: i64,
    ) -> Result<u32, StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        let device = stored_device(Some(device_id))?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut done: u64 = 0;
        match &self.backend {
            Backend::Sqlite(pool) => {
                // As on Postgres (below), an acknowledgement need not wait for the disk: in WAL
                // mode `synchronous = NORMAL` commits without an fsync, and a power failure can
                // lose only the last commits, which for an ACK is a redelivery that clients
                // drop by id (protocol.md 13.2). The setting is the connection's, not the
                // transaction's, so the connection goes back to FULL before the pool gets it
                // again, or is closed if that cannot be made sure (an error, a cancelled
                // request): a later deposit must never commit on a weakened connection.
                let mut conn = RelaxedSqlite::acquire(pool).await?;
                let mut tx = sqlx::Connection::begin_with(conn.conn()?, "BEGIN IMMEDIATE").await?;
                for chunk in ids.chunks(SQLITE_CHUNK) {
                    let del_sql = format!(
                        "DELETE FROM inbox_items WHERE recipient_number = ? \
                         AND recipient_device = ? AND id IN ({}) RETURNING id",
                        sqlite_list(chunk.len())
                    );
                    let mut del = sqlx::query_scalar::<_, Vec<u8>>(&del_sql)
                        .persistent(false)
                        .bind(number)
                        .bind(device);
                    for id in chunk {
                        del = del.bind(&id[..]);
                    }
                    let deleted: HashSet<Vec<u8>> =
                        del.fetch_all(&mut *tx).await?.into_iter().collect();
                    done += deleted.len() as u64;
                    // As on Postgres (below): only the rest can be number-mode items.
                    let rest: Vec<&MessageId> = chunk
                        .iter()
                        .filter(|id| !deleted.contains(&id[..]))
                        .collect();
                    if rest.is_empty() {
                        continue;
                    }
                    let list = sqlite_list(rest.len());
                    let mark_sql = format!(
                        "INSERT INTO inbox_acks (item_seq, device_id) \
                         SELECT seq, ? FROM inbox_items WHERE recipient_number = ? \
                         AND recipient_device = 0 AND id IN ({list}) \
                         ON CONFLICT (item_seq, device_id) DO NOTHING"
                    );
                    let cleanup_sql = format!(
                        "DELETE FROM inbox_items AS i WHERE i.recipient_number = ? \
                         AND i.recipient_device = 0 AND i.id IN ({list}) AND {}",
                        fully_acked!("i.recipient_number")
                    );
                    let mut mark = sqlx::query(&mark_sql)
                        .persistent(false)
                        .bind(device)
                        .bind(number);
                    let mut cleanup = sqlx::query(&cleanup_sql).persistent(false).bind(number);
                    for id in &rest {
                        mark = mark.bind(&id[..]);
                        cleanup = cleanup.bind(&id[..]);
                    }
                    done += mark.execute(&mut *tx).await?.rows_affected();
                    cleanup.execute(&mut *tx).await?;
                }
                tx.commit().await?;
                conn.restore().await?;
            }
            Backend::Postgres(pool) => {
                let list: Vec<&[u8]> = ids.iter().map(|id| &id[..]).collect();
                // The device's own items go in one statement, its own transaction: a drain
                // waits for this answer page after page, so it is one round trip, not four
                // (BEGIN, SET, DELETE, COMMIT). Keys to seqs one by one (see PG_LOOKUP), then
                // deleted by primary key; no recipient test outside the subquery, which a
                // stale planner could use to scan the inbox.
                let deleted: Vec<Vec<u8>> = sqlx::query_scalar(pg_delete_own())
                    .bind(number)
                    .bind(device)
                    .bind(&list)
                    .fetch_all(pool)
                    .await?;
                done += deleted.len() as u64;
                // Only the rest can be number-mode items. On an entity-mode broker the whole
                // page was the device's own, so the number-mode probe is skipped. (An id held
                // both ways, possible only across a mode change, comes back once more from the
                // number-mode inbox, and its next acknowledgement takes it.) A crash between
                // the two transactions leaves these unacknowledged: a redelivery.
                let deleted: HashSet<&[u8]> = deleted.iter().map(Vec::as_slice).collect();
                let rest: Vec<&[u8]> = list
                    .into_iter()
                    .filter(|id| !deleted.contains(id))
                    .collect();
                if !rest.is_empty() {
                    let mut tx = pool.begin_write().await?;
                    sqlx::query("SET LOCAL synchronous_commit = off")
                        .execute(&mut *tx)
                        .await?;
                    done += ack_number_mode(&mut tx, number, device, &rest).await?;
                    tx.commit().await?;
                }
            }
        }
        Ok(u32::try_from(done).unwrap_or(u32::MAX))
    }

    /// How many unexpired items [`Store::fetch_inbox`] would return for `(number, device_id)`
    /// (a LOGIN reads it through [`Store::device_for_login`]).
    pub async fn inbox_count(
        &self,
        number: &Number,
        device_id: DeviceId,
        now: i64,
    ) -> Result<i64, StoreError> {
        let number = number.as_str();
        let device = stored_device(Some(device_id))?;
        let n: i64 = on_pool!(self, pool => {
            sqlx::query_scalar(COUNT_PENDING)
                .bind(number)
                .bind(device)
                .bind(now)
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }

    /// Total stored inbox items (all recipients, expired-but-unswept included).
    pub async fn inbox_depth(&self) -> Result<i64, StoreError> {
        let n: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM inbox_items").fetch_one(pool).await?
        });
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::relaxed::testing::{next_synchronous, one_connection_sqlite};

    #[tokio::test]
    async fn a_relaxed_sqlite_connection_never_returns_to_the_pool_relaxed() {
        let dir = tempfile::tempdir().unwrap();
        // One connection, so the next statement runs on the one the ACK used.
        let store = one_connection_sqlite(dir.path()).await;
        let Backend::Sqlite(pool) = &store.backend else {
            panic!("a SQLite store");
        };
        assert_eq!(next_synchronous(&store).await, 2);
        // Restored: FULL again, and the same connection is reused (the pool's one).
        let mut relaxed = RelaxedSqlite::acquire(pool).await.unwrap();
        let during: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(relaxed.conn().unwrap())
            .await
            .unwrap();
        assert_eq!(during, 1, "NORMAL while acknowledging");
        relaxed.restore().await.unwrap();
        assert_eq!(next_synchronous(&store).await, 2);
        // Dropped without restoring (an error or a cancelled request): closed, and the pool
        // opens a fresh connection with the configured FULL.
        let relaxed = RelaxedSqlite::acquire(pool).await.unwrap();
        drop(relaxed);
        assert_eq!(next_synchronous(&store).await, 2);
        // Through the real acknowledgement.
        let from = Number::new("5550002").unwrap();
        let to = Number::new("5550001").unwrap();
        store
            .deposit_batch(
                &[NewInboxItem {
                    id: [7; 16],
                    recipient_number: to.clone(),
                    recipient_device: Some(DeviceId::FIRST),
                    sender_number: from,
                    sender_device: DeviceId::FIRST,
                    created_at: 1,
                    expires_at: i64::MAX,
                    body: b"x".to_vec(),
                }],
                10,
            )
            .await
            .unwrap();
        let acked = store
            .ack_inbox(&to, DeviceId::FIRST, &[[7; 16]], 1)
            .await
            .unwrap();
        assert_eq!(acked, 1);
        assert_eq!(next_synchronous(&store).await, 2);
        store.close().await;
    }

    /// `synchronous_commit` of the connection the pool hands out next.
    async fn next_synchronous_commit(pool: &sqlx::PgPool) -> String {
        sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// The acknowledgement's single statement turns the flush wait off for its own
    /// transaction, and nothing of it reaches the next user of the connection (a deposit
    /// must always wait for its flush).
    #[tokio::test]
    async fn a_postgres_acknowledgement_relaxes_only_its_own_commit() {
        let url = micromsg_testdb::fresh_database("mm_store_unit").await;
        let options =
            <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url).unwrap();
        // One connection, so each next statement runs on the one the ACK used.
        let store = Store::connect_postgres_with(options, 1, crate::DEFAULT_STORE_TIMEOUT)
            .await
            .unwrap();
        let Backend::Postgres(pool) = &store.backend else {
            panic!("a Postgres store");
        };
        assert_eq!(next_synchronous_commit(pool).await, "on");
        // The condition is evaluated, and in effect inside the statement that holds it...
        let inside: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT current_setting('synchronous_commit') WHERE {COMMIT_WITHOUT_FLUSH}"
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(inside, ["off"]);
        // ...and gone with that statement's transaction.
        assert_eq!(next_synchronous_commit(pool).await, "on");
        // The real statement, deleting an item, leaves its transaction committing without
        // the flush (seen from inside an explicit one, which the ACK does not use).
        let from = Number::new("5550002").unwrap();
        let to = Number::new("5550001").unwrap();
        let deposit = |id: u8| NewInboxItem {
            id: [id; 16],
            recipient_number: to.clone(),
            recipient_device: Some(DeviceId::FIRST),
            sender_number: from.clone(),
            sender_device: DeviceId::FIRST,
            created_at: 1,
            expires_at: i64::MAX,
            body: b"x".to_vec(),
        };
        store
            .deposit_batch(&[deposit(7), deposit(8)], 10)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        let gone: Vec<Vec<u8>> = sqlx::query_scalar(pg_delete_own())
            .bind(to.as_str())
            .bind(1_i64)
            .bind(vec![&[8_u8; 16][..]])
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(gone, [vec![8_u8; 16]]);
        let during: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(during, "off");
        tx.commit().await.unwrap();
        assert_eq!(next_synchronous_commit(pool).await, "on");
        // Through the real acknowledgement.
        let acked = store
            .ack_inbox(&to, DeviceId::FIRST, &[[7; 16]], 1)
            .await
            .unwrap();
        assert_eq!(acked, 1);
        assert_eq!(next_synchronous_commit(pool).await, "on");
        assert_eq!(store.inbox_depth().await.unwrap(), 0);
        store.close().await;
        micromsg_testdb::drop_database(&url).await.unwrap();
    }
}
