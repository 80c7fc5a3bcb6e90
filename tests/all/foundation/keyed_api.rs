//! The keyed read-model API end to end: random operation sequences, projected in batches of
//! random sizes, must leave exactly the state a sequential model computes, and every read must
//! see the batch's own earlier writes.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::{Host, TestDb};

#[derive(Debug, Clone, Default, PartialEq)]
struct Row {
    n: i64,
    hi: Option<i64>,
    first: Option<i64>,
    note: Option<String>,
}

/// PostgreSQL's semantics of each operation, applied one by one.
fn apply(
    model: &mut BTreeMap<String, Row>,
    observed: &mut BTreeMap<i64, Option<i64>>,
    position: i64,
    op: &str,
    key: &str,
    value: i64,
) {
    match op {
        "add" => model.entry(key.into()).or_default().n += value,
        "set" => model.entry(key.into()).or_default().n = value,
        "max" => {
            let row = model.entry(key.into()).or_default();
            row.hi = Some(row.hi.map_or(value, |h| h.max(value)));
        }
        "min" => {
            let row = model.entry(key.into()).or_default();
            row.hi = Some(row.hi.map_or(value, |h| h.min(value)));
        }
        "first" => match model.get_mut(key) {
            Some(row) => row.n += 1,
            None => {
                model.insert(
                    key.into(),
                    Row {
                        n: 1,
                        first: Some(value),
                        ..Row::default()
                    },
                );
            }
        },
        "del" => {
            model.remove(key);
        }
        "get" => {
            observed.insert(position, model.get(key).map(|r| r.n));
        }
        "sql" => {
            if let Some(row) = model.get_mut(key) {
                row.n += 1000;
                row.note = Some(format!("sql@{position}"));
            }
        }
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn keyed_writes_and_reads_match_a_sequential_model() {
    let db = TestDb::new("keyed").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261125);
    let ops = [
        "add", "add", "add", "set", "max", "min", "first", "first", "del", "get", "get", "sql",
    ];
    let mut model = BTreeMap::new();
    let mut observed = BTreeMap::new();
    for _ in 0..3_000 {
        let op = ops[rng.random_range(0..ops.len())];
        let key = format!("k{}", rng.random_range(0..25));
        let value = rng.random_range(-50..50);
        let position = db
            .append("Kv", &key, op, json!({"key": key, "value": value}))
            .await;
        apply(&mut model, &mut observed, position, op, &key, value);
    }
    let mut host = Host::run(
        "keyed",
        &db.url,
        &[
            "--once",
            "--plugin",
            test_artifacts::GUEST_KV_OPS,
            "--batch-size",
            "37",
            "--max-batch-size",
            "400",
        ],
    );
    assert!(
        host.wait(Duration::from_secs(120)).await.success(),
        "{}",
        host.log()
    );

    type Stored = (String, i64, Option<i64>, Option<i64>, Option<String>);
    let rows: Vec<Stored> =
        sqlx::query_as("SELECT k, n, hi, first, note FROM kv_ops.kv ORDER BY k")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let stored: BTreeMap<String, Row> = rows
        .into_iter()
        .map(|(k, n, hi, first, note)| (k, Row { n, hi, first, note }))
        .collect();
    assert_eq!(
        stored, model,
        "the read model differs from the sequential model"
    );

    let reads: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT seq, n FROM kv_ops.observed ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let reads: BTreeMap<i64, Option<i64>> = reads.into_iter().collect();
    assert_eq!(reads, observed, "a read did not see the writes before it");
    db.drop_db().await;
}
