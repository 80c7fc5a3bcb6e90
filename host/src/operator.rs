//! `replica-sets`, `projections` and `partitions`: operator commands that change what replica
//! sets own, run on the database directly (they must work while no host of the set runs, and a
//! resize while they run).

use anyhow::bail;

use clap::Subcommand;

use crate::base::units::parse_duration;
use crate::config::DatabaseArgs;
use crate::lifecycle::read_models;
use crate::lifecycle::removal::{self, Removed};
use crate::status::pool;

pub async fn replica_sets(command: ReplicaSetCommand) -> anyhow::Result<()> {
    match command {
        ReplicaSetCommand::SwitchReaders {
            database,
            from,
            to,
            projection,
            yes,
        } => {
            confirm(
                yes,
                &format!("switch readers from replica set {from} to {to}"),
            )?;
            let pool = pool(&database).await?;
            crate::db::migrate(&pool).await?;
            for s in read_models::switch_readers(&pool, &from, &to, projection.as_deref()).await? {
                println!(
                    "{}: readers of schema {} now see replica set {to}'s read model; {from}'s is in schema {}",
                    s.projection, s.readers, s.old_set_now_in
                );
            }
            println!("next: once readers are fine, remove the old set with `projection-host replica-sets remove {from} --yes`");
            Ok(())
        }
        ReplicaSetCommand::Remove {
            database,
            name,
            yes,
        } => {
            confirm(
                yes,
                &format!("remove replica set {name} and all its read models"),
            )?;
            let pool = pool(&database).await?;
            crate::db::migrate(&pool).await?;
            for removed in removal::remove_replica_set(&pool, &name).await? {
                report(&removed);
            }
            println!("replica set {name} removed");
            Ok(())
        }
    }
}

pub async fn projections(command: ProjectionCommand) -> anyhow::Result<()> {
    match command {
        ProjectionCommand::Remove {
            database,
            replica_set,
            name,
            wait,
            yes,
        } => {
            confirm(
                yes,
                &format!(
                    "remove projection {name} of replica set {replica_set} and its read model"
                ),
            )?;
            let pool = pool(&database).await?;
            crate::db::migrate(&pool).await?;
            let removed = removal::remove_projection(&pool, &replica_set, &name, wait, &|line| {
                eprintln!("{name}: {line}")
            })
            .await?;
            report(&removed);
            Ok(())
        }
    }
}

pub async fn partitions(command: PartitionCommand) -> anyhow::Result<()> {
    match command {
        PartitionCommand::Resize {
            database,
            replica_set,
            to,
        } => {
            let pool = pool(&database).await?;
            crate::db::migrate(&pool).await?;
            eprintln!(
                "resizing replica set {replica_set} to {to} partitions (waits for in-flight batch commits)..."
            );
            let started = std::time::Instant::now();
            let r = crate::coordination::resize::resize(&pool, &replica_set, to).await?;
            println!(
                "replica set {} resized from {} to {} partitions in {:.0?} (generation {})",
                r.replica_set,
                r.from,
                r.to,
                started.elapsed(),
                r.generation
            );
            for m in &r.read_models {
                println!(
                    "  {}: new partitions start at {}{}",
                    m.projection,
                    m.lowest,
                    if m.carried {
                        format!(
                            "; events up to {} that the old partitions applied are skipped (carried checkpoints)",
                            m.highest
                        )
                    } else {
                        " (each from one old partition, exactly)".to_string()
                    }
                );
            }
            if r.dead_letters_moved > 0 {
                println!(
                    "  {} parked event(s) renumbered to their new partitions",
                    r.dead_letters_moved
                );
            }
            if r.halts_lifted > 0 {
                println!(
                    "  {} halt(s) lifted: each failing event is read again and halts its new partition again",
                    r.halts_lifted
                );
            }
            println!(
                "running hosts join again with {to} partitions within a heartbeat; set PARTITIONS={to} in their configuration"
            );
            Ok(())
        }
    }
}

fn confirm(yes: bool, what: &str) -> anyhow::Result<()> {
    if !yes {
        bail!("this would {what}, which cannot be undone; add --yes to do it");
    }
    Ok(())
}

fn report(removed: &Removed) {
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "{}: dropped schemas {}; role {}; {} checkpoint(s), {} dead letter(s) deleted",
        removed.projection,
        list(&removed.schemas),
        removed.role.as_deref().unwrap_or("none"),
        removed.checkpoints,
        removed.dead_letters
    );
    if !removed.kept.is_empty() {
        println!(
            "{}: left alone (not the projection's): {}",
            removed.projection,
            removed.kept.join(", ")
        );
    }
}

#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Change the replica set's partition count while its hosts run: nothing is replayed and
    /// nothing skipped. One transaction: at any interruption the set keeps its old count.
    Resize {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The replica set to resize.
        #[arg(long, env = "REPLICA_SET")]
        replica_set: String,
        /// The new partition count (1 to 4096).
        #[arg(long)]
        to: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaSetCommand {
    /// Make the schema readers query for each projection of FROM show TO's read model instead
    /// (one transaction). FROM must have no live hosts and TO must have caught up with it.
    SwitchReaders {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The replica set readers query today.
        #[arg(long)]
        from: String,
        /// The replica set whose read models readers should query.
        #[arg(long)]
        to: String,
        /// Only this projection (default: every projection FROM publishes).
        #[arg(long)]
        projection: Option<String>,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// Remove a replica set with no live hosts: its read models, roles, checkpoints, registry,
    /// dead letters and coordination rows.
    Remove {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The replica set to remove.
        name: String,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Remove a projection: hosts stop running it, then its schemas, role, checkpoints, registry
    /// rows, controls, halts and dead letters are dropped. Remove its file from the plugins
    /// directory first, or hosts register it again (from position 0) at their next start.
    Remove {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long, env = "REPLICA_SET", default_value = "default")]
        replica_set: String,
        /// The projection to remove.
        name: String,
        /// How long to wait for hosts to close the projection's sessions before ending them.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        wait: std::time::Duration,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}
