-- Apple devices under management, one row per UDID. `enrollment_id` is the enrollment record
-- whose certificate first authenticated the device: later requests must be signed by a
-- certificate of that same record (the original or a renewal), never another device's.
CREATE TABLE mdm_devices (
    udid             TEXT PRIMARY KEY,
    enrollment_id    TEXT NOT NULL UNIQUE REFERENCES enrollments (id),
    serial_number    TEXT,
    model            TEXT,
    model_name       TEXT,
    product_name     TEXT,
    device_name      TEXT,
    os_version       TEXT,
    build_version    TEXT,
    topic            TEXT NOT NULL,
    -- The last DeviceInformation QueryResponses and ProfileList, as JSON.
    inventory        TEXT,
    profiles         TEXT,
    bootstrap_token  TEXT,
    authenticated_at TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);

-- Command channels: the device channel (id = UDID) and, on macOS, user channels
-- (id = UDID:UserID); a User Enrollment's channel uses its EnrollmentID.
CREATE TABLE mdm_enrollments (
    id              TEXT PRIMARY KEY,
    udid            TEXT NOT NULL REFERENCES mdm_devices (udid),
    channel         TEXT NOT NULL CHECK (channel IN ('device', 'user')),
    user_id         TEXT,
    user_short_name TEXT,
    user_long_name  TEXT,
    push_token      TEXT,
    push_magic      TEXT,
    unlock_token    TEXT,
    -- active after TokenUpdate; inactive after CheckOut or a new Authenticate; the push token
    -- dies separately when APNs answers 410.
    status          TEXT NOT NULL CHECK (status IN ('pending', 'active', 'checked-out')),
    push_status     TEXT NOT NULL DEFAULT 'unknown' CHECK (push_status IN ('unknown', 'ok', 'unregistered')),
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    last_seen_at    TIMESTAMPTZ
);
CREATE INDEX mdm_enrollments_udid ON mdm_enrollments (udid);

-- The command queue: one row per command per enrollment, delivered in `seq` order.
CREATE TABLE mdm_commands (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid          TEXT NOT NULL UNIQUE,
    enrollment_id TEXT NOT NULL REFERENCES mdm_enrollments (id),
    request_type  TEXT NOT NULL,
    -- SHA-256 of the command without its UUID: identical pending commands are not queued twice.
    fingerprint   TEXT NOT NULL,
    body          BYTEA NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('queued', 'sent', 'acknowledged', 'error', 'not-now', 'format-error', 'cancelled')),
    created_by    TEXT NOT NULL,
    queued_at     TIMESTAMPTZ NOT NULL,
    sent_at       TIMESTAMPTZ,
    answered_at   TIMESTAMPTZ,
    result        BYTEA,
    error_chain   TEXT
);
CREATE INDEX mdm_commands_pending ON mdm_commands (enrollment_id, status, seq);
CREATE INDEX mdm_commands_fingerprint ON mdm_commands (enrollment_id, fingerprint);
