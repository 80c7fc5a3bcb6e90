use std::time::Duration;

use super::support::{assert_exactly_once, balanced, caught_up, host, owners};
use crate::support::{eventually, TestDb, Writer};

/// 1 -> 3 hosts while a writer appends: balanced at each step, exact at the end, and the
/// partitions that stayed with their owner were never paused or re-claimed.
#[tokio::test]
async fn scaling_out_moves_only_what_must_move_and_stays_exact() {
    let db = TestDb::new("scale").await;
    db.append_w1(0, 9_999, 200).await;
    let writer = Writer::start(db.pool.clone(), 10_000, 200, 40, Duration::from_millis(20));
    let _a = host(&db, "a", &[]);
    balanced(&db, &["a"]).await;
    let before = owners(&db).await;

    let _b = host(&db, "b", &[]);
    balanced(&db, &["a", "b"]).await;
    let _c = host(&db, "c", &[]);
    balanced(&db, &["a", "b", "c"]).await;
    let after = owners(&db).await;

    // Keep writing a little longer with three owners, then let them drain.
    let target = writer.appended() + 1_000;
    eventually(
        "more events with three hosts",
        Duration::from_secs(60),
        || async { (writer.appended() >= target).then_some(()) },
    )
    .await;
    let total = writer.stop().await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM events").await as u64,
        total
    );

    // Partitions that stayed on `a` kept their epoch: never released, never re-claimed.
    let stayed: Vec<i32> = after
        .iter()
        .filter(|(p, o)| o.owner.as_deref() == Some("a") && before[p].epoch == o.epoch)
        .map(|(p, _)| *p)
        .collect();
    let kept_by_a = after
        .values()
        .filter(|o| o.owner.as_deref() == Some("a"))
        .count();
    assert_eq!(
        stayed.len(),
        kept_by_a,
        "every partition a kept must have kept its epoch"
    );
    assert!(stayed.len() >= 10, "a keeps about a third: {stayed:?}");
    // Moved partitions were claimed anew.
    for (p, o) in &after {
        if o.owner.as_deref() != Some("a") {
            assert!(o.epoch > before[p].epoch, "p{p} moved without a new epoch");
        }
    }
    // And they kept committing throughout: no long gap between their commits while b and c
    // joined (a pause would show as a gap of at least a whole handoff).
    let gaps: Vec<(i32, f64)> = sqlx::query_as(
        "WITH commits AS (
             SELECT p, committed_at, lag(committed_at) OVER (PARTITION BY p ORDER BY committed_at) AS previous
               FROM projection_host.batches, unnest(partitions) AS p
              WHERE projection = 'bank_balances' AND p = ANY($1) AND events > 0)
         SELECT p, extract(epoch FROM max(committed_at - previous))::float8 FROM commits GROUP BY p",
    )
    .bind(&stayed)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (p, gap) in gaps {
        assert!(
            gap < 2.0,
            "partition {p} stayed with a but paused for {gap:.2}s"
        );
    }
    db.drop_db().await;
}
