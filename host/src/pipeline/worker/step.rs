//! What a worker does next, decided from what it sees: no I/O, so every rule of the loop is
//! a unit test here.

use std::collections::HashMap;
use std::time::Instant;

use super::checkpoints::Checkpoints;
use crate::ids::{Epoch, PartitionId};
use crate::pipeline::containment::{Containment, Step};
use crate::source::Head;

/// Leased partitions with their epochs.
pub(super) type Scope = Vec<(PartitionId, Epoch)>;

/// What the worker sees at the start of a step.
pub(super) struct Observation<'a> {
    /// The partitions leased for this step.
    pub leased: &'a [(PartitionId, Epoch)],
    /// Halted partitions (stop policy) and the position each halted at.
    pub halted: &'a HashMap<PartitionId, i64>,
    pub paused: bool,
    pub checkpoints: &'a Checkpoints,
    pub head: Head,
    pub now: Instant,
}

/// The worker's next step.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum WorkerStep {
    /// No partition is held: wait for an assignment.
    Idle,
    /// Paused by an operator, or every held partition halted: wait for an operator.
    WaitForOperator { paused: bool },
    /// Re-run a part of a failed batch (narrowing, or a held event's retry).
    Narrow { scope: Scope, step: Step },
    /// Every usable partition waits for the retry of its failing event.
    WaitForRetry { next_retry: Option<Instant> },
    /// Nothing to read up to the safe head: wait for new events.
    CaughtUp {
        from: i64,
        next_retry: Option<Instant>,
    },
    /// A batch of events in `(from, up_to]` over these partitions.
    Batch {
        active: Scope,
        from: i64,
        up_to: i64,
    },
}

/// The partitions whose parked events an operator asked to retry are applied before the next
/// step: the usable ones (held, not halted), unless the projection is paused.
pub(super) fn replay_scope(
    leased: &[(PartitionId, Epoch)],
    halted: &HashMap<PartitionId, i64>,
    paused: bool,
) -> Option<Scope> {
    let active = usable(leased, halted);
    (!paused && !active.is_empty()).then_some(active)
}

/// Leased partitions that are not halted.
fn usable(leased: &[(PartitionId, Epoch)], halted: &HashMap<PartitionId, i64>) -> Scope {
    leased
        .iter()
        .filter(|(p, _)| !halted.contains_key(p))
        .copied()
        .collect()
}

/// Decides the next step. Narrowing steps come first (they take the containment's queue);
/// partitions held for a retry are left out of ordinary batches.
pub(super) fn next_step(seen: &Observation<'_>, containment: &mut Containment) -> WorkerStep {
    if seen.leased.is_empty() {
        return WorkerStep::Idle;
    }
    let active = usable(seen.leased, seen.halted);
    if seen.paused || active.is_empty() {
        return WorkerStep::WaitForOperator {
            paused: seen.paused,
        };
    }
    while let Some(step) = containment.next_step(seen.now) {
        // A part of a failed batch: the partitions it names that are still usable. The others
        // were revoked or halted meanwhile; the containment forgets them.
        let scope: Scope = active
            .iter()
            .filter(|(p, _)| step.partitions.contains(p))
            .copied()
            .collect();
        for gone in step
            .partitions
            .iter()
            .filter(|p| !scope.iter().any(|(q, _)| q == *p))
        {
            containment.release(*gone);
        }
        if !scope.is_empty() {
            return WorkerStep::Narrow { scope, step };
        }
    }
    let held: Vec<PartitionId> = containment.held().collect();
    let active: Scope = active
        .into_iter()
        .filter(|(p, _)| !held.contains(p))
        .collect();
    let next_retry = containment.next_retry();
    if active.is_empty() {
        return WorkerStep::WaitForRetry { next_retry };
    }
    let from = seen.checkpoints.lowest(&active);
    let up_to = seen.head.readable_from(from);
    if from >= up_to {
        return WorkerStep::CaughtUp { from, next_retry };
    }
    WorkerStep::Batch {
        active,
        from,
        up_to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::containment::Failure;

    fn p(n: u32) -> PartitionId {
        PartitionId(n)
    }

    fn leased(partitions: &[u32]) -> Scope {
        partitions.iter().map(|n| (p(*n), Epoch(1))).collect()
    }

    fn head(safe: i64) -> Head {
        Head {
            safe,
            raw: safe,
            ..Head::default()
        }
    }

    struct World {
        leased: Scope,
        halted: HashMap<PartitionId, i64>,
        paused: bool,
        checkpoints: Checkpoints,
        head: Head,
        /// One instant for the whole test, so that no retry comes due while it runs.
        now: Instant,
    }

    impl World {
        fn new(partitions: &[u32], safe_head: i64) -> World {
            World {
                leased: leased(partitions),
                halted: HashMap::new(),
                paused: false,
                checkpoints: Checkpoints::default(),
                head: head(safe_head),
                now: Instant::now(),
            }
        }

        fn seen(&self) -> Observation<'_> {
            Observation {
                leased: &self.leased,
                halted: &self.halted,
                paused: self.paused,
                checkpoints: &self.checkpoints,
                head: self.head,
                now: self.now,
            }
        }

        fn replay_scope(&self) -> Option<Scope> {
            replay_scope(&self.leased, &self.halted, self.paused)
        }

        fn decide(&self, containment: &mut Containment) -> WorkerStep {
            next_step(&self.seen(), containment)
        }
    }

    #[test]
    fn a_worker_without_partitions_idles() {
        let world = World::new(&[], 100);
        assert_eq!(world.decide(&mut Containment::new(3)), WorkerStep::Idle);
    }

    #[test]
    fn a_paused_projection_waits_for_an_operator_even_with_events_to_read() {
        let mut world = World::new(&[0, 1], 100);
        world.paused = true;
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::WaitForOperator { paused: true }
        );
    }

    #[test]
    fn when_every_held_partition_is_halted_the_worker_waits_for_an_operator() {
        let mut world = World::new(&[0, 1], 100);
        world.halted.insert(p(0), 5);
        world.halted.insert(p(1), 7);
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::WaitForOperator { paused: false }
        );
    }

    #[test]
    fn halted_partitions_are_left_out_of_the_batch() {
        let mut world = World::new(&[0, 1, 2], 100);
        world.halted.insert(p(1), 5);
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::Batch {
                active: leased(&[0, 2]),
                from: 0,
                up_to: 100
            }
        );
    }

    #[test]
    fn a_requested_replay_covers_the_usable_partitions_only() {
        let mut world = World::new(&[0, 1], 100);
        world.halted.insert(p(0), 5);
        assert_eq!(world.replay_scope(), Some(leased(&[1])));
    }

    #[test]
    fn no_replay_runs_while_paused_or_without_a_usable_partition() {
        let mut world = World::new(&[0], 100);
        world.paused = true;
        assert_eq!(world.replay_scope(), None);
        let mut world = World::new(&[0], 100);
        world.halted.insert(p(0), 5);
        assert_eq!(world.replay_scope(), None);
        assert_eq!(World::new(&[], 100).replay_scope(), None);
    }

    #[test]
    fn a_batch_starts_after_the_lowest_checkpoint_and_reads_up_to_the_safe_head() {
        let mut world = World::new(&[0, 1], 100);
        world.checkpoints.loaded(p(0), Epoch(1), 40);
        world.checkpoints.loaded(p(1), Epoch(1), 25);
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::Batch {
                active: leased(&[0, 1]),
                from: 25,
                up_to: 100
            }
        );
    }

    #[test]
    fn a_worker_at_the_safe_head_is_caught_up_and_waits_past_its_checkpoint() {
        let mut world = World::new(&[0], 100);
        world.checkpoints.loaded(p(0), Epoch(1), 100);
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::CaughtUp {
                from: 100,
                next_retry: None
            }
        );
    }

    /// A failure of a batch over partitions 0 and 1 in which only partition 1 had an event (at
    /// 20): the failing event is known at once, so partition 0 commits first and partition 1 is
    /// held for the event's retry.
    fn failed_on_partition_1(containment: &mut Containment, now: Instant) {
        containment.failed(
            Failure {
                partitions: &[p(0), p(1)],
                up_to: 20,
                handed: &[(20, p(1))],
                position: Some(20),
            },
            now,
        );
    }

    #[test]
    fn after_a_failure_the_healthy_partitions_run_first_as_a_narrowing_step() {
        let world = World::new(&[0, 1], 100);
        let mut containment = Containment::new(3);
        failed_on_partition_1(&mut containment, world.now);
        match world.decide(&mut containment) {
            WorkerStep::Narrow { scope, step } => {
                assert_eq!(scope, leased(&[0]));
                assert_eq!(step.up_to, 20);
            }
            other => panic!("expected a narrowing step, got {other:?}"),
        }
    }

    #[test]
    fn a_narrowing_step_for_a_partition_no_longer_leased_is_dropped() {
        // Partition 0 moved to another worker: its healthy step has nothing left to run here.
        let world = World::new(&[1], 100);
        let mut containment = Containment::new(3);
        failed_on_partition_1(&mut containment, world.now);
        let step = world.decide(&mut containment);
        assert!(
            !matches!(&step, WorkerStep::Narrow { scope, .. } if scope.iter().any(|(q, _)| *q == p(0))),
            "a step ran over a partition that is not leased: {step:?}"
        );
    }

    /// Decides and commits narrowing steps until the worker would do something else; returns
    /// the steps committed and what came next.
    fn commit_narrowing_steps(
        world: &World,
        containment: &mut Containment,
    ) -> (Vec<Scope>, WorkerStep) {
        let mut committed = Vec::new();
        loop {
            match world.decide(containment) {
                WorkerStep::Narrow { scope, step } => {
                    containment.succeeded(&step);
                    committed.push(scope);
                }
                other => return (committed, other),
            }
        }
    }

    #[test]
    fn a_partition_held_for_a_retry_is_left_out_of_ordinary_batches() {
        let mut world = World::new(&[0, 1], 100);
        let mut containment = Containment::new(3);
        failed_on_partition_1(&mut containment, world.now);
        // Partition 0 (no event in the failed batch) and partition 1 up to its failing event
        // commit first; then partition 1 waits for the retry.
        let (committed, _) = commit_narrowing_steps(&world, &mut containment);
        assert_eq!(committed, vec![leased(&[0]), leased(&[1])]);
        world.checkpoints.loaded(p(0), Epoch(1), 20);
        world.checkpoints.loaded(p(1), Epoch(1), 19);
        assert_eq!(
            world.decide(&mut containment),
            WorkerStep::Batch {
                active: leased(&[0]),
                from: 20,
                up_to: 100
            }
        );
    }

    #[test]
    fn when_only_held_partitions_remain_the_worker_waits_for_the_retry() {
        // Partition 0 went to another worker: its step is dropped, not run here.
        let world = World::new(&[1], 100);
        let mut containment = Containment::new(3);
        failed_on_partition_1(&mut containment, world.now);
        let (committed, next) = commit_narrowing_steps(&world, &mut containment);
        assert_eq!(committed, vec![leased(&[1])]);
        assert!(
            matches!(
                next,
                WorkerStep::WaitForRetry {
                    next_retry: Some(_)
                }
            ),
            "expected a wait for the retry, got {next:?}"
        );
    }

    #[test]
    fn a_batch_reads_no_further_than_the_safe_head_even_when_more_is_visible() {
        let mut world = World::new(&[0], 100);
        world.head.raw = 150;
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::Batch {
                active: leased(&[0]),
                from: 0,
                up_to: 100
            }
        );
    }

    #[test]
    fn below_the_unproven_prefix_the_worker_waits_instead_of_reading() {
        let mut world = World::new(&[0], 100);
        world.head.unproven_below = 50;
        world.checkpoints.loaded(p(0), Epoch(1), 10);
        assert_eq!(
            world.decide(&mut Containment::new(3)),
            WorkerStep::CaughtUp {
                from: 10,
                next_retry: None
            }
        );
    }

    #[test]
    fn a_paused_projection_runs_no_narrowing_step_either() {
        let mut world = World::new(&[0, 1], 100);
        let mut containment = Containment::new(3);
        failed_on_partition_1(&mut containment, world.now);
        world.paused = true;
        assert_eq!(
            world.decide(&mut containment),
            WorkerStep::WaitForOperator { paused: true }
        );
    }

    #[test]
    fn an_empty_lease_idles_even_when_paused() {
        let mut world = World::new(&[], 100);
        world.paused = true;
        assert_eq!(world.decide(&mut Containment::new(3)), WorkerStep::Idle);
    }

    #[test]
    fn a_held_partition_that_was_revoked_is_released_from_the_containment() {
        // Partition 1 failed, then moved to another worker: nothing of it stays held here.
        let world = World::new(&[0], 100);
        let mut containment = Containment::new(3);
        failed_on_partition_1(&mut containment, world.now);
        let (committed, next) = commit_narrowing_steps(&world, &mut containment);
        assert_eq!(committed, vec![leased(&[0])]);
        assert!(
            containment.is_idle(),
            "partition 1 is still held although it is not leased"
        );
        assert!(matches!(next, WorkerStep::Batch { .. }), "got {next:?}");
    }
}
