use std::time::Duration;

use super::support::{assert_exactly_once, balanced, caught_up, host, shares};
use crate::support::{eventually, TestDb, Writer};

/// SIGSTOP one host past the stale timeout: the others take its partitions; on SIGCONT it cannot
/// commit anything for them (fencing), notices it was removed, rejoins, and nothing is lost or
/// applied twice.
#[tokio::test]
async fn a_paused_host_is_fenced_and_rejoins() {
    let db = TestDb::new("pause").await;
    db.append_w1(0, 4_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 5_000, 100, 30, Duration::from_millis(20));
    let _a = host(&db, "a", &[]);
    let _b = host(&db, "b", &[]);
    let zombie = host(&db, "z", &[]);
    balanced(&db, &["a", "b", "z"]).await;

    zombie.signal(libc::SIGSTOP);
    balanced(&db, &["a", "b"]).await;
    let target = writer.appended() + 300;
    eventually(
        "events while z is paused",
        Duration::from_secs(60),
        || async { (writer.appended() >= target).then_some(()) },
    )
    .await;
    zombie.signal(libc::SIGCONT);

    // It finds out it was removed (heartbeat) or is refused at commit (fencing), and rejoins.
    eventually(
        "z to notice and rejoin",
        Duration::from_secs(60),
        || async {
            let log = zombie.log();
            let noticed = log.contains("removed as stale") || log.contains("fenced");
            (noticed && shares(&db).await.get("z").copied().unwrap_or(0) > 0).then_some(())
        },
    )
    .await;
    balanced(&db, &["a", "b", "z"]).await;
    if std::env::var("SHOW_LOGS").is_ok() {
        eprintln!("{}", zombie.log());
    }
    let target = writer.appended() + 300;
    eventually(
        "events after z rejoined",
        Duration::from_secs(60),
        || async { (writer.appended() >= target).then_some(()) },
    )
    .await;
    writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    db.drop_db().await;
}
