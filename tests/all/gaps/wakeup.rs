use std::time::{Duration, Instant};

use crate::support::{eventually, Host, TestDb};

/// With a poll interval of an hour, an idle host backs off to ever longer waits; a NOTIFY
/// (from our trigger, or on pupsourcing's channel) must still wake it at once.
async fn woken_by(notify: &str) {
    let db = TestDb::new("wakeup").await;
    if notify == "trigger" {
        let out = std::process::Command::new(crate::support::host::BIN)
            .args([
                "migrate",
                "--install-notify-trigger",
                "--database-url",
                &db.url,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    db.append_w1(0, 99, 10).await;
    let _host = Host::run(
        "idle",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--poll-interval",
            "3600s",
        ],
    );
    eventually("first catch-up", Duration::from_secs(30), || async {
        (db.lowest_checkpoint("bank_balances").await >= 100).then_some(())
    })
    .await;
    // Idle for a while: the tracker's next look is now seconds away (waits double when idle).
    tokio::time::sleep(Duration::from_secs(4)).await;

    let appended = Instant::now();
    let mut tx = db.pool.begin().await.unwrap();
    super::insert_w1(&mut tx, 100, 100, 10).await;
    if notify == "pupsourcing" {
        sqlx::query("SELECT pg_notify('pupsourcing_events', '101')")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    eventually("the new event", Duration::from_secs(30), || async {
        (db.lowest_checkpoint("bank_balances").await >= 101).then_some(())
    })
    .await;
    let latency = appended.elapsed();
    assert!(
        latency < Duration::from_secs(2),
        "woken after {latency:?}: the notification was not used"
    );
    assert!(db.check_w1().await.exact());
    db.drop_db().await;
}

#[tokio::test]
async fn the_notify_trigger_wakes_an_idle_host() {
    woken_by("trigger").await;
}

#[tokio::test]
async fn pupsourcing_s_notify_channel_wakes_an_idle_host() {
    woken_by("pupsourcing").await;
}
