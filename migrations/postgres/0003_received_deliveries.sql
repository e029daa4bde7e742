-- Deliveries received from peer brokers (Postgres). Keep in step with
-- ../sqlite/0003_received_deliveries.sql.

-- The idempotency key of every delivery stored, kept until the delivery would have expired
-- (the sender's outbox gives up then): a batch re-sent after a lost answer stores nothing
-- twice, even once the recipient has fetched, acknowledged and so deleted the message.
CREATE TABLE received_deliveries (
    idempotency_key BYTEA   NOT NULL PRIMARY KEY,
    expires_at      BIGINT  NOT NULL
);
CREATE INDEX received_deliveries_expiry ON received_deliveries (expires_at);
