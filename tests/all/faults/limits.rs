use std::time::Duration;

use serde_json::json;

use crate::support::{Host, TestDb};

/// Limits are set per projection, and a breach names the limit and its value.
#[tokio::test]
async fn per_projection_limits_apply_and_are_named_when_hit() {
    let db = TestDb::new("limits").await;
    db.append("Faults", "h", "Hog", json!({})).await;
    let host = Host::run(
        "limits",
        &db.url,
        &[
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--plugin-memory-limit",
            "512MiB",
            "--projection",
            "faulty:memory=16MiB,timeout=2s",
        ],
    );
    host.wait_for_log(
        "exceeded its memory limit of 16 MiB (limit plugin_memory_limit)",
        Duration::from_secs(60),
    )
    .await;
    db.drop_db().await;
}

/// MAX_BATCH_BYTES caps what one call receives.
#[tokio::test]
async fn batches_are_capped_by_bytes() {
    let db = TestDb::new("bytes").await;
    db.append_w1(0, 1_999, 20).await;
    let mut host = Host::run(
        "bytes",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--max-batch-size",
            "1000",
            "--max-batch-bytes",
            "2KiB",
        ],
    );
    assert!(
        host.wait(Duration::from_secs(60)).await.success(),
        "{}",
        host.log()
    );
    assert!(db.check_w1().await.exact());
    // W1 events carry 12 to 14 bytes of payload and 2 of metadata: at most 2048 / 14 per call.
    let largest = db
        .scalar_i64("SELECT max(events)::int8 FROM projection_host.batches")
        .await;
    assert!((100..=146).contains(&largest), "largest batch: {largest}");
    db.drop_db().await;
}
