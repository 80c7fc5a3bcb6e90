use std::time::{Duration, Instant};

use super::support::{assert_exactly_once, balanced, caught_up, host, owners, REPLICA_SET};
use crate::support::{TestDb, Writer};

/// SIGTERM: the host finishes its batch, releases its partitions and deregisters, and the peer
/// takes over at once, far sooner than the (here 60 s) stale timeout.
#[tokio::test]
async fn sigterm_hands_partitions_over_without_waiting_for_the_stale_timeout() {
    let db = TestDb::new("sigterm").await;
    db.append_w1(0, 4_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 5_000, 100, 30, Duration::from_millis(20));
    let slow_stale = ["--stale-worker-timeout", "60s"];
    let _a = host(&db, "a", &slow_stale);
    let mut b = host(&db, "b", &slow_stale);
    balanced(&db, &["a", "b"]).await;

    // `status` shows both workers and their partitions.
    let out = std::process::Command::new(crate::support::host::BIN)
        .args([
            "status",
            "--json",
            "--replica-set",
            REPLICA_SET,
            "--database-url",
            &db.url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    assert_eq!(status["partition_owners"].as_array().unwrap().len(), 32);
    assert!(status["generation"].as_i64().unwrap() >= 1);

    let started = Instant::now();
    b.signal(libc::SIGTERM);
    assert!(
        b.wait(Duration::from_secs(30)).await.success(),
        "{}",
        b.log()
    );
    assert!(b.log().contains("left the replica set"), "{}", b.log());
    balanced(&db, &["a"]).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "handoff took {took:?}: it waited for the stale timeout"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.workers WHERE worker_id = 'b'")
            .await,
        0
    );

    writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    assert!(owners(&db)
        .await
        .values()
        .all(|o| o.owner.as_deref() == Some("a")));
    db.drop_db().await;
}
