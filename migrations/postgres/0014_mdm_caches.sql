-- What each node's MDM request caches depend on, as two counters in one row. Triggers bump
-- them in the transaction of the change itself, whoever makes it, so a node that polls the row
-- (four times a second) sees a change no earlier than its data and drops what it derived from
-- the old state:
--   identity_generation: a certificate's status, dates, bytes or enrollment; which device an
--     enrollment record is bound to; a command channel created, removed or its status changed.
--   queue_generation: a command queued, or put back into a pending state.
-- Statement-level where it can be: a batch of queued commands bumps the row once.
CREATE TABLE mdm_cache_state (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    identity_generation BIGINT NOT NULL,
    queue_generation    BIGINT NOT NULL
);
INSERT INTO mdm_cache_state (id, identity_generation, queue_generation) VALUES (1, 0, 0);

CREATE FUNCTION mdm_cache_identity_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mdm_cache_state SET identity_generation = identity_generation + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;
CREATE FUNCTION mdm_cache_queue_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mdm_cache_state SET queue_generation = queue_generation + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER mdm_cache_certificates
AFTER UPDATE OF status, not_before, not_after, der, enrollment_id, serial OR DELETE ON certificates
FOR EACH STATEMENT EXECUTE FUNCTION mdm_cache_identity_changed();
CREATE TRIGGER mdm_cache_devices
AFTER INSERT OR UPDATE OF udid, enrollment_id OR DELETE ON mdm_devices
FOR EACH STATEMENT EXECUTE FUNCTION mdm_cache_identity_changed();
CREATE TRIGGER mdm_cache_channels
AFTER INSERT OR UPDATE OF id, udid, status OR DELETE ON mdm_enrollments
FOR EACH STATEMENT EXECUTE FUNCTION mdm_cache_identity_changed();
CREATE TRIGGER mdm_cache_commands_insert
AFTER INSERT ON mdm_commands
FOR EACH STATEMENT EXECUTE FUNCTION mdm_cache_queue_changed();
CREATE TRIGGER mdm_cache_commands_requeue
AFTER UPDATE OF status, enrollment_id ON mdm_commands
FOR EACH ROW
WHEN (NEW.status IN ('queued', 'sent', 'not-now')
      AND (OLD.status NOT IN ('queued', 'sent', 'not-now')
           OR OLD.enrollment_id IS DISTINCT FROM NEW.enrollment_id))
EXECUTE FUNCTION mdm_cache_queue_changed();
