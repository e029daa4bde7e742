//! Blocks, poisoned INITIATEs, contacts and the per-entity contact policy.

use std::future::Future;

use sqlx::{PgConnection, SqliteConnection};

use super::{
    ContactRecord, DepositRoute, Number, PoolExt, Store, StoreError, device_id,
    number as to_number, on_pool, sqlite_pair_values,
};

impl Store {
    /// `owner` blocks `target` (idempotent). Rejected contact requests feed this too.
    pub async fn block(&self, owner: &Number, target: &Number, now: i64) -> Result<(), StoreError> {
        let owner = owner.as_str();
        let target = target.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO blocks (owner, target, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (owner, target) DO NOTHING",
            )
            .bind(owner)
            .bind(target)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Lifts a block. Returns whether there was one.
    pub async fn unblock(&self, owner: &Number, target: &Number) -> Result<bool, StoreError> {
        let owner = owner.as_str();
        let target = target.as_str();
        let _writing = self.writing().await;
        let n = on_pool!(self, pool => {
            sqlx::query("DELETE FROM blocks WHERE owner = $1 AND target = $2")
                .bind(owner)
                .bind(target)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// What DEPOSITs need to know ([`DepositRoute`]) for many `(sender, target)` pairs, in one
    /// statement, one route per pair, in order. The broker reads routes inside its batches'
    /// transactions instead ([`super::DepositBatcher::deposit_routed`],
    /// [`super::OutboxEntry::contact`]); this is the same read on its own.
    pub async fn deposit_routes(
        &self,
        pairs: &[(Number, Number)],
    ) -> Result<Vec<DepositRoute>, StoreError> {
        on_pool!(self, pool => {
            let mut conn = pool.acquire().await?;
            routes_on(&mut *conn, pairs).await
        })
    }

    /// Whether `owner` has blocked `target`.
    pub async fn is_blocked(&self, owner: &Number, target: &Number) -> Result<bool, StoreError> {
        let owner = owner.as_str();
        let target = target.as_str();
        let b: bool = on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM blocks WHERE owner = $1 AND target = $2)",
            )
            .bind(owner)
            .bind(target)
            .fetch_one(pool)
            .await?
        });
        Ok(b)
    }

    /// The numbers `owner` has blocked, sorted.
    pub async fn blocked_by(&self, owner: &Number) -> Result<Vec<Number>, StoreError> {
        let owner = owner.as_str();
        let v: Vec<String> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT target FROM blocks WHERE owner = $1 ORDER BY target")
                .bind(owner)
                .fetch_all(pool)
                .await?
        });
        v.into_iter().map(to_number).collect()
    }

    /// Remembers that `caller` sent an INITIATE to `target` while `target` did not exist
    /// (idempotent): if the number is given out later, `caller` cannot reach it.
    pub async fn remember_unknown_target(
        &self,
        caller: &Number,
        target: &Number,
        now: i64,
    ) -> Result<(), StoreError> {
        self.remember_unknown_targets(&[(caller.clone(), target.clone())], now)
            .await
    }

    /// [`Store::remember_unknown_target`] for many (caller, target) pairs, in one transaction.
    pub async fn remember_unknown_targets(
        &self,
        probes: &[(Number, Number)],
        now: i64,
    ) -> Result<(), StoreError> {
        if probes.is_empty() {
            return Ok(());
        }
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for (caller, target) in probes {
                sqlx::query(
                    "INSERT INTO poisoned_initiates (caller, target, created_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (caller, target) DO NOTHING",
                )
                .bind(caller.as_str())
                .bind(target.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Whether `caller` once tried to reach `target` before it existed.
    pub async fn is_poisoned(&self, caller: &Number, target: &Number) -> Result<bool, StoreError> {
        let target = target.as_str();
        let caller = caller.as_str();
        let b: bool = on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM poisoned_initiates \
                 WHERE caller = $1 AND target = $2)",
            )
            .bind(caller)
            .bind(target)
            .fetch_one(pool)
            .await?
        });
        Ok(b)
    }

    /// Adds `peer` to `owner`'s contacts with both flags off. Returns `false` if it already
    /// was a contact (its flags are left as they are).
    pub async fn add_contact(
        &self,
        owner: &Number,
        peer: &Number,
        now: i64,
    ) -> Result<bool, StoreError> {
        let owner = owner.as_str();
        let peer = peer.as_str();
        let _writing = self.writing().await;
        let n = on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO contacts (owner, peer, auto_existing, brokered, created_at) \
                 VALUES ($1, $2, FALSE, FALSE, $3) ON CONFLICT (owner, peer) DO NOTHING",
            )
            .bind(owner)
            .bind(peer)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Whether `peer` is one of `owner`'s contacts.
    pub async fn is_contact(&self, owner: &Number, peer: &Number) -> Result<bool, StoreError> {
        let owner = owner.as_str();
        let peer = peer.as_str();
        let b: bool = on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM contacts WHERE owner = $1 AND peer = $2)",
            )
            .bind(owner)
            .bind(peer)
            .fetch_one(pool)
            .await?
        });
        Ok(b)
    }

    /// `owner`'s contact record for `peer`, if any.
    pub async fn contact(
        &self,
        owner: &Number,
        peer: &Number,
    ) -> Result<Option<ContactRecord>, StoreError> {
        let owner = owner.as_str();
        let peer = peer.as_str();
        let row: Option<(String, String, bool, bool, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT owner, peer, auto_existing, brokered, created_at FROM contacts \
                 WHERE owner = $1 AND peer = $2",
            )
            .bind(owner)
            .bind(peer)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(owner, peer, auto_existing, brokered, created_at)| {
            Ok(ContactRecord {
                owner: to_number(owner)?,
                peer: to_number(peer)?,
                auto_existing,
                brokered,
                created_at,
            })
        })
        .transpose()
    }

    /// Sets the flags of an existing contact: `auto_existing` (hand `owner`'s address to
    /// `peer` without asking) and `brokered` (`owner` agrees to offline messages via the
    /// broker; a brokered pair needs both sides to agree). [`StoreError::NotFound`] if `peer`
    /// is not a contact.
    pub async fn set_contact_flags(
        &self,
        owner: &Number,
        peer: &Number,
        auto_existing: bool,
        brokered: bool,
    ) -> Result<(), StoreError> {
        let owner = owner.as_str();
        let peer = peer.as_str();
        let _writing = self.writing().await;
        let n = on_pool!(self, pool => {
            sqlx::query(
                "UPDATE contacts SET auto_existing = $3, brokered = $4 \
                 WHERE owner = $1 AND peer = $2",
            )
            .bind(owner)
            .bind(peer)
            .bind(auto_existing)
            .bind(brokered)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Sets `number`'s CONTACT-POLICY: hand its address to existing contacts without asking.
    pub async fn set_auto_existing(&self, number: &Number, on: bool) -> Result<(), StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO entity_settings (number, auto_existing) VALUES ($1, $2) \
                 ON CONFLICT (number) DO UPDATE SET auto_existing = excluded.auto_existing",
            )
            .bind(number)
            .bind(on)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// `number`'s CONTACT-POLICY (off unless set).
    pub async fn auto_existing(&self, number: &Number) -> Result<bool, StoreError> {
        let number = number.as_str();
        let v: Option<bool> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT auto_existing FROM entity_settings WHERE number = $1")
                .bind(number)
                .fetch_optional(pool)
                .await?
        });
        Ok(v.unwrap_or(false))
    }
}

/// The route read of [`Store::deposit_routes`]: keyed probes only (contacts and blocks by
/// primary key, devices by number), one row per pair and active device of its target.
const ROUTE_SELECT: &str = "SELECT k.ord, \
     EXISTS (SELECT 1 FROM contacts AS c WHERE c.owner = k.s AND c.peer = k.t), \
     EXISTS (SELECT 1 FROM blocks AS b WHERE b.owner = k.t AND b.target = k.s), \
     d.device_id \
     FROM k LEFT JOIN devices AS d ON d.number = k.t AND d.revoked_at IS NULL \
     ORDER BY k.ord, d.device_id";

/// (index into the pairs, contact, blocked, device).
type RouteRow = (i64, bool, bool, Option<i64>);

/// The backend-specific statement of a route read, on a connection (pooled, or a transaction
/// that goes on to store the deposits).
pub(crate) trait RouteIo {
    /// The [`ROUTE_SELECT`] rows of `pairs`.
    fn route_rows(
        &mut self,
        pairs: &[(Number, Number)],
    ) -> impl Future<Output = Result<Vec<RouteRow>, StoreError>> + Send;
}

impl RouteIo for PgConnection {
    async fn route_rows(
        &mut self,
        pairs: &[(Number, Number)],
    ) -> Result<Vec<RouteRow>, StoreError> {
        // One statement text whatever the batch size, so it stays prepared.
        let senders: Vec<&str> = pairs.iter().map(|(s, _)| s.as_str()).collect();
        let targets: Vec<&str> = pairs.iter().map(|(_, t)| t.as_str()).collect();
        let sql = format!(
            "WITH k (s, t, ord) AS (SELECT s, t, ord - 1 FROM \
             UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS u (s, t, ord)) {ROUTE_SELECT}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(senders)
            .bind(targets)
            .fetch_all(&mut *self)
            .await?)
    }
}

impl RouteIo for SqliteConnection {
    async fn route_rows(
        &mut self,
        pairs: &[(Number, Number)],
    ) -> Result<Vec<RouteRow>, StoreError> {
        // Placeholders per pair (well under SQLite's 32766 parameters per statement).
        const CHUNK: usize = 256;
        let mut rows = Vec::new();
        for (chunk_no, chunk) in pairs.chunks(CHUNK).enumerate() {
            // Anonymous parameters (see `sqlite_rows`), the row number inline.
            let values = sqlite_pair_values(chunk_no * CHUNK, chunk.len());
            let sql = format!("WITH k (ord, s, t) AS (VALUES {values}) {ROUTE_SELECT}");
            let mut q = sqlx::query_as::<_, RouteRow>(&sql).persistent(false);
            for (sender, target) in chunk {
                q = q.bind(sender.as_str()).bind(target.as_str());
            }
            rows.extend(q.fetch_all(&mut *self).await?);
        }
        Ok(rows)
    }
}

/// The routes of `pairs`, one per pair, in order, read on `conn`.
pub(crate) async fn routes_on<C: RouteIo + Send>(
    conn: &mut C,
    pairs: &[(Number, Number)],
) -> Result<Vec<DepositRoute>, StoreError> {
    let mut routes = vec![DepositRoute::default(); pairs.len()];
    for (ord, contact, blocked, device) in conn.route_rows(pairs).await? {
        let Some(route) = usize::try_from(ord).ok().and_then(|i| routes.get_mut(i)) else {
            return Err(StoreError::Invariant(
                "a route row for a pair that was not asked",
            ));
        };
        route.contact = contact;
        route.blocked = blocked;
        if let Some(d) = device {
            route.devices.push(device_id(d)?);
        }
    }
    Ok(routes)
}
