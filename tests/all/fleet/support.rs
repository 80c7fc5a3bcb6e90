//! Shared pieces of the fleet scenarios.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{eventually, Host, TestDb};

pub const REPLICA_SET: &str = "fleet";

/// A fleet host with fast coordination settings (heartbeat 300ms, stale after 3s).
pub fn host(db: &TestDb, worker: &str, extra: &[&str]) -> Host {
    let mut args = vec![
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--worker-id",
        worker,
        "--replica-set",
        REPLICA_SET,
        "--heartbeat-interval",
        "300ms",
        "--batch-size",
        "100",
        "--max-batch-size",
        "2000",
    ];
    if !extra.contains(&"--stale-worker-timeout") {
        args.extend(["--stale-worker-timeout", "3s"]);
    }
    args.extend_from_slice(extra);
    Host::run(worker, &db.url, &args)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub owner: Option<String>,
    pub epoch: i64,
}

pub async fn owners(db: &TestDb) -> BTreeMap<i32, Owned> {
    let rows: Vec<(i32, Option<String>, i64)> =
        sqlx::query_as("SELECT partition, owner, epoch FROM projection_host.partitions WHERE replica_set = $1 ORDER BY partition")
            .bind(REPLICA_SET)
            .fetch_all(&db.pool)
            .await
            .unwrap_or_default();
    rows.into_iter()
        .map(|(p, owner, epoch)| (p, Owned { owner, epoch }))
        .collect()
}

/// Partitions held per worker.
pub async fn shares(db: &TestDb) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    for o in owners(db).await.into_values() {
        if let Some(w) = o.owner {
            *shares.entry(w).or_default() += 1;
        }
    }
    shares
}

/// Waits until exactly `workers` hold all 32 partitions in balanced shares.
///
/// Two minutes, not one: under a loaded CI machine a host's first heartbeat can come late enough
/// to be counted stale once, and the fleet then needs a second round to settle. On timeout the
/// message carries the last shares and the workers table, so a failure says what the fleet did.
pub async fn balanced(db: &TestDb, workers: &[&str]) {
    let started = std::time::Instant::now();
    let timeout = Duration::from_secs(120);
    loop {
        let s = shares(db).await;
        let total: usize = s.values().sum();
        let names: Vec<&str> = s.keys().map(String::as_str).collect();
        let fair = 32 / workers.len();
        if total == 32 && names == workers && s.values().all(|n| *n == fair || *n == fair + 1) {
            return;
        }
        if started.elapsed() > timeout {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT worker_id, (now() - heartbeat_at)::text FROM projection_host.workers ORDER BY worker_id",
            )
            .fetch_all(&db.pool)
            .await
            .unwrap_or_default();
            panic!(
                "timed out after {timeout:?} waiting for partitions balanced over {workers:?}; \
                 last shares {s:?}; workers (id, heartbeat age) {rows:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every partition's checkpoint reached the current head.
pub async fn caught_up(db: &TestDb) {
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually("the fleet to catch up", Duration::from_secs(120), || async {
        let rows = db
            .scalar_i64_or_zero("SELECT count(*) FROM projection_host.checkpoints WHERE projection = 'bank_balances' AND position >= (SELECT max(global_position) FROM events)")
            .await;
        (rows == 32).then_some(())
    })
    .await;
    assert!(db.lowest_checkpoint("bank_balances").await >= head);
}

/// The read model is exact and the committed batches cover every event exactly once.
pub async fn assert_exactly_once(db: &TestDb) {
    let check = db.check_w1().await;
    assert!(check.exact(), "{check:?}");
    let applied = db.scalar_i64("SELECT sum(events)::int8 FROM projection_host.batches WHERE projection = 'bank_balances'").await;
    assert_eq!(
        applied, check.events_in_store,
        "committed batches applied {applied} events for {} in the store",
        check.events_in_store
    );
}
