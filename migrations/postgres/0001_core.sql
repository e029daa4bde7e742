-- MicroMsg broker core schema (Postgres). Keep in step with ../sqlite/0001_core.sql:
-- the same tables, columns and constraints, spelled in each dialect.
-- Times are unix seconds; numbers are TEXT of digits; secrets are 32-byte BLOBs; message ids
-- are 16-byte BLOBs.

CREATE TABLE entities (
    number      TEXT    NOT NULL PRIMARY KEY,
    created_at  BIGINT  NOT NULL,
    -- The next device id to hand out. Ids are never reused, even after a revoke.
    next_device BIGINT  NOT NULL DEFAULT 2
);

CREATE TABLE devices (
    number          TEXT    NOT NULL REFERENCES entities (number),
    device_id       BIGINT  NOT NULL CHECK (device_id >= 1),
    name            TEXT,
    client_secret   BYTEA   NOT NULL CHECK (length(client_secret) = 32),
    server_secret   BYTEA   NOT NULL CHECK (length(server_secret) = 32),
    created_at      BIGINT  NOT NULL,
    last_seen       BIGINT,
    revoked_at      BIGINT,
    -- The last login nonce time step accepted for this device (replay protection).
    last_nonce_step BIGINT,
    PRIMARY KEY (number, device_id)
);

-- Single-use ADD-DEVICE secrets. Only the SHA-256 of the secret is stored.
CREATE TABLE registration_secrets (
    number      TEXT    NOT NULL REFERENCES entities (number),
    secret_hash BYTEA   NOT NULL CHECK (length(secret_hash) = 32),
    name        TEXT,
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    used_at     BIGINT,
    PRIMARY KEY (number, secret_hash)
);
CREATE INDEX registration_secrets_expiry ON registration_secrets (expires_at);

CREATE TABLE entity_settings (
    number        TEXT    NOT NULL PRIMARY KEY REFERENCES entities (number),
    auto_existing BOOLEAN NOT NULL DEFAULT FALSE
);

-- owner has blocked target (target may live at another broker: no foreign key).
CREATE TABLE blocks (
    owner      TEXT    NOT NULL REFERENCES entities (number),
    target     TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (owner, target)
);

-- caller sent an INITIATE to target while target did not exist.
CREATE TABLE poisoned_initiates (
    caller     TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (caller, target)
);

CREATE TABLE contacts (
    owner         TEXT    NOT NULL REFERENCES entities (number),
    peer          TEXT    NOT NULL,
    auto_existing BOOLEAN NOT NULL DEFAULT FALSE,
    brokered      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    BIGINT  NOT NULL,
    PRIMARY KEY (owner, peer)
);

-- Offline inbox. recipient_device = 0 marks a number-mode item shared by all devices of the
-- number (0 rather than NULL so that the idempotency key below is a plain unique index: both
-- SQLite and Postgres treat NULLs as distinct in unique indexes). Device ids start at 1.
-- No foreign key on recipient_number: the hot deposit path skips the parent lookup/lock; the
-- broker checks the recipient exists, and entities are never deleted.
CREATE TABLE inbox_items (
    seq              BIGSERIAL PRIMARY KEY,
    id               BYTEA   NOT NULL CHECK (length(id) = 16),
    recipient_number TEXT    NOT NULL,
    recipient_device BIGINT  NOT NULL CHECK (recipient_device >= 0),
    sender_number    TEXT    NOT NULL,
    sender_device    BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    expires_at       BIGINT  NOT NULL,
    body             BYTEA   NOT NULL
);
CREATE UNIQUE INDEX inbox_items_key ON inbox_items (recipient_number, recipient_device, id);
CREATE INDEX inbox_items_order ON inbox_items (recipient_number, recipient_device, seq);
CREATE INDEX inbox_items_expiry ON inbox_items (expires_at);

-- Number mode: which devices have acknowledged an item.
CREATE TABLE inbox_acks (
    item_seq  BIGINT  NOT NULL REFERENCES inbox_items (seq) ON DELETE CASCADE,
    device_id BIGINT  NOT NULL,
    PRIMARY KEY (item_seq, device_id)
);

-- Client-encrypted key backup: an opaque blob with an optimistic version.
CREATE TABLE key_backups (
    number     TEXT    NOT NULL PRIMARY KEY REFERENCES entities (number),
    version    BIGINT  NOT NULL,
    blob       BYTEA   NOT NULL,
    updated_at BIGINT  NOT NULL
);
