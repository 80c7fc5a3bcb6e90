use std::time::Duration;

use crate::support::{eventually, Host, TestDb};

/// kill -9 in the middle of catching up, several times, then finish: nothing lost, nothing
/// applied twice.
#[tokio::test]
async fn kill_9_mid_stream_and_restart_is_exact() {
    let db = TestDb::new("crash").await;
    let total = 30_000i64;
    db.append_w1(0, total as u64 - 1, 500).await;
    // A stable worker id, as a restarted container keeps its pod name: the new process
    // reclaims the partitions at once instead of waiting for the stale timeout.
    let args = [
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--batch-size",
        "100",
        "--max-batch-size",
        "100",
        "--worker-id",
        "crash-test",
    ];
    let mut previous = 0;
    for round in 0..3 {
        let mut host = Host::run(&format!("victim-{round}"), &db.url, &args);
        // Wait until this incarnation committed something new, then kill it without warning.
        let reached = eventually(
            "progress before the kill",
            Duration::from_secs(60),
            || async {
                let c = db.highest_checkpoint().await;
                (c > previous + 1_000).then_some(c)
            },
        )
        .await;
        host.kill9();
        assert!(
            reached < total,
            "the host finished before it could be killed; use more events"
        );
        previous = db.highest_checkpoint().await;
    }
    let mut host = Host::run(
        "survivor",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--worker-id",
            "crash-test",
        ],
    );
    assert!(
        host.wait(Duration::from_secs(120)).await.success(),
        "{}",
        host.log()
    );
    let check = db.check_w1().await;
    assert!(check.exact(), "{check:?}");
    assert_eq!(
        db.scalar_i64("SELECT sum(events)::int8 FROM projection_host.batches")
            .await,
        total,
        "the committed batches must cover every event exactly once"
    );
    db.drop_db().await;
}
