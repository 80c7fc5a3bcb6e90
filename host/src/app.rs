//! `run`: wires the parts together, and owns the shutdown order.
//!
//! Start: bind the HTTP ports (`/health` answers from here on); wait for PostgreSQL; check the
//! events table (nothing is written before); migrate; register the mounted plugin files (each
//! checked and compiled); start the wake-up listener and the safe-head tracker; join the
//! replica set; run one pipeline per read model the registry lists. Any failure after joining
//! goes through the shutdown below, which deregisters.
//!
//! Shutdown (SIGTERM/SIGINT, or caught up with `--once`): readiness turns false; the coordinator
//! stops rebalancing but keeps heartbeating; pipelines take no new batch and finish the
//! in-flight one within the shutdown timeout (then it is abandoned and rolls back); the worker
//! releases its partitions and deregisters, so peers take over at once; HTTP stops last.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::base::notify::COORDINATION_CHANNEL;
use crate::config::RunConfig;
use crate::coordination::{Coordinator, Member, Ownership};
use crate::db::{StartWait, TlsSummary};
use crate::http::{AppState, Front};
use crate::ids::{CommitToken, WorkerId};
use crate::lifecycle::PluginCache;
use crate::metrics::HostMetrics;
use crate::pipeline::{MountedPlugins, PipelineConfig, PipelineContext, StatusBoard, Supervisor};
use crate::runtime::Runtime;
use crate::source::safe_head::SafeHeadTracker;
use crate::source::wakeup::{self, Wakeup};

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let worker = WorkerId::from_environment(config.pod_name.as_deref());
    let metrics = HostMetrics::new(&config.coordination.replica_set, worker.as_str());
    // The ports first: a taken port ends the start before anything is written or registered,
    // and while the start waits for PostgreSQL, /health answers and /ready says why not.
    let front = Front::default();
    let http_stop = CancellationToken::new();
    let http_tasks = match &config.http {
        Some(http) => crate::http::serve(
            crate::http::bind(http).await?,
            front.clone(),
            metrics.clone(),
            http_stop.clone(),
        ),
        None => Vec::new(),
    };
    let result = run_until_stopped(config, worker, metrics, &front).await;
    http_stop.cancel();
    for task in http_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    result
}

/// Runs the host until it is stopped. A resize of the replica set under this host ends one run;
/// the next joins again with the new partition count (the HTTP ports stay up, /ready says false
/// meanwhile).
async fn run_until_stopped(
    config: RunConfig,
    worker: WorkerId,
    metrics: HostMetrics,
    front: &Front,
) -> anyhow::Result<()> {
    // One watcher for the whole process: a signal that arrives while one run shuts down or the
    // next starts (a rejoin after a resize) still stops the host.
    let (signal_tx, signal) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let name = shutdown_signal().await;
        let _ = signal_tx.send(Some(name));
    });
    // One engine for the process: a rejoin keeps its compiled plugins.
    let runtime =
        Arc::new(Runtime::new(config.runtime.clone()).context("starting the WebAssembly runtime")?);
    let mut config = config;
    loop {
        let run = start_and_run(
            config.clone(),
            worker.clone(),
            metrics.clone(),
            front,
            signal.clone(),
            runtime.clone(),
        );
        match run.await? {
            Ended::Rejoin if signal.borrow().is_none() => {
                tracing::info!("joining the replica set again after its resize");
                // The set's count is the operator's now, whatever this host was started with.
                config.coordination.partitions = None;
            }
            Ended::Rejoin | Ended::Stopped => return Ok(()),
        }
    }
}

/// The database as the rest of the start needs it: checked, migrated, with a pool.
struct Connected {
    pool: sqlx::PgPool,
    /// How host sessions connect (the wake-up listener and safe-head tracker open their own).
    db: crate::db::DbConfig,
    /// How projection sessions connect: the same target and options, as the projection's role.
    session_options: sqlx::postgres::PgConnectOptions,
}

/// Waits for PostgreSQL, checks the events table (resolving its schema into `config`), opens
/// the pool and migrates. `None` when a signal arrived while waiting.
async fn connect(
    config: &mut RunConfig,
    incarnation: &uuid::Uuid,
    front: &Front,
    signal: &mut Signal,
) -> anyhow::Result<Option<Connected>> {
    let mut db = config.database.clone();
    db.application_name = Member::application_name(incarnation);
    let session_options = db.connect_options()?;
    let status = front.starting_status();
    let wait = StartWait {
        timeout: config.db_wait_timeout,
        status: status.clone(),
    };
    let mut first = tokio::select! {
        conn = crate::db::wait_for_database(&db, &wait) => conn?,
        signal = received(signal) => {
            tracing::info!(%signal, "stopped while waiting for PostgreSQL");
            return Ok(None);
        }
    };
    match TlsSummary::of(&mut first, &db).await {
        Ok(summary) => summary.log(&db),
        Err(e) => tracing::debug!(error = %e, "cannot read pg_stat_ssl"),
    }
    status.set("checking the events table");
    // Nothing is created before the target is known to hold an events table of the right
    // layout: a host pointed at the wrong database leaves it as it was.
    config.events_table = check_events_table(&mut first, &config.events_table).await?;
    let _ = sqlx::Connection::close(first).await;
    config.coordination.events_table = config.events_table.clone();
    // From here on every host session sees only the catalog on its search path; everything
    // else is named with its schema.
    db.search_path = Some(crate::db::HOST_SEARCH_PATH.to_string());
    status.set("opening the connection pool");
    let pool = db.connect_pool().await.context(
        "connecting to PostgreSQL (check DATABASE_URL and that the server is reachable)",
    )?;
    warn_if_superuser(&pool).await;
    status.set("creating or upgrading the host's tables");
    crate::db::migrate(&pool)
        .await
        .context("creating the host's tables")?;
    Ok(Some(Connected {
        pool,
        db,
        session_options,
    }))
}

/// How one run of the host ended.
enum Ended {
    /// Stopped by a signal, by `--once`, or because nothing can run.
    Stopped,
    /// The replica set was resized: join again.
    Rejoin,
}

async fn start_and_run(
    mut config: RunConfig,
    worker: WorkerId,
    metrics: HostMetrics,
    front: &Front,
    mut signal: Signal,
    runtime: Arc<Runtime>,
) -> anyhow::Result<Ended> {
    let incarnation = uuid::Uuid::new_v4();
    let Some(Connected {
        pool,
        db,
        session_options,
    }) = connect(&mut config, &incarnation, front, &mut signal).await?
    else {
        return Ok(Ended::Stopped);
    };
    let status = front.starting_status();
    let token = CommitToken::generate();

    let replica_set = config.coordination.replica_set.clone();
    let cache = Arc::new(PluginCache::new(
        runtime.clone(),
        pool.clone(),
        replica_set.clone(),
    ));

    // The replica set must exist before plugins are registered under it.
    crate::coordination::membership::ensure_replica_set(
        &pool,
        &replica_set,
        config.coordination.partitions,
        config.coordination.strategy,
    )
    .await?;
    let mut mounted = MountedPlugins::new(config.plugin_files.clone(), config.plugin_dirs.clone());
    // A bad file (not a component, a describe that traps or loops) is reported and skipped, so
    // that the other projections start.
    status.set("registering the mounted plugins");
    let unusable = mounted.scan(&cache, &pool, &replica_set).await?;

    let background = CancellationToken::new();
    let Listening {
        coordination_wakeup,
        head,
    } = listen(&db, &config, &metrics, &background).await?;

    let once_target = if config.once {
        let head = crate::source::stream_head(&pool, &config.events_table).await?;
        tracing::info!(
            head,
            "--once: running until every projection has caught up with this position"
        );
        Some(head)
    } else {
        None
    };

    let ownership = Ownership::new();
    let member = Member {
        replica_set: replica_set.clone(),
        worker: worker.clone(),
        incarnation,
        hostname: gethostname::gethostname().to_string_lossy().into_owned(),
        pod_namespace: config.pod_namespace.clone(),
        commit_token: token.digest(),
    };
    let joined = Coordinator::join(
        pool.clone(),
        config.coordination.clone(),
        member,
        ownership.clone(),
        coordination_wakeup.clone(),
        metrics.clone(),
    )
    .await?;
    let partitions = joined.coordinator.partitions();
    // From here on every way out goes through the orderly shutdown below, which deregisters.
    let nothing_to_run = joined.registry.borrow().running.is_empty().then(|| {
        anyhow::anyhow!(
            "no projection can run: {}",
            if unusable.is_empty() {
                "no plugin is mounted and the registry holds none for this replica set".to_string()
            } else {
                unusable.join("; ")
            }
        )
    });
    let stop_rebalancing = CancellationToken::new();
    let leave = CancellationToken::new();
    let mut coordinator_task = tokio::spawn(
        joined
            .coordinator
            .run(stop_rebalancing.clone(), leave.clone()),
    );

    let board = StatusBoard::default();
    tokio::spawn(sample_history(board.clone(), stop_rebalancing.clone()));
    let context = PipelineContext {
        runtime: runtime.clone(),
        pool: pool.clone(),
        ownership: ownership.clone(),
        head: head.clone(),
        metrics: metrics.clone(),
        board: board.clone(),
        coordinator: coordination_wakeup.clone(),
        controls: joined.controls,
        registry: joined.registry.clone(),
        cache: cache.clone(),
        session_options,
        token,
    };
    let supervisor = supervisor(&config, context, &worker, partitions, once_target, mounted);
    let stop_pipelines = CancellationToken::new();
    let supervisor_task =
        tokio::spawn(supervisor.run(stop_pipelines.clone(), config.shutdown_timeout));

    let shutting_down = Arc::new(AtomicBool::new(false));
    if let Some(http) = &config.http {
        front.started(AppState {
            replica_set: replica_set.clone(),
            events_table: config.events_table.clone(),
            admin_token: http.admin_token.clone(),
            pool: pool.clone(),
            coordination: joined.status.clone(),
            board: board.clone(),
            shutting_down: shutting_down.clone(),
            worker: worker.clone(),
            runtime: runtime.clone(),
        });
    }

    // Run until told to stop.
    let resized = joined.resized.clone();
    let mut rejoin = false;
    let outcome: anyhow::Result<&str> = match nothing_to_run {
        Some(error) => Err(error),
        None => tokio::select! {
            signal = received(&mut signal) => Ok(signal),
            _ = resized.cancelled() => {
                rejoin = true;
                Ok("the replica set was resized")
            }
            settled = settled(&pool, &replica_set, partitions, once_target, &joined.registry) => settled,
            result = &mut coordinator_task => match result {
                Ok(Ok(())) => Ok("coordinator ended"),
                Ok(Err(e)) => Err(anyhow::Error::new(e)),
                Err(e) => Err(anyhow::anyhow!("the coordinator task failed: {e}")),
            },
        },
    };
    Shutdown {
        shutting_down,
        stop_rebalancing,
        ownership,
        stop_pipelines,
        supervisor_task,
        leave,
        coordinator_task,
        background,
        pool,
        shutdown_timeout: config.shutdown_timeout,
    }
    .run(outcome)
    .await?;
    Ok(if rejoin {
        Ended::Rejoin
    } else {
        Ended::Stopped
    })
}

/// The pipelines' supervisor: one pipeline per read model the registry lists, each configured
/// from `run`'s settings (and the projection's own, from its settings file).
fn supervisor(
    config: &RunConfig,
    context: PipelineContext,
    worker: &WorkerId,
    partitions: u32,
    once_target: Option<i64>,
    mounted: MountedPlugins,
) -> Supervisor {
    let cache = context.cache.clone();
    Supervisor {
        context,
        template: PipelineConfig {
            replica_set: config.coordination.replica_set.clone(),
            worker: worker.clone(),
            partitions,
            batch_size: config.batch_size,
            max_batch_size: config.max_batch_size,
            poll_interval: config.poll_interval,
            events_table: config.events_table.clone(),
            once_target,
            settings: config.settings.defaults.clone(),
            isolation: config.isolation,
            // Filled in per read model by the supervisor.
            track: String::new(),
            namespace: String::new(),
            build_generation: 0,
        },
        settings: config.settings.clone(),
        cache,
        mounted,
        scan_interval: config.plugin_scan_interval,
    }
}

/// What the background tasks that follow the database give the rest.
struct Listening {
    /// Woken by NOTIFY on the coordination channel.
    coordination_wakeup: Wakeup,
    /// The safe head: how far events may be read without skipping an open writer's gap.
    head: crate::source::safe_head::SafeHead,
}

/// Starts the LISTEN connection (events and coordination channels) and the safe-head tracker,
/// until `background` is cancelled.
async fn listen(
    db: &crate::db::DbConfig,
    config: &RunConfig,
    metrics: &HostMetrics,
    background: &CancellationToken,
) -> anyhow::Result<Listening> {
    let events_wakeup = Wakeup::default();
    let coordination_wakeup = Wakeup::default();
    let mut routes: Vec<(String, Wakeup)> = config
        .notify_channels
        .iter()
        .map(|c| (c.clone(), events_wakeup.clone()))
        .collect();
    routes.push((
        COORDINATION_CHANNEL.to_string(),
        coordination_wakeup.clone(),
    ));
    tokio::spawn(wakeup::listen(db.clone(), routes, background.child_token()));
    let (tracker, head) = SafeHeadTracker::new(
        db.clone(),
        config.events_table.clone(),
        events_wakeup,
        config.poll_interval,
        metrics.clone(),
    )
    .await
    .context("preparing to read the events table")?;
    tokio::spawn(tracker.run(background.child_token()));
    Ok(Listening {
        coordination_wakeup,
        head,
    })
}

/// What the orderly shutdown stops, in its order.
struct Shutdown {
    /// Readiness reads it.
    shutting_down: Arc<AtomicBool>,
    stop_rebalancing: CancellationToken,
    ownership: Arc<Ownership>,
    stop_pipelines: CancellationToken,
    supervisor_task: tokio::task::JoinHandle<()>,
    /// Releases the partitions and deregisters (the coordinator heartbeats until then).
    leave: CancellationToken,
    coordinator_task: tokio::task::JoinHandle<Result<(), crate::coordination::CoordinationError>>,
    /// The wake-up listener and the safe-head tracker.
    background: CancellationToken,
    pool: sqlx::PgPool,
    shutdown_timeout: Duration,
}

impl Shutdown {
    async fn run(mut self, outcome: anyhow::Result<&str>) -> anyhow::Result<()> {
        let reason = match &outcome {
            Ok(reason) => reason.to_string(),
            Err(e) => format!("error: {e:#}"),
        };
        tracing::info!(%reason, "shutting down: readiness is now false, in-flight batches finish");
        self.shutting_down.store(true, Ordering::SeqCst);
        self.stop_rebalancing.cancel();
        self.ownership.close();
        self.stop_pipelines.cancel();
        if tokio::time::timeout(
            self.shutdown_timeout + Duration::from_secs(1),
            &mut self.supervisor_task,
        )
        .await
        .is_err()
        {
            self.supervisor_task.abort();
        }
        self.leave.cancel();
        if !self.coordinator_task.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.coordinator_task).await;
        }
        self.background.cancel();
        self.pool.close().await;
        outcome.map(|reason| tracing::info!(%reason, "stopped"))
    }
}

/// The events table, named with its schema as the server resolves it on the user's search
/// path, and checked for the pupsourcing layout; refused (before anything is written) when it
/// does not exist or differs.
async fn check_events_table(
    conn: &mut sqlx::PgConnection,
    table: &crate::db::QualifiedName,
) -> anyhow::Result<crate::db::QualifiedName> {
    let resolved = table
        .resolve(conn)
        .await
        .context("looking up the events table")?;
    let Some((qualified, oid)) = resolved else {
        anyhow::bail!(
            "the events table {table} does not exist in the database DATABASE_URL points at \
             (set EVENTS_TABLE / --events-table, e.g. es.events); nothing was created"
        );
    };
    let problems = crate::source::layout::problems(conn, oid)
        .await
        .context("reading the events table's columns")?;
    if !problems.is_empty() {
        anyhow::bail!(
            "the events table {qualified} does not have the pupsourcing layout: {}; nothing was created",
            problems.join("; ")
        );
    }
    Ok(qualified)
}

/// A superuser's session is not confined by privileges; the host does not need one.
async fn warn_if_superuser(pool: &sqlx::PgPool) {
    let superuser: Result<bool, sqlx::Error> =
        sqlx::query_scalar("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
            .fetch_one(pool)
            .await;
    if let Ok(true) = superuser {
        tracing::warn!(
            "the host connects as a superuser; it needs far less (docs/operations.md, \"The host's database role\"): \
             run it as a role with CREATEROLE and the grants listed there"
        );
    }
}

/// The name of the stop signal once one arrived (`None` until then).
type Signal = tokio::sync::watch::Receiver<Option<&'static str>>;

/// Resolves with the signal's name once one arrived (at once if it already did).
async fn received(signal: &mut Signal) -> &'static str {
    match signal.wait_for(|s| s.is_some()).await {
        Ok(s) => s.unwrap_or("SIGTERM"),
        // The watcher is gone (it could not listen): never.
        Err(_) => std::future::pending().await,
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the host");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// `--once`: resolves when every partition of every running projection caught up with the
/// head seen at start (`Ok`) or halted (`Err`, naming each halted partition); never without
/// `--once`.
async fn settled(
    pool: &sqlx::PgPool,
    replica_set: &str,
    partitions: u32,
    target: Option<i64>,
    registry: &tokio::sync::watch::Receiver<Arc<crate::lifecycle::registry::Registry>>,
) -> anyhow::Result<&'static str> {
    use crate::pipeline::settled::{check, describe, Settled};
    let Some(target) = target else {
        return std::future::pending().await;
    };
    loop {
        let tracks: Vec<String> = registry
            .borrow()
            .running
            .iter()
            .map(|r| r.track.clone())
            .collect();
        match check(pool, replica_set, partitions, target, &tracks).await {
            Ok(Settled::CaughtUp) => return Ok("caught up (--once)"),
            Ok(Settled::Halted(halts)) => anyhow::bail!("--once: {}", describe(&halts)),
            Ok(Settled::Not) => {}
            Err(e) => tracing::debug!(error = %e, "--once: cannot read progress yet"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Samples the projections for the status page's chart until `stop`.
async fn sample_history(board: StatusBoard, stop: CancellationToken) {
    let mut every = tokio::time::interval(crate::pipeline::status::SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => board.sample(),
        }
    }
}
