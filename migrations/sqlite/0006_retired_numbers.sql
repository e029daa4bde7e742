-- Numbers of deleted entities (SQLite). Keep in step with ../postgres/0006_retired_numbers.sql.
--
-- ACCOUNT-DELETE removes an entity's row and everything under it, but never frees its number:
-- others still hold contact pairs, pinned keys and blocks under that number, and a new entity
-- handed the same number would inherit them. REGISTER draws again on a retired number, as on
-- a taken one.
CREATE TABLE retired_numbers (
    number     TEXT    NOT NULL PRIMARY KEY,
    retired_at INTEGER NOT NULL
);
