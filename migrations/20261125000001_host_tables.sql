-- projection-host's own tables. They live in the `projection_host` schema so that they never
-- collide with the event store or with read models. The events table itself is not touched.

-- A replica set: a group of projections that scale together over a fixed number of partitions.
CREATE TABLE IF NOT EXISTS projection_host.replica_sets (
    name          TEXT PRIMARY KEY,
    partitions    INT NOT NULL CHECK (partitions BETWEEN 1 AND 4096),
    -- Bumped on every change of assignment; recorded in `generations`.
    generation    BIGINT NOT NULL DEFAULT 0,
    strategy      TEXT NOT NULL DEFAULT 'cooperative' CHECK (strategy IN ('cooperative', 'recreate')),
    -- `recreate` only: 'stopping' while the owners of the previous generation release.
    phase         TEXT NOT NULL DEFAULT 'running' CHECK (phase IN ('running', 'stopping')),
    -- The worker that computes assignments, and until when its lease holds (database clock).
    leader        TEXT,
    leader_until  TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Live members of a replica set. A row is removed on graceful shutdown, or by the leader once
-- its heartbeat is older than the stale-worker timeout.
CREATE TABLE IF NOT EXISTS projection_host.workers (
    replica_set   TEXT NOT NULL REFERENCES projection_host.replica_sets (name) ON DELETE CASCADE,
    worker_id     TEXT NOT NULL,
    -- A fresh id per process, so that a restart with the same worker id is told apart.
    incarnation   UUID NOT NULL,
    hostname      TEXT NOT NULL,
    pod_namespace TEXT,
    host_version  TEXT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, worker_id)
);

-- One row per logical partition. `assigned_to` is the leader's plan; `owner` is who holds it
-- now. Every claim increments `epoch`, the fencing token every batch commit checks.
CREATE TABLE IF NOT EXISTS projection_host.partitions (
    replica_set         TEXT NOT NULL REFERENCES projection_host.replica_sets (name) ON DELETE CASCADE,
    partition           INT NOT NULL,
    assigned_to         TEXT,
    assigned_generation BIGINT NOT NULL DEFAULT 0,
    owner               TEXT,
    epoch               BIGINT NOT NULL DEFAULT 0,
    claimed_at          TIMESTAMPTZ,
    released_at         TIMESTAMPTZ,
    PRIMARY KEY (replica_set, partition)
);

-- History of generations, for operators and for the logs.
CREATE TABLE IF NOT EXISTS projection_host.generations (
    replica_set  TEXT NOT NULL REFERENCES projection_host.replica_sets (name) ON DELETE CASCADE,
    generation   BIGINT NOT NULL,
    leader       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    workers      TEXT[] NOT NULL,
    moved        INT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, generation)
);

-- Progress of each projection in each partition: every event of that partition with
-- global_position <= position has been applied.
CREATE TABLE IF NOT EXISTS projection_host.checkpoints (
    replica_set  TEXT NOT NULL,
    projection   TEXT NOT NULL,
    partition    INT NOT NULL,
    position     BIGINT NOT NULL DEFAULT 0,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, projection, partition)
);

-- One row per committed batch: who applied which range with which plugin build.
CREATE TABLE IF NOT EXISTS projection_host.batches (
    id             BIGSERIAL PRIMARY KEY,
    replica_set    TEXT NOT NULL,
    projection     TEXT NOT NULL,
    worker_id      TEXT NOT NULL,
    partitions     INT[] NOT NULL,
    epochs         BIGINT[] NOT NULL,
    from_position  BIGINT NOT NULL,
    to_position    BIGINT NOT NULL,
    events         INT NOT NULL,
    plugin_version TEXT NOT NULL,
    plugin_sha256  TEXT NOT NULL,
    -- The clock at the end of the batch (not its start), just before COMMIT.
    committed_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS batches_projection_idx
    ON projection_host.batches (replica_set, projection, committed_at);
-- "Which batch (and plugin build) applied position X?"
CREATE INDEX IF NOT EXISTS batches_position_idx
    ON projection_host.batches (projection, to_position);

-- Positions the reader passed without an event, in ranges: each was proven final (no
-- transaction that could still commit it was alive) before it was passed.
CREATE TABLE IF NOT EXISTS projection_host.holes (
    from_position BIGINT PRIMARY KEY,
    to_position   BIGINT NOT NULL,
    observed_at   TIMESTAMPTZ NOT NULL,
    passed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    waited_ms     BIGINT NOT NULL,
    reason        TEXT NOT NULL
);
