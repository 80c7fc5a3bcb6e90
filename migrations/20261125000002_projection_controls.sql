-- Operator controls per projection, shared by every host of the replica set.
CREATE TABLE IF NOT EXISTS projection_host.projection_controls (
    replica_set  TEXT NOT NULL,
    projection   TEXT NOT NULL,
    paused       BOOLEAN NOT NULL DEFAULT false,
    reason       TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (replica_set, projection)
);
