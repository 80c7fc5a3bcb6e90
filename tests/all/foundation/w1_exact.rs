use std::time::Duration;

use crate::support::{Host, TestDb};

#[tokio::test]
async fn bank_balances_projects_w1_exactly_and_audits_every_batch() {
    let db = TestDb::new("w1").await;
    db.append_w1(0, 29_999, 300).await;
    let mut host = Host::run(
        "w1",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--batch-size",
            "700",
            "--max-batch-size",
            "3000",
        ],
    );
    let status = host.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "host failed:\n{}", host.log());

    let check = db.check_w1().await;
    assert_eq!(check.mismatches, 0, "read model differs from the SQL truth");
    assert_eq!(check.accounts, 300);
    assert_eq!(check.events_counted, 30_000);
    assert_eq!(check.events_in_store, 30_000);

    // Every partition's checkpoint reached the head, and the audit covers every event once.
    assert_eq!(db.lowest_checkpoint("bank_balances").await, 30_000);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM projection_host.checkpoints WHERE projection = 'bank_balances'"
        )
        .await,
        32
    );
    assert_eq!(db.scalar_i64("SELECT sum(events)::int8 FROM projection_host.batches WHERE projection = 'bank_balances'").await, 30_000);
    let versions = db
        .scalar_i64("SELECT count(DISTINCT plugin_sha256) FROM projection_host.batches")
        .await;
    assert_eq!(versions, 1);
    // Batches grew while catching up: fewer than with the live batch size alone.
    let batches = db
        .scalar_i64("SELECT count(*) FROM projection_host.batches WHERE events > 0")
        .await;
    assert!(
        batches < 30_000 / 700,
        "batches did not grow while catching up: {batches}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_restarted_host_applies_only_new_events() {
    let db = TestDb::new("w1_more").await;
    db.append_w1(0, 4_999, 50).await;
    let mut host = Host::run(
        "first",
        &db.url,
        &["--once", "--plugin", test_artifacts::BANK_BALANCES],
    );
    assert!(
        host.wait(Duration::from_secs(60)).await.success(),
        "{}",
        host.log()
    );
    db.append_w1(5_000, 9_999, 50).await;
    let mut host = Host::run(
        "second",
        &db.url,
        &["--once", "--plugin", test_artifacts::BANK_BALANCES],
    );
    assert!(
        host.wait(Duration::from_secs(60)).await.success(),
        "{}",
        host.log()
    );
    let check = db.check_w1().await;
    assert!(check.exact(), "{check:?}");
    assert_eq!(
        db.scalar_i64("SELECT sum(events)::int8 FROM projection_host.batches")
            .await,
        10_000,
        "an event was applied twice"
    );
    db.drop_db().await;
}
