//! Moving entities between stores of the same operator (`micromsg-broker export` and
//! `import`): an entity's rows of every table [`Scope::Entity`] names, and the
//! acknowledgements of its inbox items ([`Scope::ItemAcks`]), read in batches and written in
//! batches. The file format is the broker's business (`micromsg-broker`'s `export_file`); this
//! module deals in [`Bundle`]s.
//!
//! Import rules, so that an import can be run again on the same file:
//! * an entity that is not at the target is inserted with all its rows;
//! * an entity that is there with the same creation time and the same devices (ids and both
//!   secrets) is the same entity, imported before: its rows are inserted with
//!   `ON CONFLICT DO NOTHING`, so identical rows are skipped and rows missing (an interrupted
//!   import) are added;
//! * an entity that is there with different data is reported as a conflict and left alone;
//! * so is a number the target retired (an entity deleted there, ACCOUNT-DELETE): it is never
//!   given to an entity again.
//!
//! Inbox items get new `seq`s at the target (a seq is local to a store); their quota counters
//! are raised by the items inserted (the counters are upper bounds, see migration 0004), and
//! acknowledgements follow their item by its key (recipient, device, message id).

use std::collections::{BTreeMap, HashMap};

use subtle::ConstantTimeEq;

use super::tables::{Column, Row, Scope, TABLES, Table, Value, bind_row, decode_row, names};
use super::{Backend, PoolExt, Store, StoreError, bulk_rows, on_pool};

/// One entity's rows: its `entities` row first, then its rows of each moved table, in
/// [`TABLES`] order (inbox items before their acknowledgements).
#[derive(Clone, Debug, Default)]
pub struct Bundle {
    /// The entity's number.
    pub number: String,
    /// `(table, rows)` in [`TABLES`] order; rows have all the table's columns.
    pub tables: Vec<(&'static Table, Vec<Row>)>,
}

impl Bundle {
    /// How many rows the bundle holds, over all tables.
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|(_, rows)| rows.len()).sum()
    }

    /// The rows of `table` in this bundle.
    pub fn rows_of(&self, table: &str) -> &[Row] {
        self.tables
            .iter()
            .find(|(t, _)| t.name == table)
            .map_or(&[], |(_, rows)| rows.as_slice())
    }
}

/// The tables an export moves, in [`TABLES`] order.
pub fn exported_tables() -> impl Iterator<Item = &'static Table> {
    TABLES
        .iter()
        .filter(|t| matches!(t.scope, Scope::Entity(_) | Scope::ItemAcks))
}

/// What [`Store::import_bundles`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Entities that were not at the target and were inserted.
    pub entities_new: u64,
    /// Entities already at the target as the same entity (their missing rows were added).
    pub entities_present: u64,
    /// Numbers that exist at the target with different data, or that the target retired:
    /// left alone.
    pub conflicts: Vec<String>,
    /// Rows inserted, over all tables.
    pub rows_inserted: u64,
    /// Rows of the file already at the target (skipped), over all tables.
    pub rows_skipped: u64,
}

impl ImportReport {
    /// Adds `other` to this report.
    pub fn add(&mut self, other: ImportReport) {
        self.entities_new += other.entities_new;
        self.entities_present += other.entities_present;
        self.conflicts.extend(other.conflicts);
        self.rows_inserted += other.rows_inserted;
        self.rows_skipped += other.rows_skipped;
    }
}

/// The column of `table` that names the owning entity (for [`Scope::Entity`] tables).
fn owner_column(table: &Table) -> Option<&'static str> {
    match table.scope {
        Scope::Entity(c) => Some(c),
        _ => None,
    }
}

impl Store {
    /// The numbers of up to `limit` entities after `after` (from the first when `None`), in
    /// order: the pages of an `--all` export.
    pub async fn entity_numbers(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let sql =
            format!("SELECT number FROM entities WHERE number > $1 ORDER BY number LIMIT {limit}");
        on_pool!(self, pool => {
            let rows: Vec<(String,)> =
                sqlx::query_as(&sql).bind(after.unwrap_or("")).fetch_all(pool).await?;
            Ok(rows.into_iter().map(|(n,)| n).collect())
        })
    }

    /// The bundles of the entities `numbers` (those that exist, in the order given), read
    /// with one statement per table in one read transaction, so they are consistent with each
    /// other even while the broker serves.
    pub async fn export_bundles(&self, numbers: &[String]) -> Result<Vec<Bundle>, StoreError> {
        let mut bundles: BTreeMap<&str, Bundle> = BTreeMap::new();
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let list = super::tables::params(&self.backend, 1, numbers.len());
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for table in exported_tables() {
                let columns: Vec<&Column> = table.columns.iter().collect();
                let (sql, owner_at) = match owner_column(table) {
                    Some(owner) => (
                        format!(
                            "SELECT {} FROM {} WHERE {owner} IN ({list}) ORDER BY {}",
                            names(&columns),
                            table.name,
                            table.key.join(", ")
                        ),
                        table.column(owner),
                    ),
                    // ItemAcks: the owner is the item's recipient, selected as an extra column.
                    None => (
                        format!(
                            "SELECT {}, i.recipient_number FROM inbox_acks a \
                             JOIN inbox_items i ON i.seq = a.item_seq \
                             WHERE i.recipient_number IN ({list}) ORDER BY a.item_seq, a.device_id",
                            columns.iter().map(|c| format!("a.{}", c.name)).collect::<Vec<_>>().join(", ")
                        ),
                        Some(columns.len()),
                    ),
                };
                let Some(owner_at) = owner_at else {
                    return Err(StoreError::Invariant("owner column not in its table"));
                };
                let mut q = sqlx::query(&sql);
                for n in numbers {
                    q = q.bind(n.as_str());
                }
                for r in q.fetch_all(&mut *tx).await? {
                    use sqlx::Row as _;
                    let owner: String = r.try_get(owner_at)?;
                    let row = decode_row!(&r, columns);
                    let Some(number) = numbers.iter().find(|n| **n == owner) else {
                        continue;
                    };
                    let bundle = bundles.entry(number.as_str()).or_insert_with(|| Bundle {
                        number: number.clone(),
                        tables: Vec::new(),
                    });
                    match bundle.tables.last_mut() {
                        Some((t, rows)) if t.name == table.name => rows.push(row),
                        _ => bundle.tables.push((table, vec![row])),
                    }
                }
            }
            tx.commit().await?;
            Ok::<(), StoreError>(())
        })?;
        Ok(numbers
            .iter()
            .filter_map(|n| bundles.remove(n.as_str()))
            .filter(|b| !b.rows_of("entities").is_empty())
            .collect())
    }

    /// Imports `bundles` in one transaction with a few batched statements per table (see the
    /// module docs for what is inserted, skipped or reported). Each bundle must hold exactly
    /// one `entities` row for its number and only rows of that number.
    pub async fn import_bundles(&self, bundles: &[Bundle]) -> Result<ImportReport, StoreError> {
        let mut report = ImportReport::default();
        if bundles.is_empty() {
            return Ok(report);
        }
        for b in bundles {
            check_bundle(b)?;
        }
        let numbers: Vec<&str> = bundles.iter().map(|b| b.number.as_str()).collect();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // What the target holds of these entities: their entities and devices rows.
            let entities = super::tables::table("entities").ok_or(StoreError::Invariant("entities"))?;
            let devices = super::tables::table("devices").ok_or(StoreError::Invariant("devices"))?;
            let mut present: HashMap<String, (Vec<Row>, Vec<Row>)> = HashMap::new();
            for (table, slot) in [(entities, 0), (devices, 1)] {
                let columns: Vec<&Column> = table.columns.iter().collect();
                let sql = format!(
                    "SELECT {} FROM {} WHERE number IN ({}) ORDER BY {}",
                    names(&columns),
                    table.name,
                    super::tables::params(&self.backend, 1, numbers.len()),
                    table.key.join(", ")
                );
                let mut q = sqlx::query(&sql);
                for n in &numbers {
                    q = q.bind(*n);
                }
                for r in q.fetch_all(&mut *tx).await? {
                    let row = decode_row!(&r, columns);
                    let number = row.first().and_then(Value::as_text).unwrap_or_default().to_owned();
                    let entry = present.entry(number).or_default();
                    if slot == 0 { entry.0.push(row) } else { entry.1.push(row) }
                }
            }
            let retired_sql = format!(
                "SELECT number FROM retired_numbers WHERE number IN ({})",
                super::tables::params(&self.backend, 1, numbers.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&retired_sql);
            for n in &numbers {
                q = q.bind(*n);
            }
            let retired: Vec<String> = q.fetch_all(&mut *tx).await?;
            let mut accepted: Vec<&Bundle> = Vec::with_capacity(bundles.len());
            for b in bundles {
                if retired.contains(&b.number) {
                    report.conflicts.push(b.number.clone());
                    continue;
                }
                match present.get(&b.number) {
                    None => {
                        report.entities_new += 1;
                        accepted.push(b);
                    }
                    Some((e, d)) if same_entity(b, e, d) => {
                        report.entities_present += 1;
                        accepted.push(b);
                    }
                    Some(_) => report.conflicts.push(b.number.clone()),
                }
            }
            // The inboxes that get items, locked as a deposit batch running alone locks them
            // (exclusive on Postgres; SQLite has one writer): a batch beside others counts only
            // what is committed, so it must not decide on these inboxes while the moved items
            // are stored and not yet counted.
            let inboxes = moved_inboxes(&accepted)?;
            if !inboxes.is_empty() {
                super::inbox::DepositIo::lock_inboxes(&mut *tx, &inboxes, true).await?;
            }
            for table in exported_tables() {
                let rows: Vec<&Row> = accepted.iter().flat_map(|b| b.rows_of(table.name)).collect();
                if rows.is_empty() {
                    continue;
                }
                let inserted = match table.scope {
                    Scope::ItemAcks => {
                        let acks = ack_keys(&accepted)?;
                        let refs: Vec<&[Value]> = acks.iter().map(Vec::as_slice).collect();
                        let mut n = 0;
                        for chunk in refs.chunks(super::tables::max_params(&self.backend) / 4) {
                            let sql = insert_acks_sql(&self.backend, chunk.len());
                            let mut q = sqlx::query(&sql);
                            for k in chunk {
                                q = bind_row!(q, ACK_KEY, k);
                            }
                            n += q.execute(&mut *tx).await?.rows_affected();
                        }
                        n
                    }
                    _ => {
                        // The target numbers a moved item itself: every column but the serial.
                        let columns: Vec<&Column> = table
                            .columns
                            .iter()
                            .filter(|c| Some(c.name) != table.serial)
                            .collect();
                        let skip = table.serial.and_then(|s| table.column(s));
                        let per = super::tables::max_params(&self.backend) / columns.len();
                        let mut n = 0;
                        let mut filled: HashMap<(String, i64), i64> = HashMap::new();
                        for chunk in super::tables::statements(&rows, per) {
                            let mut sql = super::tables::insert_sql(&self.backend, table, &columns, chunk.len());
                            let counts_inbox = table.name == "inbox_items";
                            if counts_inbox {
                                sql.push_str(" RETURNING recipient_number, recipient_device");
                            }
                            let mut q = sqlx::query(&sql);
                            for row in chunk {
                                let values = row.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, v)| v);
                                q = bind_row!(q, columns, values.collect::<Vec<_>>());
                            }
                            if counts_inbox {
                                for (number, device) in q.fetch_all(&mut *tx).await?.iter().map(|r| {
                                    use sqlx::Row as _;
                                    (r.try_get::<String, _>(0), r.try_get::<i64, _>(1))
                                }) {
                                    *filled.entry((number?, device?)).or_default() += 1;
                                    n += 1;
                                }
                            } else {
                                n += q.execute(&mut *tx).await?.rows_affected();
                            }
                        }
                        // Raise the quota counters by the items stored (they stay upper bounds).
                        let filled: Vec<_> = filled.into_iter().collect();
                        for chunk in filled.chunks(super::tables::max_params(&self.backend) / 3) {
                            let sql = raise_counters_sql(&self.backend, chunk.len());
                            let mut q = sqlx::query(&sql);
                            for ((number, device), items) in chunk {
                                q = q.bind(number.as_str()).bind(*device).bind(*items);
                            }
                            q.execute(&mut *tx).await?;
                        }
                        n
                    }
                };
                report.rows_inserted += inserted;
                report.rows_skipped += rows.len() as u64 - inserted.min(rows.len() as u64);
            }
            tx.commit().await?;
            Ok::<(), StoreError>(())
        })?;
        Ok(report)
    }
}

/// Inserts `rows` acknowledgements given as [`ACK_KEY`]s: each finds its item's seq at the
/// target by the item's key (`column1`… are the names both dialects give a `VALUES` list's
/// columns; SQLite needs the `WHERE` to parse an upsert after a join).
fn insert_acks_sql(backend: &Backend, rows: usize) -> String {
    format!(
        "INSERT INTO inbox_acks (item_seq, device_id) \
         SELECT i.seq, v.column4 FROM (VALUES {}) AS v \
         JOIN inbox_items i ON i.recipient_number = v.column1 \
         AND i.recipient_device = v.column2 AND i.id = v.column3 \
         WHERE true ON CONFLICT DO NOTHING",
        bulk_rows(backend, rows, 4)
    )
}

/// The inboxes (recipient number, stored device) `bundles` hold items for, sorted, once each.
fn moved_inboxes(bundles: &[&Bundle]) -> Result<Vec<super::inbox::Inbox>, StoreError> {
    let table = super::tables::table("inbox_items").ok_or(StoreError::Invariant("inbox_items"))?;
    let at = |name: &str| table.columns.iter().position(|c| c.name == name);
    let (Some(number), Some(device)) = (at("recipient_number"), at("recipient_device")) else {
        return Err(StoreError::Invariant("inbox_items recipient columns"));
    };
    let mut inboxes: Vec<_> = bundles
        .iter()
        .flat_map(|b| b.rows_of("inbox_items"))
        .filter_map(|row| {
            let n = row.get(number)?.as_text()?;
            Some((n.to_owned(), row.get(device)?.as_int()?))
        })
        .collect();
    inboxes.sort();
    inboxes.dedup();
    Ok(inboxes)
}

/// Adds to `rows` inboxes' quota counters `(number, device, items)` the items just stored.
fn raise_counters_sql(backend: &Backend, rows: usize) -> String {
    format!(
        "INSERT INTO inbox_counters (recipient_number, recipient_device, items) \
         VALUES {} ON CONFLICT (recipient_number, recipient_device, slot) \
         DO UPDATE SET items = inbox_counters.items + excluded.items",
        bulk_rows(backend, rows, 3)
    )
}

/// The columns of an acknowledgement's key as bound: the item's recipient number, recipient
/// device and message id, and the acknowledging device.
const ACK_KEY: &[Column] = &[
    Column {
        name: "recipient_number",
        kind: super::tables::Kind::Text,
    },
    Column {
        name: "recipient_device",
        kind: super::tables::Kind::Int,
    },
    Column {
        name: "id",
        kind: super::tables::Kind::Blob,
    },
    Column {
        name: "device_id",
        kind: super::tables::Kind::Int,
    },
];

/// Each acknowledgement of the bundles as `[recipient, device, id, acking device]`: its
/// item (named in the file by the source's seq) found among the bundle's inbox items.
fn ack_keys(bundles: &[&Bundle]) -> Result<Vec<Row>, StoreError> {
    let items = super::tables::table("inbox_items").ok_or(StoreError::Invariant("inbox_items"))?;
    let at = |c: &str| {
        items
            .column(c)
            .ok_or(StoreError::Invariant("inbox_items column"))
    };
    let (seq, number, device, id) = (
        at("seq")?,
        at("recipient_number")?,
        at("recipient_device")?,
        at("id")?,
    );
    let mut out = Vec::new();
    for b in bundles {
        let by_seq: HashMap<i64, &Row> = b
            .rows_of("inbox_items")
            .iter()
            .filter_map(|r| r.get(seq).and_then(Value::as_int).map(|s| (s, r)))
            .collect();
        for ack in b.rows_of("inbox_acks") {
            let (Some(item_seq), Some(acker)) = (
                ack.first().and_then(Value::as_int),
                ack.get(1).and_then(Value::as_int),
            ) else {
                return Err(StoreError::InvalidArgument(
                    "an acknowledgement without its columns",
                ));
            };
            let item = by_seq.get(&item_seq).ok_or(StoreError::InvalidArgument(
                "an acknowledgement of an item the entity does not have",
            ))?;
            out.push(vec![
                item[number].clone(),
                item[device].clone(),
                item[id].clone(),
                Value::Int(acker),
            ]);
        }
    }
    Ok(out)
}

/// Checks that `b` is well formed: one `entities` row for its number, every row of the right
/// width and types, and every owned row owned by the bundle's number.
fn check_bundle(b: &Bundle) -> Result<(), StoreError> {
    let entity = b.rows_of("entities");
    if entity.len() != 1 || entity[0].first().and_then(Value::as_text) != Some(&b.number) {
        return Err(StoreError::InvalidArgument(
            "an entity without its entities row",
        ));
    }
    for (table, rows) in &b.tables {
        for row in rows {
            if row.len() != table.columns.len()
                || !row.iter().zip(table.columns).all(|(v, c)| v.fits(c.kind))
            {
                return Err(StoreError::InvalidArgument(
                    "a row that does not fit its table",
                ));
            }
            if let Some(owner) = owner_column(table).and_then(|c| table.column(c))
                && row[owner].as_text() != Some(&b.number)
            {
                return Err(StoreError::InvalidArgument(
                    "a row of another entity in a bundle",
                ));
            }
        }
    }
    Ok(())
}

/// Whether the target's `entities` row `existing` and `devices` rows are the entity of `b`:
/// the same creation time, and the same devices with the same secrets (compared in constant
/// time). Other columns (last login, names) may have moved on since.
fn same_entity(b: &Bundle, existing: &[Row], devices: &[Row]) -> bool {
    let Some(table) = super::tables::table("devices") else {
        return false;
    };
    let created = |rows: &[Row]| rows.first().and_then(|r| r.get(1)).cloned();
    if existing.len() != 1 || created(existing) != created(b.rows_of("entities")) {
        return false;
    }
    let key = |row: &Row| -> Option<(i64, Vec<u8>)> {
        let id = row.get(table.column("device_id")?)?.as_int()?;
        let mut secrets = Vec::with_capacity(64);
        for c in ["client_secret", "server_secret"] {
            match row.get(table.column(c)?)? {
                Value::Blob(s) => secrets.extend_from_slice(s),
                _ => return None,
            }
        }
        Some((id, secrets))
    };
    let mut mine: Vec<_> = b.rows_of("devices").iter().map(key).collect();
    let mut theirs: Vec<_> = devices.iter().map(key).collect();
    mine.sort_by_key(|k| k.as_ref().map(|(id, _)| *id));
    theirs.sort_by_key(|k| k.as_ref().map(|(id, _)| *id));
    mine.len() == theirs.len()
        && mine.iter().zip(&theirs).all(|(a, b)| match (a, b) {
            (Some((ia, sa)), Some((ib, sb))) => ia == ib && bool::from(sa.ct_eq(sb)),
            _ => false,
        })
}
