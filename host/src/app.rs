//! `run`: wires the parts together, and owns the shutdown order.
//!
//! Start: connect and migrate, register the mounted plugin files (each checked and compiled),
//! start the wake-up listener and the safe-head tracker, join the replica set, run one pipeline
//! per read model the registry lists, serve HTTP.
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

use crate::config::RunConfig;
use crate::coordination::{Coordinator, Member, Ownership, COORDINATION_CHANNEL};
use crate::http::AppState;
use crate::ids::{CommitToken, WorkerId};
use crate::lifecycle::PluginCache;
use crate::metrics::HostMetrics;
use crate::pipeline::{MountedPlugins, PipelineConfig, PipelineContext, StatusBoard, Supervisor};
use crate::runtime::Runtime;
use crate::source::safe_head::SafeHeadTracker;
use crate::source::wakeup::{self, Wakeup};

pub async fn run(mut config: RunConfig) -> anyhow::Result<()> {
    let incarnation = uuid::Uuid::new_v4();
    let worker = WorkerId::from_environment(config.pod_name.as_deref());
    let mut db = config.database.clone();
    db.application_name = Member::application_name(&incarnation);
    // Projection sessions log in with the same target and options, as the projection's role.
    let session_options = db.connect_options()?;
    config.events_table = resolve_events_table(&db, &config.events_table).await?;
    config.coordination.events_table = config.events_table.clone();
    // From here on every host session sees only the catalog on its search path; everything
    // else is named with its schema.
    db.search_path = Some(crate::db::HOST_SEARCH_PATH.to_string());
    let pool = db.connect_pool().await.context(
        "connecting to PostgreSQL (check DATABASE_URL and that the server is reachable)",
    )?;
    warn_if_superuser(&pool).await;
    crate::db::migrate(&pool)
        .await
        .context("creating the host's tables")?;
    let token = CommitToken::generate();

    let replica_set = config.coordination.replica_set.clone();
    let metrics = HostMetrics::new(&replica_set, worker.as_str());
    let runtime =
        Arc::new(Runtime::new(config.runtime.clone()).context("starting the WebAssembly runtime")?);
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
    let unusable = mounted.scan(&cache, &pool, &replica_set).await?;

    let background = CancellationToken::new();
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

    let once_target = if config.once {
        let head: i64 = sqlx::query_scalar(&format!(
            "SELECT coalesce(max(global_position), 0) FROM {}",
            config.events_table
        ))
        .fetch_one(&pool)
        .await?;
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
    if joined.registry.borrow().running.is_empty() {
        anyhow::bail!(
            "no projection can run: {}",
            if unusable.is_empty() {
                "no plugin is mounted and the registry holds none for this replica set".to_string()
            } else {
                unusable.join("; ")
            }
        );
    }
    let stop_rebalancing = CancellationToken::new();
    let leave = CancellationToken::new();
    let mut coordinator_task = tokio::spawn(
        joined
            .coordinator
            .run(stop_rebalancing.clone(), leave.clone()),
    );

    let board = StatusBoard::default();
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
    let supervisor = Supervisor {
        context,
        template: PipelineConfig {
            replica_set: replica_set.clone(),
            worker: worker.clone(),
            partitions,
            batch_size: config.batch_size,
            max_batch_size: config.max_batch_size,
            poll_interval: config.poll_interval,
            events_table: config.events_table.clone(),
            once_target,
            settings: config.settings.defaults.clone(),
            isolation: config.isolation,
            track: String::new(),
            namespace: String::new(),
            build_generation: 0,
        },
        settings: config.settings.clone(),
        cache: cache.clone(),
        mounted,
        scan_interval: config.plugin_scan_interval,
    };
    let stop_pipelines = CancellationToken::new();
    let mut supervisor_task =
        tokio::spawn(supervisor.run(stop_pipelines.clone(), config.shutdown_timeout));

    let shutting_down = Arc::new(AtomicBool::new(false));
    let http_stop = CancellationToken::new();
    let mut http_tasks = Vec::new();
    if let Some(http) = &config.http {
        let state = AppState {
            replica_set: replica_set.clone(),
            events_table: config.events_table.clone(),
            admin_token: http.admin_token.clone(),
            pool: pool.clone(),
            coordination: joined.status.clone(),
            board: board.clone(),
            metrics: metrics.clone(),
            shutting_down: shutting_down.clone(),
            worker: worker.clone(),
            head: head.clone(),
            runtime: runtime.clone(),
        };
        http_tasks = crate::http::serve(http, state, http_stop.clone()).await?;
    }

    // Run until told to stop.
    let outcome: anyhow::Result<&str> = tokio::select! {
        signal = shutdown_signal() => Ok(signal),
        () = caught_up(&board, once_target.is_some()) => Ok("caught up (--once)"),
        result = &mut coordinator_task => match result {
            Ok(Ok(())) => Ok("coordinator ended"),
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(e) => Err(anyhow::anyhow!("the coordinator task failed: {e}")),
        },
    };
    let reason = match &outcome {
        Ok(reason) => reason.to_string(),
        Err(e) => format!("error: {e:#}"),
    };
    tracing::info!(%reason, "shutting down: readiness is now false, in-flight batches finish");
    shutting_down.store(true, Ordering::SeqCst);
    stop_rebalancing.cancel();
    ownership.close();
    stop_pipelines.cancel();
    if tokio::time::timeout(
        config.shutdown_timeout + Duration::from_secs(1),
        &mut supervisor_task,
    )
    .await
    .is_err()
    {
        supervisor_task.abort();
    }
    leave.cancel();
    if !coordinator_task.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut coordinator_task).await;
    }
    background.cancel();
    http_stop.cancel();
    for task in http_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    pool.close().await;
    outcome.map(|reason| tracing::info!(%reason, "stopped"))
}

/// The events table, named with its schema as the server resolves it on the user's search
/// path; refused (before anything is written) when it does not exist.
async fn resolve_events_table(
    db: &crate::db::DbConfig,
    table: &crate::db::QualifiedName,
) -> anyhow::Result<crate::db::QualifiedName> {
    let mut conn = crate::db::connect_one(db).await.context(
        "connecting to PostgreSQL (check DATABASE_URL and that the server is reachable)",
    )?;
    let resolved = table
        .resolve(&mut conn)
        .await
        .context("looking up the events table")?;
    let _ = sqlx::Connection::close(conn).await;
    match resolved {
        Some((qualified, _)) => Ok(qualified),
        None => anyhow::bail!(
            "the events table {table} does not exist in the database DATABASE_URL points at \
             (set EVENTS_TABLE / --events-table, e.g. es.events)"
        ),
    }
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

async fn caught_up(board: &StatusBoard, once: bool) {
    if !once {
        return std::future::pending().await;
    }
    loop {
        let all = board.all();
        if !all.is_empty() && all.iter().all(|s| s.caught_up) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
