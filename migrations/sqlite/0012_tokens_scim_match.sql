-- Two small additions: deleting token integrations with app-client use (tokens), and the
-- lookups SCIM matching by userName or e-mail needs and the search keys SCIM list filters use
-- in SQL (scim).

-- App-config tokens, continued: an integration can be deleted (kept as a row with
-- `deleted_at`, its tokens and clients revoked, so history stays; creating the name again
-- revives the row), and each app client records when it last validated (written at most
-- once a minute per client, off the request path).
ALTER TABLE token_integrations ADD COLUMN deleted_at TEXT;
ALTER TABLE token_integrations ADD COLUMN deleted_by TEXT;
ALTER TABLE app_clients ADD COLUMN last_used_at TEXT;

-- SCIM under `scim_match = "user_name"` or `"email"` finds a provider's person by login or
-- e-mail, compared without case.
CREATE INDEX users_login_key ON users (provider, LOWER(login));
CREATE INDEX users_email_key ON users (provider, LOWER(email));

-- SCIM list filters narrowed in SQL (eq/sw/co): lower-cased search keys made by the broker
-- (the same lower-casing the filter evaluator applies). NULL for rows written before this
-- migration: such rows are always candidates, and get their keys at their next write.
-- emails_key holds every e-mail value, each between newlines.
ALTER TABLE scim_users ADD COLUMN display_name_key TEXT;
ALTER TABLE scim_users ADD COLUMN emails_key TEXT;
ALTER TABLE scim_groups ADD COLUMN display_name_key TEXT;
CREATE INDEX scim_users_display_name ON scim_users (provider, display_name_key);
CREATE INDEX scim_groups_display_name ON scim_groups (provider, display_name_key);
