-- Events a projection could not apply, parked under the dead-letter policy, with every later
-- event of the same aggregate (so that each aggregate's order is kept).
CREATE TABLE IF NOT EXISTS projection_host.dead_letters (
    id               BIGSERIAL PRIMARY KEY,
    replica_set      TEXT NOT NULL,
    projection       TEXT NOT NULL,
    partition        INT NOT NULL,
    position         BIGINT NOT NULL,
    aggregate_id     TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    error            TEXT NOT NULL,
    parked_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- An operator asked to apply the aggregate's parked events again.
    retry_requested  BOOLEAN NOT NULL DEFAULT false,
    attempts         INT NOT NULL DEFAULT 0,
    UNIQUE (replica_set, projection, position)
);
CREATE INDEX IF NOT EXISTS dead_letters_aggregate_idx
    ON projection_host.dead_letters (replica_set, projection, partition, aggregate_id, position);

-- Partitions halted under the stop policy: the checkpoint stays before `position` until an
-- operator resumes the projection.
CREATE TABLE IF NOT EXISTS projection_host.halts (
    replica_set  TEXT NOT NULL,
    projection   TEXT NOT NULL,
    partition    INT NOT NULL,
    position     BIGINT NOT NULL,
    error        TEXT NOT NULL,
    halted_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, projection, partition)
);
