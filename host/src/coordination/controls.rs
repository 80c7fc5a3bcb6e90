//! Operator controls that every host of a replica set follows: paused projections, halted
//! partitions (stop policy), requested dead-letter retries. Stored in PostgreSQL, announced with
//! NOTIFY, re-read every coordination round.

use std::collections::BTreeSet;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    pub paused: BTreeSet<String>,
    /// Projections with halted partitions.
    pub halted: BTreeSet<String>,
    /// Projections with dead letters whose retry was requested.
    pub retry: BTreeSet<String>,
    /// Changes with every operator action (pause, resume, skip ...), so that pipelines re-read
    /// their halts and parked aggregates even when the sets above look the same.
    pub revision: String,
}

pub type Shared = Arc<Controls>;

pub async fn load(pool: &PgPool, replica_set: &str) -> Result<Shared, sqlx::Error> {
    let rows = crate::store::controls::load(pool, replica_set).await?;
    let mut controls = Controls::default();
    for (kind, projection) in rows {
        match kind.as_str() {
            "paused" => controls.paused.insert(projection),
            "halted" => controls.halted.insert(projection),
            "retry" => controls.retry.insert(projection),
            _ => {
                controls.revision = projection;
                true
            }
        };
    }
    Ok(Arc::new(controls))
}

/// Pauses or resumes a projection fleet-wide; hosts act at their next batch boundary. Resuming
/// also lifts the halts of the stop policy, so halted partitions try again.
pub async fn set_paused(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    paused: bool,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    crate::store::controls::set_paused(&mut tx, replica_set, projection, paused, reason).await?;
    if !paused {
        crate::store::halts::clear(&mut tx, replica_set, projection).await?;
    }
    crate::base::notify::coordination(&mut *tx, replica_set).await?;
    tx.commit().await
}

/// Publishes new controls if they changed.
pub fn publish(tx: &watch::Sender<Shared>, controls: Shared) {
    tx.send_if_modified(|current| {
        if **current == *controls {
            false
        } else {
            *current = controls;
            true
        }
    });
}
