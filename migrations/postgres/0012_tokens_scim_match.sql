-- Two small additions: deleting token integrations with app-client use (tokens), and the
-- lookups SCIM matching by userName or e-mail needs (scim).

-- App-config tokens, continued: an integration can be deleted (kept as a row with
-- `deleted_at`, its tokens and clients revoked, so history stays; creating the name again
-- revives the row), and each app client records when it last validated (written at most
-- once a minute per client, off the request path).
ALTER TABLE token_integrations ADD COLUMN deleted_at TIMESTAMPTZ;
ALTER TABLE token_integrations ADD COLUMN deleted_by TEXT;
ALTER TABLE app_clients ADD COLUMN last_used_at TIMESTAMPTZ;

-- SCIM under `scim_match = "user_name"` or `"email"` finds a provider's person by login or
-- e-mail, compared without case.
CREATE INDEX users_login_key ON users (provider, LOWER(login));
CREATE INDEX users_email_key ON users (provider, LOWER(email));
