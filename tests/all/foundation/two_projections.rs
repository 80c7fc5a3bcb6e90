use std::time::Duration;

use crate::support::{Host, TestDb};

/// Two projections in one host keep independent checkpoints: one added later replays the whole
/// stream while the other only continues.
#[tokio::test]
async fn projections_in_one_host_have_independent_checkpoints() {
    let db = TestDb::new("two").await;
    db.append_w1(0, 7_999, 80).await;
    let mut host = Host::run(
        "only-bank",
        &db.url,
        &["--once", "--plugin", test_artifacts::BANK_BALANCES],
    );
    assert!(
        host.wait(Duration::from_secs(60)).await.success(),
        "{}",
        host.log()
    );
    db.append_w1(8_000, 11_999, 80).await;
    let mut host = Host::run(
        "both",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::EVENT_COUNTER,
        ],
    );
    assert!(
        host.wait(Duration::from_secs(60)).await.success(),
        "{}",
        host.log()
    );

    assert!(db.check_w1().await.exact());
    let counted: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT event_type, events, first_position, last_position FROM event_counter.event_counts ORDER BY event_type",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let truth: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT event_type, count(*), min(global_position), max(global_position) FROM events GROUP BY event_type ORDER BY event_type",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(counted, truth);
    let applied = |p: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT sum(events)::int8 FROM projection_host.batches WHERE projection = $1",
            )
            .bind(p)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        applied("bank_balances").await,
        12_000,
        "bank_balances continued from its checkpoint"
    );
    assert_eq!(
        applied("event_counter").await,
        12_000,
        "event_counter started from the beginning"
    );
    db.drop_db().await;
}
