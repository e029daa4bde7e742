//! Copying a whole store into another (`micromsg-broker migrate-store`: the embedded SQLite
//! store into Postgres, as Synapse's `synapse_port_db` does).
//!
//! Every table of [`TABLES`] is copied in key order, a keyset page at a time, each page in
//! one transaction of batched `INSERT … ON CONFLICT DO NOTHING` statements. So a copy that
//! was interrupted is simply run again: a table with a single integer key (`inbox_items.seq`,
//! the big one) continues after the largest key the target already holds (pages commit in key
//! order, so everything below it is there), the others are read again from the start and the
//! rows already copied are skipped. Nothing is ever duplicated.
//!
//! At the end the row count of every table is compared between source and target, and each
//! serial column's sequence is set past the copied rows (Postgres), so the next deposit does
//! not collide with a copied `seq`.
//!
//! The caller passes a progress callback, called after every page; returning
//! `ControlFlow::Break` stops the copy there (as an interruption would).

use std::ops::ControlFlow;

use super::tables::{TABLES, Table};
use super::{Backend, Store, StoreError};

/// Rows per page by default: one page is one read and one transaction at the target.
pub const DEFAULT_MIGRATE_BATCH_ROWS: usize = 5_000;

/// Where a copy is, passed to the progress callback after every page.
#[derive(Clone, Copy, Debug)]
pub struct MigrateProgress {
    /// The table being copied.
    pub table: &'static str,
    /// Rows of this table read so far (including rows found already copied).
    pub done: u64,
    /// Rows the source table holds.
    pub total: u64,
    /// Rows read so far over all tables.
    pub done_all: u64,
}

/// A table's row count at the source and at the target after the copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableCount {
    /// The table.
    pub table: &'static str,
    /// Rows at the source.
    pub source: i64,
    /// Rows at the target.
    pub target: i64,
    /// Rows this run inserted (the rest were there from an earlier run, or skipped).
    pub inserted: u64,
}

/// The result of [`migrate`].
#[derive(Clone, Debug)]
pub enum MigrateOutcome {
    /// Every table was copied; the counts per table (compare `source` and `target`).
    Done(Vec<TableCount>),
    /// The progress callback stopped the copy; running it again continues.
    Stopped,
}

impl MigrateOutcome {
    /// The tables whose counts differ (empty when the copy is complete and verified).
    pub fn mismatches(&self) -> Vec<&TableCount> {
        match self {
            MigrateOutcome::Done(counts) => {
                counts.iter().filter(|c| c.source != c.target).collect()
            }
            MigrateOutcome::Stopped => Vec::new(),
        }
    }
}

/// Copies every table of `source` into `target`, `batch_rows` rows per page (at least 1).
/// Refuses ([`StoreError::InvalidArgument`]) when either schema differs from [`TABLES`]: a
/// table missing from the list would be left behind.
pub async fn migrate(
    source: &Store,
    target: &Store,
    batch_rows: usize,
    mut progress: impl FnMut(&MigrateProgress) -> ControlFlow<()>,
) -> Result<MigrateOutcome, StoreError> {
    if !source.schema_drift().await?.is_empty() || !target.schema_drift().await?.is_empty() {
        return Err(StoreError::InvalidArgument(
            "the schema has tables or columns the table list does not cover",
        ));
    }
    let batch_rows = batch_rows.max(1);
    let mut done_all = 0;
    let mut inserted = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let total = u64::try_from(source.count_rows(table).await?).unwrap_or(0);
        let mut step = MigrateProgress {
            table: table.name,
            done: 0,
            total,
            done_all,
        };
        match copy_table(source, target, table, batch_rows, &mut step, &mut progress).await? {
            ControlFlow::Break(()) => return Ok(MigrateOutcome::Stopped),
            ControlFlow::Continue(n) => inserted.push(n),
        }
        done_all = step.done_all;
    }
    let mut counts = Vec::with_capacity(TABLES.len());
    for (table, inserted) in TABLES.iter().zip(inserted) {
        counts.push(TableCount {
            table: table.name,
            source: source.count_rows(table).await?,
            target: target.count_rows(table).await?,
            inserted,
        });
        if let Some(serial) = table.serial {
            target.fix_sequence(table, serial).await?;
        }
    }
    Ok(MigrateOutcome::Done(counts))
}

/// Copies one table; `Continue(rows inserted)`, or `Break` when the callback stopped it.
async fn copy_table(
    source: &Store,
    target: &Store,
    table: &'static Table,
    batch_rows: usize,
    step: &mut MigrateProgress,
    progress: &mut impl FnMut(&MigrateProgress) -> ControlFlow<()>,
) -> Result<ControlFlow<(), u64>, StoreError> {
    // Resume a single-integer-key table after the last row copied (see the module docs);
    // rows below it count as done.
    let mut after = match target.max_key(table).await? {
        Some(max) => {
            let below = source.count_up_to(table, max).await?;
            step.done = below;
            step.done_all += below;
            Some(vec![super::tables::Value::Int(max)])
        }
        None => None,
    };
    let mut inserted = 0;
    loop {
        let rows = source
            .read_page(table, after.as_deref(), batch_rows)
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(Store::key_of(table, last));
        inserted += target.insert_rows(table, &rows).await?;
        step.done += rows.len() as u64;
        step.done_all += rows.len() as u64;
        if progress(step).is_break() {
            return Ok(ControlFlow::Break(()));
        }
        if rows.len() < batch_rows {
            break;
        }
    }
    Ok(ControlFlow::Continue(inserted))
}

impl Store {
    /// Rows of a single-integer-key table with a key up to `max`.
    async fn count_up_to(&self, table: &Table, max: i64) -> Result<u64, StoreError> {
        let [key] = table.key else { return Ok(0) };
        let sql = format!("SELECT COUNT(*) FROM {} WHERE {key} <= $1", table.name);
        super::on_pool!(self, pool => {
            let (n,): (i64,) = sqlx::query_as(&sql).bind(max).fetch_one(pool).await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    /// Sets the sequence of `table.serial` past the largest value stored (Postgres; SQLite's
    /// AUTOINCREMENT counter already follows explicitly inserted keys).
    async fn fix_sequence(&self, table: &Table, serial: &str) -> Result<(), StoreError> {
        if let Backend::Postgres(pool) = &self.backend {
            let sql = format!(
                "SELECT setval(pg_get_serial_sequence('{t}', '{serial}'), \
                 COALESCE(MAX({serial}), 1), MAX({serial}) IS NOT NULL) FROM {t}",
                t = table.name
            );
            sqlx::query(&sql).execute(pool).await?;
        }
        Ok(())
    }
}
