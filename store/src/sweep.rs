//! Periodic clean-up of expired and spent rows, in bounded batches.

use super::{Store, StoreError, SweepReport, on_pool};

/// Rows deleted per statement (each statement is its own short transaction).
const SWEEP_BATCH: i64 = 1000;
/// Statements per table per [`Store::sweep`] call, so one call stays short.
const SWEEP_ROUNDS: u32 = 50;
/// Used or expired registration secrets are kept this long (seconds), then removed.
const SECRET_RETENTION: i64 = 86_400;

const SWEEP_INBOX: &str = "DELETE FROM inbox_items WHERE seq IN \
     (SELECT seq FROM inbox_items WHERE expires_at <= $1 LIMIT $2)";

const SWEEP_SECRETS: &str = "DELETE FROM registration_secrets \
     WHERE (number, secret_hash) IN (SELECT number, secret_hash FROM registration_secrets \
       WHERE expires_at <= $1 OR used_at <= $1 LIMIT $2)";

const SWEEP_PUBKEYS: &str = "DELETE FROM broker_pubkeys WHERE peer_number IN \
     (SELECT peer_number FROM broker_pubkeys WHERE expires_at <= $1 LIMIT $2)";

const SWEEP_FORWARDS: &str = "DELETE FROM forwards WHERE number IN \
     (SELECT number FROM forwards WHERE expires_at <= $1 LIMIT $2)";

/// The kept block lists of forwards that are gone (expired and swept, or never set).
const SWEEP_FORWARD_BLOCKS: &str = "DELETE FROM forward_blocks WHERE (number, target) IN \
     (SELECT number, target FROM forward_blocks b \
      WHERE NOT EXISTS (SELECT 1 FROM forwards f WHERE f.number = b.number AND f.expires_at > $1) \
      LIMIT $2)";

const SWEEP_RECEIVED: &str = "DELETE FROM received_deliveries WHERE idempotency_key IN \
     (SELECT idempotency_key FROM received_deliveries WHERE expires_at <= $1 LIMIT $2)";

const SWEEP_PORT_TOKENS: &str = "DELETE FROM port_tokens \
     WHERE (number, token_hash) IN (SELECT number, token_hash FROM port_tokens \
       WHERE expires_at <= $1 LIMIT $2)";

impl Store {
    /// Deletes expired inbox items (with their acknowledgements), registration secrets used or
    /// expired more than a day before `now`, expired broker-held pubkeys, the kept keys of
    /// expired deliveries from peer brokers, expired PORT-OUT tokens (used or not: a repeat
    /// of a port is answered from its entry, not its token) and expired forwards with their
    /// kept block lists. Works in batches
    /// of short transactions; if a bound is hit the report says `more` and the caller calls
    /// again (soon).
    pub async fn sweep(&self, now: i64) -> Result<SweepReport, StoreError> {
        let mut report = SweepReport::default();
        let jobs: [(&str, i64); 7] = [
            (SWEEP_INBOX, now),
            (SWEEP_SECRETS, now.saturating_sub(SECRET_RETENTION)),
            (SWEEP_PUBKEYS, now),
            (SWEEP_RECEIVED, now),
            (SWEEP_PORT_TOKENS, now),
            (SWEEP_FORWARDS, now),
            (SWEEP_FORWARD_BLOCKS, now),
        ];
        for (job, (sql, cutoff)) in jobs.into_iter().enumerate() {
            let mut total = 0u64;
            let mut rounds = 0;
            loop {
                // The write gate per statement, so other writers go between the batches.
                let writing = self.writing().await;
                let n = on_pool!(self, pool => {
                    sqlx::query(sql)
                        .bind(cutoff)
                        .bind(SWEEP_BATCH)
                        .execute(pool)
                        .await?
                        .rows_affected()
                });
                drop(writing);
                total += n;
                rounds += 1;
                if n < SWEEP_BATCH as u64 {
                    break;
                }
                if rounds >= SWEEP_ROUNDS {
                    report.more = true;
                    break;
                }
            }
            match job {
                0 => report.inbox_items = total,
                1 => report.registration_secrets = total,
                2 => report.peer_pubkeys = total,
                3 => report.received_deliveries = total,
                4 => report.port_tokens = total,
                5 => report.forwards = total,
                // The block lists of expired forwards: counted with them.
                _ => {}
            }
        }
        Ok(report)
    }
}
