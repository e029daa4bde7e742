-- Deleted entities' numbers and forwards (SQLite). Keep in step with
-- ../postgres/0006_retired_numbers.sql.
--
-- ACCOUNT-DELETE removes an entity's row and everything under it, but never frees its number:
-- others still hold contact pairs, pinned keys and blocks under that number, and a new entity
-- handed the same number would inherit them. REGISTER draws again on a retired number, as on
-- a taken one.
CREATE TABLE retired_numbers (
    number     TEXT    NOT NULL PRIMARY KEY,
    retired_at INTEGER NOT NULL
);

-- FORWARD: the signed moved notice an entity published for whoever INITIATEs its number,
-- until expires_at. No foreign key: a forward outlives ACCOUNT-DELETE until it expires.
CREATE TABLE forwards (
    number     TEXT    NOT NULL PRIMARY KEY,
    notice     BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX forwards_expiry ON forwards (expires_at);

-- The block list of a deleted entity whose forward still lives: a blocked caller must keep
-- learning nothing (protocol.md 10.2). Removed with the forward.
CREATE TABLE forward_blocks (
    number TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (number, target)
);
