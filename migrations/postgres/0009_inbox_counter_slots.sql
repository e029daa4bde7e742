-- Inbox quota counters split into slots (Postgres). Keep in step with
-- ../sqlite/0009_inbox_counter_slots.sql.
--
-- Why: every deposit batch for an inbox used to add to that inbox's one counter row, and
-- Postgres holds the row's lock until the commit's WAL flush is done, so a second batch for the
-- same inbox waited for the first one's flush before it could even start: one batch in flight,
-- a deposit waiting about two flushes, and on a slow-fsync day deposits ran below a single-row
-- insert (docs/performance.md). Now each batch in flight adds to a slot of its own, and the
-- bound is the sum of the inbox's slots. A batch first takes a shared advisory lock on each of
-- its inboxes; a writer that must see an inbox alone (a batch whose bound nears the quota, which
-- then counts it exactly, or a delivery from a peer broker) takes it exclusively, which waits
-- for those batches to commit and keeps new ones out, and adds to slot 0 (store/src/inbox.rs,
-- `Lane`).
ALTER TABLE inbox_counters ADD COLUMN slot SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE inbox_counters DROP CONSTRAINT inbox_counters_pkey;
ALTER TABLE inbox_counters ADD PRIMARY KEY (recipient_number, recipient_device, slot);
