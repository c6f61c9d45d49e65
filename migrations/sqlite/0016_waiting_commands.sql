-- Commands waiting for their device (queued, or answered NotNow), by age: the push sweep reads
-- the few waiting rows, not the whole history.
CREATE INDEX mdm_commands_waiting ON mdm_commands (queued_at, enrollment_id)
    WHERE status IN ('queued', 'not-now');
