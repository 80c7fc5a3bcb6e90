//! A projection subscribed to some events of a store full of others: it reads along the
//! primary key (never another index of the events table, which would scan the whole table on
//! every batch), and still applies exactly its events, across runs of positions that hold none.

use std::time::Duration;

use crate::support::{Host, TestDb};

/// Blocks of `SUBSCRIBED` W1 events, each followed by `NOISE` events of other contexts and
/// aggregate types, which the bank-balances subscription (Bank / Account / Deposited,
/// Withdrawn) does not take.
const BLOCKS: i64 = 60;
const SUBSCRIBED: i64 = 40;
const NOISE: i64 = 260;
const ACCOUNTS: i64 = 90;

async fn index_scans(db: &TestDb, index: &str) -> i64 {
    db.scalar_i64(&format!(
        "SELECT idx_scan FROM pg_stat_user_indexes WHERE relname = 'events' AND indexrelname = '{index}'"
    ))
    .await
}

#[tokio::test]
async fn a_selective_subscription_reads_along_the_primary_key_and_applies_exactly_its_events() {
    let db = TestDb::new("subscription_reads").await;
    // No statistics, as on a table just loaded: without them the planner took the unique
    // (bounded_context, aggregate_type, ...) index for the subscription's filters and scanned
    // every Account event of the store per batch.
    sqlx::raw_sql("ALTER TABLE events SET (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await
        .unwrap();
    let block = SUBSCRIBED + NOISE;
    sqlx::raw_sql(&format!(
        "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version,
                             event_id, event_type, event_version, payload, metadata, created_at)
         SELECT CASE WHEN subscribed THEN 'Bank' WHEN g % 2 = 0 THEN 'Shop' ELSE 'Bank' END,
                CASE WHEN subscribed THEN 'Account' WHEN g % 2 = 0 THEN 'Order' ELSE 'Loan' END,
                CASE WHEN subscribed THEN 'acct-' || (w % {ACCOUNTS}) ELSE 'other-' || g END,
                CASE WHEN subscribed THEN w / {ACCOUNTS} + 1 ELSE 1 END,
                md5('subscription-reads-' || g)::uuid,
                CASE WHEN NOT subscribed THEN 'Placed'
                     WHEN w % 10 < 7 THEN 'Deposited' ELSE 'Withdrawn' END, 1,
                convert_to('{{\"amount\":' || (1 + (w * 7919) % 1000) || '}}', 'UTF8'),
                '{{}}'::jsonb, now()
           FROM (SELECT g, g % {block} < {SUBSCRIBED} AS subscribed,
                        (g / {block}) * {SUBSCRIBED} + g % {block} AS w
                   FROM generate_series(0::bigint, {BLOCKS} * {block} - 1) AS g) AS numbered
          ORDER BY g"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let pkey_before = index_scans(&db, "events_pkey").await;
    let unique_index: String = sqlx::query_scalar(
        "SELECT indexrelname::text FROM pg_stat_user_indexes
          WHERE relname = 'events' AND indexrelname LIKE 'events_bounded_context%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let unique_before = index_scans(&db, &unique_index).await;

    // Batches of 7: most reads meet only noise (more than a read's pages of it) or end a
    // block part way through a page.
    let mut host = Host::run(
        "subscription_reads",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--batch-size",
            "7",
            "--max-batch-size",
            "7",
        ],
    );
    let status = host.wait(Duration::from_secs(180)).await;
    assert!(status.success(), "host failed:\n{}", host.log());

    // The host's backends have ended, so their index statistics are flushed.
    assert_eq!(
        index_scans(&db, &unique_index).await,
        unique_before,
        "the host's reads scanned {unique_index} instead of walking the primary key"
    );
    assert!(index_scans(&db, "events_pkey").await > pkey_before);

    let check = db.check_w1().await;
    assert_eq!(check.mismatches, 0, "read model differs from the SQL truth");
    assert_eq!(check.accounts, ACCOUNTS);
    assert_eq!(check.events_counted, BLOCKS * SUBSCRIBED);
    assert_eq!(
        db.lowest_checkpoint("bank_balances").await,
        BLOCKS * block,
        "every partition's checkpoint reaches the head, through the noise at the end"
    );
    db.drop_db().await;
}
