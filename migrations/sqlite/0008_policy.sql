-- Group-driven policy: the applied policy sets, what the reconciler manages on each device, and
-- the requests that wake it.

-- Each applied policy set, with the files it was compiled from (JSON {path: base64}), so that
-- every node compiles the same set and any version can be shown or restored.
CREATE TABLE policy_versions (
    version    INTEGER PRIMARY KEY AUTOINCREMENT,
    applied_at TEXT NOT NULL,
    applied_by TEXT NOT NULL,
    git_commit TEXT,
    digest     TEXT NOT NULL,
    files      TEXT NOT NULL,
    summary    TEXT
);

-- What the reconciler manages on a device, per enrollment record (a re-enrolled device starts
-- a new ledger), one row per item: `profile:<PayloadIdentifier>`, `app:<bundle id>`,
-- `join:<policy>:<n>` (a command on join), `scope:<policy>` (the device is in the policy's
-- scope), `leave:<policy>:<lock|wipe>` (a deprovisioning action waiting for its grace) or
-- `identity:renewal` (the device's identity certificate, renewed before it expires), or
-- `inventory:<profiles|apps>` (a ProfileList or ManagedApplicationList when the last is stale).
-- `wanted` is whether it should be there; `revision` counts the row's
-- transitions: every change is a compare-and-set on it, so two nodes deciding the same
-- change cannot both act.
CREATE TABLE managed_items (
    enrollment_id TEXT NOT NULL REFERENCES enrollments (id),
    udid          TEXT NOT NULL,
    item_key      TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('profile', 'app', 'join', 'scope', 'deprovision', 'identity',
                                        'inventory')),
    wanted        BOOLEAN NOT NULL,
    content_hash  TEXT NOT NULL,
    config_hash   TEXT,
    policy        TEXT NOT NULL,
    group_ref     TEXT,
    revision      INTEGER NOT NULL,
    action        TEXT NOT NULL CHECK (action IN ('install', 'update', 'configure', 'remove', 'run', 'enter',
                                            'leave', 'schedule', 'cancel', 'lock', 'wipe')),
    command_uuid  TEXT,
    -- deprovision: when the action falls due.
    due_at        TEXT,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (enrollment_id, item_key)
);
CREATE INDEX managed_items_udid ON managed_items (udid);
CREATE INDEX managed_items_command ON managed_items (command_uuid);

-- Every command the reconciler queued: at most one per (enrollment, item, revision), which
-- the primary key enforces whatever the number of nodes or restarts.
CREATE TABLE managed_item_commands (
    enrollment_id TEXT NOT NULL,
    item_key      TEXT NOT NULL,
    revision      INTEGER NOT NULL,
    content_hash  TEXT NOT NULL,
    action        TEXT NOT NULL,
    command_uuid  TEXT NOT NULL UNIQUE,
    queued_at     TEXT NOT NULL,
    PRIMARY KEY (enrollment_id, item_key, revision)
);

-- Work for the reconciler: a person whose groups changed (user_id), a device that enrolled
-- (udid), or everything (both NULL). Any node may claim a request; a periodic full pass
-- covers a request claimed by a node that died before finishing it.
CREATE TABLE reconcile_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT,
    udid         TEXT,
    reason       TEXT NOT NULL,
    requested_at TEXT NOT NULL
);

-- Whether the directory still knows the person: active, disabled or deleted (as the last group
-- sync saw it).
ALTER TABLE users ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'disabled', 'deleted'));
ALTER TABLE users ADD COLUMN status_changed_at TEXT;

-- When the device last reported its profiles, and its managed apps: an item acknowledged
-- before a report that lacks it has drifted (removed on the device).
ALTER TABLE mdm_devices ADD COLUMN profiles_reported_at TEXT;
ALTER TABLE mdm_devices ADD COLUMN apps TEXT;
ALTER TABLE mdm_devices ADD COLUMN apps_reported_at TEXT;
