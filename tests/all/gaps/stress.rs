use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{insert_w1, QUICK};
use crate::support::{eventually, Host, TestDb};

/// Many concurrent writers with random transaction lengths and random rollbacks, while the
/// host projects: the read model ends equal to the SQL truth, and every missing position is a
/// recorded hole.
#[tokio::test]
async fn random_writers_with_delays_and_rollbacks_lose_nothing() {
    let db = TestDb::new("stress").await;
    let mut args = vec![
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--batch-size",
        "50",
    ];
    args.extend(QUICK);
    let _host = Host::run("stress", &db.url, &args);
    let next = Arc::new(AtomicI64::new(0));
    let rolled_back = Arc::new(AtomicI64::new(0));
    let until = Instant::now() + Duration::from_secs(8);
    let mut writers = Vec::new();
    for _ in 0..8 {
        let (pool, next, rolled_back) = (db.pool.clone(), next.clone(), rolled_back.clone());
        writers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let (n, hold, commit) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(1..=5i64),
                        rng.random_range(0..300u64),
                        rng.random_bool(0.8),
                    )
                };
                let from = next.fetch_add(n, Ordering::SeqCst);
                let mut tx = pool.begin().await.unwrap();
                insert_w1(&mut tx, from, from + n - 1, 37).await;
                tokio::time::sleep(Duration::from_millis(hold)).await;
                if commit {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                    rolled_back.fetch_add(n, Ordering::SeqCst);
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "catch-up after the stress",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await >= head).then_some(()) },
    )
    .await;
    let check = db.check_w1().await;
    assert!(check.exact(), "{check:?}");
    assert!(
        rolled_back.load(Ordering::SeqCst) > 0,
        "the stress must include rollbacks"
    );
    let holes = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM generate_series(1, {head}) AS p
              WHERE EXISTS (SELECT 1 FROM projection_host.holes WHERE p BETWEEN from_position AND to_position)"
        ))
        .await;
    let missing = head - db.scalar_i64("SELECT count(*) FROM events").await;
    assert_eq!(
        holes, missing,
        "every missing position below the head is a recorded hole, and nothing else is"
    );
    db.drop_db().await;
}
