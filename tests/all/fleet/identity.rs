use std::time::Duration;

use super::support::{balanced, caught_up, host, owners, REPLICA_SET};
use crate::support::{Host, TestDb};

/// A host restarted with the same POD_NAME keeps its worker identity and reclaims its partitions
/// at once (new epochs), without waiting for the stale timeout of its previous process.
#[tokio::test]
async fn a_restart_with_the_same_pod_name_keeps_the_identity() {
    let db = TestDb::new("identity").await;
    db.append_w1(0, 2_999, 50).await;
    let slow_stale = ["--stale-worker-timeout", "60s"];
    let mut first = host(&db, "pod-a", &slow_stale);
    balanced(&db, &["pod-a"]).await;
    let before = owners(&db).await;
    first.kill9();

    let _second = Host::spawn(
        "pod-a again",
        &[
            "run",
            "--no-http",
            "--database-url",
            &db.url,
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--replica-set",
            REPLICA_SET,
            "--heartbeat-interval",
            "300ms",
            "--stale-worker-timeout",
            "60s",
        ],
        &[("POD_NAME", "pod-a")],
    );
    crate::support::eventually(
        "pod-a to reclaim every partition",
        Duration::from_secs(20),
        || async {
            let now = owners(&db).await;
            now.iter()
                .all(|(p, o)| o.owner.as_deref() == Some("pod-a") && o.epoch > before[p].epoch)
                .then_some(())
        },
    )
    .await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT worker_id FROM projection_host.workers")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(ids, ["pod-a"]);
    db.append_w1(3_000, 3_999, 50).await;
    caught_up(&db).await;
    assert!(db.check_w1().await.exact());
    db.drop_db().await;
}

/// The partition count is fixed for a replica set: another value is refused by name.
#[tokio::test]
async fn a_different_partition_count_is_refused() {
    let db = TestDb::new("partitions").await;
    let mut first = Host::run(
        "p32",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--replica-set",
            "rs",
        ],
    );
    assert!(
        first.wait(Duration::from_secs(60)).await.success(),
        "{}",
        first.log()
    );
    let mut second = Host::run(
        "p16",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--replica-set",
            "rs",
            "--partitions",
            "16",
        ],
    );
    let status = second.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = second.log();
    assert!(log.contains("replica set 'rs' has 32 partitions"), "{log}");
    assert!(log.contains("--partitions 16"), "{log}");
    assert!(
        log.contains("projection-host partitions resize --replica-set rs --to 16"),
        "{log}"
    );
    db.drop_db().await;
}
