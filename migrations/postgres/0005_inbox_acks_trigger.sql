-- Number-mode acknowledgements leave with their item through one statement-level trigger
-- instead of the foreign key's ON DELETE CASCADE (Postgres only).
--
-- Why: the cascade fires a referential-integrity query for every deleted inbox item, although
-- only number-mode items (recipient_device = 0) can have acknowledgements. An INBOX-ACK of a
-- page of ~116 entity-mode items spent about half of its DELETE in those per-row checks
-- (docs/performance.md, "drain"). The trigger below runs once per DELETE statement, over the
-- statement's deleted rows, and probes inbox_acks' primary key only for number-mode items.
--
-- What the foreign key also did, refusing an acknowledgement of an item being deleted, the
-- acknowledging INSERT now does itself: it locks the item (FOR KEY SHARE, as the foreign key's
-- check did) and skips one that is gone. Item seqs are never reused, so no acknowledgement can
-- ever be taken for another item's.
--
-- SQLite keeps its foreign key (../sqlite/0001_core.sql): it has no statement-level triggers,
-- and its cascade is an in-process index probe.

ALTER TABLE inbox_acks DROP CONSTRAINT inbox_acks_item_seq_fkey;

CREATE FUNCTION inbox_items_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- = ANY(ARRAY(...)): an index probe per deleted number-mode item whatever the statistics
    -- say about inbox_acks; nothing at all for a statement that deleted only device items.
    DELETE FROM inbox_acks
    WHERE item_seq = ANY (ARRAY(SELECT seq FROM deleted_items WHERE recipient_device = 0));
    RETURN NULL;
END
$$;

CREATE TRIGGER inbox_items_deleted
    AFTER DELETE ON inbox_items
    REFERENCING OLD TABLE AS deleted_items
    FOR EACH STATEMENT EXECUTE FUNCTION inbox_items_deleted();
