-- The schema readers query for each projection of a replica set: its stable name. A schema
-- name is claimed by one replica set only (the UNIQUE constraint), in the transaction that
-- registers the set's first version of the projection; the first set gets the projection's own
-- name, any other `<projection>__<set>`. What PostgreSQL enforces is the schema's owner (the
-- projection's role of that set); this table is what lets the host say who holds a name and
-- move it between sets (`replica-sets switch-readers`).
CREATE TABLE IF NOT EXISTS projection_host.read_models (
    replica_set   TEXT NOT NULL,
    projection    TEXT NOT NULL,
    stable_schema TEXT NOT NULL UNIQUE,
    claimed_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, projection)
);

-- Deployments of earlier releases used the projection's name in every replica set: the set
-- that registered the projection first keeps it.
INSERT INTO projection_host.read_models (replica_set, projection, stable_schema)
SELECT DISTINCT ON (projection) replica_set, projection, projection
  FROM projection_host.plugins
 ORDER BY projection, created_at
ON CONFLICT DO NOTHING;
