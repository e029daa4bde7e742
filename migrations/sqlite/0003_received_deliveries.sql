-- Deliveries received from peer brokers (SQLite). Keep in step with
-- ../postgres/0003_received_deliveries.sql.

-- The idempotency key of every delivery stored, kept until the delivery would have expired
-- (the sender's outbox gives up then): a batch re-sent after a lost answer stores nothing
-- twice, even once the recipient has fetched, acknowledged and so deleted the message.
CREATE TABLE received_deliveries (
    idempotency_key BLOB    NOT NULL PRIMARY KEY,
    expires_at      INTEGER NOT NULL
);
CREATE INDEX received_deliveries_expiry ON received_deliveries (expires_at);
