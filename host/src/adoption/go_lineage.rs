//! What a Go-lineage deployment left in the database: its checkpoints, in the tables the Go
//! libraries create (names configurable, as they are there), and whether its workers still run.
//!
//! - pupsourcing v1 processors and pupsourcing-orchestrator: `projection_checkpoints
//!   (projection_name, last_global_position)`, one row `<name>` when there is one partition, else
//!   one row `<name>_p<k>` per partition k; the orchestrator records the partition count of each
//!   generation in `orchestrator_generations.total_partitions` and its workers' heartbeats in
//!   `orchestrator_workers`.
//! - pupsourcing/core: `consumer_segments (consumer_name, segment_id, total_segments, owner_id,
//!   checkpoint)` and heartbeats in `consumer_workers`.
//!
//! Every Go library routes an event to partition `fnv1a_32(aggregate_id) mod count` (the same
//! function as this host) and advances a partition's checkpoint only past the events it handled,
//! so an event was handled exactly when its position is at or below its partition's checkpoint.
//! That is "applied exactly" when the handlers write in the checkpoint's transaction
//! (pupsourcing/core); v1 processors and the orchestrator hand the handler no transaction, so
//! a batch cut short may have applied events above the checkpoint (docs/migrating.md says how
//! to stop them so that it is not).

use std::time::Duration;

use sqlx::PgConnection;

use crate::db::QualifiedName;

/// Which Go system wrote the checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum GoSystem {
    /// pupsourcing v1 processors, partitioned by hand (TOTAL_PARTITIONS) or not at all.
    Processor,
    /// pupsourcing-orchestrator (its generations table gives the partition count).
    Orchestrator,
    /// pupsourcing/core workers (consumer segments).
    Core,
}

/// The Go tables, as named in the deployment.
#[derive(Debug, Clone)]
pub struct GoTables {
    pub checkpoints: QualifiedName,
    pub generations: QualifiedName,
    pub workers: QualifiedName,
    pub segments: QualifiedName,
    pub segment_workers: QualifiedName,
}

/// What to read.
#[derive(Debug, Clone)]
pub struct GoDeployment {
    pub system: GoSystem,
    pub tables: GoTables,
    /// The projection's (or consumer's) name in the Go code.
    pub name: String,
    /// The orchestrator's replica set.
    pub replica_set: String,
    /// The partition count of a processor deployment (TOTAL_PARTITIONS), or a check of the
    /// orchestrator's.
    pub partitions: Option<u32>,
    /// A Go worker whose heartbeat is younger than this is running.
    pub stale_timeout: Duration,
}

/// The Go deployment's progress: `positions[k]` for partition k of `positions.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoProgress {
    pub positions: Vec<i64>,
    /// Where the partition count came from.
    pub count_from: String,
    /// The rows read, as `key = position`.
    pub rows: Vec<String>,
    /// Rows of the name that do not belong to the current partitioning (left from an
    /// earlier one); not used.
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error("table {table} does not exist ({hint})")]
    MissingTable { table: String, hint: String },
    #[error("{0}")]
    Inconsistent(String),
    #[error("reading the Go deployment's tables: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The Go processors' checkpoint key of partition `k` of `count`: the projection's name when
/// there is one partition, else `<name>_p<k>` (the count is not part of the key).
fn checkpoint_name(name: &str, count: u32, k: u32) -> String {
    if count == 1 {
        name.to_string()
    } else {
        format!("{name}_p{k}")
    }
}

async fn require(
    conn: &mut PgConnection,
    table: &QualifiedName,
    hint: &str,
) -> Result<(), GoError> {
    if table.resolve(conn).await?.is_none() {
        return Err(GoError::MissingTable {
            table: table.to_string(),
            hint: hint.to_string(),
        });
    }
    Ok(())
}

/// Reads the deployment's checkpoints (with `lock`, locking its rows for the caller's
/// transaction, so that a Go worker still running cannot move them unseen).
pub async fn progress(
    conn: &mut PgConnection,
    go: &GoDeployment,
    lock: bool,
) -> Result<GoProgress, GoError> {
    match go.system {
        GoSystem::Processor | GoSystem::Orchestrator => checkpoint_rows(conn, go, lock).await,
        GoSystem::Core => segment_rows(conn, go, lock).await,
    }
}

async fn checkpoint_rows(
    conn: &mut PgConnection,
    go: &GoDeployment,
    lock: bool,
) -> Result<GoProgress, GoError> {
    let t = &go.tables;
    require(
        conn,
        &t.checkpoints,
        "pass --checkpoints-table with the table the Go processors write",
    )
    .await?;
    let (count, count_from) = match go.system {
        GoSystem::Orchestrator => orchestrator_count(conn, go).await?,
        _ => match go.partitions {
            Some(n) => (n.max(1), "--go-partitions".to_string()),
            None => (1, "no --go-partitions: one partition".to_string()),
        },
    };
    let locking = if lock { " FOR UPDATE" } else { "" };
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT projection_name, last_global_position FROM {}
          WHERE projection_name = $1 OR starts_with(projection_name, $1 || '_p')
          ORDER BY projection_name{locking}",
        t.checkpoints
    ))
    .bind(&go.name)
    .fetch_all(&mut *conn)
    .await?;
    let key = |k: u32| checkpoint_name(&go.name, count, k);
    let mut positions = vec![0i64; count as usize];
    let (mut used, mut ignored) = (Vec::new(), Vec::new());
    for (name, position) in rows {
        match (0..count).find(|k| key(*k) == name) {
            Some(k) => {
                positions[k as usize] = position;
                used.push(format!("{name} = {position}"));
            }
            None => ignored.push(format!("{name} = {position}")),
        }
    }
    if used.is_empty() {
        return Err(GoError::Inconsistent(format!(
            "{} has no checkpoint of projection '{}' under {} partition(s) (expected {}); check --go-name{}",
            t.checkpoints,
            go.name,
            count,
            key(0),
            if ignored.is_empty() {
                String::new()
            } else {
                format!(" and the partition count (rows found: {})", ignored.join(", "))
            }
        )));
    }
    Ok(GoProgress {
        positions,
        count_from,
        rows: used,
        ignored,
    })
}

/// The orchestrator's partition count: its newest generation's, checked against the checkpoint
/// rows' age, or the operator's `--go-partitions`. Returns it with where it came from.
async fn orchestrator_count(
    conn: &mut PgConnection,
    go: &GoDeployment,
) -> Result<(u32, String), GoError> {
    let t = &go.tables;
    require(
        conn,
        &t.generations,
        "pass --generations-table, or --from processor --go-partitions N for processors without the orchestrator",
    )
    .await?;
    let newest: Option<(i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(&format!(
        "SELECT total_partitions, created_at FROM {} WHERE replica_set = $1 ORDER BY created_at DESC LIMIT 1",
        t.generations
    ))
    .bind(&go.replica_set)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((newest, began)) = newest else {
        return Err(GoError::Inconsistent(format!(
            "{} has no generation of replica set '{}' (pass --go-replica-set with the orchestrator's REPLICA_SET)",
            t.generations, go.replica_set
        )));
    };
    let newest = newest.max(1) as u32;
    if let Some(given) = go.partitions {
        // The operator knows better (a generation that never ran, e.g. created by a scale-down
        // that was undone).
        return Ok((
            given.max(1),
            format!(
                "--go-partitions (the newest generation of replica set '{}' in {} says {newest})",
                go.replica_set, t.generations
            ),
        ));
    }
    // A generation is created whenever membership changes; one that never ran leaves the
    // checkpoints of an earlier count under the same names.
    let written_before: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT projection_name FROM {}
          WHERE (projection_name = $1 OR starts_with(projection_name, $1 || '_p'))
            AND updated_at < $2 ORDER BY projection_name",
        t.checkpoints
    ))
    .bind(&go.name)
    .bind(began)
    .fetch_all(&mut *conn)
    .await?;
    let stale: Vec<&str> = written_before
        .iter()
        .map(String::as_str)
        .filter(|n| (0..newest).any(|k| checkpoint_name(&go.name, newest, k) == *n))
        .collect();
    if !stale.is_empty() {
        return Err(GoError::Inconsistent(format!(
            "the checkpoints {} were last written before the newest generation of replica set '{}' ({newest} partitions) began at {began}: \
             that generation may never have run, and they may belong to an earlier partition count. \
             Check the orchestrator's history and pass --go-partitions with the count they were written under",
            stale.join(", "),
            go.replica_set
        )));
    }
    Ok((
        newest,
        format!(
            "the newest generation of replica set '{}' in {}",
            go.replica_set, t.generations
        ),
    ))
}

async fn segment_rows(
    conn: &mut PgConnection,
    go: &GoDeployment,
    lock: bool,
) -> Result<GoProgress, GoError> {
    let t = &go.tables;
    require(
        conn,
        &t.segments,
        "pass --segments-table with the table the core workers write",
    )
    .await?;
    let locking = if lock { " FOR UPDATE" } else { "" };
    let rows: Vec<(i32, i32, i64)> = sqlx::query_as(&format!(
        "SELECT segment_id, total_segments, checkpoint FROM {} WHERE consumer_name = $1 ORDER BY segment_id{locking}",
        t.segments
    ))
    .bind(&go.name)
    .fetch_all(&mut *conn)
    .await?;
    let Some(&(_, total, _)) = rows.first() else {
        return Err(GoError::Inconsistent(format!(
            "{} has no segment of consumer '{}'; check --go-name",
            t.segments, go.name
        )));
    };
    if total < 1 || rows.iter().any(|(_, t, _)| *t != total) {
        return Err(GoError::Inconsistent(format!(
            "the segments of consumer '{}' in {} disagree on total_segments; fix them before importing",
            go.name, t.segments
        )));
    }
    let mut positions = vec![0i64; total as usize];
    let (mut used, mut ignored) = (Vec::new(), Vec::new());
    for (segment, _, checkpoint) in rows {
        match positions.get_mut(segment as usize) {
            Some(slot) if segment >= 0 => {
                *slot = checkpoint;
                used.push(format!("segment {segment} = {checkpoint}"));
            }
            _ => ignored.push(format!("segment {segment} = {checkpoint}")),
        }
    }
    Ok(GoProgress {
        positions,
        count_from: format!("total_segments in {}", t.segments),
        rows: used,
        ignored,
    })
}

/// Go workers of the deployment that still heartbeat (a processor deployment has no registry:
/// `None`).
pub async fn live_workers(
    conn: &mut PgConnection,
    go: &GoDeployment,
) -> Result<Option<Vec<String>>, GoError> {
    let seconds = go.stale_timeout.as_secs_f64();
    let t = &go.tables;
    let live: Vec<String> = match go.system {
        GoSystem::Processor => return Ok(None),
        GoSystem::Orchestrator => {
            require(conn, &t.workers, "pass --workers-table").await?;
            sqlx::query_scalar(&format!(
                "SELECT id::text || ' (' || state || ', heartbeat ' || round(extract(epoch FROM now() - last_heartbeat))::text || ' s ago)'
                   FROM {} WHERE replica_set = $1 AND state <> 'stopped'
                    AND last_heartbeat > now() - $2 * interval '1 second' ORDER BY id",
                t.workers
            ))
            .bind(&go.replica_set)
            .bind(seconds)
            .fetch_all(&mut *conn)
            .await?
        }
        GoSystem::Core => {
            require(conn, &t.segment_workers, "pass --segment-workers-table").await?;
            sqlx::query_scalar(&format!(
                "SELECT worker_id || ' (heartbeat ' || round(extract(epoch FROM now() - last_heartbeat))::text || ' s ago)'
                   FROM {} WHERE consumer_name = $1
                    AND last_heartbeat > now() - $2 * interval '1 second' ORDER BY worker_id",
                t.segment_workers
            ))
            .bind(&go.name)
            .bind(seconds)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    Ok(Some(live))
}

/// Writes `positions` back as the deployment's checkpoints (a rollback: the Go workers continue
/// where the host stopped), in the caller's transaction. `positions` has the deployment's
/// partition count.
pub async fn write_back(
    conn: &mut PgConnection,
    go: &GoDeployment,
    positions: &[i64],
) -> Result<(), GoError> {
    let t = &go.tables;
    match go.system {
        GoSystem::Processor | GoSystem::Orchestrator => {
            let count = positions.len() as u32;
            let names: Vec<String> = (0..count)
                .map(|k| checkpoint_name(&go.name, count, k))
                .collect();
            sqlx::query(&format!(
                "INSERT INTO {} AS c (projection_name, last_global_position, updated_at)
                 SELECT n, p, now() FROM unnest($1::text[], $2::int8[]) AS x(n, p)
                 ON CONFLICT (projection_name) DO UPDATE
                    SET last_global_position = EXCLUDED.last_global_position, updated_at = now()",
                t.checkpoints
            ))
            .bind(&names)
            .bind(positions)
            .execute(&mut *conn)
            .await?;
        }
        GoSystem::Core => {
            let segments: Vec<i32> = (0..positions.len() as i32).collect();
            sqlx::query(&format!(
                "UPDATE {} s SET checkpoint = x.p, owner_id = NULL
                   FROM unnest($2::int[], $3::int8[]) AS x(segment, p)
                  WHERE s.consumer_name = $1 AND s.segment_id = x.segment",
                t.segments
            ))
            .bind(&go.name)
            .bind(&segments)
            .bind(positions)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
