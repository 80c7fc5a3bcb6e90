//! Replica sets own their read models: a second set on one database writes a schema of its own,
//! readers switch to it when it has caught up, the old set is removed; and a projection can be
//! removed with everything the host made for it.

use std::time::Duration;

use projection_host::bench::{check_w1, Check};

use crate::support::host::BIN;
use crate::support::{eventually, Host, TestDb};

/// `projection-host <args>` against the test database: (succeeded, stdout + stderr).
fn cli(db: &TestDb, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("REPLICA_SET")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// One `run --once` of bank-balances in `set`; returns its log.
async fn run_once(db: &TestDb, set: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--replica-set",
        set,
        "--worker-id",
        "w",
        "--once",
    ];
    args.extend_from_slice(extra);
    let mut host = Host::run(set, &db.url, &args);
    let status = host.wait(Duration::from_secs(180)).await;
    let log = host.log();
    assert!(status.success(), "set {set}: {log}");
    log
}

/// `replica-sets switch-readers --from a --to b`, confirmed or not.
fn switch_a_to_b(db: &TestDb, yes: bool) -> (bool, String) {
    let mut args = vec!["replica-sets", "switch-readers", "--from", "a", "--to", "b"];
    if yes {
        args.push("--yes");
    }
    cli(db, &args)
}

async fn check(db: &TestDb, schema: &str) -> Check {
    check_w1(&db.url, schema).await.unwrap()
}

/// Events counted by a read model (its accounts' event counters summed).
async fn counted(db: &TestDb, schema: &str) -> i64 {
    check(db, schema).await.events_counted
}

async fn schema_exists(db: &TestDb, schema: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// What `docs/operations.md` says to do to change the partition count, followed to the letter.
#[tokio::test]
async fn a_new_replica_set_builds_beside_the_old_one_and_readers_switch_to_it() {
    let db = TestDb::new("sets").await;
    db.append_w1(0, 3_999, 100).await;
    run_once(&db, "a", &[]).await;
    assert!(check(&db, "bank_balances").await.exact());

    // Readers of the stable schema, as the operations guide sets them up.
    let reader = format!("{}_reader", db.name);
    sqlx::raw_sql(&format!(
        "CREATE ROLE \"{reader}\"; GRANT USAGE ON SCHEMA bank_balances TO \"{reader}\";
         GRANT SELECT ON ALL TABLES IN SCHEMA bank_balances TO \"{reader}\";"
    ))
    .execute(&db.pool)
    .await
    .unwrap();

    db.append_w1(4_000, 5_999, 100).await;
    // The second set, with another partition count: its own schema, the old read model untouched.
    let log = run_once(&db, "b", &["--partitions", "16"]).await;
    assert!(
        log.contains("belongs to replica set a") && log.contains("switch-readers --from a --to b"),
        "the second set says whose the name is and how readers move: {log}"
    );
    assert_eq!(
        counted(&db, "bank_balances").await,
        4_000,
        "set b never wrote set a's tables"
    );
    assert!(check(&db, "bank_balances__b").await.exact());

    // Refused: no confirmation; a live host of the old set; an old set further ahead.
    let (ok, out) = switch_a_to_b(&db, false);
    assert!(!ok && out.contains("--yes"), "{out}");
    let mut live_a = Host::run(
        "a-live",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--replica-set",
            "a",
            "--worker-id",
            "a-0",
        ],
    );
    eventually("set a to catch up", Duration::from_secs(120), || async {
        (counted(&db, "bank_balances").await == 6_000).then_some(())
    })
    .await;
    db.append_w1(6_000, 6_999, 100).await;
    eventually(
        "set a to apply the newest events",
        Duration::from_secs(120),
        || async { (counted(&db, "bank_balances").await == 7_000).then_some(()) },
    )
    .await;
    let (ok, out) = switch_a_to_b(&db, true);
    assert!(!ok && out.contains("still has live hosts (a-0)"), "{out}");
    live_a.signal(libc::SIGTERM);
    assert!(
        live_a.wait(Duration::from_secs(60)).await.success(),
        "{}",
        live_a.log()
    );
    let (ok, out) = switch_a_to_b(&db, true);
    assert!(
        !ok && out.contains("readers would go back in time"),
        "{out}"
    );

    // b catches up; the switch; readers (with their own grants) now read b's model, exactly.
    run_once(&db, "b", &["--partitions", "16"]).await;
    let (ok, out) = switch_a_to_b(&db, true);
    assert!(ok, "{out}");
    assert!(out.contains("bank_balances__a"), "{out}");
    let as_reader: i64 = {
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query(&format!("SET LOCAL ROLE \"{reader}\""))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query_scalar("SELECT sum(event_count)::int8 FROM bank_balances.account_balances")
            .fetch_one(&mut *tx)
            .await
            .unwrap()
    };
    assert_eq!(
        as_reader, 7_000,
        "readers keep their access and see set b's read model"
    );
    assert!(check(&db, "bank_balances").await.exact());
    assert_eq!(
        counted(&db, "bank_balances__a").await,
        7_000,
        "set a's model is kept until removed"
    );

    // The old set goes; the new one keeps projecting into what readers query.
    let (ok, out) = cli(&db, &["replica-sets", "remove", "b", "--yes"]);
    assert!(
        !ok && out.contains("switch them first"),
        "b holds the readers' name now: {out}"
    );
    let (ok, out) = cli(&db, &["replica-sets", "remove", "a", "--yes"]);
    assert!(ok, "{out}");
    assert!(!schema_exists(&db, "bank_balances__a").await);
    for table in [
        "checkpoints",
        "plugins",
        "read_models",
        "projection_roles",
        "batches",
    ] {
        let left = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM projection_host.{table} WHERE replica_set = 'a'"
            ))
            .await;
        assert_eq!(left, 0, "{table} rows of set a");
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.replica_sets WHERE name = 'a'")
            .await,
        0
    );
    db.append_w1(7_000, 7_999, 100).await;
    run_once(&db, "b", &["--partitions", "16"]).await;
    let after = check(&db, "bank_balances").await;
    assert!(after.exact() && after.events_in_store == 8_000, "{after:?}");
    let applied = db
        .scalar_i64("SELECT sum(events)::int8 FROM projection_host.batches WHERE replica_set = 'b'")
        .await;
    assert_eq!(applied, 8_000, "set b applied every event once");
    sqlx::query(&format!("DROP ROLE \"{reader}\""))
        .execute(&db.pool)
        .await
        .ok();
    db.drop_db().await;
}

/// `projections remove` while a host runs it: the host stops running it, and the schema, role,
/// checkpoints, registry rows, controls and dead letters are gone.
#[tokio::test]
async fn a_removed_projection_leaves_nothing_behind() {
    let db = TestDb::new("remove").await;
    db.append_w1(0, 1_999, 50).await;
    let mut host = Host::run(
        "remove",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--worker-id",
            "r-0",
        ],
    );
    eventually("the host to catch up", Duration::from_secs(120), || async {
        (db.lowest_checkpoint("bank_balances").await >= 1_999).then_some(())
    })
    .await;
    let role: String = sqlx::query_scalar("SELECT role_name FROM projection_host.projection_roles")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    let (ok, out) = cli(&db, &["projections", "remove", "nosuch", "--yes"]);
    assert!(
        !ok && out.contains("no projection 'nosuch'") && out.contains("known: bank_balances"),
        "{out}"
    );
    let (ok, out) = cli(&db, &["projections", "remove", "bank_balances"]);
    assert!(!ok && out.contains("--yes"), "{out}");
    assert!(
        schema_exists(&db, "bank_balances").await,
        "nothing was removed without --yes"
    );

    let (ok, out) = cli(&db, &["projections", "remove", "bank_balances", "--yes"]);
    assert!(ok, "{out}");
    assert!(out.contains(&role), "{out}");
    assert!(!schema_exists(&db, "bank_balances").await);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
        ))
        .await,
        0,
        "the role is dropped"
    );
    for table in [
        "checkpoints",
        "plugins",
        "read_models",
        "projection_roles",
        "projection_controls",
        "dead_letters",
        "halts",
    ] {
        let left = db
            .scalar_i64(&format!("SELECT count(*) FROM projection_host.{table}"))
            .await;
        assert_eq!(left, 0, "{table} rows left");
    }
    assert!(
        host.is_running(),
        "the host outlives one of its projections: {}",
        host.log()
    );
    // New events are not applied by anyone, and nothing recreated the projection.
    db.append_w1(2_000, 2_099, 50).await;
    host.signal(libc::SIGTERM);
    assert!(
        host.wait(Duration::from_secs(60)).await.success(),
        "{}",
        host.log()
    );
    assert!(!schema_exists(&db, "bank_balances").await, "{}", host.log());
    db.drop_db().await;
}
