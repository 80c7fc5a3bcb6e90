use std::time::Duration;

use serde_json::json;

use super::ids_in_distinct_partitions;
use crate::support::{admin_cli, eventually, HttpHost, TestDb};

fn cli(h: &HttpHost, args: &[&str]) -> String {
    admin_cli(&h.health, args)
}

type Seen = Vec<(String, i64, Option<i64>)>;

async fn seen(db: &TestDb) -> Seen {
    sqlx::query_as("SELECT aggregate_id, n, last_position FROM faulty.seen ORDER BY 1")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Dead-letter policy: the failing event is parked with every later event of its aggregate,
/// everything else keeps flowing; retry applies them in order once the cause is fixed; skip drops
/// one for good.
#[tokio::test]
async fn poison_events_are_parked_per_aggregate_and_can_be_retried_or_skipped() {
    let db = TestDb::new("deadletter").await;
    let ids = ids_in_distinct_partitions(3);
    let (poisoned, trapped, healthy) = (&ids[0], &ids[1], &ids[2]);
    let mut positions = std::collections::HashMap::<String, Vec<i64>>::new();
    let append = |id: &str, kind: &str| {
        let (db, id, kind) = (&db, id.to_string(), kind.to_string());
        async move { (id.clone(), db.append("Faults", &id, &kind, json!({})).await) }
    };
    for (id, kind) in [
        (poisoned, "Fine"),
        (healthy, "Fine"),
        (poisoned, "RejectUntilFixed"),
        (trapped, "Fine"),
        (poisoned, "Fine"),
        (trapped, "Trap"),
        (healthy, "Fine"),
        (trapped, "Fine"),
        (poisoned, "Fine"),
    ] {
        let (id, p) = append(id, kind).await;
        positions.entry(id).or_default().push(p);
    }
    let h = HttpHost::run(
        "deadletter",
        &db.url,
        &[
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--projection",
            "faulty:on_failure=dead-letter,max_retries=1",
        ],
    );
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "the projection to pass every event",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("faulty").await >= head).then_some(()) },
    )
    .await;

    // Exactly the poison events and the later events of their aggregates are parked.
    let parked: Vec<(String, i64, String, String)> = sqlx::query_as(
        "SELECT aggregate_id, position, event_type, error FROM projection_host.dead_letters ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected: Vec<(String, i64, &str)> = vec![
        (poisoned.clone(), positions[poisoned][1], "RejectUntilFixed"),
        (poisoned.clone(), positions[poisoned][2], "Fine"),
        (trapped.clone(), positions[trapped][1], "Trap"),
        (trapped.clone(), positions[trapped][2], "Fine"),
        (poisoned.clone(), positions[poisoned][3], "Fine"),
    ];
    let mut expected = expected;
    expected.sort_by_key(|e| e.1);
    assert_eq!(parked.len(), expected.len(), "{parked:?}");
    for ((agg, pos, kind, error), (e_agg, e_pos, e_kind)) in parked.iter().zip(&expected) {
        assert_eq!((agg, pos, kind.as_str()), (e_agg, e_pos, *e_kind));
        if kind == "Fine" {
            assert!(error.contains("follows a parked event"), "{error}");
        } else {
            assert!(error.contains("failed 2 times"), "{error}");
        }
    }
    assert!(parked.iter().any(|p| p.3.contains("is not fixed yet")));
    assert!(parked.iter().any(|p| p.3.contains("trapped")));
    // Every other event was applied: the healthy aggregate fully, the others up to the poison.
    assert_eq!(
        seen(&db).await,
        vec![
            (poisoned.clone(), 1, Some(positions[poisoned][0])),
            (trapped.clone(), 1, Some(positions[trapped][0])),
            (healthy.clone(), 2, Some(positions[healthy][1])),
        ]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Seen>()
    );
    // A later event of a parked aggregate is parked too; a later event of a healthy one is not.
    let (_, late_poisoned) = append(poisoned, "Fine").await;
    let (_, late_healthy) = append(healthy, "Fine").await;
    eventually("the late events", Duration::from_secs(30), || async {
        (db.lowest_checkpoint("faulty").await >= late_healthy).then_some(())
    })
    .await;
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM projection_host.dead_letters WHERE position = {late_poisoned}"
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT n FROM faulty.seen WHERE aggregate_id = '{healthy}'"
        ))
        .await,
        3
    );

    // The list, through the CLI.
    let listed = cli(&h, &["dead-letters", "list", "--projection", "faulty"]);
    assert_eq!(listed.lines().count(), 6, "{listed}");
    assert!(listed.contains("RejectUntilFixed"), "{listed}");

    // Fix the cause, retry: the aggregate's parked events are applied in order.
    sqlx::query("INSERT INTO faulty.fixed VALUES ($1)")
        .bind(poisoned)
        .execute(&db.pool)
        .await
        .unwrap();
    let out = cli(
        &h,
        &[
            "dead-letters",
            "retry",
            "--projection",
            "faulty",
            "--aggregate",
            poisoned,
        ],
    );
    assert!(out.contains("retrying 4 parked event(s)"), "{out}");
    eventually("the retried events to be applied", Duration::from_secs(30), || async {
        (db.scalar_i64(&format!("SELECT count(*) FROM projection_host.dead_letters WHERE aggregate_id = '{poisoned}'")).await == 0).then_some(())
    })
    .await;
    let (n, last): (i64, i64) =
        sqlx::query_as("SELECT n, last_position FROM faulty.seen WHERE aggregate_id = $1")
            .bind(poisoned)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (n, last),
        (5, late_poisoned),
        "all of the aggregate's events, the last one last"
    );

    // The trap stays a trap: skip it; its follower stays parked until retried.
    let trap_id = db
        .scalar_i64(&format!(
            "SELECT id FROM projection_host.dead_letters WHERE position = {}",
            positions[trapped][1]
        ))
        .await;
    let out = cli(&h, &["dead-letters", "skip", &trap_id.to_string()]);
    assert!(out.contains("skipped"), "{out}");
    cli(
        &h,
        &[
            "dead-letters",
            "retry",
            "--projection",
            "faulty",
            "--aggregate",
            trapped,
        ],
    );
    eventually(
        "the trapped aggregate's follower to be applied",
        Duration::from_secs(30),
        || async {
            (db.scalar_i64("SELECT count(*) FROM projection_host.dead_letters")
                .await
                == 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT n FROM faulty.seen WHERE aggregate_id = '{trapped}'"
        ))
        .await,
        2,
        "the skipped event was never applied"
    );
    db.drop_db().await;
}
