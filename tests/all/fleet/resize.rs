//! `partitions resize` while the fleet runs: exact under a live writer through a non-multiple
//! grow and a shrink (both carry checkpoints), and an interrupted resize leaves the old count.

use std::time::Duration;

use super::support::{assert_exactly_once, host, REPLICA_SET};
use crate::support::host::BIN;
use crate::support::{eventually, Host, TestDb, Writer};

/// `projection-host partitions resize --to N` for the fleet's set: (succeeded, output).
fn resize(db: &TestDb, to: u32) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(["partitions", "resize", "--replica-set", REPLICA_SET])
        .args(["--to", &to.to_string()])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("running partitions resize");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The set's stored count, its partition rows, and the checkpoint rows of bank_balances.
async fn shape(db: &TestDb) -> (i64, i64, i64) {
    (
        db.scalar_i64("SELECT partitions::int8 FROM projection_host.replica_sets WHERE name = 'fleet'")
            .await,
        db.scalar_i64("SELECT count(*) FROM projection_host.partitions WHERE replica_set = 'fleet'")
            .await,
        db.scalar_i64(
            "SELECT count(*) FROM projection_host.checkpoints WHERE replica_set = 'fleet' AND projection = 'bank_balances'",
        )
        .await,
    )
}

/// Waits until every one of `count` partitions is owned (the fleet joined again after a resize).
async fn all_owned(db: &TestDb, count: i64) {
    eventually(
        &format!("all {count} partitions owned"),
        Duration::from_secs(120),
        || async {
            let owned = db
                .scalar_i64_or_zero(
                    "SELECT count(owner) FROM projection_host.partitions WHERE replica_set = 'fleet'",
                )
                .await;
            let rows = db
                .scalar_i64_or_zero("SELECT count(*) FROM projection_host.partitions WHERE replica_set = 'fleet'")
                .await;
            (owned == count && rows == count).then_some(())
        },
    )
    .await;
}

/// Waits until every checkpoint of the `count` partitions reached the head.
async fn caught_up(db: &TestDb, count: i64) {
    eventually(
        "the fleet to catch up",
        Duration::from_secs(120),
        || async {
            let at_head = db
                .scalar_i64_or_zero(
                    "SELECT count(*) FROM projection_host.checkpoints
                  WHERE replica_set = 'fleet' AND projection = 'bank_balances'
                    AND position >= (SELECT max(global_position) FROM events)",
                )
                .await;
            (at_head == count).then_some(())
        },
    )
    .await;
}

/// Waits until the fleet applied events past `position` in every partition.
async fn progressed_past(db: &TestDb, count: i64, position: i64) {
    eventually(
        "progress in every partition",
        Duration::from_secs(120),
        || async {
            let past = db
                .scalar_i64_or_zero(&format!(
                    "SELECT count(*) FROM projection_host.checkpoints
                      WHERE replica_set = 'fleet' AND projection = 'bank_balances' AND position > {position}"
                ))
                .await;
            (past == count).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_resize_under_a_live_writer_skips_nothing_and_applies_nothing_twice() {
    let db = TestDb::new("resize_live").await;
    db.append_w1(0, 5_999, 300).await;
    let writer = Writer::start(db.pool.clone(), 6_000, 300, 20, Duration::from_millis(20));
    let a = host(&db, "a", &["--partitions", "6"]);
    let mut b = host(&db, "b", &["--partitions", "6"]);
    let mut c = host(&db, "c", &["--partitions", "6"]);
    all_owned(&db, 6).await;
    progressed_past(&db, 6, 3_000).await;

    // 6 -> 9: not a multiple, so new partitions start at the lowest checkpoint of their sources
    // and the old checkpoints are carried. A host is killed right after, while it rejoins.
    let (ok, out) = resize(&db, 9);
    assert!(ok, "{out}");
    c.kill9();
    assert!(out.contains("resized from 6 to 9"), "{out}");
    assert_eq!(shape(&db).await, (9, 9, 9));
    all_owned(&db, 9).await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    progressed_past(&db, 9, head).await;
    // And one is killed in its next batch after the rejoin (its partitions go to the others
    // once it is stale).
    b.kill9();
    let b = host(&db, "b", &[]);
    all_owned(&db, 9).await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    progressed_past(&db, 9, head).await;

    // 9 -> 4: a shrink under the carried checkpoints of the first resize.
    let (ok, out) = resize(&db, 4);
    assert!(ok, "{out}");
    assert_eq!(shape(&db).await, (4, 4, 4));
    all_owned(&db, 4).await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    progressed_past(&db, 4, head).await;

    let total = writer.stop().await;
    caught_up(&db, 4).await;
    assert_exactly_once(&db).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM events").await as u64,
        total
    );
    // The hosts joined again in their own processes: nobody restarted them.
    let mut hosts = [a, b];
    for h in hosts.iter_mut() {
        assert!(h.is_running(), "{} exited: {}", h.label, h.log());
        assert!(
            h.log()
                .contains("joining the replica set again after its resize"),
            "{}",
            h.log()
        );
    }
    // Once every partition passed them, the leader drops the carried checkpoints.
    let started = std::time::Instant::now();
    while db
        .scalar_i64("SELECT count(*) FROM projection_host.carried_checkpoints")
        .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "carried checkpoints not dropped; logs:\n{}\n{}",
            hosts[0].log(),
            hosts[1].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A host still configured with the old count starts (with a warning) instead of failing.
    let mut late = Host::run(
        "late",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--replica-set",
            REPLICA_SET,
            "--worker-id",
            "late",
            "--partitions",
            "9",
            "--once",
        ],
    );
    let status = late.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "{}", late.log());
    assert!(
        late.log().contains("was resized from 9 to 4 partitions"),
        "{}",
        late.log()
    );
    db.drop_db().await;
}

/// Waits until a session of the resize waits for a lock while running `statement`.
async fn resize_waits_in(db: &TestDb, statement: &str) {
    eventually(
        &format!("the resize to wait in {statement}"),
        Duration::from_secs(60),
        || async {
            let waiting = db
                .scalar_i64(&format!(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE wait_event_type = 'Lock' AND query LIKE '{statement}%'"
                ))
                .await;
            (waiting == 1).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_resize_killed_at_its_first_or_last_step_leaves_the_set_at_its_old_count() {
    let db = TestDb::new("resize_killed").await;
    db.append_w1(0, 1_999, 50).await;
    let once = |worker: &'static str| {
        Host::run(
            worker,
            &db.url,
            &[
                "--plugin",
                test_artifacts::BANK_BALANCES,
                "--replica-set",
                REPLICA_SET,
                "--worker-id",
                worker,
                "--partitions",
                "4",
                "--once",
            ],
        )
    };
    let mut first = once("first");
    assert!(
        first.wait(Duration::from_secs(120)).await.success(),
        "{}",
        first.log()
    );
    // A halt row, so that the resize's last step (lifting halts) has a row to wait on.
    sqlx::query(
        "INSERT INTO projection_host.halts (replica_set, projection, partition, position, error)
         VALUES ('fleet', 'bank_balances', 3, 2001, 'test: a lock to wait on')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, position FROM projection_host.checkpoints WHERE replica_set = 'fleet' ORDER BY partition",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();

    // First step: the set's row, locked elsewhere. Last step: a halt row, locked elsewhere
    // (everything else is already written, uncommitted).
    for (lock, statement) in [
        (
            "SELECT 1 FROM projection_host.replica_sets WHERE name = 'fleet' FOR UPDATE",
            "SELECT partitions FROM projection_host.replica_sets",
        ),
        (
            "SELECT 1 FROM projection_host.halts WHERE replica_set = 'fleet' FOR UPDATE",
            "DELETE FROM projection_host.halts",
        ),
    ] {
        let mut blocker = db.pool.begin().await.unwrap();
        sqlx::query(lock).execute(&mut *blocker).await.unwrap();
        let mut resizing = Host::spawn(
            "resize",
            &[
                "partitions",
                "resize",
                "--replica-set",
                REPLICA_SET,
                "--to",
                "7",
            ],
            &[("DATABASE_URL", &db.url)],
        );
        resize_waits_in(&db, statement).await;
        resizing.kill9();
        blocker.rollback().await.unwrap();
        // The server ends the killed client's session (and its transaction) once it notices.
        eventually("the killed resize's session to end", Duration::from_secs(60), || async {
            let left = db
                .scalar_i64(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '{statement}%' AND pid <> pg_backend_pid()"
                ))
                .await;
            (left == 0).then_some(())
        })
        .await;
        assert_eq!(shape(&db).await, (4, 4, 4), "after a kill in {statement}");
        let after: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, position FROM projection_host.checkpoints WHERE replica_set = 'fleet' ORDER BY partition",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(after, before, "after a kill in {statement}");
        assert_eq!(
            db.scalar_i64("SELECT count(*) FROM projection_host.halts")
                .await,
            1
        );
    }

    // Done to the end, the resize takes the set to 7; more events project exactly.
    let (ok, out) = resize(&db, 7);
    assert!(ok, "{out}");
    assert!(out.contains("1 halt(s) lifted"), "{out}");
    assert_eq!(shape(&db).await, (7, 7, 7));
    let (ok, out) = resize(&db, 7);
    assert!(!ok && out.contains("already has 7 partitions"), "{out}");
    db.append_w1(2_000, 2_999, 50).await;
    let mut second = once("second");
    assert!(
        second.wait(Duration::from_secs(120)).await.success(),
        "{}",
        second.log()
    );
    let check = db.check_w1().await;
    assert!(check.exact(), "{check:?}");
    db.drop_db().await;
}
