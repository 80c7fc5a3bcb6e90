//! `carried_checkpoints`: checkpoints of an earlier partitioning of a read model (before a
//! resize, or the Go lineage's before an import), kept while they still say more than the
//! current ones. Under such a partitioning an event was applied exactly when its position is at
//! or below the checkpoint of its partition there; the worker skips those events.

use sqlx::{PgConnection, PgPool};

use crate::ids::PartitionId;

/// One earlier partitioning and its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    /// `positions[p]` for partition `p` of `positions.len()` partitions.
    pub positions: Vec<i64>,
}

impl Carried {
    /// Whether the earlier partitioning applied this event.
    pub fn applied(&self, aggregate_id: &str, position: i64) -> bool {
        let count = self.positions.len() as u32;
        if count == 0 {
            return false;
        }
        let p = PartitionId::of(aggregate_id, count);
        position <= self.positions[p.0 as usize]
    }

    /// The highest checkpoint: above it, this partitioning applied nothing.
    pub fn highest(&self) -> i64 {
        self.positions.iter().copied().max().unwrap_or(0)
    }
}

/// The earlier partitionings of a read model (each is a rule of its own: an event is applied
/// if any of them applied it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarriedSet(pub Vec<Carried>);

impl CarriedSet {
    pub fn applied(&self, aggregate_id: &str, position: i64) -> bool {
        self.0.iter().any(|c| c.applied(aggregate_id, position))
    }
}

/// The carried checkpoints of one read model.
pub async fn load(pool: &PgPool, replica_set: &str, projection: &str) -> sqlx::Result<CarriedSet> {
    let rows: Vec<(Vec<i64>,)> = sqlx::query_as(
        "SELECT positions FROM projection_host.carried_checkpoints
          WHERE replica_set = $1 AND projection = $2 ORDER BY id",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_all(pool)
    .await?;
    Ok(CarriedSet(
        rows.into_iter()
            .map(|(positions,)| Carried { positions })
            .collect(),
    ))
}

/// Every read model's carried checkpoints in the set with their origin (inside a resize).
pub async fn of_replica_set(
    conn: &mut PgConnection,
    replica_set: &str,
) -> sqlx::Result<Vec<(String, Carried, String)>> {
    let rows: Vec<(String, Vec<i64>, String)> = sqlx::query_as(
        "SELECT projection, positions, origin FROM projection_host.carried_checkpoints
          WHERE replica_set = $1 ORDER BY id FOR UPDATE",
    )
    .bind(replica_set)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(projection, positions, origin)| (projection, Carried { positions }, origin))
        .collect())
}

/// Replaces the set's carried checkpoints of `projection` with `kept`.
pub async fn replace(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    kept: &[(Carried, String)],
) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM projection_host.carried_checkpoints WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .execute(&mut *conn)
    .await?;
    for (carried, origin) in kept {
        sqlx::query(
            "INSERT INTO projection_host.carried_checkpoints (replica_set, projection, partitions, positions, origin)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(replica_set)
        .bind(projection)
        .bind(carried.positions.len() as i32)
        .bind(&carried.positions)
        .bind(origin)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// One carried partitioning, as `status` shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Summary {
    pub projection: String,
    pub origin: String,
    pub partitions: i32,
    /// Until every checkpoint passed this position, the rule applies.
    pub highest: i64,
}

pub async fn summaries(pool: &PgPool, replica_set: &str) -> sqlx::Result<Vec<Summary>> {
    sqlx::query_as(
        "SELECT projection, origin, partitions, (SELECT max(x) FROM unnest(positions) AS x) AS highest
           FROM projection_host.carried_checkpoints WHERE replica_set = $1 ORDER BY projection, id",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}

/// Drops the carried checkpoints that no longer say anything: every current checkpoint of the
/// read model passed their highest position. Returns how many were dropped.
///
/// The partition count is the set's as this statement sees it, with the set's row locked, not
/// the caller's: a leader that has not noticed a resize yet would count the new checkpoints
/// against the old number.
pub async fn drop_passed(pool: &PgPool, replica_set: &str) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "WITH set AS (
             SELECT partitions FROM projection_host.replica_sets WHERE name = $1 FOR SHARE)
         DELETE FROM projection_host.carried_checkpoints k
          WHERE k.replica_set = $1
            AND (SELECT count(*) FROM projection_host.checkpoints c
                  WHERE c.replica_set = k.replica_set AND c.projection = k.projection
                    AND c.position >= (SELECT max(x) FROM unnest(k.positions) AS x))
                = (SELECT partitions FROM set)",
    )
    .bind(replica_set)
    .execute(pool)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_applied_at_or_below_its_earlier_partitions_checkpoint() {
        let a = "order-2"; // partition 1 of 3
        let b = "order-5"; // partition 2 of 3
        assert_eq!(PartitionId::of(a, 3), PartitionId(1));
        assert_eq!(PartitionId::of(b, 3), PartitionId(2));
        let carried = Carried {
            positions: vec![10, 20, 30],
        };
        assert!(carried.applied(a, 20));
        assert!(!carried.applied(a, 21));
        assert!(carried.applied(b, 21));
        assert!(!carried.applied(b, 31));
        assert_eq!(carried.highest(), 30);
        let set = CarriedSet(vec![
            carried,
            Carried {
                positions: vec![40],
            },
        ]);
        assert!(set.applied(b, 40));
        assert!(!set.applied(b, 41));
    }
}
