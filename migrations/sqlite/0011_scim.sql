-- SCIM 2.0 provisioning: the clients (an IdP's credential, bound to one provider) and the SCIM
-- view of the people and groups they push. A SCIM user IS the users row of its provider (its
-- SCIM id is users.id), a SCIM group IS the groups row (its SCIM id is groups.id): sign-ins,
-- directory syncs and SCIM all write the same rows.

CREATE TABLE scim_clients (
    id           TEXT PRIMARY KEY,
    provider     TEXT NOT NULL,
    name         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
);

-- The SCIM resource of a person: the attributes the IdP pushed (JSON, known attributes only),
-- userName (unique per provider, compared without case: user_name_key is its lower case),
-- whether the IdP says the account is active, and the version the ETag names.
CREATE TABLE scim_users (
    user_id       TEXT PRIMARY KEY REFERENCES users (id),
    provider      TEXT NOT NULL,
    user_name     TEXT NOT NULL,
    user_name_key TEXT NOT NULL,
    external_id   TEXT,
    active        BOOLEAN NOT NULL,
    resource      TEXT NOT NULL,
    version       BIGINT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    UNIQUE (provider, user_name_key)
);
CREATE INDEX scim_users_external ON scim_users (provider, external_id);

-- The SCIM resource of a group; its members are user_groups rows (source 'scim').
CREATE TABLE scim_groups (
    group_id     TEXT PRIMARY KEY REFERENCES groups (id),
    provider     TEXT NOT NULL,
    external_id  TEXT,
    display_name TEXT NOT NULL,
    version      BIGINT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX scim_groups_provider ON scim_groups (provider, display_name);
