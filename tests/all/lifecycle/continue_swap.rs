use std::time::Duration;

use super::{builds_per_partition, every_partition_runs, sha};
use crate::fleet_support::{assert_exactly_once, balanced, caught_up};
use crate::support::{admin_cli, HttpHost, TestDb, Writer};

fn fleet_host(db: &TestDb, worker: &str) -> HttpHost {
    HttpHost::run(
        worker,
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--worker-id",
            worker,
            "--replica-set",
            "fleet",
            "--heartbeat-interval",
            "300ms",
            "--stale-worker-timeout",
            "3s",
        ],
    )
}

fn push(h: &HttpHost, file: &str, mode: &str) -> String {
    admin_cli(&h.health, &["plugins", "push", file, "--mode", mode])
}

/// Continue mode on a two-host fleet while a writer appends: each partition switches at a batch
/// boundary, every batch before the switch is v1's and every batch after it v2's, and the read
/// model stays exact.
#[tokio::test]
async fn a_continue_swap_switches_every_partition_once_and_stays_exact() {
    let db = TestDb::new("swap").await;
    db.append_w1(0, 4_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 5_000, 100, 20, Duration::from_millis(15));
    let a = fleet_host(&db, "a");
    let _b = fleet_host(&db, "b");
    balanced(&db, &["a", "b"]).await;
    let v1 = sha(test_artifacts::BANK_BALANCES);
    let v2 = sha(test_artifacts::GUEST_BANK_BALANCES_V2);
    every_partition_runs(&db, "bank_balances", &v1).await;

    let out = push(&a, test_artifacts::GUEST_BANK_BALANCES_V2, "continue");
    assert!(out.contains("active"), "{out}");
    every_partition_runs(&db, "bank_balances", &v2).await;
    writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;

    for (partition, builds) in builds_per_partition(&db, "bank_balances").await {
        assert_eq!(
            builds,
            [v1.clone(), v2.clone()],
            "partition {partition} did not switch exactly once"
        );
    }
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT sha256, state FROM projection_host.plugins ORDER BY created_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        [
            (v1.clone(), "retired".to_string()),
            (v2.clone(), "active".to_string())
        ]
    );

    // Rollback goes back to v1 the same way.
    admin_cli(&a.health, &["plugins", "rollback", "bank_balances"]);
    db.append_w1(1_000_000, 1_000_999, 100).await;
    every_partition_runs(&db, "bank_balances", &v1).await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    db.drop_db().await;
}

/// A host killed in the middle of a swap: the fleet converges to the new version, exactly.
#[tokio::test]
async fn a_host_killed_during_a_swap_does_not_split_the_fleet() {
    let db = TestDb::new("swapkill").await;
    db.append_w1(0, 2_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 3_000, 100, 20, Duration::from_millis(15));
    let a = fleet_host(&db, "a");
    let mut b = fleet_host(&db, "b");
    balanced(&db, &["a", "b"]).await;
    push(&a, test_artifacts::GUEST_BANK_BALANCES_V2, "continue");
    b.host.kill9();
    balanced(&db, &["a"]).await;
    let v2 = sha(test_artifacts::GUEST_BANK_BALANCES_V2);
    every_partition_runs(&db, "bank_balances", &v2).await;
    writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    let last_v1_after_v2 = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM projection_host.batches b1, unnest(b1.partitions) p1
              WHERE b1.plugin_sha256 <> '{v2}' AND EXISTS (
                    SELECT 1 FROM projection_host.batches b2, unnest(b2.partitions) p2
                     WHERE b2.plugin_sha256 = '{v2}' AND p2 = p1 AND b2.committed_at < b1.committed_at)"
        ))
        .await;
    assert_eq!(
        last_v1_after_v2, 0,
        "no batch of the old build may commit after the new one took a partition"
    );
    db.drop_db().await;
}
