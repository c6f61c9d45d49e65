-- The CA (and optional RA): certificate and private key, the key sealed with the master key.
CREATE TABLE ca_keys (
    role        TEXT PRIMARY KEY CHECK (role IN ('ca', 'ra')),
    certificate BYTEA NOT NULL,
    sealed_key  TEXT NOT NULL,
    imported    BOOLEAN NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

-- Who asked for a device to be enrolled, and for whom. Challenges and certificates hang off it.
CREATE TABLE enrollments (
    id           TEXT PRIMARY KEY,
    for_user     TEXT,
    for_device   TEXT,
    requested_by TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    status       TEXT NOT NULL
);

-- One-time SCEP challenges, stored as SHA-256 of the challenge (it is a bearer secret).
CREATE TABLE scep_challenges (
    challenge_hash TEXT PRIMARY KEY,
    enrollment_id  TEXT NOT NULL REFERENCES enrollments (id),
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    redeemed_at    TIMESTAMPTZ
);
CREATE INDEX scep_challenges_enrollment ON scep_challenges (enrollment_id);

-- Every certificate the CA issued. (transaction_id, sender_nonce) is unique, so a replayed
-- request can never issue a second certificate.
CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    enrollment_id     TEXT REFERENCES enrollments (id),
    subject           TEXT NOT NULL,
    not_before        TIMESTAMPTZ NOT NULL,
    not_after         TIMESTAMPTZ NOT NULL,
    status            TEXT NOT NULL,
    revoked_at        TIMESTAMPTZ,
    revocation_reason TEXT,
    renewed_from      TEXT,
    transaction_id    TEXT NOT NULL,
    sender_nonce      TEXT NOT NULL,
    der               BYTEA NOT NULL,
    issued_at         TIMESTAMPTZ NOT NULL,
    UNIQUE (transaction_id, sender_nonce)
);
CREATE INDEX certificates_enrollment ON certificates (enrollment_id);
CREATE INDEX certificates_transaction ON certificates (transaction_id);
