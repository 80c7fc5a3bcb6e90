use std::path::PathBuf;
use std::time::Duration;

use crate::support::{eventually, series, HttpHost, TestDb};

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python");
    let python = std::env::var("PROJECTION_HOST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or(venv);
    assert!(
        python.is_file(),
        "{} is missing: scripts/test installs the manifest validator (pip install -r deploy/requirements.txt)",
        python.display()
    );
    python
}

/// Every manifest validates against the Kubernetes schemas, and every metric the dashboard,
/// the alerts and the HPA query exists in a scrape of a running host.
#[tokio::test]
async fn manifests_validate_and_query_only_exported_metrics() {
    let db = TestDb::new("deploy").await;
    db.append_w1(0, 99, 10).await;
    // A halted partition too, so that the series only a halt exports are in the scrape.
    db.append("Faults", "f1", "Reject", serde_json::json!({}))
        .await;
    let h = HttpHost::run(
        "deploy",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--max-retries",
            "0",
        ],
    );
    let scrape = eventually("a scrape after the first batch and the halt", Duration::from_secs(30), || async {
        let s = h.scrape().await;
        (series(&s, "pupsourcing_orchestrator_events_processed_total{projection=\"bank_balances\",replica_set=\"default\"}") == Some(100.0)
            && s.contains("projection_host_halted_position{")).then_some(s)
    })
    .await;
    let file = std::env::temp_dir().join(format!("ph-scrape-{:08x}.txt", rand::random::<u32>()));
    std::fs::write(&file, scrape).unwrap();
    let validator = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/validate.py");
    let out = std::process::Command::new(python())
        .arg(validator)
        .arg("--scrape")
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_file(&file).ok();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("deployment files are valid"), "{text}");
    db.drop_db().await;
}
