//! What a worker does with each partition of its replica set, given the partition rows and
//! what this process holds. No I/O: every rule is a unit test here; `Coordinator::reconcile`
//! carries the plan out and publishes the result.

use std::collections::{HashMap, HashSet};

use super::PartitionRow;
use crate::ids::{Epoch, PartitionId};

/// What reconciling sees.
pub(super) struct Seen<'a> {
    pub rows: &'a [PartitionRow],
    /// This worker's id.
    pub me: &'a str,
    /// The generation is running (not behind the recreate strategy's stop barrier).
    pub running: bool,
    /// What this process holds, at which epoch.
    pub held: &'a HashMap<PartitionId, Epoch>,
    /// Releases in flight: left alone until they finish.
    pub releasing: &'a HashSet<PartitionId>,
    pub live_workers: &'a HashSet<String>,
}

/// What to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Held here, but the row shows another owner or epoch: another worker took them over.
    pub lost: Vec<PartitionId>,
    /// No longer ours to run (reassigned, or the generation is stopping).
    pub release: Vec<PartitionId>,
    /// Assigned to us and free (no owner, or an owner that is gone).
    pub claim: Vec<PartitionId>,
    /// Every partition assigned to this worker.
    pub assigned: Vec<PartitionId>,
}

pub(super) fn plan(seen: &Seen<'_>) -> Plan {
    let mut plan = Plan::default();
    for row in seen.rows {
        let p = PartitionId(row.partition as u32);
        let owner_is_me = row.owner.as_deref() == Some(seen.me);
        let assigned_to_me = row.assigned_to.as_deref() == Some(seen.me);
        if assigned_to_me {
            plan.assigned.push(p);
        }
        if seen.releasing.contains(&p) {
            continue;
        }
        match seen.held.get(&p) {
            Some(epoch) if !owner_is_me || row.epoch != epoch.0 => plan.lost.push(p),
            Some(_) if !assigned_to_me || !seen.running => plan.release.push(p),
            Some(_) => {}
            // Held in the database by this worker id but not by this process (a release that
            // failed half-way, or a previous process): hand it back.
            None if owner_is_me && (!assigned_to_me || !seen.running) => plan.release.push(p),
            None if assigned_to_me && seen.running => {
                let owner_gone = row
                    .owner
                    .as_ref()
                    .is_none_or(|o| o == seen.me || !seen.live_workers.contains(o));
                if owner_gone {
                    plan.claim.push(p);
                }
            }
            None => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        partition: i32,
        assigned_to: Option<&str>,
        owner: Option<&str>,
        epoch: i64,
    ) -> PartitionRow {
        PartitionRow {
            partition,
            assigned_to: assigned_to.map(String::from),
            owner: owner.map(String::from),
            epoch,
        }
    }

    struct World {
        rows: Vec<PartitionRow>,
        running: bool,
        held: HashMap<PartitionId, Epoch>,
        releasing: HashSet<PartitionId>,
        live: HashSet<String>,
    }

    impl World {
        fn new(rows: Vec<PartitionRow>) -> World {
            World {
                rows,
                running: true,
                held: HashMap::new(),
                releasing: HashSet::new(),
                live: ["me", "other"].into_iter().map(String::from).collect(),
            }
        }

        fn plan(&self) -> Plan {
            plan(&Seen {
                rows: &self.rows,
                me: "me",
                running: self.running,
                held: &self.held,
                releasing: &self.releasing,
                live_workers: &self.live,
            })
        }
    }

    fn ps(ns: &[u32]) -> Vec<PartitionId> {
        ns.iter().map(|n| PartitionId(*n)).collect()
    }

    #[test]
    fn a_free_partition_assigned_to_me_is_claimed_while_the_generation_runs() {
        let world = World::new(vec![row(0, Some("me"), None, 1)]);
        let plan = world.plan();
        assert_eq!(plan.claim, ps(&[0]));
        assert_eq!(plan.assigned, ps(&[0]));
    }

    #[test]
    fn nothing_is_claimed_behind_the_recreate_barrier() {
        let mut world = World::new(vec![row(0, Some("me"), None, 1)]);
        world.running = false;
        assert!(world.plan().claim.is_empty());
    }

    #[test]
    fn a_partition_a_live_worker_still_owns_waits_and_a_dead_owners_is_claimed() {
        let mut world = World::new(vec![
            row(0, Some("me"), Some("other"), 1),
            row(1, Some("me"), Some("gone"), 1),
        ]);
        world.live.remove("gone");
        assert_eq!(world.plan().claim, ps(&[1]));
    }

    #[test]
    fn a_held_partition_another_worker_took_over_is_lost() {
        let mut world = World::new(vec![
            row(0, Some("other"), Some("other"), 2),
            row(1, Some("me"), Some("me"), 3),
        ]);
        world.held.insert(PartitionId(0), Epoch(1));
        // Same owner, newer epoch: claimed again meanwhile (by a later process of this id).
        world.held.insert(PartitionId(1), Epoch(2));
        assert_eq!(world.plan().lost, ps(&[0, 1]));
    }

    #[test]
    fn a_held_partition_reassigned_elsewhere_or_behind_the_barrier_is_released() {
        let mut world = World::new(vec![
            row(0, Some("other"), Some("me"), 1),
            row(1, Some("me"), Some("me"), 1),
        ]);
        world.held.insert(PartitionId(0), Epoch(1));
        world.held.insert(PartitionId(1), Epoch(1));
        assert_eq!(world.plan().release, ps(&[0]));
        world.running = false;
        assert_eq!(world.plan().release, ps(&[0, 1]));
    }

    #[test]
    fn a_partition_my_id_owns_in_the_database_but_this_process_does_not_hold_is_handed_back() {
        let world = World::new(vec![row(0, Some("other"), Some("me"), 1)]);
        assert_eq!(world.plan().release, ps(&[0]));
    }

    #[test]
    fn a_partition_being_released_is_left_alone_but_still_counts_as_assigned() {
        let mut world = World::new(vec![row(0, Some("me"), None, 1)]);
        world.releasing.insert(PartitionId(0));
        let plan = world.plan();
        assert!(plan.claim.is_empty() && plan.release.is_empty() && plan.lost.is_empty());
        assert_eq!(plan.assigned, ps(&[0]));
    }
}
