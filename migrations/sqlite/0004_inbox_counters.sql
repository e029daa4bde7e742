-- Inbox quota counters (SQLite). Keep in step with ../postgres/0004_inbox_counters.sql.

-- An upper bound on the rows each inbox holds in inbox_items, so that a deposit checks the
-- quota without counting the inbox. A deposit adds the items it may store to its inbox's row
-- BEFORE inserting them, in the same transaction; deletions (acknowledgement, sweep, device
-- revocation) leave it alone, so it only ever overstates. Only when the bound would pass the
-- quota does the deposit count the inbox exactly (under the row lock its own update holds) and
-- write the exact figure back. One small row per inbox that has ever had a deposit.
CREATE TABLE inbox_counters (
    recipient_number TEXT   NOT NULL,
    recipient_device INTEGER NOT NULL,
    items            INTEGER NOT NULL,
    PRIMARY KEY (recipient_number, recipient_device)
);

INSERT INTO inbox_counters (recipient_number, recipient_device, items)
SELECT recipient_number, recipient_device, COUNT(*)
FROM inbox_items
GROUP BY recipient_number, recipient_device;
