//! `--events-table`: another table in the pupsourcing layout is read like `events`; a table in
//! another layout is refused at start, with every differing column named.

use std::time::Duration;

use crate::support::{Host, TestDb};

#[tokio::test]
async fn a_custom_events_table_with_varchar_columns_is_projected_exactly() {
    let db = TestDb::new("custom_table").await;
    db.append_w1(0, 5_999, 60).await;
    // The same events, same positions, in a table whose text columns are varchar (as some
    // pupsourcing deployments declare them).
    sqlx::raw_sql(
        "CREATE SCHEMA store;
         CREATE TABLE store.domain_events (
             global_position BIGSERIAL PRIMARY KEY,
             bounded_context VARCHAR(100) NOT NULL,
             aggregate_type VARCHAR(100) NOT NULL,
             aggregate_id VARCHAR(255) NOT NULL,
             aggregate_version BIGINT NOT NULL,
             event_id UUID NOT NULL UNIQUE,
             event_type VARCHAR(255) NOT NULL,
             event_version INT NOT NULL DEFAULT 1,
             payload BYTEA NOT NULL,
             trace_id VARCHAR(64),
             correlation_id VARCHAR(64),
             causation_id VARCHAR(64),
             metadata JSONB,
             created_at TIMESTAMPTZ NOT NULL DEFAULT NOW());
         INSERT INTO store.domain_events SELECT global_position, bounded_context, aggregate_type,
                aggregate_id, aggregate_version, event_id, event_type, event_version, payload,
                trace_id, correlation_id, causation_id, metadata, created_at
           FROM events ORDER BY global_position;
         SELECT setval('store.domain_events_global_position_seq', 6000);
         -- Proof that the host read the custom table: the default one loses its events.
         TRUNCATE events;",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let mut host = Host::run(
        "custom_table",
        &db.url,
        &[
            "--once",
            "--events-table",
            "store.domain_events",
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
    );
    let status = host.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "host failed:\n{}", host.log());

    let wrong = db
        .scalar_i64(
            "WITH expected AS (
               SELECT aggregate_id AS account_id,
                      sum(CASE WHEN event_type = 'Deposited' THEN 1 ELSE -1 END
                          * (convert_from(payload, 'UTF8')::jsonb ->> 'amount')::bigint) AS balance,
                      count(*) AS event_count, max(global_position) AS last_position
                 FROM store.domain_events GROUP BY aggregate_id)
             SELECT count(*) FROM expected e
               FULL JOIN bank_balances.account_balances a USING (account_id)
              WHERE a.account_id IS NULL OR e.account_id IS NULL OR a.balance <> e.balance
                 OR a.event_count <> e.event_count OR a.last_position <> e.last_position",
        )
        .await;
    assert_eq!(wrong, 0, "read model differs from the custom table's truth");
    assert_eq!(
        db.scalar_i64("SELECT sum(event_count)::int8 FROM bank_balances.account_balances")
            .await,
        6_000
    );
    db.drop_db().await;
}

#[tokio::test]
async fn an_events_table_in_another_layout_is_refused_naming_each_column() {
    let db = TestDb::new("legacy_table").await;
    sqlx::raw_sql(
        "CREATE TABLE legacy_events (
             global_position BIGSERIAL PRIMARY KEY,
             bounded_context TEXT NOT NULL,
             aggregate_type TEXT NOT NULL,
             aggregate_id TEXT NOT NULL,
             aggregate_version INT NOT NULL,
             event_id UUID NOT NULL,
             event_type TEXT NOT NULL,
             payload JSONB NOT NULL,
             trace_id TEXT, correlation_id TEXT, causation_id TEXT, metadata JSONB,
             created_at TIMESTAMP NOT NULL DEFAULT NOW())",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let mut host = Host::run(
        "legacy_table",
        &db.url,
        &[
            "--once",
            "--events-table",
            "legacy_events",
            "--plugin",
            test_artifacts::BANK_BALANCES,
        ],
    );
    let status = host.wait(Duration::from_secs(60)).await;
    let log = host.log();
    assert!(
        !status.success(),
        "a table in another layout must stop the start:\n{log}"
    );
    assert!(
        log.contains("does not have the pupsourcing layout"),
        "{log}"
    );
    for problem in [
        "column aggregate_version is integer, expected bigint",
        "column event_version is missing",
        "column payload is jsonb, expected bytea",
        "column created_at is timestamp without time zone, expected timestamp with time zone",
    ] {
        assert!(log.contains(problem), "`{problem}` not reported:\n{log}");
    }
    // Columns that match are not reported.
    assert!(!log.contains("column aggregate_id"), "{log}");
    db.drop_db().await;
}
