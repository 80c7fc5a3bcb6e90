//! Changing a replica set's partition count while its hosts run, without replaying or skipping
//! an event.
//!
//! One transaction: lock the set's row and every partition row (an in-flight batch commit holds
//! its rows FOR SHARE, so the lock waits for it; every later commit of an earlier claim fails
//! its fence), read the checkpoints, and write them for the new count. A new partition starts
//! at the lowest checkpoint of the old partitions its aggregates can come from; where those
//! differ, the old checkpoints are kept as carried checkpoints (`store::carried`), and the worker
//! skips the events they say were applied. When the new count is a multiple of the old one,
//! every new partition draws from one old partition and starts exactly at its checkpoint. The
//! partition rows are reshaped, unowned and unassigned, with fresh epochs; the hosts see the new
//! count at their next coordination round, drop what they held and join again with it.
//!
//! Interrupted at any point (the process killed, the connection lost), the transaction rolls
//! back and the set stays at its old count.

use std::collections::BTreeMap;

use sqlx::PgPool;

use crate::base::notify;
use crate::store::carried::Carried;
use crate::store::checkpoints::Stored;
use crate::store::{self, replica_sets};

/// Partition counts a replica set may have (the table's CHECK).
pub const MAX_PARTITIONS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("replica set '{0}' does not exist (check --replica-set / REPLICA_SET)")]
    NoSuchSet(String),
    #[error("replica set '{set}' already has {count} partitions; nothing to do")]
    Unchanged { set: String, count: u32 },
    #[error("a replica set has 1 to {MAX_PARTITIONS} partitions; {0} is out of range")]
    OutOfRange(u32),
    #[error(
        "hosts of an older release run in replica set '{set}': {hosts}. They would claim partitions of the new layout with the old count; finish the rollout of this release first (nothing was changed)"
    )]
    OlderHosts { set: String, hosts: String },
    #[error(
        "the resize could not lock the set's partitions within {LOCK_TIMEOUT:?} (a batch commit or another resize holds them); nothing was changed, run it again"
    )]
    Busy,
    #[error("database error during the resize: {0}")]
    Sql(sqlx::Error),
}

/// Longest wait for the locks of the set's rows (a batch commit holds its partitions for
/// milliseconds; a stuck one must not hold every host's coordination behind the resize).
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Hosts whose heartbeat is younger than this count as running (the default stale timeout).
const LIVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

impl From<sqlx::Error> for ResizeError {
    fn from(e: sqlx::Error) -> Self {
        match crate::base::sqlstate::of(&e).as_deref() {
            Some(
                crate::base::sqlstate::LOCK_NOT_AVAILABLE
                | crate::base::sqlstate::DEADLOCK_DETECTED,
            ) => ResizeError::Busy,
            _ => ResizeError::Sql(e),
        }
    }
}

/// What a resize did to one read model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadModelResize {
    pub projection: String,
    pub lowest: i64,
    pub highest: i64,
    /// The old checkpoints were kept as carried checkpoints (they differed within a new
    /// partition's sources).
    pub carried: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Resized {
    pub replica_set: String,
    pub from: u32,
    pub to: u32,
    pub generation: i64,
    pub read_models: Vec<ReadModelResize>,
    /// Parked events renumbered, and halts lifted (they are found again).
    pub dead_letters_moved: u64,
    pub halts_lifted: u64,
}

/// A read model's checkpoints and carried checkpoints for the new count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub checkpoints: Vec<Stored>,
    pub carried: Vec<(Carried, String)>,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The new checkpoints of one read model. `old` holds its stored checkpoints under `from`
/// partitions (a missing partition applied nothing), `carried` its carried checkpoints.
///
/// An aggregate in new partition `p` (hash mod `to`) is in an old partition `q` with `q ≡ p`
/// modulo gcd(from, to), because both are the hash reduced modulo a multiple of the gcd; so
/// the lowest checkpoint over those `q` is a position up to which every event of `p` was
/// applied. Above it, the old checkpoints (kept as a carried rule) say exactly which were.
pub fn plan(
    projection: &str,
    from: u32,
    to: u32,
    old: &[Stored],
    carried: Vec<(Carried, String)>,
) -> Plan {
    let mut positions = vec![0i64; from as usize];
    let mut generations = vec![0i64; from as usize];
    for s in old {
        if let Some(slot) = positions.get_mut(s.partition as usize) {
            *slot = s.position;
            generations[s.partition as usize] = s.build_generation;
        }
    }
    let g = gcd(from, to);
    let mut differ = false;
    let checkpoints: Vec<Stored> = (0..to)
        .map(|p| {
            let sources = (0..from).filter(|q| q % g == p % g);
            let (mut lowest, mut highest, mut generation) = (i64::MAX, i64::MIN, 0);
            for q in sources {
                lowest = lowest.min(positions[q as usize]);
                highest = highest.max(positions[q as usize]);
                generation = generation.max(generations[q as usize]);
            }
            differ |= lowest != highest;
            Stored {
                projection: projection.to_string(),
                partition: p as i32,
                position: lowest,
                build_generation: generation,
            }
        })
        .collect();
    let lowest_now = checkpoints.iter().map(|c| c.position).min().unwrap_or(0);
    // An earlier rule still counts where it reaches above the new lowest checkpoint.
    let mut kept: Vec<(Carried, String)> = carried
        .into_iter()
        .filter(|(c, _)| c.highest() > lowest_now)
        .collect();
    if differ {
        kept.push((
            Carried { positions },
            format!("resize {from} -> {to} partitions"),
        ));
    }
    Plan {
        checkpoints,
        carried: kept,
    }
}

/// Resizes `replica_set` to `to` partitions (see the module's comment).
pub async fn resize(pool: &PgPool, replica_set: &str, to: u32) -> Result<Resized, ResizeError> {
    if !(1..=MAX_PARTITIONS).contains(&to) {
        return Err(ResizeError::OutOfRange(to));
    }
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        LOCK_TIMEOUT.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    let Some(from) = replica_sets::lock(&mut tx, replica_set).await? else {
        return Err(ResizeError::NoSuchSet(replica_set.to_string()));
    };
    if from == to {
        return Err(ResizeError::Unchanged {
            set: replica_set.to_string(),
            count: to,
        });
    }
    // Hosts running now. One of an older release started later reads the new count at its
    // start, but skips no carried checkpoint: the docs say to finish a rollout first.
    let older = store::workers::older_protocol(&mut tx, replica_set, LIVE_WITHIN).await?;
    if !older.is_empty() {
        return Err(ResizeError::OlderHosts {
            set: replica_set.to_string(),
            hosts: older.join(", "),
        });
    }
    store::partitions::lock_all(&mut tx, replica_set).await?;
    let mut by_model: BTreeMap<String, Vec<Stored>> = BTreeMap::new();
    for s in store::checkpoints::all_for_update(&mut tx, replica_set).await? {
        by_model.entry(s.projection.clone()).or_default().push(s);
    }
    let mut carried_by_model: BTreeMap<String, Vec<(Carried, String)>> = BTreeMap::new();
    for (projection, c, origin) in store::carried::of_replica_set(&mut tx, replica_set).await? {
        carried_by_model
            .entry(projection)
            .or_default()
            .push((c, origin));
    }
    let mut read_models = Vec::new();
    for (projection, old) in &by_model {
        let earlier = carried_by_model.remove(projection).unwrap_or_default();
        let planned = plan(projection, from, to, old, earlier);
        store::checkpoints::replace(&mut tx, replica_set, projection, &planned.checkpoints).await?;
        store::carried::replace(&mut tx, replica_set, projection, &planned.carried).await?;
        let positions = planned.checkpoints.iter().map(|c| c.position);
        read_models.push(ReadModelResize {
            projection: projection.clone(),
            lowest: positions.clone().min().unwrap_or(0),
            highest: old.iter().map(|c| c.position).max().unwrap_or(0),
            carried: !planned.carried.is_empty(),
        });
    }
    store::partitions::reshape(&mut tx, replica_set, to).await?;
    replica_sets::set_partitions(&mut tx, replica_set, from, to).await?;
    let generation = replica_sets::new_generation(
        &mut tx,
        replica_set,
        &replica_sets::StartedBy::Operator,
        &format!("resize {from} -> {to} partitions"),
    )
    .await?
    .ok_or_else(|| ResizeError::NoSuchSet(replica_set.to_string()))?;
    let dead_letters_moved = store::dead_letters::repartition(&mut tx, replica_set, to).await?;
    let halts_lifted = store::halts::clear_all(&mut tx, replica_set).await?;
    notify::coordination(&mut *tx, replica_set).await?;
    tx.commit().await?;
    Ok(Resized {
        replica_set: replica_set.to_string(),
        from,
        to,
        generation,
        read_models,
        dead_letters_moved,
        halts_lifted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PartitionId;

    fn stored(checkpoints: &[i64]) -> Vec<Stored> {
        checkpoints
            .iter()
            .enumerate()
            .map(|(p, c)| Stored {
                projection: "m".into(),
                partition: p as i32,
                position: *c,
                build_generation: 0,
            })
            .collect()
    }

    fn positions(plan: &Plan) -> Vec<i64> {
        plan.checkpoints.iter().map(|c| c.position).collect()
    }

    #[test]
    fn doubling_maps_each_new_partition_onto_one_old_one_exactly() {
        let planned = plan("m", 2, 4, &stored(&[10, 20]), Vec::new());
        assert_eq!(positions(&planned), vec![10, 20, 10, 20]);
        assert!(planned.carried.is_empty());
    }

    #[test]
    fn shrinking_starts_at_the_lowest_source_and_carries_the_old_checkpoints() {
        let planned = plan("m", 4, 2, &stored(&[10, 20, 30, 40]), Vec::new());
        assert_eq!(positions(&planned), vec![10, 20]);
        assert_eq!(planned.carried.len(), 1);
        assert_eq!(planned.carried[0].0.positions, vec![10, 20, 30, 40]);
    }

    #[test]
    fn coprime_counts_draw_on_every_old_partition_and_a_missing_one_counts_as_zero() {
        let planned = plan("m", 3, 2, &stored(&[10, 20]), Vec::new());
        assert_eq!(positions(&planned), vec![0, 0]);
        assert_eq!(planned.carried[0].0.positions, vec![10, 20, 0]);
    }

    #[test]
    fn a_new_partition_never_starts_above_an_unapplied_event_of_its_aggregates() {
        // For every aggregate, the old rule (its old partition's checkpoint) and the new one
        // (new checkpoint, then the carried rule) agree on every position.
        let old = [7i64, 3, 12, 9, 5, 11];
        for to in 1..=13u32 {
            let planned = plan("m", old.len() as u32, to, &stored(&old), Vec::new());
            let carried = crate::store::carried::CarriedSet(
                planned.carried.iter().map(|(c, _)| c.clone()).collect(),
            );
            for a in 0..200 {
                let aggregate = format!("account-{a}");
                let old_checkpoint = old[PartitionId::of(&aggregate, old.len() as u32).0 as usize];
                let new_checkpoint =
                    planned.checkpoints[PartitionId::of(&aggregate, to).0 as usize].position;
                assert!(new_checkpoint <= old_checkpoint, "to {to}: {aggregate}");
                for position in 0..15 {
                    let applied_before = position <= old_checkpoint;
                    let applied_after =
                        position <= new_checkpoint || carried.applied(&aggregate, position);
                    assert_eq!(
                        applied_before, applied_after,
                        "to {to}: {aggregate} at {position}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_earlier_rule_is_kept_only_while_it_reaches_above_the_new_lowest_checkpoint() {
        let earlier = vec![
            (
                Carried {
                    positions: vec![5, 8],
                },
                String::new(),
            ),
            (
                Carried {
                    positions: vec![30],
                },
                String::new(),
            ),
        ];
        let planned = plan("m", 2, 4, &stored(&[10, 20]), earlier);
        assert_eq!(planned.carried.len(), 1);
        assert_eq!(planned.carried[0].0.positions, vec![30]);
    }
}
