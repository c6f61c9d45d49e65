-- App-config tokens (the PingID pattern): integrations (an app and the managed app
-- configuration key its token goes under), their shared tokens, the app clients that validate
-- tokens, and which token each device was last sent.

-- One app a token is delivered to. `overlap_secs`: how long a rotated-out token stays valid.
-- `device_tokens`: whether its devices also get per-device signed tokens.
CREATE TABLE token_integrations (
    name          TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL,
    bundle_id     TEXT NOT NULL,
    config_key    TEXT NOT NULL,
    device_tokens BOOLEAN NOT NULL DEFAULT FALSE,
    overlap_secs  INTEGER NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

-- Shared tokens. The value is sealed with the master key and found by `value_hash`, an
-- HMAC-SHA256 under a key that is itself sealed (token_state.lookup_key), so a copy of the
-- database alone cannot confirm a guessed token. The status (scheduled, active, expired,
-- revoked) follows from the times. `seq` orders tokens by creation across nodes (the
-- generation the insert made). `start_noted`/`end_noted`: the moment it became active or
-- expired has been turned into a reconcile request (by exactly one node).
CREATE TABLE shared_tokens (
    id           TEXT PRIMARY KEY,
    integration  TEXT NOT NULL REFERENCES token_integrations (name),
    label        TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('generated', 'imported')),
    value_hash   TEXT NOT NULL,
    sealed_value TEXT NOT NULL,
    last4        TEXT NOT NULL,
    not_before   TEXT NOT NULL,
    expires_at   TEXT,
    created_by   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    revoked_by   TEXT,
    revoked_at   TEXT,
    start_noted  BOOLEAN NOT NULL,
    end_noted    BOOLEAN NOT NULL,
    seq          INTEGER NOT NULL
);
CREATE UNIQUE INDEX shared_tokens_value ON shared_tokens (integration, value_hash);

-- Credentials of an app's back end that validates tokens of one integration: the secret
-- (256 random bits) is stored as its SHA-256 only. A name is unique among active clients.
CREATE TABLE app_clients (
    id          TEXT PRIMARY KEY,
    integration TEXT NOT NULL REFERENCES token_integrations (name),
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_by  TEXT,
    revoked_at  TEXT
);
CREATE UNIQUE INDEX app_clients_active_name ON app_clients (integration, name)
    WHERE revoked_at IS NULL;

-- Which shared token each enrollment record was last sent, and by which command: the API
-- counts, per token, the devices that acknowledged a configuration carrying it.
CREATE TABLE token_deliveries (
    token_id      TEXT NOT NULL REFERENCES shared_tokens (id),
    enrollment_id TEXT NOT NULL REFERENCES enrollments (id),
    udid          TEXT NOT NULL,
    item_key      TEXT NOT NULL,
    command_uuid  TEXT NOT NULL,
    delivered_at  TEXT NOT NULL,
    PRIMARY KEY (token_id, enrollment_id)
);
CREATE INDEX token_deliveries_command ON token_deliveries (command_uuid);

-- One row: `generation` is bumped in the transaction of every change to integrations, tokens
-- or clients, and each node reloads its in-memory validation index when it moves.
-- `lookup_key` is the sealed HMAC key of shared_tokens.value_hash, made at first start.
CREATE TABLE token_state (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL,
    lookup_key TEXT
);
INSERT INTO token_state (id, generation, lookup_key) VALUES (1, 0, NULL);

-- A validation may name a device by its serial number.
CREATE INDEX mdm_devices_serial ON mdm_devices (serial_number);
