//! `migrate` and `status`: the commands that work on the database directly.

use std::fmt::Write as _;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::DatabaseArgs;
use crate::db::{DbConfig, QualifiedName};

pub(crate) async fn pool(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let url = crate::config::database_url(args)?;
    let config = DbConfig {
        url,
        max_connections: 2,
        idle_in_transaction_timeout: std::time::Duration::from_secs(60),
        application_name: "projection-host cli".into(),
        search_path: None,
    };
    Ok(config.connect_pool().await?)
}

/// Creates or upgrades the host's tables; optionally installs the NOTIFY trigger.
pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let pool = pool(&args.database).await?;
    crate::db::migrate(&pool).await?;
    println!(
        "host tables are up to date (schema {})",
        crate::db::HOST_SCHEMA
    );
    if args.install_notify_trigger {
        let table: QualifiedName = args
            .events_table
            .parse()
            .map_err(|e: String| anyhow::anyhow!("invalid EVENTS_TABLE: {e}"))?;
        install_notify_trigger(&pool, &table).await?;
        println!("installed trigger projection_host_notify on {table}: hosts wake up on NOTIFY projection_host_events");
    }
    Ok(())
}

/// One NOTIFY per inserting statement (not per row), fired at commit.
pub async fn install_notify_trigger(pool: &PgPool, table: &QualifiedName) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION projection_host.notify_new_events() RETURNS trigger
         LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('projection_host_events', ''); RETURN NULL; END $$",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::raw_sql(&format!(
        "DROP TRIGGER IF EXISTS projection_host_notify ON {table};
         CREATE TRIGGER projection_host_notify AFTER INSERT ON {table}
         FOR EACH STATEMENT EXECUTE FUNCTION projection_host.notify_new_events()"
    ))
    .execute(&mut *tx)
    .await
    .with_context(|| format!("installing the trigger on {table}"))?;
    tx.commit().await?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub replica_set: String,
    pub partitions: i32,
    pub generation: i64,
    pub strategy: crate::store::replica_sets::Strategy,
    pub phase: crate::store::replica_sets::Phase,
    pub leader: Option<String>,
    pub head: i64,
    pub workers: Vec<WorkerRow>,
    pub partition_owners: Vec<PartitionRow>,
    pub projections: Vec<ProjectionRow>,
    /// Partitions halted at a failing event (stop policy).
    pub halts: Vec<HaltRow>,
    /// Projections paused by an operator.
    pub paused: Vec<PausedRow>,
    /// Parked events per projection (dead-letter policy).
    pub dead_letters: Vec<DeadLetterCount>,
    /// Checkpoints of an earlier partitioning still in use (after a resize or an import).
    pub carried: Vec<CarriedRow>,
}

pub use crate::store::carried::Summary as CarriedRow;

pub use crate::store::controls::Paused as PausedRow;
pub use crate::store::dead_letters::Count as DeadLetterCount;
pub use crate::store::halts::Row as HaltRow;

pub use crate::store::checkpoints::Progress as ProjectionRow;
pub use crate::store::partitions::Row as PartitionRow;
pub use crate::store::workers::Row as WorkerRow;

/// Reads the replica set's state from the database.
pub async fn load(
    pool: &PgPool,
    replica_set: &str,
    events: &QualifiedName,
) -> anyhow::Result<Status> {
    let overview = crate::store::replica_sets::overview(pool, replica_set)
        .await
        .map_err(|e| match crate::base::sqlstate::of(&e).as_deref() {
            Some(crate::base::sqlstate::UNDEFINED_TABLE) => anyhow::anyhow!(
                "this database has no projection host tables yet: run `projection-host migrate` (or start a host) against it, or check DATABASE_URL"
            ),
            _ => anyhow::Error::new(e).context("reading the replica set"),
        })?;
    let crate::store::replica_sets::Overview {
        partitions,
        generation,
        strategy,
        phase,
        leader,
    } = overview.with_context(|| {
        format!("replica set '{replica_set}' does not exist (no host has joined it yet)")
    })?;
    let head = crate::source::stream_head(pool, events)
        .await
        .with_context(|| format!("reading the head of {events}"))?;
    let workers = crate::store::workers::list(pool, replica_set).await?;
    let partition_owners = crate::store::partitions::list(pool, replica_set).await?;
    let projections =
        crate::store::checkpoints::progress(pool, replica_set, head, i64::from(partitions)).await?;
    let halts = crate::store::halts::list(pool, replica_set).await?;
    let paused = crate::store::controls::paused(pool, replica_set).await?;
    let dead_letters = crate::store::dead_letters::counts(pool, replica_set).await?;
    let carried = crate::store::carried::summaries(pool, replica_set).await?;
    Ok(Status {
        carried,
        halts,
        paused,
        dead_letters,
        replica_set: replica_set.to_string(),
        partitions,
        generation,
        strategy,
        phase,
        leader,
        head,
        workers,
        partition_owners,
        projections,
    })
}

pub async fn print(args: StatusArgs) -> anyhow::Result<()> {
    let pool = pool(&args.database).await?;
    let events: QualifiedName = args
        .events_table
        .parse()
        .map_err(|e: String| anyhow::anyhow!("invalid EVENTS_TABLE: {e}"))?;
    let status = load(&pool, &args.replica_set, &events).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print!("{}", render(&status));
    Ok(())
}

fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replica set {}: generation {}, {} partitions, strategy {}, phase {}, leader {}, stream head {}",
        s.replica_set,
        s.generation,
        s.partitions,
        s.strategy,
        s.phase,
        s.leader.as_deref().unwrap_or("-"),
        s.head
    );
    let _ = writeln!(out, "\nworkers ({}):", s.workers.len());
    for w in &s.workers {
        let _ = writeln!(
            out,
            "  {:<32} partitions {:>4}  heartbeat {:>6}ms ago  host {}  v{}",
            w.worker_id, w.partitions, w.heartbeat_age_ms, w.hostname, w.host_version
        );
    }
    let _ = writeln!(
        out,
        "\npartitions (owner@epoch, -> planned owner when it differs):"
    );
    for p in &s.partition_owners {
        let owner = p.owner.as_deref().unwrap_or("(unowned)");
        let planned = match (&p.assigned_to, &p.owner) {
            (Some(a), Some(o)) if a == o => String::new(),
            (Some(a), _) => format!("  -> {a}"),
            (None, _) => "  -> (unassigned)".into(),
        };
        let _ = writeln!(out, "  p{:<4} {owner}@e{}{planned}", p.partition, p.epoch);
    }
    let _ = writeln!(out, "\nprojections:");
    for p in &s.projections {
        let mut flags = String::new();
        if let Some(paused) = s.paused.iter().find(|x| x.projection == p.projection) {
            let _ = write!(
                flags,
                "  PAUSED since {}{}",
                paused.since.to_rfc3339(),
                paused
                    .reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(" ({r})"))
            );
        }
        let halted = s
            .halts
            .iter()
            .filter(|h| h.projection == p.projection)
            .count();
        if halted > 0 {
            let _ = write!(flags, "  HALTED partitions: {halted}");
        }
        if let Some(parked) = s.dead_letters.iter().find(|d| d.projection == p.projection) {
            let _ = write!(flags, "  dead letters: {}", parked.events);
        }
        for c in s.carried.iter().filter(|c| c.projection == p.projection) {
            let _ = write!(
                flags,
                "  carried checkpoints up to {} ({})",
                c.highest, c.origin
            );
        }
        let _ = writeln!(
            out,
            "  {:<24} checkpoints {}..{}  lag {} positions  last commit {}{flags}",
            p.projection,
            p.lowest_checkpoint,
            p.highest_checkpoint,
            p.lag_positions,
            p.last_commit.map_or("-".into(), |t| t.to_rfc3339())
        );
    }
    if !s.halts.is_empty() {
        let _ = writeln!(
            out,
            "\nhalted partitions (fix the cause, then `projection-host resume PROJECTION`):"
        );
        for h in &s.halts {
            let _ = writeln!(
                out,
                "  {:<24} p{:<4} at position {}  since {}: {}",
                h.projection,
                h.partition,
                h.position,
                h.halted_at.to_rfc3339(),
                crate::base::text::plugin_message(&h.error)
            );
        }
    }
    if !s.dead_letters.is_empty() {
        let _ = writeln!(out, "\ndead letters (`projection-host dead-letters list`):");
        for d in &s.dead_letters {
            let _ = writeln!(
                out,
                "  {:<24} {} parked, oldest {}",
                d.projection,
                d.events,
                d.oldest.to_rfc3339()
            );
        }
    }
    out
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Also install an `AFTER INSERT ... FOR EACH STATEMENT` trigger on the events table that
    /// wakes hosts with NOTIFY. It changes the user's table, so it is opt-in.
    #[arg(long)]
    pub install_notify_trigger: bool,
    /// The events table (optionally schema-qualified).
    #[arg(long, env = "EVENTS_TABLE", default_value = "events")]
    pub events_table: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[arg(long, env = "REPLICA_SET", default_value = "default")]
    pub replica_set: String,
    #[arg(long, env = "EVENTS_TABLE", default_value = "events")]
    pub events_table: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
