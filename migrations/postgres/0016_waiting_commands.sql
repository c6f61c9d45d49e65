-- no-transaction
-- Commands waiting for their device (queued, or answered NotNow), by age: the push sweep reads
-- the few waiting rows, not the whole history. Built CONCURRENTLY (hence outside a
-- transaction, one statement per file): the queue keeps taking writes from nodes still
-- serving during a rolling upgrade.
CREATE INDEX CONCURRENTLY IF NOT EXISTS mdm_commands_waiting ON mdm_commands (queued_at, enrollment_id)
    WHERE status IN ('queued', 'not-now');
