//! Plugin versions across the fleet: continue swaps, blue/green rebuilds, a host killed during
//! a swap, and a mounted file replaced on one host only.

mod compile_cache;
mod continue_swap;
mod mounted_file;
mod rebuild;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{eventually, TestDb};

/// sha256 of a component file, as the registry keys it.
pub fn sha(path: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(path).unwrap(),
    ))
}

/// Waits until every partition of `track` committed a batch with the build `sha`.
pub async fn every_partition_runs(db: &TestDb, track: &str, sha: &str) {
    eventually(
        &format!("every partition of {track} to commit with {}", &sha[..12]),
        Duration::from_secs(60),
        || async {
            let n = db
                .scalar_i64_or_zero(&format!(
                    "SELECT count(DISTINCT p) FROM projection_host.batches, unnest(partitions) AS p
                  WHERE projection = '{track}' AND plugin_sha256 = '{sha}'"
                ))
                .await;
            (n == 32).then_some(())
        },
    )
    .await;
}

/// Waits until the registry shows the build `sha` as active.
pub async fn becomes_active(db: &TestDb, sha: &str, what: &str, timeout: Duration) {
    eventually(what, timeout, || async {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM projection_host.plugins WHERE sha256 = $1")
                .bind(sha)
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        (state.as_deref() == Some("active")).then_some(())
    })
    .await;
}

/// Per partition, the sequence of builds that committed its batches, with repeats collapsed:
/// a clean swap reads [v1, v2].
pub async fn builds_per_partition(db: &TestDb, track: &str) -> BTreeMap<i32, Vec<String>> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT p, plugin_sha256 FROM projection_host.batches, unnest(partitions) AS p
          WHERE projection = $1 ORDER BY p, committed_at, id",
    )
    .bind(track)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut sequences: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for (p, sha) in rows {
        let seq = sequences.entry(p).or_default();
        if seq.last() != Some(&sha) {
            seq.push(sha);
        }
    }
    sequences
}
