use std::time::Duration;

use crate::support::{eventually, HttpHost, TestDb, Writer, ADMIN_TOKEN};

async fn call(method: reqwest::Method, url: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Without the token, or with a wrong one: 401 and nothing changes. With it: status, pause,
/// resume (also through the CLI), and the OpenAPI description.
#[tokio::test]
async fn the_admin_api_requires_its_token_and_pauses_projections() {
    let db = TestDb::new("admin").await;
    db.append_w1(0, 999, 20).await;
    let h = HttpHost::run(
        "admin",
        &db.url,
        &["--plugin", test_artifacts::BANK_BALANCES],
    );
    eventually("/ready", Duration::from_secs(30), || async {
        h.get("/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let pause = format!("{}/admin/projections/bank_balances/pause", h.health);

    for token in [None, Some("wrong-token-wrong-token")] {
        let (status, body) = call(reqwest::Method::POST, &pause, token).await;
        assert_eq!(status, 401, "{body}");
        let (status, _) = call(
            reqwest::Method::GET,
            &format!("{}/admin/status", h.health),
            token,
        )
        .await;
        assert_eq!(status, 401);
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.projection_controls")
            .await,
        0,
        "a refused call changes nothing"
    );

    // Ready means the partitions are held; the first commit may come a moment later.
    eventually(
        "a first checkpoint of partition 0",
        Duration::from_secs(30),
        || async {
            (db.scalar_i64_or_zero(
                "SELECT count(*) FROM projection_host.checkpoints WHERE partition = 0",
            )
            .await
                > 0)
            .then_some(())
        },
    )
    .await;
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{}/admin/status", h.health),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["partitions"].as_array().unwrap().len(), 32);
    assert_eq!(body["workers"].as_array().unwrap().len(), 1);
    let projection = &body["projections"][0];
    assert_eq!(projection["name"], "bank_balances");
    assert_eq!(projection["on_this_host"]["plugin_version"], "0.1.0");
    assert!(body["partitions"][0]["checkpoints"]["bank_balances"]
        .as_i64()
        .is_some());

    // Pause through the CLI: the checkpoint stops while events keep arriving.
    let cli = |action: &str| {
        std::process::Command::new(crate::support::host::BIN)
            .args([
                action,
                "bank_balances",
                "--admin-url",
                &h.health,
                "--reason",
                "maintenance",
            ])
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    };
    let out = cli("pause");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.host
        .wait_for_log("paused by an operator", Duration::from_secs(10))
        .await;
    let held = db.lowest_checkpoint("bank_balances").await;
    let writer = Writer::start(db.pool.clone(), 1_000, 20, 20, Duration::from_millis(10));
    eventually("events while paused", Duration::from_secs(30), || async {
        (writer.appended() > 1_500).then_some(())
    })
    .await;
    assert_eq!(
        db.lowest_checkpoint("bank_balances").await,
        held,
        "a paused projection must not advance"
    );
    let (_, body) = call(
        reqwest::Method::GET,
        &format!("{}/admin/status", h.health),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(body["projections"][0]["paused"], true);
    assert_eq!(body["projections"][0]["on_this_host"]["state"], "paused");

    let out = cli("resume");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    writer.stop().await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually("catch-up after resume", Duration::from_secs(30), || async {
        (db.lowest_checkpoint("bank_balances").await >= head).then_some(())
    })
    .await;
    assert!(db.check_w1().await.exact());

    let (status, spec) = call(
        reqwest::Method::GET,
        &format!("{}/admin/openapi.json", h.health),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(spec["openapi"], "3.0.3");
    assert!(spec["paths"]["/admin/projections/{name}/pause"]["post"].is_object());

    // A bad name is refused with a message, not an internal error.
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{}/admin/projections/Bad-Name/pause", h.health),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // An unknown name is refused, names the known ones, and stores nothing a projection
    // deployed later under that name would inherit.
    let out = std::process::Command::new(crate::support::host::BIN)
        .args(["pause", "nosuch", "--admin-url", &h.health])
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pause nosuch must fail: {stderr}");
    assert!(
        stderr.contains("nosuch") && stderr.contains("known: bank_balances"),
        "{stderr}"
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM projection_host.projection_controls WHERE projection = 'nosuch'"
        )
        .await,
        0
    );
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{}/admin/dead-letters?projection=nosuch", h.health),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 404, "dead letters of an unknown projection: {body}");
    db.drop_db().await;
}
