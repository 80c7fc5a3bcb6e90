//! The start: it waits for PostgreSQL (probes say why it is not ready), gives up at once on what
//! waiting cannot cure, writes nothing before it has checked the target, binds its ports before
//! it joins, deregisters when it fails after joining; and `--once` ends, also on a halt.

use std::time::Duration;

use projection_host::devdb::DevDatabase;
use serde_json::json;

use crate::support::{eventually, free_port, Host, HttpHost, TestDb};

async fn host_schema_exists(db: &TestDb) -> bool {
    db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'projection_host'")
        .await
        > 0
}

#[tokio::test]
async fn the_start_waits_for_postgres_and_the_probes_say_why() {
    let dev = DevDatabase::init().expect("a throwaway PostgreSQL (initdb/pg_ctl installed?)");
    dev.start_server().unwrap();
    let pool = sqlx::PgPool::connect(&dev.url).await.unwrap();
    crate::support::db::create_w1_schema(&pool).await;
    crate::support::db::append_w1(&pool, 0, 999, 20).await;
    pool.close().await;
    dev.stop_server().unwrap();

    let mut h = HttpHost::run(
        "wait",
        &dev.url,
        &["--plugin", test_artifacts::BANK_BALANCES, "--once"],
    );
    let ready = eventually(
        "/ready to explain the wait",
        Duration::from_secs(30),
        || async {
            let (health, _) = h.get("/health").await?;
            let (status, body) = h.get("/ready").await?;
            (health == 200 && status == 503 && body.contains("waiting for PostgreSQL"))
                .then_some(body)
        },
    )
    .await;
    assert!(
        ready.to_lowercase().contains("connection refused"),
        "the root cause is shown: {ready}"
    );
    h.host
        .wait_for_log("waiting for PostgreSQL", Duration::from_secs(10))
        .await;

    dev.start_server().unwrap();
    let status = h.host.wait(Duration::from_secs(120)).await;
    let log = h.host.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("PostgreSQL is reachable"), "{log}");
    assert!(
        !log.contains("pool timed out"),
        "the cause is never hidden: {log}"
    );
    let attempts = log.matches("waiting for PostgreSQL:").count();
    let refused = log.to_lowercase().matches("connection refused").count();
    assert!(attempts >= 1, "{log}");
    assert_eq!(
        attempts, refused,
        "each attempt logs its cause once:\n{log}"
    );
    let check = projection_host::bench::check_w1(&dev.url, "bank_balances")
        .await
        .unwrap();
    assert!(check.exact(), "{check:?}");
}

#[tokio::test]
async fn what_waiting_cannot_cure_ends_the_start_with_one_message() {
    let db = TestDb::new("nodb").await;
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_path("/no_such_database_here");
    let mut host = Host::run(
        "unknown-db",
        url.as_str(),
        &["--plugin", test_artifacts::BANK_BALANCES],
    );
    let status = host.wait(Duration::from_secs(30)).await;
    let log = host.log();
    assert!(!status.success());
    assert!(
        log.contains("no_such_database_here") && log.contains("check the database name"),
        "{log}"
    );
    assert!(!log.contains("waiting for PostgreSQL"), "{log}");

    // A bound on the wait: a port nobody listens on, given up after DB_WAIT_TIMEOUT.
    let refused = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let mut host = Host::spawn(
        "wait-timeout",
        &[
            "run",
            "--no-http",
            "--database-url",
            &refused,
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
        &[("DB_WAIT_TIMEOUT", "2s")],
    );
    let status = host.wait(Duration::from_secs(30)).await;
    let log = host.log();
    assert!(!status.success());
    assert!(
        log.contains("did not accept a connection within DB_WAIT_TIMEOUT"),
        "{log}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn nothing_is_written_before_the_events_table_is_checked() {
    let db = TestDb::new("notable").await;
    sqlx::raw_sql("DROP TABLE events CASCADE")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut host = Host::run(
        "no-events",
        &db.url,
        &["--plugin", test_artifacts::BANK_BALANCES],
    );
    assert!(!host.wait(Duration::from_secs(30)).await.success());
    assert!(host.log().contains("does not exist"), "{}", host.log());
    assert!(!host_schema_exists(&db).await, "nothing may be created");

    // A table of that name with another layout: refused, each difference named.
    sqlx::raw_sql("CREATE TABLE events (global_position bigint, payload text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut host = Host::run(
        "bad-layout",
        &db.url,
        &["--plugin", test_artifacts::BANK_BALANCES],
    );
    assert!(!host.wait(Duration::from_secs(30)).await.success());
    let log = host.log();
    assert!(
        log.contains("does not have the pupsourcing layout")
            && log.contains("column payload is text, expected bytea")
            && log.contains("column event_id is missing"),
        "{log}"
    );
    assert!(!host_schema_exists(&db).await, "nothing may be created");
    db.drop_db().await;
}

#[tokio::test]
async fn a_taken_port_ends_the_start_before_the_database_is_touched() {
    let db = TestDb::new("port").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut host = Host::run(
        "port-taken",
        &db.url,
        &[
            "--health-addr",
            &address,
            "--metrics-addr",
            &metrics,
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
    );
    assert!(!host.wait(Duration::from_secs(30)).await.success());
    let log = host.log();
    assert!(
        log.contains("binding the health/admin port") && log.contains(&address),
        "{log}"
    );
    assert_eq!(
        log.matches("starting the pipeline").count(),
        0,
        "no pipeline starts: {log}"
    );
    assert!(!host_schema_exists(&db).await, "nothing was written");
    drop(taken);
    db.drop_db().await;
}

#[tokio::test]
async fn a_start_that_fails_after_joining_deregisters() {
    let db = TestDb::new("dereg").await;
    let dir = std::env::temp_dir().join(format!("ph-bad-plugin-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.wasm");
    std::fs::write(&bad, b"not a component").unwrap();
    let mut host = Host::run("dereg", &db.url, &["--plugin", bad.to_str().unwrap()]);
    assert!(!host.wait(Duration::from_secs(60)).await.success());
    let log = host.log();
    assert!(log.contains("no projection can run"), "{log}");
    assert!(
        log.contains("joined") || log.contains("registered"),
        "the host had joined: {log}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.workers")
            .await,
        0,
        "a failed start leaves no registration behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
    db.drop_db().await;
}

#[tokio::test]
async fn once_ends_non_zero_naming_each_halted_partition() {
    let db = TestDb::new("oncehalt").await;
    let ids = crate::faults::ids_in_distinct_partitions(2);
    let (bad, good) = (&ids[0], &ids[1]);
    db.append("Faults", bad, "Fine", json!({})).await;
    let poison = db
        .append("Faults", bad, "RejectUntilFixed", json!({}))
        .await;
    db.append("Faults", good, "Fine", json!({})).await;
    let mut host = Host::run(
        "once-halt",
        &db.url,
        &[
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--max-retries",
            "1",
            "--once",
        ],
    );
    let status = host.wait(Duration::from_secs(120)).await;
    let log = host.log();
    assert!(!status.success(), "a halt must fail --once: {log}");
    let partition = projection_host::ids::PartitionId::of(bad, 32).as_i32();
    assert!(
        log.contains(&format!(
            "projection faulty partition {partition} halted at position {poison}"
        )),
        "{log}"
    );
    // The good partition caught up before the exit.
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT n FROM faulty.seen WHERE aggregate_id = '{good}'"
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.workers")
            .await,
        0,
        "deregistered on the way out"
    );
    db.drop_db().await;
}
