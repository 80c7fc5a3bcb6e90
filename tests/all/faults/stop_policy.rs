use std::time::Duration;

use serde_json::json;

use super::ids_in_distinct_partitions;
use crate::support::{admin_cli, eventually, HttpHost, TestDb, ADMIN_TOKEN};

/// Stop policy (the default): after its retries the failing event's partition halts there and
/// is reported; other partitions keep going; resume after the fix continues it exactly.
#[tokio::test]
async fn the_stop_policy_halts_one_partition_until_resumed() {
    let db = TestDb::new("stop").await;
    let ids = ids_in_distinct_partitions(2);
    let (bad, good) = (&ids[0], &ids[1]);
    db.append("Faults", bad, "Fine", json!({})).await;
    let poison = db
        .append("Faults", bad, "RejectUntilFixed", json!({}))
        .await;
    db.append("Faults", bad, "Fine", json!({})).await;
    db.append("Faults", good, "Fine", json!({})).await;
    let h = HttpHost::run(
        "stop",
        &db.url,
        &[
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--max-retries",
            "1",
        ],
    );
    let partition = projection_host::ids::PartitionId::of(bad, 32).as_i32();
    eventually("the partition to halt", Duration::from_secs(60), || async {
        (db.scalar_i64_or_zero(&format!("SELECT count(*) FROM projection_host.halts WHERE partition = {partition} AND position = {poison}")).await == 1).then_some(())
    })
    .await;
    // Other partitions keep going, also with new events.
    let later = db.append("Faults", good, "Fine", json!({})).await;
    eventually(
        "the other partition to go on",
        Duration::from_secs(30),
        || async {
            (db.scalar_i64(&format!(
                "SELECT n FROM faulty.seen WHERE aggregate_id = '{good}'"
            ))
            .await
                == 2)
                .then_some(())
        },
    )
    .await;
    let halted_checkpoint = db
        .scalar_i64(&format!("SELECT position FROM projection_host.checkpoints WHERE projection = 'faulty' AND partition = {partition}"))
        .await;
    assert!(
        halted_checkpoint < poison,
        "the halted partition stays before the failing event"
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT n FROM faulty.seen WHERE aggregate_id = '{bad}'"
        ))
        .await,
        1
    );
    // Reported: status (admin API) and log.
    let status: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/admin/status", h.health))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["projections"][0]["halted"],
        json!([[partition, poison]])
    );
    assert!(h.host.log().contains("partition halted at a failing event"));
    assert!(later > poison);

    // Fix, resume: the partition continues from the failing event, in order.
    sqlx::query("INSERT INTO faulty.fixed VALUES ($1)")
        .bind(bad)
        .execute(&db.pool)
        .await
        .unwrap();
    admin_cli(&h.health, &["resume", "faulty"]);
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "the halted partition to catch up",
        Duration::from_secs(30),
        || async { (db.lowest_checkpoint("faulty").await >= head).then_some(()) },
    )
    .await;
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT n FROM faulty.seen WHERE aggregate_id = '{bad}'"
        ))
        .await,
        3
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.halts")
            .await,
        0
    );
    db.drop_db().await;
}
