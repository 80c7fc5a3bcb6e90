use std::time::Duration;

use super::support::{assert_exactly_once, balanced, caught_up, host, owners};
use crate::support::{TestDb, Writer};

/// The recreate strategy: on a membership change every partition stops and is claimed anew
/// (behind the stop barrier), and the read model stays exact.
#[tokio::test]
async fn the_recreate_strategy_restarts_every_partition_and_stays_exact() {
    let db = TestDb::new("recreate").await;
    db.append_w1(0, 4_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 5_000, 100, 30, Duration::from_millis(20));
    let recreate = ["--strategy", "recreate"];
    let _a = host(&db, "a", &recreate);
    balanced(&db, &["a"]).await;
    let before = owners(&db).await;
    let _b = host(&db, "b", &recreate);
    balanced(&db, &["a", "b"]).await;
    let after = owners(&db).await;
    for (p, o) in &after {
        assert!(
            o.epoch > before[p].epoch,
            "p{p}: recreate must stop and re-claim every partition, even those that stay"
        );
    }
    let phase: String = sqlx::query_scalar("SELECT phase FROM projection_host.replica_sets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(phase, "running");
    writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    db.drop_db().await;
}
