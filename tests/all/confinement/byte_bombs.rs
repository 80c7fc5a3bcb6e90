//! Host memory is bounded in bytes wherever a plugin can make it grow: buffered writes, query
//! results, rows read back, error strings and log lines. Each bomb fails its batch through the
//! failure policy, names the limit, and the host's peak RSS stays within its normal footprint
//! plus the plugin's memory limit and the configured byte limits.

use std::time::Duration;

use serde_json::json;

use super::support::{append_attacks, applied, parked, peak_rss, Attack};
use crate::support::{eventually, Host, TestDb};

#[tokio::test]
async fn byte_bombs_fail_their_batch_and_keep_host_memory_bounded() {
    let db = TestDb::new("bombs").await;
    db.append_w1(0, 999, 20).await;
    let mut host = Host::run(
        "bombs",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_HOSTILE,
            "--projection",
            "hostile:on_failure=dead-letter,max_retries=0,memory=64MiB,max_write_bytes=16MiB,max_query_bytes=16MiB",
        ],
    );
    eventually(
        "bank_balances to catch up",
        Duration::from_secs(90),
        || async { (super::support::bank_events(&db).await == 1000).then_some(()) },
    )
    .await;
    // Setup and a small batch of the hostile projection: the footprint to compare with.
    append_attacks(
        &db,
        &[Attack {
            name: "warm_up",
            steps: json!([{"write_bytes": [10, 1000]}]),
        }],
    )
    .await;
    eventually("the warm-up", Duration::from_secs(60), || async {
        applied(&db)
            .await
            .iter()
            .any(|a| a == "warm_up")
            .then_some(())
    })
    .await;
    let normal = peak_rss(host.pid());

    let attacks = [
        // 4,000 rows of 200 KB: 800 MB if buffered whole.
        Attack {
            name: "write_bomb",
            steps: json!([{"write_bytes": [4000, 200000]}]),
        },
        // 80 rows of 10 MB: 800 MB if fetched whole.
        Attack {
            name: "query_bomb",
            steps: json!([{"query": "SELECT repeat('x', 10000000) FROM generate_series(1, 80)"}]),
        },
        // A 40 MB row stored by SQL, then read back through the keyed API.
        Attack {
            name: "get_bomb",
            steps: json!([
            {"execute": "INSERT INTO big (id, data) VALUES (-1, repeat('y', 40000000)) ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data"},
            {"keep": "SELECT length(data)::text FROM big WHERE id = -1"}]),
        },
        // A 50 MB error message.
        Attack {
            name: "error_bomb",
            steps: json!([{"error_bytes": 50000000}]),
        },
        // A newline that would forge a host log line.
        Attack {
            name: "log_forgery",
            steps: json!([{"log": "harmless\nERROR projection_host: forged line"}]),
        },
    ];
    append_attacks(&db, &attacks).await;
    eventually(
        "every bomb to be handled",
        Duration::from_secs(120),
        || async {
            let done = super::support::handled(&db).await;
            (done > attacks.len()).then_some(())
        },
    )
    .await;
    let peak = peak_rss(host.pid());
    let parked = parked(&db).await;
    let error = |name: &str| {
        parked
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not parked: {parked:#?}"))
    };
    assert!(
        error("write_bomb").contains("max_write_bytes"),
        "{}",
        error("write_bomb")
    );
    assert!(
        error("query_bomb").contains("max_query_bytes"),
        "{}",
        error("query_bomb")
    );
    let error_bomb = error("error_bomb");
    assert!(
        error_bomb.len() < 10_000,
        "the stored error is bounded: {} bytes",
        error_bomb.len()
    );
    assert!(
        error_bomb.contains("more bytes cut"),
        "{}",
        &error_bomb[error_bomb.len() - 200..]
    );
    assert!(applied(&db).await.iter().any(|a| a == "log_forgery"));
    let log = host.log();
    assert!(
        log.contains("harmless\\nERROR projection_host: forged line"),
        "the newline is escaped"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("ERROR projection_host: forged line")),
        "a forged log line"
    );
    // The get bomb's row is stored (by the plugin's own SQL, on the server), but never read
    // into the host: nothing of it reached the loot table.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM hostile.loot WHERE what = 'get_bomb'")
            .await,
        1
    );

    // The plugin's memory limit, plus the byte limits twice (a value is briefly held both as
    // read and as decoded or lowered), plus slack for the allocator.
    let allowed = normal + (64 << 20) + 2 * (16 << 20) + 2 * (16 << 20) + (32 << 20);
    eprintln!(
        "byte bombs: normal peak RSS {} MiB, after the bombs {} MiB (allowed {} MiB)",
        normal >> 20,
        peak >> 20,
        allowed >> 20
    );
    assert!(
        peak <= allowed,
        "peak RSS {} MiB over {} MiB",
        peak >> 20,
        allowed >> 20
    );
    assert!(db.check_w1().await.exact());
    host.kill9();
    db.drop_db().await;
}
