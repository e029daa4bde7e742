-- Number portability inside a network (SQLite). Keep in step with
-- ../postgres/0007_ported_numbers.sql. docs/federation.md section 12.

-- The latest ported-number entry this broker knows for each number: the number now lives at
-- to_broker. seq orders the entries of one number (a later port has a higher seq). On the
-- broker the number left (from_broker) the row is written when it agrees (PortOut), without
-- the gaining broker's signature; the gaining broker's announcement fills that in.
CREATE TABLE ported_numbers (
    number           TEXT    NOT NULL PRIMARY KEY,
    seq              INTEGER NOT NULL CHECK (seq >= 1),
    from_broker      TEXT    NOT NULL,
    to_broker        TEXT    NOT NULL,
    time             INTEGER NOT NULL,
    identity_key     BLOB    NOT NULL CHECK (length(identity_key) = 32),
    user_signature   BLOB    NOT NULL CHECK (length(user_signature) = 64),
    broker_key       BLOB    NOT NULL,
    broker_signature BLOB    NOT NULL,
    recorded_at      INTEGER NOT NULL
);

-- Single-use PORT-OUT tokens. Only the SHA-256 of the token is stored.
CREATE TABLE port_tokens (
    number      TEXT    NOT NULL,
    token_hash  BLOB    NOT NULL CHECK (length(token_hash) = 32),
    to_broker   TEXT    NOT NULL,
    -- The identity key the user named at PORT-OUT: only a statement signed by it ports.
    identity_key BLOB   NOT NULL CHECK (length(identity_key) = 32),
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    PRIMARY KEY (number, token_hash)
);
CREATE INDEX port_tokens_expiry ON port_tokens (expires_at);

-- Announcements of entries this broker made, one row per peer until that peer confirmed
-- (retried with the outbox's backoff; a peer that was down gets it when it is back).
CREATE TABLE port_announcements (
    number          TEXT    NOT NULL,
    peer_broker     TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    PRIMARY KEY (number, peer_broker)
);
CREATE INDEX port_announcements_due ON port_announcements (next_attempt_at);
