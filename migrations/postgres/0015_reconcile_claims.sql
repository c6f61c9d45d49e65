-- Reconcile requests are claimed, not deleted, by the node that serves them: claimed_by names
-- the node (as in leases) and claimed_until (Unix milliseconds by its clock) is when another
-- node may take the request over. The request is deleted once served; a node killed while
-- serving leaves its claims to run out, so no trigger is lost with it.
ALTER TABLE reconcile_requests ADD COLUMN claimed_by TEXT;
ALTER TABLE reconcile_requests ADD COLUMN claimed_until BIGINT NOT NULL DEFAULT 0;
CREATE INDEX reconcile_requests_claimable ON reconcile_requests (claimed_until, id);
