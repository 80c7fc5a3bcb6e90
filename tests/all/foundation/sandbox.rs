//! A plugin that traps, loops, hogs memory or rejects an event: the batch rolls back, the error
//! names the projection and the position, the host retries with backoff and stays up, and the
//! other projection in the same host keeps going.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Host, TestDb};

async fn poison_is_contained(label: &str, poison: &str, expected_error: &str) {
    let db = TestDb::new(label).await;
    db.append_w1(0, 1_999, 20).await;
    db.append("Faults", "a1", "Fine", json!({})).await;
    db.append("Faults", "a2", "Fine", json!({})).await;
    let poison_at = db.append("Faults", "a3", poison, json!({})).await;
    db.append("Faults", "a4", "Fine", json!({})).await;

    let host = Host::run(
        label,
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--plugin-call-timeout",
            "1s",
            "--plugin-memory-limit",
            "32MiB",
        ],
    );
    // The failure is reported with the projection, the position and the reason ...
    let isolated = format!("[while handling event at position {poison_at}]");
    // The single failing event is retried (with backoff) rather than skipped.
    let log = eventually(
        "the failing event to be retried",
        Duration::from_secs(60),
        || async {
            let log = host.log();
            (log.lines().filter(|l| l.contains(&isolated)).count() >= 2).then_some(log)
        },
    )
    .await;
    for line in log.lines().filter(|l| l.contains(&isolated)) {
        assert!(line.contains(expected_error), "{line}");
        assert!(line.contains("projection=\"faulty\""), "{line}");
    }

    // ... the failing batch rolled back; the host contained it by partition: the poison's
    // partition committed exactly the events before it, and every other partition went on
    // (a4, after the poison but in another partition, is applied) ...
    assert_ne!(
        projection_host::ids::PartitionId::of("a3", 32),
        projection_host::ids::PartitionId::of("a4", 32)
    );
    eventually(
        "the other partitions to go past the poison",
        Duration::from_secs(60),
        || async {
            let seen: Vec<String> =
                sqlx::query_scalar("SELECT aggregate_id FROM faulty.seen ORDER BY 1")
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            (seen == ["a1", "a2", "a4"]).then_some(())
        },
    )
    .await;
    // The poison's partition commits the part before the poison after the other partitions
    // (the narrowing runs them first), so its checkpoint is awaited; it never passes the poison.
    let poisoned = projection_host::ids::PartitionId::of("a3", 32).as_i32();
    let checkpoint_sql = format!("SELECT position FROM projection_host.checkpoints WHERE projection = 'faulty' AND partition = {poisoned}");
    let stopped_at = eventually(
        "the poison's partition to commit the events before it",
        Duration::from_secs(60),
        || async {
            let at = db.scalar_i64(&checkpoint_sql).await;
            (at >= poison_at - 1).then_some(at)
        },
    )
    .await;
    assert_eq!(
        stopped_at,
        poison_at - 1,
        "the poison's partition stops right before it"
    );
    assert_eq!(db.lowest_checkpoint("faulty").await, poison_at - 1);

    // ... and the other projection keeps going, also with events appended after the failure.
    db.append_w1(2_000, 2_999, 20).await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "bank_balances to catch up",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await >= head).then_some(()) },
    )
    .await;
    assert!(db.check_w1().await.exact());

    let mut host = host;
    assert!(host.is_running(), "the host must survive a failing plugin");
    host.signal(libc::SIGTERM);
    assert!(
        host.wait(Duration::from_secs(30)).await.success(),
        "{}",
        host.log()
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_trapping_plugin_is_contained() {
    poison_is_contained("trap", "Trap", "the plugin trapped: wasm trap: wasm `unreachable` instruction executed; plugin output: thread '<unnamed>' (1) panicked at tests/guests/faulty/src/lib.rs").await;
}

#[tokio::test]
async fn an_endless_loop_hits_the_cpu_deadline() {
    poison_is_contained(
        "loop",
        "Loop",
        "exceeded its CPU deadline of 1s (limit plugin_call_timeout)",
    )
    .await;
}

#[tokio::test]
async fn a_memory_hog_hits_the_memory_limit() {
    poison_is_contained(
        "hog",
        "Hog",
        "exceeded its memory limit of 32 MiB (limit plugin_memory_limit)",
    )
    .await;
}

#[tokio::test]
async fn a_rejected_event_is_reported_with_its_position() {
    poison_is_contained("reject", "Reject", "this event is rejected on purpose").await;
}
