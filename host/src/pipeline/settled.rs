//! `--once`: the run ends when every partition of every running projection has either caught
//! up with the head seen at start or halted at a failing event. Read from the database, so
//! that it holds for the replica set as a whole, whichever host applied what.

use sqlx::PgPool;

/// A partition stopped at a failing event (`ON_FAILURE=stop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    pub projection: String,
    pub partition: i32,
    pub position: i64,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Some partition is still short of the target.
    Not,
    CaughtUp,
    /// Every other partition caught up; these halted.
    Halted(Vec<Halt>),
}

/// Where the replica set stands against `target` for the tracks in `tracks`.
pub async fn check(
    pool: &PgPool,
    replica_set: &str,
    partitions: u32,
    target: i64,
    tracks: &[String],
) -> Result<Settled, sqlx::Error> {
    if tracks.is_empty() {
        return Ok(Settled::Not);
    }
    // A partition without a checkpoint row has applied nothing (position 0).
    let behind =
        crate::store::checkpoints::partitions_below(pool, replica_set, target, tracks, partitions)
            .await?;
    if behind > 0 {
        return Ok(Settled::Not);
    }
    let halts = crate::store::halts::of_tracks(pool, replica_set, tracks).await?;
    if halts.is_empty() {
        return Ok(Settled::CaughtUp);
    }
    Ok(Settled::Halted(
        halts
            .into_iter()
            .map(|(projection, partition, position, error)| Halt {
                projection,
                partition,
                position,
                error,
            })
            .collect(),
    ))
}

/// One line per halted partition, for the exit message.
pub fn describe(halts: &[Halt]) -> String {
    let lines: Vec<String> = halts
        .iter()
        .map(|h| {
            format!(
                "projection {} partition {} halted at position {}: {}",
                h.projection,
                h.partition,
                h.position,
                crate::base::text::plugin_message(&h.error)
            )
        })
        .collect();
    format!(
        "{} partition(s) halted (the others caught up): {}; fix the cause and run `projection-host resume PROJECTION`, or see `projection-host dead-letters list`",
        halts.len(),
        lines.join("; ")
    )
}
