use std::time::Duration;

use super::{insert_w1, QUICK};
use crate::support::{eventually, Host, TestDb, Writer};

/// Positions of a rolled-back writer and of a writer whose backend was killed never fill: the
/// reader passes them once their transactions are over (never before), and records them.
#[tokio::test]
async fn holes_of_dead_writers_are_passed_after_they_end_and_recorded() {
    let db = TestDb::new("holes").await;
    db.append_w1(0, 499, 20).await;
    let mut args = vec!["--plugin", test_artifacts::BANK_BALANCES];
    args.extend(QUICK);
    let _host = Host::run("holes", &db.url, &args);

    let mut rolled_back = db.pool.begin().await.unwrap();
    let lost = insert_w1(&mut rolled_back, 2_000_000, 2_000_002, 20).await;
    let mut killed = db.pool.begin().await.unwrap();
    let killed_positions = insert_w1(&mut killed, 3_000_000, 3_000_000, 20).await;
    let killed_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *killed)
        .await
        .unwrap();
    let writer = Writer::start(db.pool.clone(), 500, 20, 20, Duration::from_millis(10));
    eventually("later events", Duration::from_secs(30), || async {
        (writer.appended() > 1_500).then_some(())
    })
    .await;
    assert!(
        db.lowest_checkpoint("bank_balances").await < lost[0],
        "a hole held by a live writer must not be passed"
    );

    let ended_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    rolled_back.rollback().await.unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(killed_pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(terminated);
    drop(killed);

    writer.stop().await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "catch-up past the holes",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await >= head).then_some(()) },
    )
    .await;
    assert!(db.check_w1().await.exact());

    for position in lost.iter().chain(&killed_positions) {
        let passed: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT passed_at FROM projection_host.holes WHERE $1 BETWEEN from_position AND to_position",
        )
        .bind(position)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        let passed = passed.unwrap_or_else(|| panic!("hole at {position} was not recorded"));
        assert!(
            passed >= ended_at,
            "hole at {position} was passed at {passed} before its writer ended at {ended_at}"
        );
    }
    // Every position up to the head is an event or a recorded hole.
    let unaccounted = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM generate_series(1, {head}) AS p
              WHERE NOT EXISTS (SELECT 1 FROM events WHERE global_position = p)
                AND NOT EXISTS (SELECT 1 FROM projection_host.holes WHERE p BETWEEN from_position AND to_position)"
        ))
        .await;
    assert_eq!(unaccounted, 0);
    db.drop_db().await;
}
