-- Answered commands by answer time: the console's outcome chart reads the last day's rows, not
-- the whole history.
CREATE INDEX mdm_commands_answered ON mdm_commands (answered_at) WHERE answered_at IS NOT NULL;
