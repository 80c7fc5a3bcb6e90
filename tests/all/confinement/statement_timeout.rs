//! Plugin SQL that hits the statement timeout is a plugin failure (the policy applies, the batch
//! is not retried for ever), and a statement the host abandons is ended on the server.

use std::time::Duration;

use serde_json::json;

use super::support::{append_attacks, applied, hostile_role, parked, Attack};
use crate::support::{eventually, Host, TestDb};

#[tokio::test]
async fn a_statement_timeout_goes_to_the_failure_policy_and_nothing_keeps_running() {
    let db = TestDb::new("stmt_timeout").await;
    let mut host = Host::run(
        "stmt_timeout",
        &db.url,
        &[
            "--plugin",
            test_artifacts::GUEST_HOSTILE,
            "--projection",
            "hostile:on_failure=dead-letter,max_retries=1,timeout=1s",
        ],
    );
    // One at a time, so that each is a batch of its own.
    for (i, attack) in [
        Attack {
            name: "sleep",
            steps: json!([{"query": "SELECT pg_sleep(30)"}]),
        },
        // The plugin lifts its own statement timeout: the host's wall-clock limit (the call's
        // deadline plus its grace) abandons the call and ends the statement.
        Attack {
            name: "sleep_untimed",
            steps: json!([
            {"execute": "SET LOCAL statement_timeout = 0"},
            {"query": "SELECT pg_sleep(600)"}]),
        },
        Attack {
            name: "after",
            steps: json!([{"query": "SELECT 1"}]),
        },
    ]
    .into_iter()
    .enumerate()
    {
        append_attacks(&db, &[attack]).await;
        eventually(
            "the event to be handled",
            Duration::from_secs(120),
            || async {
                let done = super::support::handled(&db).await;
                (done > i).then_some(())
            },
        )
        .await;
    }
    let parked = parked(&db).await;
    assert!(
        parked
            .get("sleep")
            .is_some_and(|e| e.contains("statement timeout")),
        "{parked:#?}"
    );
    assert!(
        parked
            .get("sleep_untimed")
            .is_some_and(|e| e.contains("did not return within")),
        "{parked:#?}"
    );
    assert_eq!(applied(&db).await, vec!["after".to_string()]);
    let role = hostile_role(&db).await;
    let sleeping = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND query LIKE '%pg_sleep%' AND state = 'active'"
        ))
        .await;
    assert_eq!(
        sleeping, 0,
        "an abandoned statement still runs on the server"
    );
    // Each failing event was tried twice (max_retries=1), not retried for ever.
    let rollbacks = host.log().matches("batch rolled back").count();
    assert!(rollbacks <= 8, "{rollbacks} rollbacks:\n{}", host.log());
    host.kill9();
    db.drop_db().await;
}
