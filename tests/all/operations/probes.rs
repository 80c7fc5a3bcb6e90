use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, HttpHost, TestDb};

/// /health answers without the database; /ready turns true once the worker holds its partitions,
/// and false as soon as SIGTERM arrives, while /health stays up until the process ends.
#[tokio::test]
async fn readiness_turns_false_first_on_sigterm() {
    let db = TestDb::new("probes").await;
    db.append_w1(0, 99, 10).await;
    // A poison event keeps a plugin call in flight for up to its 5 s deadline, so shutdown
    // takes a while and the probes can be observed during it.
    db.append("Faults", "x", "Loop", json!({})).await;
    let mut h = HttpHost::run(
        "probes",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--plugin-call-timeout",
            "5s",
            "--shutdown-timeout",
            "20s",
        ],
    );
    eventually("/health", Duration::from_secs(30), || async {
        h.get("/health").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let (_, body) = eventually("/ready", Duration::from_secs(30), || async {
        h.get("/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["partitions_held"], 32);
    h.host
        .wait_for_log(
            "calling the plugin projection=\"faulty\"",
            Duration::from_secs(30),
        )
        .await;

    h.host.signal(libc::SIGTERM);
    let (_, body) = eventually("/ready to turn false", Duration::from_secs(10), || async {
        h.get("/ready").await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert!(body.contains("shutting down"), "{body}");
    assert_eq!(
        h.get("/health").await.map(|(s, _)| s),
        Some(200),
        "liveness stays up while draining"
    );
    assert!(
        h.host.is_running(),
        "the in-flight call keeps the host draining"
    );
    assert!(
        h.host.wait(Duration::from_secs(30)).await.success(),
        "{}",
        h.host.log()
    );
    assert!(
        h.get("/health").await.is_none(),
        "HTTP stops last, with the process"
    );
    db.drop_db().await;
}
