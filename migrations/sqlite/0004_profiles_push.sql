-- Keys the broker signs with besides the CA, each with a certificate the CA issued: today the
-- configuration-profile signer. The key is sealed with the master key.
CREATE TABLE signing_keys (
    purpose     TEXT PRIMARY KEY,
    certificate BLOB NOT NULL,
    sealed_key  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

-- The APNs push certificate (MDM topic) and its sealed key. One is active: a new import
-- replaces it, since devices enrolled under another topic cannot be woken with it anyway.
CREATE TABLE push_certificates (
    topic       TEXT PRIMARY KEY,
    certificate BLOB NOT NULL,
    sealed_key  TEXT NOT NULL,
    not_after   TEXT NOT NULL,
    imported_at TEXT NOT NULL
);
