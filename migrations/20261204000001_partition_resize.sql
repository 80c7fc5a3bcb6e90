-- Changing a replica set's partition count, and adopting checkpoints of another partitioning
-- (the Go lineage's), without replaying what was applied.

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
