//! A start that cannot be fooled: bad plugins are reported and skipped (the others run), the
//! safe head comes from the events table rather than from any checkpoint, a checkpoint above
//! the head is refused by name, and a compiled-plugin cache that others can write is refused.

use std::time::Duration;

use crate::support::{eventually, Host, TestDb};

#[tokio::test]
async fn bad_plugins_at_start_are_skipped_and_the_others_run() {
    let db = TestDb::new("bad_start").await;
    db.append_w1(0, 499, 10).await;
    let garbage = std::env::temp_dir().join(format!("{}-garbage.wasm", db.name));
    std::fs::write(&garbage, b"this is not a component").unwrap();
    let garbage = garbage.display().to_string();
    let mut host = Host::run(
        "bad_start",
        &db.url,
        &[
            "--once",
            "--plugin-call-timeout",
            "1s",
            "--plugin",
            test_artifacts::GUEST_DESCRIBE_LOOP,
            "--plugin",
            &garbage,
            "--plugin",
            test_artifacts::GUEST_HUGE_VERSION,
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
    );
    let status = host.wait(Duration::from_secs(120)).await;
    let log = host.log();
    assert!(status.success(), "{log}");
    assert!(db.check_w1().await.exact());
    assert!(
        log.contains("describe_loop") && log.contains("CPU deadline"),
        "{log}"
    );
    assert!(log.contains("not a WebAssembly file"), "{log}");
    assert!(log.contains("a version string of 8388608 bytes"), "{log}");
    assert!(
        log.len() < 1 << 20,
        "the 8 MiB version string must not reach the log"
    );

    // Nothing usable at all: a clear refusal, not a host that runs nothing.
    let mut host = Host::run(
        "bad_start_only",
        &db.url,
        &["--once", "--replica-set", "other", "--plugin", &garbage],
    );
    let status = host.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    assert!(
        host.log().contains("no projection can run"),
        "{}",
        host.log()
    );
    let _ = std::fs::remove_file(&garbage);
    db.drop_db().await;
}

#[tokio::test]
async fn a_checkpoint_above_the_head_is_refused_and_moves_nothing_else() {
    let db = TestDb::new("forged_start").await;
    db.append_w1(0, 499, 10).await;
    let mut first = Host::run(
        "forged_first",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::EVENT_COUNTER,
        ],
    );
    assert!(
        first.wait(Duration::from_secs(120)).await.success(),
        "{}",
        first.log()
    );
    // A checkpoint far beyond the head (written by hand, or from another events table).
    sqlx::query("UPDATE projection_host.checkpoints SET position = 1000000 WHERE projection = 'bank_balances' AND partition = 3")
        .execute(&db.pool)
        .await
        .unwrap();
    db.append_w1(500, 999, 10).await;
    let host = Host::run(
        "forged_second",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::EVENT_COUNTER,
        ],
    );
    host.wait_for_log(
        "checkpoints above the highest event position 1000",
        Duration::from_secs(60),
    )
    .await;
    let log = host.log();
    assert!(log.contains("partition 3 at 1000000"), "{log}");
    // The other projection is not moved by it: it applies every new event.
    eventually(
        "event_counter to count every event",
        Duration::from_secs(60),
        || async {
            let counted = db
                .scalar_i64_or_zero("SELECT sum(events)::int8 FROM event_counter.event_counts")
                .await;
            (counted == 1000).then_some(())
        },
    )
    .await;
    assert_eq!(
        db.scalar_i64("SELECT min(position) FROM projection_host.checkpoints WHERE projection = 'event_counter'")
            .await,
        1000
    );
    // bank_balances did not move past what it had applied.
    assert_eq!(
        db.scalar_i64("SELECT max(last_position) FROM bank_balances.account_balances")
            .await,
        500
    );
    drop(host);
    db.drop_db().await;
}

#[tokio::test]
async fn a_compiled_plugin_cache_that_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::new("cache_dir").await;
    let dir = std::env::temp_dir().join(format!("{}-cache", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let dir_arg = dir.display().to_string();
    let mut host = Host::run(
        "cache_dir",
        &db.url,
        &[
            "--once",
            "--plugin-cache-dir",
            &dir_arg,
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
    );
    let status = host.wait(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(
        host.log()
            .contains("can be written by other users (mode 777)"),
        "{}",
        host.log()
    );
    // The same directory, private: accepted.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut host = Host::run(
        "cache_dir_ok",
        &db.url,
        &[
            "--once",
            "--plugin-cache-dir",
            &dir_arg,
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
    );
    assert!(
        host.wait(Duration::from_secs(120)).await.success(),
        "{}",
        host.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
    db.drop_db().await;
}

#[tokio::test]
async fn a_projection_cannot_take_over_a_schema_that_is_not_its_own() {
    use projection_host::sink::role::{prepare, RoleError};
    let db = TestDb::new("schema_takeover").await;
    projection_host::db::migrate(&db.pool).await.unwrap();
    sqlx::raw_sql("CREATE SCHEMA app; CREATE TABLE app.customers (id int PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    for (name, expected) in [
        ("projection_host", "reserved"),
        ("public", "reserved"),
        ("pg_catalog", "reserved"),
        ("app", "already exists and belongs to"),
        ("postgres", "has the name of a database role"),
    ] {
        let err = prepare(&db.pool, "default", name, name).await.unwrap_err();
        assert!(
            matches!(
                err,
                RoleError::Reserved { .. }
                    | RoleError::SchemaTaken { .. }
                    | RoleError::NamedAfterRole { .. }
            ),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
    // The application's table still belongs to its owner.
    assert_eq!(
        sqlx::query_scalar::<_, String>(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 'app.customers'::regclass"
        )
        .fetch_one(&db.pool)
        .await
        .unwrap(),
        "postgres"
    );
    // A new schema is created for the projection's role.
    let credentials = prepare(&db.pool, "default", "fresh", "fresh")
        .await
        .unwrap();
    assert_eq!(
        sqlx::query_scalar::<_, String>(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'fresh'"
        )
        .fetch_one(&db.pool)
        .await
        .unwrap(),
        credentials.name
    );
    db.drop_db().await;
}
