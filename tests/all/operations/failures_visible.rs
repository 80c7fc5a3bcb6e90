//! Stopped work is visible: halted and paused partitions in the metrics (with lag that keeps
//! growing) and in `status`; a panicked pipeline is logged, counted and restarted; logs keep one
//! type per field and stay JSON in JSON mode; `status | head` does not panic.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::host::BIN;
use crate::support::{eventually, series, Host, HttpHost, TestDb, ADMIN_TOKEN};

fn partition_series(name: &str, partition: i32, extra: &str) -> String {
    format!(
        "{name}{{partition=\"{partition}\",projection=\"faulty\",replica_set=\"default\"{extra}}}"
    )
}

#[tokio::test]
async fn halted_and_paused_partitions_show_in_metrics_and_status_with_growing_lag() {
    let db = TestDb::new("visible").await;
    let ids = crate::faults::ids_in_distinct_partitions(2);
    let (bad, good) = (&ids[0], &ids[1]);
    db.append("Faults", good, "Fine", json!({})).await;
    let poison = db.append("Faults", bad, "Reject", json!({})).await;
    db.append("Faults", bad, "Fine", json!({})).await;
    let h = HttpHost::run(
        "visible",
        &db.url,
        &[
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--max-retries",
            "0",
        ],
    );
    let (bad_p, good_p) = (
        projection_host::ids::PartitionId::of(bad, 32).as_i32(),
        projection_host::ids::PartitionId::of(good, 32).as_i32(),
    );
    let halted = partition_series(
        "projection_host_partition_state",
        bad_p,
        ",state=\"halted\"",
    );
    let bad_lag = partition_series("projection_host_partition_lag_events", bad_p, "");
    let good_lag = partition_series("projection_host_partition_lag_events", good_p, "");
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    let scrape = eventually(
        "the halt in the metrics",
        Duration::from_secs(60),
        || async {
            let s = h.scrape().await;
            (series(&s, &halted) == Some(1.0) && series(&s, &good_lag) == Some(0.0)).then_some(s)
        },
    )
    .await;
    assert_eq!(
        series(
            &scrape,
            &partition_series("projection_host_halted_position", bad_p, "")
        ),
        Some(poison as f64)
    );
    assert_eq!(
        series(&scrape, &bad_lag),
        Some((head - poison + 1) as f64),
        "a halted partition's lag counts every event from the halted one on"
    );
    // The halted partition applied nothing before the poison (its first event), so its
    // checkpoint is 0 while every other partition is at the head.
    let halted_checkpoint = db
        .scalar_i64_or_zero(&format!("SELECT position FROM projection_host.checkpoints WHERE projection = 'faulty' AND partition = {bad_p}"))
        .await;
    assert!(halted_checkpoint < poison);
    assert_eq!(
        series(
            &scrape,
            "projection_host_checkpoint_position{projection=\"faulty\",replica_set=\"default\"}"
        ),
        Some(halted_checkpoint as f64),
        "the checkpoint gauge is the lowest over every held partition, halted ones included"
    );
    let average = series(
        &scrape,
        "projection_lag_events{projection=\"faulty\",replica_set=\"default\"}",
    )
    .unwrap();
    assert!(average >= (head - poison + 1) as f64 / 32.0, "{average}");

    // New events: the halted partition's lag grows, the healthy one's does not.
    for _ in 0..3 {
        db.append("Faults", bad, "Fine", json!({})).await;
        db.append("Faults", good, "Fine", json!({})).await;
    }
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "the halted lag to grow",
        Duration::from_secs(30),
        || async {
            let s = h.scrape().await;
            (series(&s, &bad_lag) == Some((head - poison + 1) as f64)
                && series(&s, &good_lag) == Some(0.0))
            .then_some(())
        },
    )
    .await;

    // Paused: every held partition says so, and the lag keeps growing while paused.
    let paused = reqwest::Client::new()
        .post(format!("{}/admin/projections/faulty/pause", h.health))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"reason": "maintenance"}))
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success());
    let paused_state = partition_series(
        "projection_host_partition_state",
        good_p,
        ",state=\"paused\"",
    );
    eventually(
        "the pause in the metrics",
        Duration::from_secs(30),
        || async { (series(&h.scrape().await, &paused_state) == Some(1.0)).then_some(()) },
    )
    .await;
    let mut last = 0;
    for _ in 0..4 {
        last = db.append("Faults", good, "Fine", json!({})).await;
    }
    eventually(
        "the paused lag to grow",
        Duration::from_secs(30),
        || async {
            let lag = series(&h.scrape().await, &good_lag)?;
            (lag >= 4.0).then_some(())
        },
    )
    .await;
    assert!(
        db.scalar_i64(&format!("SELECT position FROM projection_host.checkpoints WHERE projection = 'faulty' AND partition = {good_p}")).await < last,
        "nothing is applied while paused"
    );

    // `status` shows the pause, the halt with its position and error, in words.
    let out = Command::new(BIN)
        .args(["status", "--database-url", &db.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("PAUSED since") && text.contains("(maintenance)"),
        "{text}"
    );
    assert!(text.contains("HALTED partitions: 1"), "{text}");
    let halt_line = text
        .lines()
        .find(|l| l.contains(&format!("p{bad_p}")) && l.contains("at position"))
        .unwrap_or_else(|| panic!("no halt line:\n{text}"));
    assert!(
        halt_line.contains(&format!("at position {poison}"))
            && halt_line.contains("rejected on purpose"),
        "{halt_line}"
    );

    // `status --json | head`: the reader goes away early; the command ends without a panic.
    let mut child = Command::new(BIN)
        .args(["status", "--json", "--database-url", &db.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // stdout is closed here (dropped), as `head -c 1` would.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(first[0], b'{');
    db.drop_db().await;
}

/// A panic inside a pipeline task goes through tracing (message and location), is counted, and
/// the pipeline restarts at once; nothing is lost or applied twice.
#[tokio::test]
async fn a_panicked_pipeline_is_logged_counted_and_restarted() {
    let db = TestDb::new("panics").await;
    db.append_w1(0, 1_999, 20).await;
    let health = format!("127.0.0.1:{}", crate::support::free_port());
    let metrics = format!("127.0.0.1:{}", crate::support::free_port());
    let host = Host::spawn(
        "panics",
        &[
            "run",
            "--database-url",
            &db.url,
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--health-addr",
            &health,
            "--metrics-addr",
            &metrics,
            "--batch-size",
            "100",
            "--max-batch-size",
            "100",
        ],
        &[
            ("PROJECTION_HOST_FAILPOINT", "pipeline-panic:2"),
            ("LOG_FORMAT", "json"),
        ],
    );
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually(
        "catch-up despite two panics",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await >= head).then_some(()) },
    )
    .await;
    assert!(db.check_w1().await.exact(), "nothing lost or applied twice");
    let scrape = eventually("the panic counter", Duration::from_secs(10), || async {
        let s = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (series(&s, "projection_host_pipeline_panics_total{projection=\"bank_balances\",replica_set=\"default\"}") == Some(2.0)).then_some(s)
    })
    .await;
    drop(scrape);
    let log = host.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let panics: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "a task panicked")
        .collect();
    assert_eq!(panics.len(), 2, "{log}");
    for p in &panics {
        assert_eq!(p["panic"], "failpoint pipeline-panic");
        assert!(
            p["location"].as_str().unwrap().contains("pipeline/worker/"),
            "{p}"
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["message"] == "the pipeline task panicked; restarting it")
            .count(),
        2
    );
    // One JSON type per field across every line.
    let mut types: BTreeMap<String, std::collections::BTreeSet<&'static str>> = BTreeMap::new();
    for line in &lines {
        for (field, value) in line.as_object().unwrap() {
            let kind = match value {
                serde_json::Value::String(_) => "string",
                serde_json::Value::Number(_) => "number",
                serde_json::Value::Bool(_) => "bool",
                serde_json::Value::Null => "null",
                _ => "structure",
            };
            types.entry(field.clone()).or_default().insert(kind);
        }
    }
    let mixed: Vec<_> = types.iter().filter(|(_, t)| t.len() > 1).collect();
    assert!(mixed.is_empty(), "fields with several types: {mixed:?}");
    for field in ["generation", "partitions", "workers"] {
        if let Some(kinds) = types.get(field) {
            assert_eq!(
                kinds.iter().copied().collect::<Vec<_>>(),
                ["number"],
                "{field}"
            );
        }
    }
    assert!(types.contains_key("generation"), "{types:?}");
    db.drop_db().await;
}

/// In JSON mode every line is JSON: argument errors and the final error included, once each.
#[tokio::test]
async fn json_mode_keeps_argument_errors_and_final_errors_json() {
    let db = TestDb::new("jsonerr").await;
    for (args, env, needle) in [
        (
            vec!["run", "--no-such-flag"],
            vec![("LOG_FORMAT", "json")],
            "--no-such-flag",
        ),
        (
            vec![
                "status",
                "--log-format",
                "json",
                "--replica-set",
                "nope",
                "--database-url",
                &db.url,
            ],
            vec![],
            "run `projection-host migrate`",
        ),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .envs(env)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(!lines.is_empty(), "{args:?}: no output");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
            assert!(v["level"].is_string(), "{line}");
        }
        let errors: Vec<&&str> = lines.iter().filter(|l| l.contains("\"ERROR\"")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error line:\n{stderr}");
        assert!(errors[0].contains(needle), "{stderr}");
    }
    db.drop_db().await;
}
