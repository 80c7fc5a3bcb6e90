use std::time::Duration;

use super::{becomes_active, every_partition_runs, sha};
use crate::fleet_support::{assert_exactly_once, balanced, caught_up};
use crate::support::{Host, TestDb};

/// Each host mounts its own plugins directory. Replacing the file on one host only registers
/// the new bytes; every host then runs the registered version, whatever its own file says.
#[tokio::test]
async fn a_file_replaced_on_one_host_is_run_by_every_host() {
    let db = TestDb::new("mounted").await;
    db.append_w1(0, 2_999, 100).await;
    let dir = |name: &str| {
        let d = std::env::temp_dir().join(format!("ph-mount-{name}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(test_artifacts::BANK_BALANCES, d.join("bank_balances.wasm")).unwrap();
        d
    };
    let (dir_a, dir_b) = (dir("a"), dir("b"));
    let args = |worker: &'static str, d: &std::path::Path| {
        vec![
            "--plugins".to_string(),
            d.display().to_string(),
            "--worker-id".into(),
            worker.into(),
            "--replica-set".into(),
            "fleet".into(),
            "--heartbeat-interval".into(),
            "300ms".into(),
            "--stale-worker-timeout".into(),
            "3s".into(),
            "--plugin-scan-interval".into(),
            "500ms".into(),
        ]
    };
    let args_a = args("a", &dir_a);
    let args_b = args("b", &dir_b);
    let a = Host::run(
        "a",
        &db.url,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let _b = Host::run(
        "b",
        &db.url,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    balanced(&db, &["a", "b"]).await;

    // Only b's directory gets the new build (as a ConfigMap update reaches pods at different times).
    let tmp = dir_b.join(".bank_balances.wasm.tmp");
    std::fs::copy(test_artifacts::GUEST_BANK_BALANCES_V2, &tmp).unwrap();
    std::fs::rename(&tmp, dir_b.join("bank_balances.wasm")).unwrap();
    let v2 = sha(test_artifacts::GUEST_BANK_BALANCES_V2);
    becomes_active(
        &db,
        &v2,
        "b to register the new file",
        Duration::from_secs(30),
    )
    .await;
    db.append_w1(3_000, 5_999, 100).await;
    every_partition_runs(&db, "bank_balances", &v2).await;
    caught_up(&db).await;
    assert_exactly_once(&db).await;
    a.wait_for_log(
        "swapping the plugin at this batch boundary",
        Duration::from_secs(10),
    )
    .await;
    let source: String =
        sqlx::query_scalar("SELECT source FROM projection_host.plugins WHERE sha256 = $1")
            .bind(&v2)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        source.contains(&dir_b.display().to_string()),
        "registered from b's mount: {source}"
    );
    // a's own file is still v1; a restart of a must not bring v1 back.
    drop(a);
    let _a = Host::run(
        "a again",
        &db.url,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    db.append_w1(6_000, 6_999, 100).await;
    caught_up(&db).await;
    let v1 = sha(test_artifacts::BANK_BALANCES);
    let late_v1 = db
        .scalar_i64(&format!("SELECT count(*) FROM projection_host.batches WHERE plugin_sha256 = '{v1}' AND to_position > 6000"))
        .await;
    assert_eq!(
        late_v1, 0,
        "the stale mounted file must not be re-activated"
    );
    std::fs::remove_dir_all(&dir_a).ok();
    std::fs::remove_dir_all(&dir_b).ok();
    db.drop_db().await;
}
