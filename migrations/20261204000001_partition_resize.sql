-- Changing a replica set's partition count, and adopting checkpoints of another partitioning
-- (the Go lineage's), without replaying what was applied.

-- What a host of this release understands about a replica set, beyond its version string:
-- 2 = it notices a resize and joins again, its claims carry its partition count, and it honours
-- carried checkpoints. A resize is refused while a live host of an older release (1, the default
-- its registrations leave) could claim a partition of the new layout.
ALTER TABLE projection_host.workers ADD COLUMN IF NOT EXISTS protocol INT NOT NULL DEFAULT 1;

-- The count before the last resize: hosts still configured with it (a rollout in progress)
-- start with a warning instead of an error.
ALTER TABLE projection_host.replica_sets ADD COLUMN IF NOT EXISTS previous_partitions INT;

-- Checkpoints of an earlier partitioning of a read model, kept while they still say more than
-- the current ones: an event was applied when its position is at or below the checkpoint of
-- its partition under that partitioning (`positions[1 + fnv1a_32(aggregate_id) mod
-- partitions]`). A resize or an import starts every new partition at the lowest checkpoint
-- that covers it, and the worker skips, between there and the highest, the events a row here
-- says were applied. A row is dropped once every checkpoint of the read model passed its
-- highest position.
CREATE TABLE IF NOT EXISTS projection_host.carried_checkpoints (
    id          BIGSERIAL PRIMARY KEY,
    replica_set TEXT NOT NULL,
    projection  TEXT NOT NULL,
    partitions  INT NOT NULL CHECK (partitions >= 1),
    positions   BIGINT[] NOT NULL CHECK (cardinality(positions) = partitions),
    -- Where the partitioning came from: "resize 32 -> 24", "import of pupsourcing ...".
    origin      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS carried_checkpoints_projection_idx
    ON projection_host.carried_checkpoints (replica_set, projection);

-- A read model adopted by `projection-host import` keeps its old name as a view, for readers.
-- Writes through it (a Go worker of the old deployment still running) are refused: the host
-- writes the table itself.
CREATE OR REPLACE FUNCTION projection_host.refuse_write_to_adopted_view() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION '%.% is a read-only view of a read model that projection-host maintains now (%); stop the writer of the old deployment',
        TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = '42501';
END $$;

-- Read-model tables `projection-host import` took over: where each came from, so that
-- `import --rollback` can put it back as it was.
CREATE TABLE IF NOT EXISTS projection_host.adopted_tables (
    replica_set  TEXT NOT NULL,
    projection   TEXT NOT NULL,
    from_schema  TEXT NOT NULL,
    from_name    TEXT NOT NULL,
    to_schema    TEXT NOT NULL,
    to_name      TEXT NOT NULL,
    owner        TEXT NOT NULL,
    adopted_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, projection, to_schema, to_name)
);

-- A read model's readers (a view of an adopted table, direct readers, an operator's ad-hoc
-- SELECT) run its row-level security policies as themselves: a policy the projection wrote is
-- code of the plugin's choosing run with the reader's rights. A projection's session may not
-- keep tables with row-level security (enabled or forced) or policies; the batch is refused
-- and rolls back with them. Same function as in 20261201000001_confinement.sql, plus that check.
CREATE OR REPLACE FUNCTION projection_host.authorize_batch(
    p_replica_set TEXT, p_worker TEXT, p_token TEXT, p_track TEXT
) RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_projection TEXT;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM projection_host.workers w
         WHERE w.replica_set = p_replica_set AND w.worker_id = p_worker
           AND w.commit_token = sha256(convert_to(p_token, 'UTF8'))
    ) THEN
        RAISE EXCEPTION 'only the projection host may record batches (the commit token does not match worker %)', p_worker
            USING ERRCODE = '42501';
    END IF;
    -- The host's own role may record any projection's batch (SQL_ISOLATION=none); a projection's
    -- session only its own.
    IF has_table_privilege(session_user, 'projection_host.checkpoints', 'UPDATE') THEN
        RETURN;
    END IF;
    SELECT coalesce((SELECT p.projection FROM projection_host.plugins p
                      WHERE p.replica_set = p_replica_set AND p.track = p_track LIMIT 1), p_track)
      INTO v_projection;
    IF NOT EXISTS (
        SELECT 1 FROM projection_host.projection_roles r
         WHERE r.role_name = session_user AND r.replica_set = p_replica_set AND r.projection = v_projection
    ) THEN
        RAISE EXCEPTION 'session user % may not record batches of %', session_user, p_track
            USING ERRCODE = '42501';
    END IF;
    -- Large objects live outside every schema; a projection's session may not keep any.
    IF EXISTS (SELECT 1 FROM pg_largeobject_metadata m JOIN pg_roles r ON r.oid = m.lomowner
                WHERE r.rolname = session_user) THEN
        RAISE EXCEPTION 'projection % created large objects, which live outside its schema; they are not allowed', v_projection
            USING ERRCODE = '42501';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
                WHERE r.rolname = session_user
                  AND (c.relrowsecurity OR c.relforcerowsecurity
                       OR EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid))) THEN
        RAISE EXCEPTION 'projection % put row-level security on its tables, whose policies would run as every reader; it is not allowed', v_projection
            USING ERRCODE = '42501';
    END IF;
END $$;
REVOKE ALL ON FUNCTION projection_host.authorize_batch(TEXT, TEXT, TEXT, TEXT) FROM PUBLIC;
