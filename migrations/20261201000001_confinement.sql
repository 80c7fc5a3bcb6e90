-- Confinement of plugin SQL by PostgreSQL's own privileges (docs/architecture.md, "Confinement").
--
-- Plugin SQL runs in a session whose session user is the projection's own LOGIN role. That role
-- has no privilege on this schema; the host's bookkeeping inside a batch transaction (checkpoints,
-- the batch audit, parked events) goes through the SECURITY DEFINER functions of
-- `projection_host_api`, which only the host can call successfully: each call carries the host
-- process's secret commit token, whose hash is stored with the worker and which never reaches the
-- plugin's session in a form it can read.

-- Row locks that serialise the host's own critical sections across hosts. Advisory locks are not
-- used for this: any session, a plugin's included, can take any advisory lock key.
CREATE TABLE IF NOT EXISTS projection_host.locks (
    name TEXT PRIMARY KEY
);

-- sha256 of the process's commit token (see above).
ALTER TABLE projection_host.workers ADD COLUMN IF NOT EXISTS commit_token BYTEA;

-- One LOGIN role per projection of a replica set, with the secret the host logs in with.
CREATE TABLE IF NOT EXISTS projection_host.projection_roles (
    role_name   TEXT PRIMARY KEY,
    replica_set TEXT NOT NULL,
    projection  TEXT NOT NULL,
    secret      TEXT NOT NULL,
    rotated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (replica_set, projection)
);

CREATE SCHEMA IF NOT EXISTS projection_host_api;
REVOKE ALL ON SCHEMA projection_host_api FROM PUBLIC;

-- Raises unless the caller is the host process that owns the batch (token) working for the
-- projection this session belongs to.
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
END $$;
REVOKE ALL ON FUNCTION projection_host.authorize_batch(TEXT, TEXT, TEXT, TEXT) FROM PUBLIC;

-- Checkpoints and the audit row of one batch, only if the worker still owns every partition at
-- the epoch it claimed it with (the rows are locked FOR SHARE, so a concurrent claim waits for
-- this transaction), and only if the build is still the one registered for the read model.
CREATE OR REPLACE FUNCTION projection_host_api.commit_batch(
    p_replica_set TEXT, p_worker TEXT, p_token TEXT, p_track TEXT,
    p_partitions INT[], p_epochs BIGINT[], p_from BIGINT, p_to BIGINT, p_events INT,
    p_plugin_version TEXT, p_plugin_sha256 TEXT, p_build_generation BIGINT,
    OUT held BOOLEAN, OUT current_build BOOLEAN
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM projection_host.authorize_batch(p_replica_set, p_worker, p_token, p_track);
    WITH claimed AS (
        SELECT o.partition, o.epoch FROM unnest(p_partitions, p_epochs) AS o(partition, epoch)
    ), fence AS (
        SELECT p.partition
          FROM projection_host.partitions p
          JOIN claimed c ON c.partition = p.partition AND c.epoch = p.epoch
         WHERE p.replica_set = p_replica_set AND p.owner = p_worker
           FOR SHARE OF p
    ), track AS (
        -- The read model is still run (a promoted rebuild retires the old one's whole track) ...
        SELECT 1 FROM projection_host.plugins
         WHERE replica_set = p_replica_set AND track = p_track AND state IN ('active', 'building')
           FOR SHARE
    ), current AS (
        -- ... by this build or a newer one that has not yet written these partitions. Read models
        -- without a registry entry (library use) are not version-fenced.
        SELECT NOT EXISTS (SELECT 1 FROM projection_host.plugins WHERE replica_set = p_replica_set AND track = p_track)
            OR (EXISTS (SELECT 1 FROM track)
                AND EXISTS (SELECT 1 FROM projection_host.plugins
                             WHERE replica_set = p_replica_set AND track = p_track AND sha256 = p_plugin_sha256)
                AND NOT EXISTS (SELECT 1 FROM projection_host.checkpoints
                                 WHERE replica_set = p_replica_set AND projection = p_track
                                   AND partition = ANY(p_partitions) AND build_generation > p_build_generation)) AS ok
    ), guard AS (
        SELECT count(*) = cardinality(p_partitions) AND (SELECT ok FROM current) AS held,
               (SELECT ok FROM current) AS current_build
          FROM fence
    ), checkpoint AS (
        INSERT INTO projection_host.checkpoints AS c
               (replica_set, projection, partition, position, updated_at, build_generation)
        SELECT p_replica_set, p_track, claimed.partition, p_to, now(), p_build_generation
          FROM claimed, guard WHERE guard.held
        ON CONFLICT (replica_set, projection, partition)
        DO UPDATE SET position = GREATEST(c.position, EXCLUDED.position), updated_at = EXCLUDED.updated_at,
                      build_generation = GREATEST(c.build_generation, EXCLUDED.build_generation)
        RETURNING 1
    ), audit AS (
        INSERT INTO projection_host.batches
            (replica_set, projection, worker_id, partitions, epochs, from_position, to_position,
             events, plugin_version, plugin_sha256)
        SELECT p_replica_set, p_track, p_worker, p_partitions, p_epochs, p_from, p_to, p_events,
               p_plugin_version, p_plugin_sha256
          FROM guard WHERE guard.held
        RETURNING 1
    )
    -- The data-modifying CTEs run to completion whether or not this reads them.
    SELECT g.held, g.current_build INTO held, current_build FROM guard g;
END $$;

-- Parks events under the dead-letter policy, inside the batch transaction. A follower of an
-- aggregate whose retry was requested joins that retry.
CREATE OR REPLACE FUNCTION projection_host_api.park_dead_letters(
    p_replica_set TEXT, p_worker TEXT, p_token TEXT, p_track TEXT,
    p_partitions INT[], p_positions BIGINT[], p_aggregates TEXT[], p_event_types TEXT[], p_errors TEXT[]
) RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM projection_host.authorize_batch(p_replica_set, p_worker, p_token, p_track);
    INSERT INTO projection_host.dead_letters
           (replica_set, projection, partition, position, aggregate_id, event_type, error, retry_requested)
    SELECT p_replica_set, p_track, x.p, x.pos, x.agg, x.et, x.err,
           EXISTS (SELECT 1 FROM projection_host.dead_letters d
                    WHERE d.replica_set = p_replica_set AND d.projection = p_track
                      AND d.aggregate_id = x.agg AND d.retry_requested)
      FROM unnest(p_partitions, p_positions, p_aggregates, p_event_types, p_errors) AS x(p, pos, agg, et, err)
    ON CONFLICT (replica_set, projection, position) DO NOTHING;
END $$;

-- Removes parked events that were applied again, inside the replay's transaction.
CREATE OR REPLACE FUNCTION projection_host_api.unpark_dead_letters(
    p_replica_set TEXT, p_worker TEXT, p_token TEXT, p_track TEXT, p_ids BIGINT[]
) RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM projection_host.authorize_batch(p_replica_set, p_worker, p_token, p_track);
    DELETE FROM projection_host.dead_letters
     WHERE replica_set = p_replica_set AND projection = p_track AND id = ANY(p_ids);
END $$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA projection_host_api FROM PUBLIC;
