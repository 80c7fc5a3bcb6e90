use std::time::Duration;

use super::{insert_w1, QUICK};
use crate::support::{eventually, Host, TestDb, Writer};

/// A writer takes a position early and commits long after many faster writers (longer than any
/// timeout the host was given): the reader holds at that position until it commits, then
/// applies it. Nothing is skipped; no hole is recorded.
#[tokio::test]
async fn a_slow_writer_s_event_is_never_skipped() {
    let db = TestDb::new("late").await;
    db.append_w1(0, 999, 20).await;
    let mut args = vec!["--plugin", test_artifacts::BANK_BALANCES];
    args.extend(QUICK);
    let _host = Host::run("late", &db.url, &args);

    let mut slow = db.pool.begin().await.unwrap();
    let held = insert_w1(&mut slow, 1_000_000, 1_000_000, 20).await[0];
    let writer = Writer::start(db.pool.clone(), 1_000, 20, 20, Duration::from_millis(10));
    // Plenty of later events commit; the projection must stop just before the held position.
    eventually(
        "later events to be committed",
        Duration::from_secs(30),
        || async { (db.scalar_i64("SELECT count(*) FROM events").await > 2_500).then_some(()) },
    )
    .await;
    let waited = std::time::Instant::now();
    while waited.elapsed() < Duration::from_secs(4) {
        let checkpoint = db.lowest_checkpoint("bank_balances").await;
        assert!(checkpoint < held, "the reader passed position {held} while its writer was still open (checkpoint {checkpoint})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        db.lowest_checkpoint("bank_balances").await,
        held - 1,
        "the reader holds right before the open position"
    );

    slow.commit().await.unwrap();
    writer.stop().await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "catch-up past the late event",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await >= head).then_some(()) },
    )
    .await;
    assert!(db.check_w1().await.exact());
    assert_eq!(db.scalar_i64(&format!("SELECT count(*) FROM projection_host.holes WHERE {held} BETWEEN from_position AND to_position")).await, 0);
    db.drop_db().await;
}
