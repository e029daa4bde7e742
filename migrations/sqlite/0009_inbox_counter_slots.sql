-- Inbox quota counters split into slots (SQLite). Keep in step with
-- ../postgres/0009_inbox_counter_slots.sql, which says why. SQLite has one writer at a time,
-- so it only ever uses slot 0; the column keeps the two schemas (and `migrate-store`) alike.
CREATE TABLE inbox_counters_slotted (
    recipient_number TEXT    NOT NULL,
    recipient_device INTEGER NOT NULL,
    items            INTEGER NOT NULL,
    slot             INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipient_number, recipient_device, slot)
);
INSERT INTO inbox_counters_slotted (recipient_number, recipient_device, items, slot)
SELECT recipient_number, recipient_device, items, 0 FROM inbox_counters;
DROP TABLE inbox_counters;
ALTER TABLE inbox_counters_slotted RENAME TO inbox_counters;
