use std::time::Duration;

use super::{becomes_active, every_partition_runs, sha};
use crate::fleet_support::caught_up;
use crate::support::{admin_cli, eventually, HttpHost, TestDb, Writer};

/// Blue/green: v2 builds its read model from position 0 beside v1, which keeps serving; once
/// caught up it is promoted, the stable name shows v2's exact read model (with its new column),
/// and v1 is retired with its data kept aside.
#[tokio::test]
async fn a_rebuild_catches_up_beside_the_old_version_and_is_promoted() {
    let db = TestDb::new("rebuild").await;
    db.append_w1(0, 19_999, 200).await;
    let h = HttpHost::run(
        "rebuild",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--promote-lag",
            "500",
            "--max-batch-size",
            "500",
        ],
    );
    let v1 = sha(test_artifacts::BANK_BALANCES);
    let v2 = sha(test_artifacts::GUEST_BANK_BALANCES_V2);
    caught_up(&db).await;
    let writer = Writer::start(db.pool.clone(), 20_000, 200, 20, Duration::from_millis(15));

    let out = admin_cli(
        &h.health,
        &[
            "plugins",
            "push",
            test_artifacts::GUEST_BANK_BALANCES_V2,
            "--mode",
            "rebuild",
        ],
    );
    assert!(out.contains("building"), "{out}");
    let track = format!("bank_balances@{}", &v2[..8]);
    let building_schema = format!("bank_balances_{}", &v2[..8]);

    // While v2 builds, v1 keeps serving the stable name.
    let v1_before = db.lowest_checkpoint("bank_balances").await;
    eventually(
        "v2 to build part of its read model",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint(&track).await > 0).then_some(()) },
    )
    .await;
    eventually(
        "v1 to keep serving during the build",
        Duration::from_secs(60),
        || async { (db.lowest_checkpoint("bank_balances").await > v1_before).then_some(()) },
    )
    .await;

    // Promotion once caught up.
    becomes_active(
        &db,
        &v2,
        "the rebuild to be promoted",
        Duration::from_secs(120),
    )
    .await;
    every_partition_runs(&db, &track, &v2).await;
    writer.stop().await;
    let head = db
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    eventually("v2 to catch up", Duration::from_secs(60), || async {
        (db.lowest_checkpoint(&track).await >= head).then_some(())
    })
    .await;

    // Readers of the stable name see v2's read model: exact balances and the new column.
    assert!(db.check_w1().await.exact());
    let wrong_largest = db
        .scalar_i64(
            "SELECT count(*) FROM bank_balances.account_balances a
               JOIN (SELECT aggregate_id, max((convert_from(payload, 'UTF8')::jsonb ->> 'amount')::bigint) AS largest
                       FROM events WHERE event_type = 'Deposited' GROUP BY aggregate_id) t ON t.aggregate_id = a.account_id
              WHERE a.largest_deposit <> t.largest",
        )
        .await;
    assert_eq!(
        wrong_largest, 0,
        "v2 built largest_deposit from the whole history"
    );
    let kind: String = sqlx::query_scalar(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'bank_balances' AND c.relname = 'account_balances'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        kind, "v",
        "the stable name is a view onto the promoted read model"
    );
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM \"{building_schema}\".account_balances"
        ))
        .await,
        200
    );

    // v1 is retired; its read model was moved aside (kept for the grace period) and is no longer written.
    let (state, namespace): (String, String) =
        sqlx::query_as("SELECT state, namespace FROM projection_host.plugins WHERE sha256 = $1")
            .bind(&v1)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, "retired");
    assert_eq!(namespace, format!("bank_balances_{}", &v1[..8]));
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM \"{namespace}\".account_balances"
        ))
        .await,
        200
    );
    db.drop_db().await;
}
