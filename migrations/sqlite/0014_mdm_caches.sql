-- What each node's MDM request caches depend on, as two counters in one row. Triggers bump
-- them in the transaction of the change itself, whoever makes it, so a node that polls the row
-- (four times a second) sees a change no earlier than its data and drops what it derived from
-- the old state:
--   identity_generation: a certificate's status, dates, bytes or enrollment; which device an
--     enrollment record is bound to; a command channel created, removed or its status changed.
--   queue_generation: a command queued, or put back into a pending state.
CREATE TABLE mdm_cache_state (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    identity_generation INTEGER NOT NULL,
    queue_generation    INTEGER NOT NULL
);
INSERT INTO mdm_cache_state (id, identity_generation, queue_generation) VALUES (1, 0, 0);

CREATE TRIGGER mdm_cache_certificates_update
AFTER UPDATE OF status, not_before, not_after, der, enrollment_id, serial ON certificates
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_certificates_delete AFTER DELETE ON certificates
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_devices_insert AFTER INSERT ON mdm_devices
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_devices_update AFTER UPDATE OF udid, enrollment_id ON mdm_devices
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_devices_delete AFTER DELETE ON mdm_devices
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_channels_insert AFTER INSERT ON mdm_enrollments
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_channels_update AFTER UPDATE OF id, udid, status ON mdm_enrollments
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_channels_delete AFTER DELETE ON mdm_enrollments
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_commands_insert AFTER INSERT ON mdm_commands
BEGIN
    UPDATE mdm_cache_state SET queue_generation = queue_generation + 1 WHERE id = 1;
END;
CREATE TRIGGER mdm_cache_commands_requeue AFTER UPDATE OF status, enrollment_id ON mdm_commands
WHEN NEW.status IN ('queued', 'sent', 'not-now')
     AND (OLD.status NOT IN ('queued', 'sent', 'not-now') OR OLD.enrollment_id <> NEW.enrollment_id)
BEGIN
    UPDATE mdm_cache_state SET queue_generation = queue_generation + 1 WHERE id = 1;
END;
