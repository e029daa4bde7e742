//! The ONE list of the store's tables ([`TABLES`]): their columns, keys, serial columns and
//! what an entity export moves; and generic row access over it, shared by
//! [`migrate`](crate::migrate) and [`portable`](crate::portable): keyset pages read in key
//! order and batched idempotent inserts (`ON CONFLICT DO NOTHING`, thousands of rows per
//! statement).
//!
//! A table the migrations create and this list does not name would be silently left behind
//! by `migrate-store` and an export, so [`Store::schema_drift`] compares the list with the
//! live schema: `migrate-store` refuses to run on a difference and the store tests fail on one.

use std::fmt;

use zeroize::Zeroize;

use super::{Backend, Store, StoreError, on_pool};

/// A column's type, as both dialects spell it (`INTEGER`/`BIGINT`, `BOOLEAN`, `TEXT`,
/// `BLOB`/`BYTEA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A 64-bit integer.
    Int,
    /// A boolean (0/1 in SQLite).
    Bool,
    /// UTF-8 text.
    Text,
    /// Bytes.
    Blob,
}

/// One column of a table.
#[derive(Debug)]
pub struct Column {
    /// The column's name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
}

/// What an entity export does with a table's rows.
#[derive(Debug, PartialEq, Eq)]
pub enum Scope {
    /// The rows of one entity, named by this column; they move with the entity.
    Entity(&'static str),
    /// Acknowledgements of number-mode inbox items: they move with their item (an item's
    /// `seq` is local to a store, so the file names the item by its seq at the source and
    /// the import finds the item's new seq by its key).
    ItemAcks,
    /// Derived from other tables (the inbox quota counters); the import adds to it.
    Derived,
    /// Not moved: short-lived per-entity rows (pending ADD-DEVICE secrets, which expire in
    /// minutes) or the broker's own state (federation outbox and dedup keys, peer pubkeys,
    /// poisoned INITIATEs). `migrate-store` still copies them.
    Stays,
}

/// One table of the schema.
#[derive(Debug)]
pub struct Table {
    /// The table's name.
    pub name: &'static str,
    /// Every column, in the order rows are read and written.
    pub columns: &'static [Column],
    /// The primary key's columns (keyset order).
    pub key: &'static [&'static str],
    /// A column the database numbers itself (`AUTOINCREMENT`/`BIGSERIAL`): its sequence is
    /// set past the copied rows after a migration, and an import leaves it to the target.
    pub serial: Option<&'static str>,
    /// What an entity export does with the rows.
    pub scope: Scope,
}

impl Table {
    /// The index of the column `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column { name, kind }
}

use Kind::{Blob, Bool, Int, Text};

/// Every table of the schema, parents before children (foreign keys hold at every step of a
/// copy). The only place that lists them: add a table here when a migration creates one.
pub const TABLES: &[Table] = &[
    Table {
        name: "entities",
        columns: &[
            col("number", Text),
            col("created_at", Int),
            col("next_device", Int),
        ],
        key: &["number"],
        serial: None,
        scope: Scope::Entity("number"),
    },
    Table {
        name: "devices",
        columns: &[
            col("number", Text),
            col("device_id", Int),
            col("name", Text),
            col("client_secret", Blob),
            col("server_secret", Blob),
            col("created_at", Int),
            col("last_seen", Int),
            col("revoked_at", Int),
            col("last_nonce_step", Int),
        ],
        key: &["number", "device_id"],
        serial: None,
        scope: Scope::Entity("number"),
    },
    Table {
        name: "registration_secrets",
        columns: &[
            col("number", Text),
            col("secret_hash", Blob),
            col("name", Text),
            col("created_at", Int),
            col("expires_at", Int),
            col("used_at", Int),
        ],
        key: &["number", "secret_hash"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "entity_settings",
        columns: &[col("number", Text), col("auto_existing", Bool)],
        key: &["number"],
        serial: None,
        scope: Scope::Entity("number"),
    },
    Table {
        name: "blocks",
        columns: &[
            col("owner", Text),
            col("target", Text),
            col("created_at", Int),
        ],
        key: &["owner", "target"],
        serial: None,
        scope: Scope::Entity("owner"),
    },
    Table {
        name: "poisoned_initiates",
        columns: &[
            col("caller", Text),
            col("target", Text),
            col("created_at", Int),
        ],
        key: &["caller", "target"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "contacts",
        columns: &[
            col("owner", Text),
            col("peer", Text),
            col("auto_existing", Bool),
            col("brokered", Bool),
            col("created_at", Int),
        ],
        key: &["owner", "peer"],
        serial: None,
        scope: Scope::Entity("owner"),
    },
    Table {
        name: "inbox_items",
        columns: &[
            col("seq", Int),
            col("id", Blob),
            col("recipient_number", Text),
            col("recipient_device", Int),
            col("sender_number", Text),
            col("sender_device", Int),
            col("created_at", Int),
            col("expires_at", Int),
            col("body", Blob),
        ],
        key: &["seq"],
        serial: Some("seq"),
        scope: Scope::Entity("recipient_number"),
    },
    Table {
        name: "inbox_acks",
        columns: &[col("item_seq", Int), col("device_id", Int)],
        key: &["item_seq", "device_id"],
        serial: None,
        scope: Scope::ItemAcks,
    },
    Table {
        name: "key_backups",
        columns: &[
            col("number", Text),
            col("version", Int),
            col("blob", Blob),
            col("updated_at", Int),
        ],
        key: &["number"],
        serial: None,
        scope: Scope::Entity("number"),
    },
    Table {
        name: "broker_pubkeys",
        columns: &[
            col("peer_number", Text),
            col("pubkey", Blob),
            col("expires_at", Int),
        ],
        key: &["peer_number"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "outbox",
        columns: &[
            col("idempotency_key", Blob),
            col("peer_broker", Text),
            col("payload", Blob),
            col("attempts", Int),
            col("next_attempt_at", Int),
            col("created_at", Int),
        ],
        key: &["idempotency_key"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "received_deliveries",
        columns: &[col("idempotency_key", Blob), col("expires_at", Int)],
        key: &["idempotency_key"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "inbox_counters",
        columns: &[
            col("recipient_number", Text),
            col("recipient_device", Int),
            col("items", Int),
            col("slot", Int),
        ],
        key: &["recipient_number", "recipient_device", "slot"],
        serial: None,
        scope: Scope::Derived,
    },
    // Number portability (docs/federation.md 12): the network's routing state and this
    // broker's pending announcements and PORT-OUT tokens. A ported number's entry is the
    // network's, not the entity's, so it stays with the broker.
    Table {
        name: "ported_numbers",
        columns: &[
            col("number", Text),
            col("seq", Int),
            col("from_broker", Text),
            col("to_broker", Text),
            col("time", Int),
            col("identity_key", Blob),
            col("user_signature", Blob),
            col("broker_key", Blob),
            col("broker_signature", Blob),
            col("recorded_at", Int),
        ],
        key: &["number"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "port_tokens",
        columns: &[
            col("number", Text),
            col("token_hash", Blob),
            col("to_broker", Text),
            col("identity_key", Blob),
            col("expires_at", Int),
            col("used_at", Int),
        ],
        key: &["number", "token_hash"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "port_announcements",
        columns: &[
            col("number", Text),
            col("peer_broker", Text),
            col("seq", Int),
            col("attempts", Int),
            col("next_attempt_at", Int),
        ],
        key: &["number", "peer_broker"],
        serial: None,
        scope: Scope::Stays,
    },
    Table {
        name: "retired_numbers",
        columns: &[col("number", Text), col("retired_at", Int)],
        key: &["number"],
        serial: None,
        // The broker's own record that a number of its pool is spent; the entity is gone.
        scope: Scope::Stays,
    },
    Table {
        name: "forwards",
        columns: &[
            col("number", Text),
            col("notice", Blob),
            col("created_at", Int),
            col("expires_at", Int),
        ],
        key: &["number"],
        serial: None,
        // A forward answers for a number of THIS broker; at another broker it would answer
        // for nothing (the entity has left).
        scope: Scope::Stays,
    },
    Table {
        name: "forward_blocks",
        columns: &[col("number", Text), col("target", Text)],
        key: &["number", "target"],
        serial: None,
        scope: Scope::Stays,
    },
];

/// The table named `name` in [`TABLES`].
pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}

/// One stored value. Bytes are wiped on drop (a row of `devices` holds login secrets) and
/// never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Drop for Value {
    fn drop(&mut self) {
        if let Value::Blob(b) = self {
            b.zeroize();
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Blob(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

impl Value {
    /// The text, when this is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, when this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Whether this value fits a column of `kind` (NULL fits any).
    pub fn fits(&self, kind: Kind) -> bool {
        matches!(
            (self, kind),
            (Value::Null, _)
                | (Value::Int(_), Kind::Int)
                | (Value::Bool(_), Kind::Bool)
                | (Value::Text(_), Kind::Text)
                | (Value::Blob(_), Kind::Blob)
        )
    }
}

/// A row: one value per column of its table, in the table's column order.
pub type Row = Vec<Value>;

/// The most bytes of text and blobs one multi-row statement carries: inbox bodies may be up to
/// a frame (64 KiB) each, and thousands of them in one statement would make statements of
/// hundreds of megabytes.
pub const MAX_STATEMENT_BYTES: usize = 16 << 20;

/// The bytes of text and blobs in `row`.
pub fn row_bytes<R: AsRef<[Value]>>(row: &R) -> usize {
    row.as_ref()
        .iter()
        .map(|v| match v {
            Value::Text(s) => s.len(),
            Value::Blob(b) => b.len(),
            _ => 8,
        })
        .sum()
}

/// `rows` cut into consecutive statements of at most `max_rows` rows and (past the first row
/// of each) [`MAX_STATEMENT_BYTES`] bytes.
pub(crate) fn statements<R: AsRef<[Value]>>(rows: &[R], max_rows: usize) -> Vec<&[R]> {
    let max_rows = max_rows.max(1);
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let size = row_bytes(row);
        if i > start && (i - start >= max_rows || bytes + size > MAX_STATEMENT_BYTES) {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// The most parameters one statement binds: SQLite's default `SQLITE_MAX_VARIABLE_NUMBER`
/// (32,766), and Postgres' wire limit (65,535).
pub(crate) fn max_params(backend: &Backend) -> usize {
    match backend {
        Backend::Sqlite(_) => 32_766,
        Backend::Postgres(_) => 65_535,
    }
}

/// Binds the values of `$row` (columns `$cols`) to the query `$q`, in order. NULLs are bound
/// with their column's type (Postgres refuses a `bigint` NULL for a `text` column).
macro_rules! bind_row {
    ($q:expr, $cols:expr, $row:expr) => {{
        let mut q = $q;
        for (c, v) in $cols.iter().zip($row.iter()) {
            q = match (v, c.kind) {
                ($crate::tables::Value::Int(i), _) => q.bind(*i),
                ($crate::tables::Value::Bool(b), _) => q.bind(*b),
                ($crate::tables::Value::Text(s), _) => q.bind(s.as_str()),
                ($crate::tables::Value::Blob(b), _) => q.bind(b.as_slice()),
                ($crate::tables::Value::Null, $crate::tables::Kind::Int) => q.bind(None::<i64>),
                ($crate::tables::Value::Null, $crate::tables::Kind::Bool) => q.bind(None::<bool>),
                ($crate::tables::Value::Null, $crate::tables::Kind::Text) => q.bind(None::<String>),
                ($crate::tables::Value::Null, $crate::tables::Kind::Blob) => {
                    q.bind(None::<Vec<u8>>)
                }
            };
        }
        q
    }};
}
pub(crate) use bind_row;

/// Reads the columns `$cols` of the sqlx row `$r` into a [`Row`].
macro_rules! decode_row {
    ($r:expr, $cols:expr) => {{
        use sqlx::Row as _;
        let r = $r;
        let mut out = Vec::with_capacity($cols.len());
        for (i, c) in $cols.iter().enumerate() {
            let v = match c.kind {
                $crate::tables::Kind::Int => r
                    .try_get::<Option<i64>, _>(i)?
                    .map_or($crate::tables::Value::Null, $crate::tables::Value::Int),
                $crate::tables::Kind::Bool => r
                    .try_get::<Option<bool>, _>(i)?
                    .map_or($crate::tables::Value::Null, $crate::tables::Value::Bool),
                $crate::tables::Kind::Text => r
                    .try_get::<Option<String>, _>(i)?
                    .map_or($crate::tables::Value::Null, $crate::tables::Value::Text),
                $crate::tables::Kind::Blob => r
                    .try_get::<Option<Vec<u8>>, _>(i)?
                    .map_or($crate::tables::Value::Null, $crate::tables::Value::Blob),
            };
            out.push(v);
        }
        out
    }};
}
pub(crate) use decode_row;

/// `$1, $2, …` (Postgres) or `?, ?, …` (SQLite): `n` parameters, numbered from `first`.
pub(crate) fn params(backend: &Backend, first: usize, n: usize) -> String {
    match backend {
        Backend::Sqlite(_) => super::sqlite_list(n),
        Backend::Postgres(_) => (first..first + n)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The column names of `columns`, comma separated.
pub(crate) fn names(columns: &[&Column]) -> String {
    columns
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `INSERT INTO table (columns) VALUES (…), … ON CONFLICT DO NOTHING` for `rows` rows: a row
/// whose key (or any unique index) is already there is skipped, so a copy can be rerun.
pub(crate) fn insert_sql(
    backend: &Backend,
    table: &Table,
    columns: &[&Column],
    rows: usize,
) -> String {
    format!(
        "INSERT INTO {} ({}) VALUES {} ON CONFLICT DO NOTHING",
        table.name,
        names(columns),
        super::bulk_rows(backend, rows, columns.len())
    )
}

impl Store {
    /// Reads up to `limit` rows of `table` in key order, after the key `after` (from the
    /// start when `None`): one keyset page, for copying a table of any size in bounded steps.
    pub async fn read_page(
        &self,
        table: &Table,
        after: Option<&[Value]>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let columns: Vec<&Column> = table.columns.iter().collect();
        let key = table.key.join(", ");
        let condition = match after {
            None => String::new(),
            Some(_) => format!(
                "WHERE ({key}) > ({})",
                params(&self.backend, 1, table.key.len())
            ),
        };
        let sql = format!(
            "SELECT {} FROM {} {condition} ORDER BY {key} LIMIT {limit}",
            names(&columns),
            table.name
        );
        let key_columns: Vec<&Column> = table
            .key
            .iter()
            .filter_map(|k| table.columns.iter().find(|c| c.name == *k))
            .collect();
        on_pool!(self, pool => {
            let mut q = sqlx::query(&sql);
            if let Some(after) = after {
                q = bind_row!(q, key_columns, after);
            }
            let rows = q.fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(decode_row!(r, columns));
            }
            Ok(out)
        })
    }

    /// The key of `row` of `table` (its key columns' values).
    pub fn key_of(table: &Table, row: &[Value]) -> Vec<Value> {
        table
            .key
            .iter()
            .filter_map(|k| table.column(k).and_then(|i| row.get(i)).cloned())
            .collect()
    }

    /// Inserts `rows` (all columns of `table`) in batched statements inside one transaction,
    /// skipping rows already there. Returns how many rows were inserted.
    pub async fn insert_rows(&self, table: &Table, rows: &[Row]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let columns: Vec<&Column> = table.columns.iter().collect();
        let per_statement = (max_params(&self.backend) / columns.len()).max(1);
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            use super::PoolExt as _;
            let mut tx = pool.begin_write().await?;
            let mut inserted = 0;
            for chunk in statements(rows, per_statement) {
                let sql = insert_sql(&self.backend, table, &columns, chunk.len());
                let mut q = sqlx::query(&sql);
                for row in chunk {
                    q = bind_row!(q, columns, row);
                }
                inserted += q.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    /// How many rows `table` holds.
    pub async fn count_rows(&self, table: &Table) -> Result<i64, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM {}", table.name);
        on_pool!(self, pool => {
            let (n,): (i64,) = sqlx::query_as(&sql).fetch_one(pool).await?;
            Ok(n)
        })
    }

    /// The largest value of `table`'s single integer key column, if it has one and rows.
    pub async fn max_key(&self, table: &Table) -> Result<Option<i64>, StoreError> {
        let [key] = table.key else { return Ok(None) };
        if table
            .columns
            .iter()
            .find(|c| c.name == *key)
            .map(|c| c.kind)
            != Some(Kind::Int)
        {
            return Ok(None);
        }
        let sql = format!("SELECT MAX({key}) FROM {}", table.name);
        on_pool!(self, pool => {
            let (n,): (Option<i64>,) = sqlx::query_as(&sql).fetch_one(pool).await?;
            Ok(n)
        })
    }

    /// Differences between [`TABLES`] and this database's schema: each `table` or
    /// `table.column` that one has and the other has not, described. Empty when they agree.
    pub async fn schema_drift(&self) -> Result<Vec<String>, StoreError> {
        let live: Vec<(String, String)> =
            match &self.backend {
                Backend::Sqlite(pool) => {
                    sqlx::query_as(
                        "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
                     WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
                     AND m.name NOT LIKE '\\_sqlx%' ESCAPE '\\'",
                    )
                    .fetch_all(pool)
                    .await?
                }
                Backend::Postgres(pool) => sqlx::query_as(
                    "SELECT table_name::text, column_name::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() \
                     AND table_name NOT LIKE '\\_sqlx%'",
                )
                .fetch_all(pool)
                .await?,
            };
        let mut drift = Vec::new();
        for (t, c) in &live {
            match table(t) {
                None => {
                    let what = format!("table {t} is in the schema but not in the table list");
                    if !drift.contains(&what) {
                        drift.push(what);
                    }
                }
                Some(spec) if spec.column(c).is_none() => drift.push(format!(
                    "column {t}.{c} is in the schema but not in the table list"
                )),
                Some(_) => {}
            }
        }
        for spec in TABLES {
            for c in spec.columns {
                if !live.iter().any(|(t, n)| t == spec.name && n == c.name) {
                    drift.push(format!(
                        "column {}.{} is in the table list but not in the schema",
                        spec.name, c.name
                    ));
                }
            }
        }
        Ok(drift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_cut_by_rows_and_by_bytes() {
        let small: Vec<Row> = (0..10).map(|i| vec![Value::Int(i)]).collect();
        let cuts: Vec<usize> = statements(&small, 4).iter().map(|s| s.len()).collect();
        assert_eq!(cuts, [4, 4, 2]);
        let big: Vec<Row> = (0..5)
            .map(|_| vec![Value::Blob(vec![0; MAX_STATEMENT_BYTES / 2])])
            .collect();
        let cuts: Vec<usize> = statements(&big, 1000).iter().map(|s| s.len()).collect();
        assert_eq!(cuts, [2, 2, 1], "16 MiB a statement");
        let huge = vec![vec![Value::Blob(vec![0; MAX_STATEMENT_BYTES + 1])]];
        assert_eq!(
            statements(&huge, 10).len(),
            1,
            "a row larger than the cap goes alone"
        );
        assert!(statements::<Row>(&[], 10).is_empty());
    }

    #[test]
    fn every_table_has_its_key_and_scope_columns() {
        for t in TABLES {
            for k in t.key {
                assert!(t.column(k).is_some(), "{}.{k}", t.name);
            }
            if let Scope::Entity(owner) = t.scope {
                assert!(t.column(owner).is_some(), "{}.{owner}", t.name);
            }
        }
    }
}
