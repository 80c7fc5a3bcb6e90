//! The commit guard on its own, against PostgreSQL: a batch commits only while its worker owns
//! every partition at the claimed epoch, and a concurrent claim cannot slip in between.

use std::time::Duration;

use std::sync::LazyLock;

use projection_host::ids::{CommitToken, Epoch, PartitionId, WorkerId};
use projection_host::sink::commit::{record_batch, BatchCommit, Caller};
use projection_host::sink::CommitOutcome;

use crate::support::TestDb;

/// The commit token of worker `z`'s process.
static TOKEN: LazyLock<CommitToken> = LazyLock::new(CommitToken::generate);

async fn setup(db: &TestDb) {
    projection_host::db::migrate(&db.pool).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO projection_host.replica_sets (name, partitions) VALUES ('rs', 2);
         INSERT INTO projection_host.partitions (replica_set, partition, owner, epoch) VALUES ('rs', 0, 'z', 1), ('rs', 1, 'z', 1);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO projection_host.workers (replica_set, worker_id, incarnation, hostname, host_version, commit_token)
         VALUES ('rs', 'z', gen_random_uuid(), 'test', 'test', $1)",
    )
    .bind(TOKEN.digest())
    .execute(&db.pool)
    .await
    .unwrap();
}

fn batch<'a>(
    worker: &'a WorkerId,
    partitions: &'a [(PartitionId, Epoch)],
    to: i64,
) -> BatchCommit<'a> {
    BatchCommit {
        caller: Caller {
            replica_set: "rs",
            worker,
            token: &TOKEN,
            projection: "p",
        },
        partitions,
        from_position: 0,
        to_position: to,
        events: 1,
        plugin_version: "1",
        plugin_sha256: "x",
        build_generation: 0,
    }
}

#[tokio::test]
async fn a_superseded_owner_cannot_commit() {
    let db = TestDb::new("fence").await;
    setup(&db).await;
    let z = WorkerId("z".into());
    let held = [(PartitionId(0), Epoch(1)), (PartitionId(1), Epoch(1))];

    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        record_batch(&mut tx, &batch(&z, &held, 10)).await.unwrap(),
        CommitOutcome::Recorded
    );
    tx.commit().await.unwrap();

    // Another worker claims partition 1 (epoch 2). z still believes it holds both at epoch 1.
    sqlx::query("UPDATE projection_host.partitions SET owner = 'a', epoch = 2 WHERE partition = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        record_batch(&mut tx, &batch(&z, &held, 20)).await.unwrap(),
        CommitOutcome::Fenced
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        db.scalar_i64("SELECT max(position) FROM projection_host.checkpoints")
            .await,
        10,
        "nothing of the fenced batch may stick"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.batches")
            .await,
        1
    );

    // Same worker id, stale epoch (a previous process of a restarted pod): also fenced.
    sqlx::query("UPDATE projection_host.partitions SET owner = 'z', epoch = 3 WHERE partition = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        record_batch(&mut tx, &batch(&z, &held, 20)).await.unwrap(),
        CommitOutcome::Fenced
    );
    tx.rollback().await.unwrap();
    db.drop_db().await;
}

#[tokio::test]
async fn a_claim_waits_for_a_commit_in_flight() {
    let db = TestDb::new("fence_race").await;
    setup(&db).await;
    let z = WorkerId("z".into());
    let held = [(PartitionId(0), Epoch(1))];
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        record_batch(&mut tx, &batch(&z, &held, 10)).await.unwrap(),
        CommitOutcome::Recorded
    );

    // The claim blocks on the guard's row lock until z's transaction ends ...
    let pool = db.pool.clone();
    let claim = tokio::spawn(async move {
        sqlx::query("UPDATE projection_host.partitions SET owner = 'a', epoch = epoch + 1 WHERE partition = 0")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT position FROM projection_host.checkpoints WHERE partition = 0",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    });
    crate::support::eventually("the claim to wait on the row lock", Duration::from_secs(10), || async {
        let waiting = db
            .scalar_i64("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE projection_host.partitions%'")
            .await;
        (waiting == 1).then_some(())
    })
    .await;
    assert!(!claim.is_finished());
    tx.commit().await.unwrap();
    // ... so the new owner reads the checkpoint z committed, and re-applies nothing.
    assert_eq!(claim.await.unwrap(), 10);
    db.drop_db().await;
}

#[tokio::test]
async fn only_the_process_that_holds_the_commit_token_can_record_a_batch() {
    let db = TestDb::new("fence_token").await;
    setup(&db).await;
    let z = WorkerId("z".into());
    let held = [(PartitionId(0), Epoch(1))];
    let forged = CommitToken::generate();
    let mut commit = batch(&z, &held, 10);
    commit.caller.token = &forged;
    let mut tx = db.pool.begin().await.unwrap();
    let err = record_batch(&mut tx, &commit).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("only the projection host may record batches"),
        "{err}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM projection_host.checkpoints")
            .await,
        0
    );
    db.drop_db().await;
}
