//! Number portability inside a network (docs/federation.md 12): PORT-OUT tokens, the
//! ported-number entries every broker of the network keeps, the losing broker's side of a
//! port (token spent, entry recorded, waiting inbox items moved into the outbox, the entity's
//! contacts handed over) and the gaining broker's (the entity created with the ported number,
//! its contacts, the entry and one announcement per peer), each in ONE transaction.

use subtle::ConstantTimeEq;

use super::entities::INSERT_DEVICE;
use super::{
    ContactRecord, DeviceId, NewDevice, Number, PoolExt, Store, StoreError, array, bulk_rows,
    on_pool,
};

/// A ported-number entry: `number` now lives at `to_broker` (docs/federation.md 12.3).
#[derive(Clone, PartialEq, Eq)]
pub struct PortedEntry {
    /// The ported number.
    pub number: Number,
    /// Its sequence: 1 for the first port of the number, one more for each later one.
    pub seq: u64,
    /// The broker the number left.
    pub from_broker: String,
    /// The broker that serves it now.
    pub to_broker: String,
    /// The TIME of the user's statement (unix seconds).
    pub time: u64,
    /// The user's Ed25519 identity public key.
    pub identity_key: [u8; 32],
    /// The user's signature over the port statement.
    pub user_signature: [u8; 64],
    /// The gaining broker's Ed25519 identity public key (empty until its announcement came,
    /// on the losing broker).
    pub broker_key: Vec<u8>,
    /// The gaining broker's signature over the entry (empty likewise).
    pub broker_signature: Vec<u8>,
}

impl std::fmt::Debug for PortedEntry {
    /// Without the keys and signatures (long, and of no use in a log).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortedEntry")
            .field("number", &self.number)
            .field("seq", &self.seq)
            .field("from_broker", &self.from_broker)
            .field("to_broker", &self.to_broker)
            .field("signed_by_broker", &!self.broker_signature.is_empty())
            .finish_non_exhaustive()
    }
}

impl PortedEntry {
    /// Whether `other` states the same port (number, seq, brokers, time, user key and
    /// signature); the gaining broker's signature may be missing on either side.
    pub fn same_port(&self, other: &PortedEntry) -> bool {
        self.number == other.number
            && self.seq == other.seq
            && self.from_broker == other.from_broker
            && self.to_broker == other.to_broker
            && self.time == other.time
            && self.identity_key == other.identity_key
            && self.user_signature == other.user_signature
    }
}

/// What [`Store::record_ported`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortedOutcome {
    /// It is newer than what was held (or the first): stored.
    Recorded,
    /// The same port was held already (the gaining broker's signature may have been added).
    Unchanged,
    /// A newer entry for the number is held: ignored.
    Stale,
    /// Another port with the same seq is held: refused, nothing changed.
    Conflict,
}

/// The losing broker's side of a port, as [`Store::port_out`] takes it.
#[derive(Debug, Clone)]
pub struct PortOut {
    /// The entry to record (its `seq` is ignored: the store assigns the next one).
    pub entry: PortedEntry,
    /// SHA-256 of the token the gaining broker presented.
    pub token_hash: [u8; 32],
    /// Now (unix seconds).
    pub now: i64,
}

/// A message waiting in the inbox of a number being ported away.
#[derive(Clone, PartialEq, Eq)]
pub struct WaitingItem {
    /// The client's message id.
    pub id: [u8; 16],
    /// Who deposited it.
    pub sender: Number,
    /// From which device.
    pub sender_device: u32,
    /// Deposit time.
    pub created_at: i64,
    /// Expiry.
    pub expires_at: i64,
    /// Opaque ciphertext.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for WaitingItem {
    /// Never the body.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingItem")
            .field("sender", &self.sender)
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// What the losing broker hands over when a port went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortedAway {
    /// The seq the store gave the entry.
    pub seq: u64,
    /// The entity's contacts (owner = the ported number).
    pub contacts: Vec<ContactRecord>,
    /// The numbers the entity blocked.
    pub blocks: Vec<Number>,
    /// How many waiting messages were moved into the outbox.
    pub moved: u64,
}

/// The gaining broker's side of a port, as [`Store::port_in`] takes it.
#[derive(Debug)]
pub struct PortIn {
    /// The entry, signed by this broker.
    pub entry: PortedEntry,
    /// The entity's first device here.
    pub device: NewDevice,
    /// Its contacts, from the losing broker.
    pub contacts: Vec<ContactRecord>,
    /// Its blocks, from the losing broker.
    pub blocks: Vec<Number>,
    /// Every peer broker to announce the entry to.
    pub announce_to: Vec<String>,
    /// Now (unix seconds).
    pub now: i64,
    /// The number comes back to a broker that let it go before: the entity this broker kept
    /// from then (its logins answered PORTED) is replaced, its rows removed first, in the
    /// same transaction. Without it, an existing entity is [`StoreError::NumberTaken`].
    pub replaces_leftover: bool,
}

/// Turns a waiting message into its outbox row: (idempotency key, payload).
pub type ToOutbox = dyn Fn(&WaitingItem) -> ([u8; 16], Vec<u8>) + Send + Sync;

/// A stored token: hash, to broker, identity key, expiry, when used.
type TokenRow = (Vec<u8>, String, Vec<u8>, i64, Option<i64>);

type EntryRow = (
    String,
    i64,
    String,
    String,
    i64,
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
);

/// Contacts or blocks per statement in [`Store::port_in`] (5 parameters each at most: well under
/// either backend's limit).
const PORT_IN_CHUNK: usize = 1000;

const ENTRY_COLUMNS: &str = "number, seq, from_broker, to_broker, time, identity_key, \
                             user_signature, broker_key, broker_signature";

fn entry_of(row: EntryRow) -> Result<PortedEntry, StoreError> {
    let (number, seq, from_broker, to_broker, time, key, sig, broker_key, broker_signature) = row;
    Ok(PortedEntry {
        number: Number::new(number).map_err(|_| StoreError::Corrupt("ported number"))?,
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt("ported seq"))?,
        from_broker,
        to_broker,
        time: u64::try_from(time).map_err(|_| StoreError::Corrupt("ported time"))?,
        identity_key: array(&key, "identity key length")?,
        user_signature: array(&sig, "signature length")?,
        broker_key,
        broker_signature,
    })
}

fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidArgument("value out of range"))
}

const UPSERT_ENTRY: &str = "INSERT INTO ported_numbers \
     (number, seq, from_broker, to_broker, time, identity_key, user_signature, broker_key, \
      broker_signature, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (number) DO UPDATE SET seq = excluded.seq, from_broker = excluded.from_broker, \
     to_broker = excluded.to_broker, time = excluded.time, identity_key = excluded.identity_key, \
     user_signature = excluded.user_signature, broker_key = excluded.broker_key, \
     broker_signature = excluded.broker_signature, recorded_at = excluded.recorded_at";

/// Inside an [`on_pool!`] body: stores `$entry` as the number's entry ([`UPSERT_ENTRY`]),
/// recorded at `$now`.
macro_rules! upsert_entry {
    ($tx:expr, $entry:expr, $now:expr) => {
        sqlx::query(UPSERT_ENTRY)
            .bind($entry.number.as_str())
            .bind(i64_of($entry.seq)?)
            .bind(&$entry.from_broker)
            .bind(&$entry.to_broker)
            .bind(i64_of($entry.time)?)
            .bind(&$entry.identity_key[..])
            .bind(&$entry.user_signature[..])
            .bind(&$entry.broker_key)
            .bind(&$entry.broker_signature)
            .bind($now)
            .execute(&mut *$tx)
            .await?
    };
}

impl Store {
    /// Issues a PORT-OUT token for `number` towards `to_broker`: only its SHA-256 is kept.
    /// Earlier unused tokens of the number are dropped (one outstanding token at a time).
    pub async fn create_port_token(
        &self,
        number: &Number,
        token_hash: &[u8; 32],
        to_broker: &str,
        identity_key: &[u8; 32],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let number = number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM port_tokens WHERE number = $1 AND used_at IS NULL")
                .bind(number)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO port_tokens (number, token_hash, to_broker, identity_key, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(number)
            .bind(&token_hash[..])
            .bind(to_broker)
            .bind(&identity_key[..])
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The losing broker agrees to a port, in one transaction: the token (compared in constant
    /// time with each of the number's tokens) must be unused, unexpired and issued for
    /// `entry.to_broker`, and is spent; the entry is recorded with the next seq of the number;
    /// every unexpired message waiting for the number is turned into an outbox row by
    /// `to_outbox` (its idempotency key and payload) and leaves the inbox. Returns the seq,
    /// the entity's contacts and blocks. A refused token is [`StoreError::BadPortToken`], a
    /// statement key other than the one named at PORT-OUT is
    /// [`StoreError::InvalidArgument`]; either changes nothing.
    pub async fn port_out(
        &self,
        port: &PortOut,
        to_outbox: &ToOutbox,
    ) -> Result<PortedAway, StoreError> {
        let number = port.entry.number.as_str();
        let now = port.now;
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let tokens: Vec<TokenRow> = sqlx::query_as(
                "SELECT token_hash, to_broker, identity_key, expires_at, used_at \
                 FROM port_tokens WHERE number = $1",
            )
            .bind(number)
            .fetch_all(&mut *tx)
            .await?;
            // Every held token is compared, whatever matched, so the time taken does not
            // depend on where (or whether) the presented one is.
            let mut found: Option<TokenRow> = None;
            for row in tokens {
                if bool::from(row.0.as_slice().ct_eq(&port.token_hash[..])) {
                    found = Some(row);
                }
            }
            let Some((hash, to_broker, identity_key, expires_at, used_at)) = found else {
                return Err(StoreError::BadPortToken);
            };
            if used_at.is_some() || expires_at <= now || to_broker != port.entry.to_broker {
                return Err(StoreError::BadPortToken);
            }
            // The statement must be signed by the key the user named when asking for the token.
            if identity_key.as_slice() != port.entry.identity_key.as_slice() {
                return Err(StoreError::InvalidArgument("identity key"));
            }
            let spent = sqlx::query(
                "UPDATE port_tokens SET used_at = $3 \
                 WHERE number = $1 AND token_hash = $2 AND used_at IS NULL",
            )
            .bind(number)
            .bind(&hash)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if spent != 1 {
                return Err(StoreError::BadPortToken);
            }
            let held: Option<i64> =
                sqlx::query_scalar("SELECT seq FROM ported_numbers WHERE number = $1")
                    .bind(number)
                    .fetch_optional(&mut *tx)
                    .await?;
            let seq = held.unwrap_or(0) + 1;
            let e = &port.entry;
            sqlx::query(UPSERT_ENTRY)
                .bind(number)
                .bind(seq)
                .bind(&e.from_broker)
                .bind(&e.to_broker)
                .bind(i64_of(e.time)?)
                .bind(&e.identity_key[..])
                .bind(&e.user_signature[..])
                .bind(&e.broker_key)
                .bind(&e.broker_signature)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let contacts: Vec<(String, bool, bool, i64)> = sqlx::query_as(
                "SELECT peer, auto_existing, brokered, created_at FROM contacts \
                 WHERE owner = $1 ORDER BY peer",
            )
            .bind(number)
            .fetch_all(&mut *tx)
            .await?;
            let blocks: Vec<String> =
                sqlx::query_scalar("SELECT target FROM blocks WHERE owner = $1 ORDER BY target")
                    .bind(number)
                    .fetch_all(&mut *tx)
                    .await?;
            type Waiting = (Vec<u8>, String, i64, i64, i64, Vec<u8>);
            let waiting: Vec<Waiting> = sqlx::query_as(
                "SELECT id, sender_number, sender_device, created_at, expires_at, body \
                 FROM inbox_items WHERE recipient_number = $1 AND expires_at > $2 ORDER BY seq",
            )
            .bind(number)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let mut moved = 0u64;
            let mut seen = std::collections::HashSet::new();
            for (id, sender, sender_device, created_at, expires_at, body) in waiting {
                let id: [u8; 16] = array(&id, "message id length")?;
                // Entity mode holds a copy per device: one delivery carries it to the new home,
                // which makes the copies there again.
                if !seen.insert((sender.clone(), id)) {
                    continue;
                }
                let item = WaitingItem {
                    id,
                    sender: Number::new(sender).map_err(|_| StoreError::Corrupt("sender"))?,
                    sender_device: u32::try_from(sender_device)
                        .map_err(|_| StoreError::Corrupt("sender device"))?,
                    created_at,
                    expires_at,
                    body,
                };
                let (key, payload) = to_outbox(&item);
                moved += sqlx::query(
                    "INSERT INTO outbox \
                     (idempotency_key, peer_broker, payload, next_attempt_at, created_at) \
                     VALUES ($1, $2, $3, $4, $4) ON CONFLICT (idempotency_key) DO NOTHING",
                )
                .bind(&key[..])
                .bind(&e.to_broker)
                .bind(payload)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            sqlx::query("DELETE FROM inbox_items WHERE recipient_number = $1")
                .bind(number)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM port_tokens WHERE number = $1 AND used_at IS NULL")
                .bind(number)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            let contacts = contacts
                .into_iter()
                .map(|(peer, auto_existing, brokered, created_at)| {
                    Ok(ContactRecord {
                        owner: port.entry.number.clone(),
                        peer: Number::new(peer).map_err(|_| StoreError::Corrupt("contact"))?,
                        auto_existing,
                        brokered,
                        created_at,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let blocks = blocks
                .into_iter()
                .map(|b| Number::new(b).map_err(|_| StoreError::Corrupt("block")))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(PortedAway {
                seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt("ported seq"))?,
                contacts,
                blocks,
                moved,
            })
        })
    }

    /// What the losing broker hands over for `number` (its contacts and blocks), read again
    /// for a repeated `PortOut` whose first answer was lost.
    pub async fn handover_of(
        &self,
        number: &Number,
    ) -> Result<(Vec<ContactRecord>, Vec<Number>), StoreError> {
        let owner = number.as_str();
        let contacts: Vec<(String, bool, bool, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT peer, auto_existing, brokered, created_at FROM contacts \
                 WHERE owner = $1 ORDER BY peer",
            )
            .bind(owner)
            .fetch_all(pool)
            .await?
        });
        let contacts = contacts
            .into_iter()
            .map(|(peer, auto_existing, brokered, created_at)| {
                Ok(ContactRecord {
                    owner: number.clone(),
                    peer: Number::new(peer).map_err(|_| StoreError::Corrupt("contact"))?,
                    auto_existing,
                    brokered,
                    created_at,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((contacts, self.blocked_by(number).await?))
    }

    /// The gaining broker's side of a port, in one transaction: the entity with the ported
    /// number and its first device (id 1), its contacts and blocks, the entry, and one
    /// announcement per peer, due at once. [`StoreError::NumberTaken`] when the number is
    /// already an entity here (nothing is written).
    pub async fn port_in(&self, port: &PortIn) -> Result<DeviceId, StoreError> {
        let number = port.entry.number.as_str();
        let now = port.now;
        let e = &port.entry;
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if port.replaces_leftover {
                for sql in crate::retire::DELETE_ROWS {
                    sqlx::query(sql).bind(number).execute(&mut *tx).await?;
                }
            }
            let inserted = sqlx::query(
                "INSERT INTO entities (number, created_at, next_device) VALUES ($1, $2, 2) \
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
                .bind(port.device.name.as_deref())
                .bind(&port.device.client_secret[..])
                .bind(&port.device.server_secret[..])
                .bind(now)
                .execute(&mut *tx)
                .await?;
            // Many rows per statement: a user with thousands of contacts is one round trip per
            // chunk, not per contact.
            for chunk in port.contacts.chunks(PORT_IN_CHUNK) {
                let sql = format!(
                    "INSERT INTO contacts (owner, peer, auto_existing, brokered, created_at) \
                     VALUES {} ON CONFLICT (owner, peer) DO NOTHING",
                    bulk_rows(&self.backend, chunk.len(), 5)
                );
                let mut q = sqlx::query(&sql);
                for c in chunk {
                    q = q
                        .bind(number)
                        .bind(c.peer.as_str())
                        .bind(c.auto_existing)
                        .bind(c.brokered)
                        .bind(c.created_at);
                }
                q.execute(&mut *tx).await?;
            }
            for chunk in port.blocks.chunks(PORT_IN_CHUNK) {
                let sql = format!(
                    "INSERT INTO blocks (owner, target, created_at) VALUES {} \
                     ON CONFLICT (owner, target) DO NOTHING",
                    bulk_rows(&self.backend, chunk.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for b in chunk {
                    q = q.bind(number).bind(b.as_str()).bind(now);
                }
                q.execute(&mut *tx).await?;
            }
            upsert_entry!(tx, e, now);
            for peer in &port.announce_to {
                sqlx::query(
                    "INSERT INTO port_announcements (number, peer_broker, seq, next_attempt_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (number, peer_broker) DO UPDATE \
                     SET seq = excluded.seq, attempts = 0, \
                     next_attempt_at = excluded.next_attempt_at",
                )
                .bind(number)
                .bind(peer)
                .bind(i64_of(e.seq)?)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(DeviceId::FIRST)
    }

    /// Records an entry announced by a peer (the caller has verified it): newer than the one
    /// held → stored; the same port → unchanged (a missing broker signature is filled in);
    /// older → stale; another port with the same seq → conflict. Idempotent.
    pub async fn record_ported(
        &self,
        entry: &PortedEntry,
        now: i64,
    ) -> Result<PortedOutcome, StoreError> {
        let number = entry.number.as_str();
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let held: Option<EntryRow> = sqlx::query_as(&format!(
                "SELECT {ENTRY_COLUMNS} FROM ported_numbers WHERE number = $1"
            ))
            .bind(number)
            .fetch_optional(&mut *tx)
            .await?;
            let held = held.map(entry_of).transpose()?;
            let outcome = match &held {
                Some(h) if h.seq > entry.seq => PortedOutcome::Stale,
                Some(h) if h.seq == entry.seq && !h.same_port(entry) => PortedOutcome::Conflict,
                Some(h) if h.seq == entry.seq && !h.broker_signature.is_empty() => {
                    PortedOutcome::Unchanged
                }
                Some(h) if h.seq == entry.seq => {
                    sqlx::query(
                        "UPDATE ported_numbers SET broker_key = $2, broker_signature = $3 \
                         WHERE number = $1",
                    )
                    .bind(number)
                    .bind(&entry.broker_key)
                    .bind(&entry.broker_signature)
                    .execute(&mut *tx)
                    .await?;
                    PortedOutcome::Unchanged
                }
                _ => {
                    upsert_entry!(tx, entry, now);
                    PortedOutcome::Recorded
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }

    /// Every ported-number entry held, by number.
    pub async fn ported_entries(&self) -> Result<Vec<PortedEntry>, StoreError> {
        let rows: Vec<EntryRow> = on_pool!(self, pool => {
            sqlx::query_as(&format!(
                "SELECT {ENTRY_COLUMNS} FROM ported_numbers ORDER BY number"
            ))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(entry_of).collect()
    }

    /// The entry held for `number`.
    pub async fn ported_entry(&self, number: &Number) -> Result<Option<PortedEntry>, StoreError> {
        let row: Option<EntryRow> = on_pool!(self, pool => {
            sqlx::query_as(&format!(
                "SELECT {ENTRY_COLUMNS} FROM ported_numbers WHERE number = $1"
            ))
            .bind(number.as_str())
            .fetch_optional(pool)
            .await?
        });
        row.map(entry_of).transpose()
    }

    /// Up to `limit` announcements due at `now`: (number, peer broker, attempts so far).
    pub async fn due_port_announcements(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<(Number, String, i64)>, StoreError> {
        let rows: Vec<(String, String, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT number, peer_broker, attempts FROM port_announcements \
                 WHERE next_attempt_at <= $1 ORDER BY next_attempt_at, number LIMIT $2",
            )
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(n, p, a)| {
                Ok((
                    Number::new(n).map_err(|_| StoreError::Corrupt("number"))?,
                    p,
                    a,
                ))
            })
            .collect()
    }

    /// Records a failed announcement and schedules the next attempt.
    pub async fn retry_port_announcement(
        &self,
        number: &Number,
        peer: &str,
        next_attempt_at: i64,
    ) -> Result<(), StoreError> {
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE port_announcements SET attempts = attempts + 1, next_attempt_at = $3 \
                 WHERE number = $1 AND peer_broker = $2",
            )
            .bind(number.as_str())
            .bind(peer)
            .bind(next_attempt_at)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Removes an announcement the peer confirmed (only if it is still for `seq`: a later
    /// port of the number queued a new one that must still go).
    pub async fn complete_port_announcement(
        &self,
        number: &Number,
        peer: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        let _writing = self.writing().await;
        on_pool!(self, pool => {
            sqlx::query(
                "DELETE FROM port_announcements \
                 WHERE number = $1 AND peer_broker = $2 AND seq = $3",
            )
            .bind(number.as_str())
            .bind(peer)
            .bind(i64_of(seq)?)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Announcements not yet confirmed, per ported number: how many peers still wait.
    pub async fn unannounced_by_number(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT number, COUNT(*) FROM port_announcements GROUP BY number",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }
}
