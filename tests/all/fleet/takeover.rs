use std::time::Duration;

use super::support::{assert_exactly_once, balanced, caught_up, host, owners};
use crate::support::{eventually, TestDb, Writer};

/// kill -9 one of three hosts: its partitions are taken over once its heartbeat is stale.
#[tokio::test]
async fn a_killed_host_s_partitions_are_taken_over_after_the_stale_timeout() {
    let db = TestDb::new("kill").await;
    db.append_w1(0, 4_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 5_000, 100, 30, Duration::from_millis(25));
    let _a = host(&db, "a", &[]);
    let _b = host(&db, "b", &[]);
    let mut c = host(&db, "c", &[]);
    balanced(&db, &["a", "b", "c"]).await;
    let generation = db
        .scalar_i64("SELECT generation FROM projection_host.replica_sets")
        .await;

    c.kill9();
    balanced(&db, &["a", "b"]).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.workers WHERE worker_id = 'c'")
            .await,
        0,
        "c was removed"
    );
    assert!(
        db.scalar_i64("SELECT generation FROM projection_host.replica_sets")
            .await
            > generation
    );
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM projection_host.generations ORDER BY generation DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(reason.contains("stale workers removed: c"), "{reason}");

    let target = writer.appended() + 500;
    eventually(
        "more events after the takeover",
        Duration::from_secs(60),
        || async { (writer.appended() >= target).then_some(()) },
    )
    .await;
    writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    assert!(owners(&db)
        .await
        .values()
        .all(|o| o.owner.as_deref() != Some("c")));
    db.drop_db().await;
}
