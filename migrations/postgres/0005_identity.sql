-- People who signed in at the enrollment portal, one row per (provider, subject).
CREATE TABLE users (
    id              TEXT PRIMARY KEY,
    provider        TEXT NOT NULL,
    subject         TEXT NOT NULL,
    login           TEXT,
    email           TEXT,
    display_name    TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    last_sign_in_at TIMESTAMPTZ NOT NULL,
    UNIQUE (provider, subject)
);

-- Groups as providers name them: external_id is the provider's stable identifier (an LDAP DN,
-- a claim or attribute value), name what a person reads.
CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    provider    TEXT NOT NULL,
    external_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (provider, external_id)
);

-- Membership as last seen: where (source, e.g. "sign-in") and when first and last.
CREATE TABLE user_groups (
    user_id       TEXT NOT NULL REFERENCES users (id),
    group_id      TEXT NOT NULL REFERENCES groups (id),
    source        TEXT NOT NULL,
    first_seen_at TIMESTAMPTZ NOT NULL,
    last_seen_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, group_id)
);
CREATE INDEX user_groups_group ON user_groups (group_id);

-- The person an enrollment record (and so its challenge and certificate) was issued to, and
-- the person a device belongs to once its first Authenticate arrives with that certificate.
ALTER TABLE enrollments ADD COLUMN user_id TEXT REFERENCES users (id);
ALTER TABLE mdm_devices ADD COLUMN owner_id TEXT REFERENCES users (id);
ALTER TABLE mdm_devices ADD COLUMN owner_bound_at TIMESTAMPTZ;
CREATE INDEX mdm_devices_owner ON mdm_devices (owner_id);

-- SAML assertion IDs already consumed, kept until the assertion would have expired anyway.
CREATE TABLE saml_assertions (
    assertion_id TEXT PRIMARY KEY,
    provider     TEXT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL
);
