-- Per-device signed tokens (JWT, ES256) and the keys that sign them.

-- The broker's token signing keys. `next` is published in the JWKS but does not sign yet;
-- `current` signs; `retired` signs no more and stays published while a token it signed has
-- not expired. The private key (PKCS#8) is sealed with the master key, bound to its kid.
CREATE TABLE token_signing_keys (
    kid          TEXT PRIMARY KEY,
    algorithm    TEXT NOT NULL CHECK (algorithm IN ('ES256')),
    -- The public key's JWK members as JSON (kty, crv, x, y).
    public_jwk   TEXT NOT NULL,
    private_key  TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('next', 'current', 'retired')),
    created_at   TIMESTAMPTZ NOT NULL,
    activated_at TIMESTAMPTZ,
    retired_at   TIMESTAMPTZ
);
-- One current key and one next key at most, whichever node creates or rotates them.
CREATE UNIQUE INDEX token_signing_keys_one_per_status ON token_signing_keys (status)
    WHERE status IN ('next', 'current');

-- Every per-device token issued: one row per JWT (`jti`), for an enrollment record and an
-- integration (the token's audience). The JWT itself is a bearer credential for the device:
-- it is kept sealed with the master key (bound to its jti), so the same string can be
-- delivered again. Revoked tokens fail introspection at once; expired ones are purged later.
CREATE TABLE device_tokens (
    jti            TEXT PRIMARY KEY,
    enrollment_id  TEXT NOT NULL REFERENCES enrollments (id),
    udid           TEXT NOT NULL,
    integration    TEXT NOT NULL,
    kid            TEXT NOT NULL REFERENCES token_signing_keys (kid),
    token          TEXT NOT NULL,
    -- SHA-256 of the claims that describe the device's owner (owner, email, groups): a change
    -- means a new token.
    claims_hash    TEXT NOT NULL,
    issued_at      TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at     TIMESTAMPTZ,
    revoked_reason TEXT
);
CREATE INDEX device_tokens_enrollment ON device_tokens (enrollment_id, integration, expires_at);
CREATE INDEX device_tokens_kid ON device_tokens (kid, expires_at);
CREATE INDEX device_tokens_expiry ON device_tokens (expires_at);
