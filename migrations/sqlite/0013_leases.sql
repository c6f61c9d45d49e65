-- Cluster leases: background work that must run once for the cluster, not once per node (the
-- reconciler's periodic full pass, each LDAP provider's sync, purges). A node holds a lease
-- until expires_at (Unix milliseconds by the holder's clock); another node takes it only after
-- that, so work moves on when its holder dies.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    acquired_at BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
