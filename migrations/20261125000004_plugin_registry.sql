-- The plugin registry: which component bytes each projection runs, agreed by the whole fleet.
--   active    what every host runs for the projection (one per projection)
--   building  a rebuild (blue/green) catching up beside the active one (at most one)
--   pending   registered, not running (pushed with activation deferred)
--   retired   ran before; kept for audit and rollback
CREATE TABLE IF NOT EXISTS projection_host.plugins (
    replica_set   TEXT NOT NULL,
    projection    TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    version       TEXT NOT NULL,
    interface     TEXT NOT NULL,
    wasm          BYTEA NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'building', 'active', 'retired')),
    mode          TEXT NOT NULL CHECK (mode IN ('continue', 'rebuild')),
    -- The checkpoint key of the read model this version writes (shared by continue swaps).
    track         TEXT NOT NULL,
    -- The schema that holds that read model.
    namespace     TEXT NOT NULL,
    source        TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    activated_at  TIMESTAMPTZ,
    retired_at    TIMESTAMPTZ,
    PRIMARY KEY (replica_set, projection, sha256)
);
CREATE UNIQUE INDEX IF NOT EXISTS plugins_one_active
    ON projection_host.plugins (replica_set, projection) WHERE state = 'active';
CREATE UNIQUE INDEX IF NOT EXISTS plugins_one_building
    ON projection_host.plugins (replica_set, projection) WHERE state = 'building';

-- Swaps are ordered per partition: each activation gets the generation it created, and a
-- checkpoint remembers the newest build that wrote it, so an older build can never commit
-- after a newer one on the same partition (while it may finish its work until the newer one is
-- ready on its host).
ALTER TABLE projection_host.plugins ADD COLUMN IF NOT EXISTS activated_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE projection_host.checkpoints ADD COLUMN IF NOT EXISTS build_generation BIGINT NOT NULL DEFAULT 0;
