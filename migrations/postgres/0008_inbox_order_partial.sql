-- The fetch-order index becomes partial (seq > 0, which every row meets: seq starts at 1), so
-- that only statements that say `seq > 0` can use it (Postgres only).
--
-- Why: a keyed probe (number, device, id) can go through inbox_items_key, which matches all
-- three columns, or through inbox_items_order (number, device, seq) with id as a filter. With
-- statistics from when an inbox was small (autovacuum analyzes at most once a minute, so an
-- inbox that fills in a burst is planned as nearly empty), both cost the same to the planner,
-- which took the order index and read the whole inbox per probe: an INBOX-ACK of one page took
-- 5-9 ms at 30,000 items instead of 0.4 ms, and the drain ran at 9,000 instead of 40,000
-- messages/s in about half of the runs (auto_explain, docs/performance.md). Neither LIMIT 1 nor
-- ORDER BY id changes that choice; an index the probe's WHERE clause does not imply does.
-- The FETCH, the one reader that needs seq order within an inbox, says `seq > 0`.
DROP INDEX inbox_items_order;
CREATE INDEX inbox_items_order ON inbox_items (recipient_number, recipient_device, seq)
    WHERE seq > 0;
