-- no-transaction
-- Answered commands by answer time: the console's outcome chart reads the last day's rows, not
-- the whole history. Built CONCURRENTLY, as 0016.
CREATE INDEX CONCURRENTLY IF NOT EXISTS mdm_commands_answered ON mdm_commands (answered_at)
    WHERE answered_at IS NOT NULL;
