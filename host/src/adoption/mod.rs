//! `import`: adopting a Go-lineage deployment without replaying history. The Go checkpoints map
//! onto this host's partitions exactly (`go_lineage`); the existing read-model tables move into
//! the projection's schema in place, their old names left as views for readers (`tables`).
//!
//! Order: everything that can be refused is checked first and printed as a plan (`--dry-run`
//! stops there). Then the idempotent steps that run nothing (the replica set, the schema's
//! name, the projection's role and schema), then one transaction that locks the set, checks
//! again that no host or Go worker runs, re-reads the Go checkpoints under lock, moves the
//! tables and writes the checkpoints; last, the plugin's registration (a host started with the
//! plugin mounted does the same). Interrupted before the commit, the import can simply run
//! again.

pub mod go_lineage;
mod rollback;
pub mod tables;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::base::units::parse_duration;
use crate::config::DatabaseArgs;
use crate::coordination::membership::{self, Strategy};
use crate::coordination::resize;
use crate::db::QualifiedName;
use crate::lifecycle::{read_models, registry};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::store;
use go_lineage::{GoDeployment, GoProgress, GoSystem, GoTables};
use tables::{Adopt, Found};

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The plugin that takes the projection over (its name is the read model's).
    #[arg(long)]
    pub plugin: std::path::PathBuf,
    /// Which Go system wrote the checkpoints.
    #[arg(long = "from", value_enum)]
    pub system: GoSystem,
    /// The projection's (or core consumer's) name in the Go code (default: the plugin's name).
    #[arg(long)]
    pub go_name: Option<String>,
    /// The Go partition count: TOTAL_PARTITIONS of processors partitioned by hand (default 1);
    /// for the orchestrator, a check of its newest generation's count.
    #[arg(long)]
    pub go_partitions: Option<u32>,
    /// The orchestrator's REPLICA_SET (default: --replica-set).
    #[arg(long)]
    pub go_replica_set: Option<String>,
    /// A Go worker whose heartbeat is younger than this is still running.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub go_stale_timeout: Duration,
    #[arg(long, default_value = "projection_checkpoints")]
    pub checkpoints_table: QualifiedName,
    #[arg(long, default_value = "orchestrator_generations")]
    pub generations_table: QualifiedName,
    #[arg(long, default_value = "orchestrator_workers")]
    pub workers_table: QualifiedName,
    #[arg(long, default_value = "consumer_segments")]
    pub segments_table: QualifiedName,
    #[arg(long, default_value = "consumer_workers")]
    pub segment_workers_table: QualifiedName,
    /// A read-model table to take over, `schema.table[=name]` (repeat for several): it moves
    /// into the projection's schema (as `name`), and its old name stays as a view for readers.
    #[arg(long = "adopt")]
    pub adopt: Vec<Adopt>,
    /// The events table (its head bounds the Go checkpoints).
    #[arg(long, env = "EVENTS_TABLE", default_value = "events")]
    pub events_table: QualifiedName,
    /// This host's replica set.
    #[arg(long, env = "REPLICA_SET", default_value = "default")]
    pub replica_set: String,
    /// Partitions of a new replica set (default: the Go count, which maps every checkpoint
    /// one to one and keeps a rollback exact).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Undo an import: write the host's checkpoints back into the Go tables, put the adopted
    /// tables back, and remove the projection from the replica set (its hosts stopped first).
    #[arg(long)]
    pub rollback: bool,
}

/// What the import will do, as checked.
struct Plan {
    replica_set: String,
    /// The set's rebalancing strategy (kept when the set exists).
    strategy: Strategy,
    projection: String,
    go: GoDeployment,
    progress: GoProgress,
    live: Option<Vec<String>>,
    partitions: u32,
    set_exists: bool,
    schema: String,
    tables: Vec<Found>,
    checkpoints: resize::Plan,
    head: i64,
}

pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let pool = crate::status::pool(&args.database).await?;
    crate::db::migrate(&pool).await?;
    let bytes = std::fs::read(&args.plugin)
        .with_context(|| format!("reading the plugin {}", args.plugin.display()))?;
    let runtime = Runtime::new(RuntimeConfig {
        memory_limit: 256 << 20,
        call_timeout: Duration::from_secs(10),
        cache_dir: None,
    })?;
    let (plugin, _) = runtime.load_bytes(&args.plugin, &bytes).await?;
    let projection = plugin.name.to_string();
    if args.rollback {
        return rollback::rollback(&pool, &args, &deployment(&args, &projection), &projection)
            .await;
    }
    let plan = plan(&pool, &args, &projection).await?;
    print_plan(&plan, args.dry_run);
    if args.dry_run {
        return Ok(());
    }
    refuse_live_go_workers(plan.live.as_deref(), args.go_stale_timeout)?;
    let mut conn = pool.acquire().await?;
    refuse_live_hosts(&mut conn, &args.replica_set).await?;

    // Idempotent steps, none of which runs the projection: the set, the schema's name, the
    // projection's role and schema.
    membership::ensure_replica_set(
        &pool,
        &args.replica_set,
        Some(plan.partitions),
        plan.strategy,
    )
    .await?;
    let schema = read_models::stable_schema(&mut conn, &args.replica_set, &projection).await?;
    drop(conn);
    anyhow::ensure!(
        schema == plan.schema,
        "the projection's schema is {schema}, not {} as planned; run the import again",
        plan.schema
    );
    let role = crate::sink::role::prepare(&pool, &args.replica_set, &projection, &schema)
        .await
        .context("preparing the projection's role and schema")?;

    // One transaction: the set (locked: no resize, removal or host start meanwhile), the Go
    // checkpoints the plan used (locked, and unchanged), the tables, the host's checkpoints.
    let mut tx = pool.begin().await?;
    let count = store::replica_sets::lock(&mut tx, &args.replica_set).await?;
    if count != Some(plan.partitions) {
        bail!(
            "replica set {} changed while importing (now {count:?} partitions, planned {}); import again (nothing was changed)",
            args.replica_set,
            plan.partitions
        );
    }
    refuse_live_hosts(&mut tx, &args.replica_set).await?;
    refuse_live_go_workers(
        go_lineage::live_workers(&mut tx, &plan.go)
            .await?
            .as_deref(),
        args.go_stale_timeout,
    )?;
    let now = go_lineage::progress(&mut tx, &plan.go, true).await?;
    if now.positions != plan.progress.positions {
        bail!(
            "the Go checkpoints moved while importing ({} -> {}): a Go worker is still running; stop it and import again (nothing was changed)",
            plan.progress.rows.join(", "),
            now.rows.join(", ")
        );
    }
    if store::checkpoints::has_progress(&mut tx, &args.replica_set, &projection).await? {
        bail!(
            "replica set {} already has checkpoints for projection {projection} (an earlier import, or hosts ran it): if an import finished, start the hosts; to start over, `projection-host import --rollback` (which puts adopted tables back) (nothing was changed)",
            args.replica_set
        );
    }
    for found in &plan.tables {
        tables::adopt(
            &mut tx,
            found,
            &args.replica_set,
            &schema,
            &role.name,
            &projection,
        )
        .await?;
    }
    store::checkpoints::replace(
        &mut tx,
        &args.replica_set,
        &projection,
        &plan.checkpoints.checkpoints,
    )
    .await?;
    store::carried::replace(
        &mut tx,
        &args.replica_set,
        &projection,
        &plan.checkpoints.carried,
    )
    .await?;
    tx.commit().await?;

    // Last, the plugin's first version (a host started with the plugin mounted would register
    // it the same way, under the track the checkpoints were written for).
    let host = format!("import on {}", gethostname::gethostname().to_string_lossy());
    if let Err(e) =
        registry::register_mounted(&pool, &args.replica_set, &plugin, &bytes, &host).await
    {
        println!(
            "imported, but registering the plugin failed ({e}); hosts started with the plugin mounted register it"
        );
    }
    println!(
        "imported: projection {projection} continues after the Go checkpoints in replica set {} ({} partitions)",
        args.replica_set, plan.partitions
    );
    println!(
        "next: start the hosts with REPLICA_SET={} PARTITIONS={} and this plugin; `projection-host status` shows their progress",
        args.replica_set, plan.partitions
    );
    Ok(())
}

pub(super) fn all(partitions: u32) -> Vec<i32> {
    (0..partitions as i32).collect()
}

fn refuse_live_go_workers(live: Option<&[String]>, stale: Duration) -> anyhow::Result<()> {
    match live {
        Some(live) if !live.is_empty() => bail!(
            "Go workers of this deployment are still running: {}. Stop them (scale the Go deployment to 0) and wait until their heartbeats are older than --go-stale-timeout ({stale:?}), then import again; nothing was changed",
            live.join(", ")
        ),
        _ => Ok(()),
    }
}

/// Hosts of the set run the registry's projections; while one runs, the import must not
/// change what they read.
async fn refuse_live_hosts(conn: &mut sqlx::PgConnection, replica_set: &str) -> anyhow::Result<()> {
    let live = store::workers::live_hosts(conn, replica_set).await?;
    if !live.is_empty() {
        bail!(
            "hosts of replica set {replica_set} are running ({}); the import is done with the set's hosts stopped (scale them to 0); nothing was changed",
            live.join(", ")
        );
    }
    Ok(())
}

/// The Go deployment the arguments name.
fn deployment(args: &ImportArgs, projection: &str) -> GoDeployment {
    GoDeployment {
        system: args.system,
        tables: GoTables {
            checkpoints: args.checkpoints_table.clone(),
            generations: args.generations_table.clone(),
            workers: args.workers_table.clone(),
            segments: args.segments_table.clone(),
            segment_workers: args.segment_workers_table.clone(),
        },
        name: args
            .go_name
            .clone()
            .unwrap_or_else(|| projection.to_string()),
        replica_set: args
            .go_replica_set
            .clone()
            .unwrap_or_else(|| args.replica_set.clone()),
        partitions: args.go_partitions,
        stale_timeout: args.go_stale_timeout,
    }
}

async fn plan(pool: &sqlx::PgPool, args: &ImportArgs, projection: &str) -> anyhow::Result<Plan> {
    let go = deployment(args, projection);
    let mut conn = pool.acquire().await?;
    let progress = go_lineage::progress(&mut conn, &go, false).await?;
    let live = go_lineage::live_workers(&mut conn, &go).await?;
    let head: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(global_position), 0) FROM {}",
        args.events_table
    ))
    .fetch_one(&mut *conn)
    .await
    .with_context(|| format!("reading the head of the events table {}", args.events_table))?;
    let highest = progress.positions.iter().copied().max().unwrap_or(0);
    if highest > head {
        bail!(
            "a Go checkpoint ({highest}) is past the events table's head ({head}): is this the Go deployment's database?"
        );
    }
    let stored = store::replica_sets::overview(pool, &args.replica_set).await?;
    let partitions = match (&stored, args.partitions) {
        (Some(s), Some(wanted)) if s.partitions as u32 != wanted => bail!(
            "replica set {} exists with {} partitions; leave --partitions out (or resize it first)",
            args.replica_set,
            s.partitions
        ),
        (Some(s), _) => s.partitions as u32,
        (None, Some(wanted)) => wanted,
        (None, None) => progress.positions.len() as u32,
    };
    let schema = match read_models::claimed(&mut conn, &args.replica_set, projection).await? {
        Some(schema) => schema,
        // What registration will claim: the projection's own name when it is free.
        None => match read_models::holder(&mut conn, projection).await? {
            None => projection.to_string(),
            Some(_) => read_models::own_schema_name(projection, &args.replica_set),
        },
    };
    if let Some(version) = registry::list(pool, &args.replica_set)
        .await?
        .into_iter()
        .find(|v| v.projection == projection)
    {
        bail!(
            "replica set {} already runs projection {projection} (version {}, {}): the import is for a projection the set does not have yet; use another replica set; to start over after an import, `projection-host import --rollback`",
            args.replica_set,
            version.version,
            version.state
        );
    }
    let mut found = Vec::new();
    for adopt in &args.adopt {
        found.push(tables::inspect(&mut conn, adopt, &schema).await?);
    }
    let old: Vec<store::checkpoints::Stored> = progress
        .positions
        .iter()
        .enumerate()
        .map(|(k, position)| store::checkpoints::Stored {
            projection: projection.to_string(),
            partition: k as i32,
            position: *position,
            build_generation: 0,
        })
        .collect();
    let mut checkpoints = resize::plan(
        projection,
        progress.positions.len() as u32,
        partitions,
        &old,
        Vec::new(),
    );
    for (_, origin) in &mut checkpoints.carried {
        *origin = format!(
            "import from {:?} ({} partitions)",
            args.system,
            progress.positions.len()
        );
    }
    Ok(Plan {
        strategy: stored
            .as_ref()
            .map_or(Strategy::Cooperative, |s| s.strategy),
        replica_set: args.replica_set.clone(),
        projection: projection.to_string(),
        go,
        progress,
        live,
        partitions,
        set_exists: stored.is_some(),
        schema,
        tables: found,
        checkpoints,
        head,
    })
}

fn print_plan(plan: &Plan, dry_run: bool) {
    let heading = if dry_run {
        "import plan (dry run: nothing is changed)"
    } else {
        "import plan"
    };
    println!("{heading}");
    let go_count = plan.progress.positions.len();
    println!(
        "  Go deployment: {:?}, projection '{}', {go_count} partition(s) (from {})",
        plan.go.system, plan.go.name, plan.progress.count_from
    );
    for row in &plan.progress.rows {
        println!("    {row}");
    }
    for row in &plan.progress.ignored {
        println!("    ignored (not of this partitioning): {row}");
    }
    match &plan.live {
        None => println!(
            "  Go workers: processors keep no registry; make sure every one is stopped before importing"
        ),
        Some(live) if live.is_empty() => println!("  Go workers: none running"),
        Some(live) => println!(
            "  Go workers STILL RUNNING (the import refuses): {}",
            live.join(", ")
        ),
    }
    let positions: Vec<i64> = plan
        .checkpoints
        .checkpoints
        .iter()
        .map(|c| c.position)
        .collect();
    println!(
        "  host: replica set {} ({}), projection {}, {} partitions, events head {}",
        plan.replica_set,
        if plan.set_exists { "exists" } else { "new" },
        plan.projection,
        plan.partitions,
        plan.head
    );
    println!(
        "    checkpoints from {} to {}{}",
        positions.iter().min().unwrap_or(&0),
        positions.iter().max().unwrap_or(&0),
        if plan.checkpoints.carried.is_empty() {
            " (each from one Go partition, exactly)".to_string()
        } else {
            format!(
                "; the {go_count} Go checkpoints are carried, so the events between that the Go workers applied are skipped"
            )
        }
    );
    if plan.tables.is_empty() {
        println!("  read models: none adopted (--adopt schema.table); the plugin's setup creates its tables empty");
    }
    for t in &plan.tables {
        println!(
            "  read model: {} (about {} rows, owner {}) moves to {} in place; {} stays as a read-only view{}",
            t.from,
            t.rows_estimate,
            t.owner,
            t.to,
            t.from,
            if t.readers.is_empty() {
                String::new()
            } else {
                format!(" readable by {}", tables::readers_text(&t.readers))
            }
        );
    }
}
