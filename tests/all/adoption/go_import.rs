use std::time::Duration;

use projection_host::ids::PartitionId;

use crate::support::host::BIN;
use crate::support::{Host, TestDb};

const ACCOUNTS: u64 = 400;
const REPLICA_SET: &str = "adopted";

/// `projection-host <args>` against the test database: (succeeded, stdout + stderr).
fn cli(db: &TestDb, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("REPLICA_SET")
        .output()
        .expect("running projection-host");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `projection-host import <args>` with the bank-balances plugin into the test's set.
fn import(db: &TestDb, args: &[&str]) -> (bool, String) {
    let mut full = vec![
        "import",
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--replica-set",
        REPLICA_SET,
    ];
    full.extend_from_slice(args);
    cli(db, &full)
}

/// The W1 read model as Go workers partitioned `checkpoints.len()` ways would have left it in
/// `public.account_balances`: each account holds exactly its events up to its partition's
/// checkpoint. Returns how many events that applied.
async fn go_read_model(db: &TestDb, checkpoints: &[i64]) -> i64 {
    let reader = reader_role(db);
    sqlx::raw_sql(&format!(
        "CREATE TABLE public.account_balances (
             account_id TEXT PRIMARY KEY, balance BIGINT NOT NULL,
             event_count BIGINT NOT NULL, last_position BIGINT NOT NULL);
         CREATE INDEX account_balances_balance_idx ON public.account_balances (balance);
         CREATE ROLE \"{reader}\";
         GRANT SELECT ON public.account_balances TO \"{reader}\";"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let (accounts, bounds): (Vec<String>, Vec<i64>) = (0..ACCOUNTS)
        .map(|a| {
            let id = format!("acct-{a}");
            let p = PartitionId::of(&id, checkpoints.len() as u32).as_i32() as usize;
            (id, checkpoints[p])
        })
        .unzip();
    sqlx::query(
        "INSERT INTO public.account_balances
         SELECT e.aggregate_id,
                sum(CASE WHEN e.event_type = 'Deposited' THEN 1 ELSE -1 END
                    * (convert_from(e.payload, 'UTF8')::jsonb ->> 'amount')::bigint),
                count(*), max(e.global_position)
           FROM events e JOIN unnest($1::text[], $2::int8[]) AS a(id, bound) ON a.id = e.aggregate_id
          WHERE e.global_position <= a.bound
          GROUP BY e.aggregate_id",
    )
    .bind(&accounts)
    .bind(&bounds)
    .execute(&db.pool)
    .await
    .unwrap();
    db.scalar_i64("SELECT sum(event_count)::int8 FROM public.account_balances")
        .await
}

/// A role that reads the Go read model (roles are per cluster: one per test database).
fn reader_role(db: &TestDb) -> String {
    format!("reader_{}", db.name)
}

/// One `run --once` of bank-balances in the adopted set.
async fn run_once(db: &TestDb, extra: &[&str]) -> String {
    let mut args = vec![
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--replica-set",
        REPLICA_SET,
        "--worker-id",
        "w",
        "--once",
    ];
    args.extend_from_slice(extra);
    let mut host = Host::run("after-import", &db.url, &args);
    let status = host.wait(Duration::from_secs(180)).await;
    let log = host.log();
    assert!(status.success(), "{log}");
    log
}

/// Events the host applied (its batch audit).
async fn applied_by_host(db: &TestDb) -> i64 {
    db.scalar_i64(
        "SELECT coalesce(sum(events), 0)::int8 FROM projection_host.batches WHERE projection = 'bank_balances'",
    )
    .await
}

async fn relkind(db: &TestDb, relation: &str) -> Option<String> {
    sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
        .bind(relation)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_orchestrator_deployment_is_adopted_in_place_and_continues_exactly() {
    let db = TestDb::new("import_orch").await;
    db.append_w1(0, 23_999, ACCOUNTS).await;
    // The orchestrator's own tables (its migrations), with history: a generation of 6
    // partitions, then the current one of 4. The Go checkpoint names carry no count, so the
    // rows of partitions 4 and 5 are leftovers of the older generation.
    sqlx::raw_sql(
        "CREATE TABLE orchestrator_generations (id UUID PRIMARY KEY, replica_set TEXT NOT NULL,
             total_partitions INT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now());
         CREATE TABLE orchestrator_workers (id UUID PRIMARY KEY, replica_set TEXT NOT NULL,
             generation_id UUID NOT NULL REFERENCES orchestrator_generations (id),
             partition_key INT NOT NULL DEFAULT -1, state TEXT NOT NULL DEFAULT 'pending',
             last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(), started_at TIMESTAMPTZ NOT NULL DEFAULT now());
         CREATE TABLE projection_checkpoints (projection_name TEXT PRIMARY KEY,
             last_global_position BIGINT NOT NULL DEFAULT 0, updated_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO orchestrator_generations VALUES
             ('00000000-0000-0000-0000-000000000001', 'main', 6, now() - interval '2 days'),
             ('00000000-0000-0000-0000-000000000002', 'main', 4, now() - interval '1 day');
         INSERT INTO orchestrator_workers (id, replica_set, generation_id, partition_key, state, last_heartbeat) VALUES
             ('00000000-0000-0000-0000-00000000000a', 'main', '00000000-0000-0000-0000-000000000001', 0, 'stopped', now() - interval '2 days'),
             ('00000000-0000-0000-0000-00000000000b', 'main', '00000000-0000-0000-0000-000000000002', 0, 'stopped', now() - interval '1 hour'),
             ('00000000-0000-0000-0000-00000000000c', 'main', '00000000-0000-0000-0000-000000000002', 1, 'running', now());
         INSERT INTO projection_checkpoints (projection_name, last_global_position) VALUES
             ('bank_balances_p0', 20000), ('bank_balances_p1', 17000),
             ('bank_balances_p2', 21500), ('bank_balances_p3', 19000),
             ('bank_balances_p4', 9000), ('bank_balances_p5', 9100);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let go_checkpoints = [20_000, 17_000, 21_500, 19_000];
    let applied_by_go = go_read_model(&db, &go_checkpoints).await;
    let table_oid = db
        .scalar_i64("SELECT 'public.account_balances'::regclass::oid::int8")
        .await;
    let go_args = [
        "--from",
        "orchestrator",
        "--go-replica-set",
        "main",
        "--adopt",
        "public.account_balances",
    ];

    // A checkpoint last written before the newest generation began may belong to an earlier
    // count: refused, naming it, unless the operator states the count.
    sqlx::query("UPDATE projection_checkpoints SET updated_at = now() - interval '3 days' WHERE projection_name = 'bank_balances_p1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut dry = go_args.to_vec();
    dry.push("--dry-run");
    let (ok, out) = import(&db, &dry);
    assert!(!ok, "{out}");
    assert!(
        out.contains("bank_balances_p1 were last written before the newest generation"),
        "{out}"
    );
    let mut stated = dry.clone();
    stated.extend(["--go-partitions", "4"]);
    let (ok, out) = import(&db, &stated);
    assert!(
        ok && out.contains("--go-partitions (the newest generation"),
        "{out}"
    );
    sqlx::query("UPDATE projection_checkpoints SET updated_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();

    // The dry run prints the plan, sees the running worker, and changes nothing.
    let mut dry = go_args.to_vec();
    dry.push("--dry-run");
    let (ok, out) = import(&db, &dry);
    assert!(ok, "{out}");
    assert!(out.contains("4 partition(s)"), "{out}");
    assert!(out.contains("bank_balances_p2 = 21500"), "{out}");
    assert!(
        out.contains("ignored (not of this partitioning): bank_balances_p4 = 9000"),
        "{out}"
    );
    assert!(out.contains("STILL RUNNING"), "{out}");
    assert!(
        out.contains("00000000-0000-0000-0000-00000000000c"),
        "{out}"
    );
    assert_eq!(
        relkind(&db, "public.account_balances").await.as_deref(),
        Some("r")
    );

    // For real: refused while the worker heartbeats.
    let (ok, out) = import(&db, &go_args);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Go workers of this deployment are still running"),
        "{out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert_eq!(
        relkind(&db, "public.account_balances").await.as_deref(),
        Some("r")
    );

    // Once it stopped, the import goes through.
    sqlx::query("UPDATE orchestrator_workers SET state = 'stopped'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (ok, out) = import(&db, &go_args);
    assert!(ok, "{out}");
    assert!(out.contains("each from one Go partition, exactly"), "{out}");

    // The table moved in place (same relation, rows not copied); its old name is a view.
    assert_eq!(
        db.scalar_i64("SELECT to_regclass('bank_balances.account_balances')::oid::int8")
            .await,
        table_oid
    );
    assert_eq!(
        relkind(&db, "public.account_balances").await.as_deref(),
        Some("v")
    );
    let checkpoints: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM projection_host.checkpoints WHERE replica_set = $1 ORDER BY partition",
    )
    .bind(REPLICA_SET)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(checkpoints, go_checkpoints);
    // The old readers still read it; writes through the old name are refused.
    let mut reader = db.pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL ROLE \"{}\"", reader_role(&db)))
        .execute(&mut *reader)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM public.account_balances")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(seen as u64, ACCOUNTS);
    reader.rollback().await.unwrap();
    let write = sqlx::query("UPDATE public.account_balances SET balance = 0")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(write.to_string().contains("read-only view"), "{write}");

    // More events arrive; the host continues after the Go checkpoints: exact, with every event
    // applied once (by Go or by the host).
    db.append_w1(24_000, 25_999, ACCOUNTS).await;
    run_once(&db, &[]).await;
    let check = projection_host::bench::check_w1(&db.url, "bank_balances")
        .await
        .unwrap();
    assert!(check.exact(), "{check:?}");
    let through_view = projection_host::bench::check_w1(&db.url, "public")
        .await
        .unwrap();
    assert!(
        through_view.exact(),
        "readers of the old name: {through_view:?}"
    );
    assert_eq!(
        applied_by_host(&db).await + applied_by_go,
        check.events_in_store
    );
    // A second import is refused: the host has progress now.
    let (ok, out) = import(&db, &["--from", "orchestrator", "--go-replica-set", "main"]);
    assert!(
        !ok && out.contains("already runs projection bank_balances"),
        "{out}"
    );

    // Removing the projection would drop the adopted table: refused, pointing at the rollback.
    let (ok, said) = cli(
        &db,
        &[
            "projections",
            "remove",
            "bank_balances",
            "--replica-set",
            REPLICA_SET,
            "--yes",
        ],
    );
    assert!(!ok, "{said}");
    assert!(said.contains("import --rollback"), "{said}");
    assert_eq!(
        relkind(&db, "bank_balances.account_balances")
            .await
            .as_deref(),
        Some("r")
    );

    // Rollback: the Go checkpoints become the host's, the table goes back (the same relation),
    // the host forgets the projection, and a Go worker continuing from there stays exact.
    let rollback = [
        "--from",
        "orchestrator",
        "--go-replica-set",
        "main",
        "--rollback",
    ];
    let (ok, out) = import(&db, &rollback);
    assert!(ok, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(
        relkind(&db, "public.account_balances").await.as_deref(),
        Some("r")
    );
    assert_eq!(
        db.scalar_i64("SELECT 'public.account_balances'::regclass::oid::int8")
            .await,
        table_oid
    );
    assert_eq!(relkind(&db, "bank_balances.account_balances").await, None);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.checkpoints")
            .await,
        0
    );
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    let written: Vec<i64> = sqlx::query_scalar(
        "SELECT last_global_position FROM projection_checkpoints
          WHERE projection_name IN ('bank_balances_p0', 'bank_balances_p1', 'bank_balances_p2', 'bank_balances_p3')
          ORDER BY projection_name",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(written, vec![head; 4]);
    db.append_w1(26_000, 26_999, ACCOUNTS).await;
    go_worker_catches_up(&db, &written).await;
    let after = projection_host::bench::check_w1(&db.url, "public")
        .await
        .unwrap();
    assert!(after.exact(), "after the rollback: {after:?}");
    db.drop_db().await;
}

/// What the Go workers do after a rollback, in SQL: each partition applies its events after
/// its checkpoint.
async fn go_worker_catches_up(db: &TestDb, checkpoints: &[i64]) {
    let (accounts, bounds): (Vec<String>, Vec<i64>) = (0..ACCOUNTS)
        .map(|a| {
            let id = format!("acct-{a}");
            let p = PartitionId::of(&id, checkpoints.len() as u32).as_i32() as usize;
            (id, checkpoints[p])
        })
        .unzip();
    sqlx::query(
        "INSERT INTO public.account_balances AS t
         SELECT e.aggregate_id,
                sum(CASE WHEN e.event_type = 'Deposited' THEN 1 ELSE -1 END
                    * (convert_from(e.payload, 'UTF8')::jsonb ->> 'amount')::bigint),
                count(*), max(e.global_position)
           FROM events e JOIN unnest($1::text[], $2::int8[]) AS a(id, bound) ON a.id = e.aggregate_id
          WHERE e.global_position > a.bound
          GROUP BY e.aggregate_id
         ON CONFLICT (account_id) DO UPDATE
            SET balance = t.balance + EXCLUDED.balance, event_count = t.event_count + EXCLUDED.event_count,
                last_position = greatest(t.last_position, EXCLUDED.last_position)",
    )
    .bind(&accounts)
    .bind(&bounds)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn core_segments_are_adopted_into_another_partition_count_exactly() {
    let db = TestDb::new("import_core").await;
    db.append_w1(0, 17_999, ACCOUNTS).await;
    sqlx::raw_sql(
        "CREATE TABLE consumer_segments (consumer_name TEXT NOT NULL, segment_id INT NOT NULL,
             total_segments INT NOT NULL, owner_id TEXT, checkpoint BIGINT NOT NULL DEFAULT 0,
             PRIMARY KEY (consumer_name, segment_id));
         CREATE INDEX consumer_segments_owner_idx ON consumer_segments (consumer_name, owner_id);
         CREATE TABLE consumer_workers (consumer_name TEXT NOT NULL, worker_id TEXT NOT NULL,
             last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (consumer_name, worker_id));
         INSERT INTO consumer_segments VALUES
             ('balances', 0, 3, NULL, 15000), ('balances', 1, 3, NULL, 12500), ('balances', 2, 3, NULL, 16800),
             ('other', 0, 1, NULL, 42);
         INSERT INTO consumer_workers VALUES ('balances', 'pod-a', now() - interval '10 minutes');",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let go_checkpoints = [15_000, 12_500, 16_800];
    let applied_by_go = go_read_model(&db, &go_checkpoints).await;
    // 3 segments onto 4 partitions: each new partition starts at the lowest of the three, and
    // the host skips what the segments applied above it.
    let (ok, out) = import(
        &db,
        &[
            "--from",
            "core",
            "--go-name",
            "balances",
            "--partitions",
            "4",
            "--adopt",
            "public.account_balances",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("Go checkpoints are carried"), "{out}");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.carried_checkpoints")
            .await,
        1
    );
    assert_eq!(
        db.scalar_i64("SELECT min(position) FROM projection_host.checkpoints")
            .await,
        12_500
    );
    let (_, status) = cli(&db, &["status", "--replica-set", REPLICA_SET]);
    assert!(
        status.contains("carried checkpoints up to 16800 (import from Core (3 partitions))"),
        "{status}"
    );
    db.append_w1(18_000, 18_999, ACCOUNTS).await;
    run_once(&db, &["--partitions", "4"]).await;
    let check = projection_host::bench::check_w1(&db.url, "bank_balances")
        .await
        .unwrap();
    assert!(check.exact(), "{check:?}");
    assert_eq!(
        applied_by_host(&db).await + applied_by_go,
        check.events_in_store
    );
    db.drop_db().await;
}

#[tokio::test]
async fn an_unpartitioned_processor_is_adopted_and_then_resized_online() {
    let db = TestDb::new("import_v1").await;
    db.append_w1(0, 9_999, ACCOUNTS).await;
    // pupsourcing v1's own table, with the one row of an unpartitioned processor.
    sqlx::raw_sql(
        "CREATE TABLE projection_checkpoints (projection_name TEXT PRIMARY KEY,
             last_global_position BIGINT NOT NULL DEFAULT 0, updated_at TIMESTAMPTZ NOT NULL DEFAULT now());
         CREATE INDEX idx_projection_checkpoints_updated_at ON projection_checkpoints (updated_at);
         INSERT INTO projection_checkpoints (projection_name, last_global_position) VALUES ('balances_v1', 8200);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let applied_by_go = go_read_model(&db, &[8_200]).await;
    let (ok, out) = import(
        &db,
        &[
            "--from",
            "processor",
            "--go-name",
            "balances_v1",
            "--adopt",
            "public.account_balances",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("processors keep no registry"), "{out}");
    assert!(out.contains("1 partitions"), "{out}");
    // One partition, as the processor had; then 1 -> 4 while nothing runs, and on from there.
    let (ok, out) = cli(
        &db,
        &[
            "partitions",
            "resize",
            "--replica-set",
            REPLICA_SET,
            "--to",
            "4",
        ],
    );
    assert!(ok, "{out}");
    db.append_w1(10_000, 10_999, ACCOUNTS).await;
    run_once(&db, &[]).await;
    let check = projection_host::bench::check_w1(&db.url, "bank_balances")
        .await
        .unwrap();
    assert!(check.exact(), "{check:?}");
    assert_eq!(
        applied_by_host(&db).await + applied_by_go,
        check.events_in_store
    );
    db.drop_db().await;
}
