use std::time::Duration;

use crate::support::{eventually, Host, TestDb, Writer};

/// The host's database sessions are killed again and again while it works: every batch in
/// flight rolls back, the pool reconnects, and nothing is lost or applied twice.
#[tokio::test]
async fn killed_connections_are_retried_without_loss() {
    let db = TestDb::new("killconn").await;
    db.append_w1(0, 4_999, 100).await;
    let writer = Writer::start(db.pool.clone(), 5_000, 100, 20, Duration::from_millis(10));
    let host = Host::run(
        "killconn",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--batch-size",
            "50",
            "--max-batch-size",
            "200",
        ],
    );
    let mut killed = 0;
    for _ in 0..6 {
        let before = db.highest_checkpoint().await;
        eventually(
            "progress between kills",
            Duration::from_secs(30),
            || async { (db.highest_checkpoint().await > before).then_some(()) },
        )
        .await;
        killed += db
            .scalar_i64(&format!(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE datname = '{}' AND application_name LIKE 'projection-host %'",
                db.name
            ))
            .await;
    }
    assert!(killed >= 6, "sessions were killed: {killed}");
    writer.stop().await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "catch-up after the kills",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await >= head).then_some(()) },
    )
    .await;
    assert!(db.check_w1().await.exact());
    assert_eq!(
        db.scalar_i64("SELECT sum(events)::int8 FROM projection_host.batches")
            .await,
        head,
        "an event was applied twice"
    );
    assert!(
        host.log()
            .contains("terminating connection due to administrator command"),
        "the kills reached the host"
    );
    db.drop_db().await;
}

/// PostgreSQL restarts under a running host: it reconnects by itself and finishes exactly.
#[tokio::test]
async fn a_database_restart_is_survived() {
    // A private server: restarting the shared one would disturb the other tests.
    let dev = projection_host::devdb::DevDatabase::start()
        .expect("a throwaway PostgreSQL (initdb/pg_ctl installed?)");
    let pool = sqlx::PgPool::connect(&dev.url).await.unwrap();
    sqlx::raw_sql(include_str!("../../../bench/w1/w1-schema.sql"))
        .execute(&pool)
        .await
        .unwrap();
    let append = |from: u64, to: u64| {
        include_str!("../../../bench/w1/w1-append.sql")
            .replace(":from", &from.to_string())
            .replace(":to", &to.to_string())
            .replace(":k", "50")
    };
    sqlx::raw_sql(&append(0, 2_999))
        .execute(&pool)
        .await
        .unwrap();
    let host = Host::run(
        "restart",
        &dev.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--batch-size",
            "50",
        ],
    );
    let lowest = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT min(position) FROM projection_host.checkpoints",
        )
        .fetch_one(&pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
    };
    eventually("first catch-up", Duration::from_secs(60), || async {
        (lowest(pool.clone()).await >= 3_000).then_some(())
    })
    .await;

    dev.restart().unwrap();
    // Appends after the restart (the pool reconnects; the first attempt may hit a dead session).
    let mut appended = false;
    for _ in 0..50 {
        if sqlx::raw_sql(&append(3_000, 5_999))
            .execute(&pool)
            .await
            .is_ok()
        {
            appended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(appended);
    eventually(
        "catch-up after the restart",
        Duration::from_secs(90),
        || async { (lowest(pool.clone()).await >= 6_000).then_some(()) },
    )
    .await;
    let check = projection_host::bench::check_w1(&dev.url, "bank_balances")
        .await
        .unwrap();
    assert!(check.exact(), "{check:?}");
    let applied: i64 = sqlx::query_scalar("SELECT sum(events)::int8 FROM projection_host.batches")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 6_000);
    let log = host.log();
    assert!(log.contains("WARN"), "the outage was reported:\n{log}");
    drop(host);
    pool.close().await;
}
