-- Federation tables (Postgres). Keep in step with ../sqlite/0002_federation.sql.

-- Pubkeys of clients at peer brokers, held for the sealed address handoff; they expire.
CREATE TABLE broker_pubkeys (
    peer_number TEXT    NOT NULL PRIMARY KEY,
    pubkey      BYTEA   NOT NULL,
    expires_at  BIGINT  NOT NULL
);
CREATE INDEX broker_pubkeys_expiry ON broker_pubkeys (expires_at);

-- Durable outbox for cross-broker deliveries, retried until the peer confirms.
CREATE TABLE outbox (
    idempotency_key BYTEA   NOT NULL PRIMARY KEY,
    peer_broker     TEXT    NOT NULL,
    payload         BYTEA   NOT NULL,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at);
