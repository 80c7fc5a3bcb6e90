use std::time::Duration;

use serde_json::json;

use crate::support::{Host, TestDb};

/// A plugin's SQL runs in a session of its own role: reading the events table, writing the
/// host's checkpoints, writing another projection's schema (by SQL or the keyed API) and
/// leaving its role all fail, the failures go through the failure policy, and nothing is touched. WASI gives
/// it no files, environment, clock or network.
#[tokio::test]
async fn plugins_cannot_reach_outside_their_read_model() {
    let db = TestDb::new("isolation").await;
    db.append_w1(0, 199, 10).await;
    let mut attempts = Vec::new();
    for kind in [
        "ReadEvents",
        "WriteCheckpoint",
        "WriteOther",
        "KeyedOther",
        "Escape",
        "Ambient",
    ] {
        attempts.push((kind, db.append("Intrusion", kind, kind, json!({})).await));
    }
    // bank_balances' schema and table exist before the intruder runs: its failures must be
    // refusals of access, not "does not exist" from a race with the other projection's setup.
    let mut first = Host::run(
        "isolation-setup",
        &db.url,
        &["--once", "--plugin", test_artifacts::BANK_BALANCES],
    );
    assert!(
        first.wait(Duration::from_secs(120)).await.success(),
        "{}",
        first.log()
    );
    let mut host = Host::run(
        "isolation",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_INTRUDER,
            "--projection",
            "intruder:on_failure=dead-letter,max_retries=0",
        ],
    );
    assert!(
        host.wait(Duration::from_secs(120)).await.success(),
        "{}",
        host.log()
    );

    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT event_type, error FROM projection_host.dead_letters WHERE projection = 'intruder' ORDER BY position")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let error_of = |kind: &str| {
        parked
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("{kind} was not parked: {parked:?}"))
    };
    assert!(
        error_of("ReadEvents").contains("permission denied for table events"),
        "{}",
        error_of("ReadEvents")
    );
    assert!(
        error_of("WriteCheckpoint").contains("permission denied for schema projection_host"),
        "{}",
        error_of("WriteCheckpoint")
    );
    assert!(
        error_of("WriteOther").contains("permission denied for schema bank_balances"),
        "{}",
        error_of("WriteOther")
    );
    assert!(
        error_of("KeyedOther").contains("bank_balances"),
        "{}",
        error_of("KeyedOther")
    );
    assert!(
        error_of("Escape").contains("permission denied for schema projection_host"),
        "RESET ROLE returns to the session user, the projection's own role: {}",
        error_of("Escape")
    );
    assert_eq!(parked.len(), 5, "Ambient is allowed: {parked:?}");

    // Nothing was touched.
    assert!(db.check_w1().await.exact());
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM bank_balances.account_balances WHERE account_id = 'stolen'"
        )
        .await,
        0
    );
    assert_eq!(db.scalar_i64("SELECT min(position) FROM projection_host.checkpoints WHERE projection = 'bank_balances'").await, attempts[5].1);

    let observed: Vec<(String, String)> =
        sqlx::query_as("SELECT what, seen FROM intruder.observations ORDER BY what")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let get = |w: &str| {
        observed
            .iter()
            .find(|(k, _)| k == w)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert!(
        get("files").starts_with("Err("),
        "no filesystem: {}",
        get("files")
    );
    assert_eq!(get("env"), "0", "no environment");
    assert_eq!(get("clock"), "0", "the clock is frozen at the epoch");
    assert!(
        get("network").starts_with("Err("),
        "no network: {}",
        get("network")
    );
    db.drop_db().await;
}
