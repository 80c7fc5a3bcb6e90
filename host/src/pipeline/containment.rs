//! Keeps one failing event from stalling the partitions around it.
//!
//! When a batch fails, the partitions that can commit should commit at once, and the failing
//! event should be found without waiting. Narrowing is deterministic (the same events fail the
//! same way), so its steps run back to back, with no backoff between them:
//!
//! - a failure that names its event splits the batch into the other partitions (healthy), the
//!   failing partition's events before it, and the event itself;
//! - a failure without a position (a panic, or an error from a plugin that does not say which
//!   event) re-runs the batch partition by partition, then halves the failing partition's events.
//!
//! Only the retries of one known failing event wait (backoff, for a cause that may pass), and
//! while they wait its partition is held aside: every other partition goes on with new batches.
//! After `max_retries` retries the projection's failure policy applies.
//!
//! This module only decides; the worker runs the steps and commits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::base::retry::backoff;
use crate::ids::PartitionId;

/// An event the plugin was handed: its position and partition.
pub type Handed = (i64, PartitionId);

/// A part of a failed batch to run again: these partitions' events up to `up_to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub partitions: Vec<PartitionId>,
    pub up_to: i64,
}

/// A batch (or a step) that the plugin failed.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The partitions the batch covered.
    pub partitions: &'a [PartitionId],
    /// The position the batch covered up to.
    pub up_to: i64,
    /// The events handed to the plugin, in position order.
    pub handed: &'a [Handed],
    /// The failing event's position, when the plugin named one.
    pub position: Option<i64>,
}

/// What happens after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The batch was split: run the next steps at once.
    Narrowed,
    /// The failing event is known; its partition waits `delay` and tries it again.
    Retry {
        event: Handed,
        attempt: u32,
        delay: Duration,
    },
    /// The event failed `max_retries + 1` times: the failure policy applies.
    GiveUp { event: Handed, attempts: u32 },
    /// Nothing to narrow (no event was handed): retry the whole batch after a backoff.
    Unlocated,
}

/// Where new steps go in the queue.
#[derive(Debug, Clone, Copy)]
enum Priority {
    /// Partitions not shown to fail: as soon as possible.
    Healthy,
    /// The failing partition's narrower steps: after the healthy ones.
    Narrowing,
}

/// A partition held aside while its failing event waits for a retry.
#[derive(Debug, Clone)]
struct Held {
    position: i64,
    attempts: u32,
    retry_at: Instant,
}

/// First and longest wait between retries of one failing event.
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Containment {
    max_retries: u32,
    steps: VecDeque<Step>,
    held: BTreeMap<PartitionId, Held>,
}

impl Containment {
    pub fn new(max_retries: u32) -> Containment {
        Containment {
            max_retries,
            ..Containment::default()
        }
    }

    /// Nothing is being narrowed or retried.
    pub fn is_idle(&self) -> bool {
        self.steps.is_empty() && self.held.is_empty()
    }

    /// Forgets everything (another plugin build took over, which may not fail at all).
    pub fn clear(&mut self) {
        self.steps.clear();
        self.held.clear();
    }

    /// Partitions that ordinary batches leave out: their failing event waits for a retry.
    pub fn held(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.held.keys().copied()
    }

    /// When the next held event is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.held.values().map(|h| h.retry_at).min()
    }

    /// The next step to run now: a narrowing step, else a held event that is due.
    pub fn next_step(&mut self, now: Instant) -> Option<Step> {
        if let Some(step) = self.steps.pop_front() {
            return Some(step);
        }
        self.held
            .iter()
            .filter(|(_, h)| h.retry_at <= now)
            .min_by_key(|(_, h)| h.retry_at)
            .map(|(p, h)| Step {
                partitions: vec![*p],
                up_to: h.position,
            })
    }

    /// A step committed: a held event that now passed releases its partition.
    pub fn succeeded(&mut self, step: &Step) {
        if let [partition] = step.partitions[..] {
            if self
                .held
                .get(&partition)
                .is_some_and(|h| h.position <= step.up_to)
            {
                self.held.remove(&partition);
            }
        }
    }

    /// The partition stops being held: its event was dealt with by the failure policy (halted),
    /// or the partition is no longer this worker's.
    pub fn release(&mut self, partition: PartitionId) {
        self.held.remove(&partition);
        for step in &mut self.steps {
            step.partitions.retain(|p| *p != partition);
        }
        self.steps.retain(|s| !s.partitions.is_empty());
    }

    /// A step that could not run for a reason other than the plugin (the database, fencing)
    /// runs again first.
    pub fn requeue(&mut self, step: Step) {
        self.steps.push_front(step);
    }

    /// The held event is to be tried (or parked) without waiting any longer.
    pub fn retry_now(&mut self, partition: PartitionId, now: Instant) {
        if let Some(held) = self.held.get_mut(&partition) {
            held.retry_at = now;
        }
    }

    /// Decides what follows a failed batch or step.
    pub fn failed(&mut self, failure: Failure<'_>, now: Instant) -> Verdict {
        let handed = failure.handed;
        if handed.is_empty() {
            return Verdict::Unlocated;
        }
        // A position outside the batch is not believed (the plugin may be wrong or hostile);
        // the failure is then narrowed as if it named none.
        let named = failure
            .position
            .and_then(|q| handed.iter().find(|(position, _)| *position == q).copied());
        let with_events: BTreeSet<PartitionId> = handed.iter().map(|(_, p)| *p).collect();
        // Partitions without events in the batch cannot have caused it: they commit first.
        let idle: Vec<PartitionId> = failure
            .partitions
            .iter()
            .filter(|p| !with_events.contains(p))
            .copied()
            .collect();
        let mut next = Vec::new();
        if !idle.is_empty() {
            next.push(Step {
                partitions: idle,
                up_to: failure.up_to,
            });
        }
        match named {
            _ if handed.len() == 1 => {
                self.queue(next, Priority::Healthy);
                self.attempt(handed[0], now)
            }
            Some((q, partition)) => {
                // The named event is only a hint (a buffered write may be blamed on a later
                // event, and a plugin may lie): it is tried alone before it counts as failing.
                next.extend(
                    with_events
                        .iter()
                        .filter(|p| **p != partition)
                        .map(|p| Step {
                            partitions: vec![*p],
                            up_to: failure.up_to,
                        })
                        .take(1),
                );
                let others: Vec<PartitionId> = with_events
                    .iter()
                    .filter(|p| **p != partition)
                    .copied()
                    .collect();
                next.truncate(next.len() - usize::from(!others.is_empty()));
                if !others.is_empty() {
                    next.push(Step {
                        partitions: others,
                        up_to: failure.up_to,
                    });
                }
                self.queue(next, Priority::Healthy);
                let mut narrower = Vec::new();
                if handed.iter().any(|(pos, p)| *p == partition && *pos < q) {
                    narrower.push(Step {
                        partitions: vec![partition],
                        up_to: q - 1,
                    });
                }
                narrower.push(Step {
                    partitions: vec![partition],
                    up_to: q,
                });
                self.queue(narrower, Priority::Narrowing);
                Verdict::Narrowed
            }
            None if with_events.len() > 1 => {
                next.extend(with_events.iter().map(|p| Step {
                    partitions: vec![*p],
                    up_to: failure.up_to,
                }));
                self.queue(next, Priority::Healthy);
                Verdict::Narrowed
            }
            None => {
                // One partition: halve its events; the first half commits if it can.
                let partition = handed[0].1;
                let middle = handed[handed.len() / 2 - 1].0;
                self.queue(next, Priority::Healthy);
                self.queue(
                    vec![
                        Step {
                            partitions: vec![partition],
                            up_to: middle,
                        },
                        Step {
                            partitions: vec![partition],
                            up_to: failure.up_to,
                        },
                    ],
                    Priority::Narrowing,
                );
                Verdict::Narrowed
            }
        }
    }

    /// One more failure of a known event: hold its partition until the retry, or give up. The
    /// partition first commits up to the event (whatever of it is not applied yet, possibly
    /// nothing but the checkpoint).
    fn attempt(&mut self, event: Handed, now: Instant) -> Verdict {
        let (position, partition) = event;
        // The partition's later events wait until this one passes: its queued steps (the rest
        // of a halving) would only fail on it again.
        for step in &mut self.steps {
            step.partitions.retain(|p| *p != partition);
        }
        self.steps.retain(|s| !s.partitions.is_empty());
        self.queue(
            vec![Step {
                partitions: vec![partition],
                up_to: position - 1,
            }],
            Priority::Narrowing,
        );
        let attempts = match self.held.get(&partition) {
            Some(held) if held.position == position => held.attempts + 1,
            _ => 1,
        };
        let delay = backoff(attempts, RETRY_BASE, RETRY_MAX);
        self.held.insert(
            partition,
            Held {
                position,
                attempts,
                retry_at: now + delay,
            },
        );
        if attempts > self.max_retries {
            Verdict::GiveUp { event, attempts }
        } else {
            Verdict::Retry {
                event,
                attempt: attempts,
                delay,
            }
        }
    }

    /// Queues steps (kept in their order). Steps of one partition run in position order, so a
    /// step goes before the first queued step that shares a partition with it. Otherwise
    /// partitions not shown to fail run first, so that they commit at once, and the narrowing
    /// of a failing partition waits behind them.
    fn queue(&mut self, steps: Vec<Step>, priority: Priority) {
        let shared = self.steps.iter().position(|queued| {
            steps
                .iter()
                .any(|s| s.partitions.iter().any(|p| queued.partitions.contains(p)))
        });
        let at = match (shared, priority) {
            (Some(i), _) => i,
            (None, Priority::Healthy) => 0,
            (None, Priority::Narrowing) => self.steps.len(),
        };
        for (i, step) in steps.into_iter().enumerate() {
            self.steps.insert(at + i, step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u32) -> PartitionId {
        PartitionId(n)
    }

    /// Runs containment against a plugin that fails on `poison` (naming it or not), as the worker
    /// would: every step's events are handed, a failure is reported, successes commit. Returns
    /// the steps that committed and the verdicts seen.
    fn run(
        events: &[Handed],
        partitions: &[PartitionId],
        poison: i64,
        names_position: bool,
        max_retries: u32,
    ) -> (Vec<Step>, Vec<Verdict>) {
        let mut c = Containment::new(max_retries);
        let up_to = events.last().unwrap().0;
        let position = names_position.then_some(poison);
        let mut verdicts = vec![c.failed(
            Failure {
                partitions,
                up_to,
                handed: events,
                position,
            },
            Instant::now(),
        )];
        let mut committed: Vec<Step> = Vec::new();
        let mut applied: BTreeMap<PartitionId, i64> = BTreeMap::new();
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..1000 {
            let Some(step) = c.next_step(far) else { break };
            let handed: Vec<Handed> = events
                .iter()
                .filter(|(pos, part)| {
                    step.partitions.contains(part)
                        && *pos <= step.up_to
                        && applied.get(part).is_none_or(|a| pos > a)
                })
                .copied()
                .collect();
            if handed.iter().any(|(pos, _)| *pos == poison) {
                let v = c.failed(
                    Failure {
                        partitions: &step.partitions,
                        up_to: step.up_to,
                        handed: &handed,
                        position,
                    },
                    Instant::now(),
                );
                let gave_up = matches!(v, Verdict::GiveUp { .. });
                verdicts.push(v);
                if gave_up {
                    c.release(step.partitions[0]);
                }
            } else {
                for part in &step.partitions {
                    applied.insert(*part, step.up_to);
                }
                c.succeeded(&step);
                committed.push(step);
            }
        }
        assert!(c.is_idle(), "containment must end");
        (committed, verdicts)
    }

    /// Events 1..=n spread round-robin over `k` partitions.
    fn events(n: i64, k: u32) -> Vec<Handed> {
        (1..=n).map(|i| (i, p((i as u32) % k))).collect()
    }

    #[test]
    fn a_failure_without_a_position_commits_every_other_partition_before_any_retry() {
        let evs = events(64, 4);
        let parts = [p(0), p(1), p(2), p(3)];
        let poison = 30; // partition 2
        let (committed, verdicts) = run(&evs, &parts, poison, false, 2);
        // The first three steps after the failure are the healthy partitions, whole.
        let healthy: Vec<&Step> = committed.iter().take(3).collect();
        for (step, part) in healthy.iter().zip([p(0), p(1), p(3)]) {
            assert_eq!(step.partitions, vec![part]);
            assert_eq!(step.up_to, 64);
        }
        // Narrowing did not wait: every verdict before the event was found is Narrowed.
        let first_retry = verdicts
            .iter()
            .position(|v| !matches!(v, Verdict::Narrowed))
            .unwrap();
        assert!(matches!(
            verdicts[first_retry],
            Verdict::Retry {
                event: (30, _),
                attempt: 1,
                ..
            }
        ));
        assert!(matches!(
            verdicts.last().unwrap(),
            Verdict::GiveUp {
                event: (30, _),
                attempts: 3
            }
        ));
    }

    #[test]
    fn the_failing_partition_commits_its_events_before_the_poison() {
        let evs = events(64, 4);
        let (committed, _) = run(&evs, &[p(0), p(1), p(2), p(3)], 30, false, 0);
        let reached = committed
            .iter()
            .filter(|s| s.partitions == [p(2)])
            .map(|s| s.up_to)
            .max()
            .unwrap();
        assert!(reached < 30, "nothing at or after the poison commits");
        assert!(
            reached >= 26,
            "the events before the poison commit (reached {reached})"
        );
    }

    #[test]
    fn a_named_position_skips_the_search_but_is_tried_alone() {
        let evs = events(64, 4);
        let (committed, verdicts) = run(&evs, &[p(0), p(1), p(2), p(3)], 30, true, 1);
        assert_eq!(
            committed[0],
            Step {
                partitions: vec![p(0), p(1), p(3)],
                up_to: 64
            }
        );
        assert_eq!(
            committed[1],
            Step {
                partitions: vec![p(2)],
                up_to: 29
            }
        );
        // The named event is tried alone before it counts as failing.
        assert_eq!(verdicts[0], Verdict::Narrowed);
        assert!(matches!(
            verdicts[1],
            Verdict::Retry {
                event: (30, _),
                attempt: 1,
                ..
            }
        ));
        assert!(matches!(
            verdicts[2],
            Verdict::GiveUp {
                event: (30, _),
                attempts: 2
            }
        ));
        assert_eq!(verdicts.len(), 3, "{verdicts:?}");
    }

    #[test]
    fn an_event_blamed_for_another_partitions_failure_is_not_given_up_on() {
        // The plugin names event 8 (partition 0) while event 3 (partition 1) is the culprit.
        let evs = events(8, 2);
        let mut c = Containment::new(0);
        let now = Instant::now();
        let v = c.failed(
            Failure {
                partitions: &[p(0), p(1)],
                up_to: 8,
                handed: &evs,
                position: Some(8),
            },
            now,
        );
        assert_eq!(
            v,
            Verdict::Narrowed,
            "max_retries=0 must not give up on a hint"
        );
        let first = c.next_step(now).unwrap();
        assert_eq!(first.partitions, vec![p(1)], "the other partition first");
    }

    #[test]
    fn partitions_without_events_commit_first_in_one_step() {
        let evs: Vec<Handed> = vec![(5, p(1)), (6, p(2)), (7, p(1))];
        let (committed, _) = run(&evs, &[p(0), p(1), p(2), p(3)], 6, false, 0);
        assert_eq!(
            committed[0],
            Step {
                partitions: vec![p(0), p(3)],
                up_to: 7
            }
        );
    }

    #[test]
    fn a_position_outside_the_batch_is_not_believed() {
        let mut c = Containment::new(3);
        let evs = events(8, 2);
        let v = c.failed(
            Failure {
                partitions: &[p(0), p(1)],
                up_to: 8,
                handed: &evs,
                position: Some(1_000),
            },
            Instant::now(),
        );
        assert_eq!(v, Verdict::Narrowed);
        assert!(c.held().next().is_none());
    }

    #[test]
    fn a_held_partition_waits_for_its_retry_and_is_released_when_the_event_passes() {
        let mut c = Containment::new(3);
        let now = Instant::now();
        let v = c.failed(
            Failure {
                partitions: &[p(4)],
                up_to: 9,
                handed: &[(9, p(4))],
                position: None,
            },
            now,
        );
        let Verdict::Retry { delay, .. } = v else {
            panic!("{v:?}")
        };
        assert_eq!(c.held().collect::<Vec<_>>(), vec![p(4)]);
        let before = c.next_step(now).unwrap();
        assert_eq!(
            before,
            Step {
                partitions: vec![p(4)],
                up_to: 8
            },
            "the partition first commits up to the event"
        );
        c.succeeded(&before);
        assert_eq!(c.held().collect::<Vec<_>>(), vec![p(4)], "still held");
        assert_eq!(c.next_step(now), None, "not due yet");
        assert_eq!(c.next_retry(), Some(now + delay));
        let step = c.next_step(now + delay).unwrap();
        assert_eq!(
            step,
            Step {
                partitions: vec![p(4)],
                up_to: 9
            }
        );
        c.succeeded(&step);
        assert!(c.is_idle());
    }

    #[test]
    fn once_the_failing_event_is_known_nothing_of_its_partition_runs_before_its_retry() {
        let mut c = Containment::new(5);
        let now = Instant::now();
        let evs: Vec<Handed> = vec![(1, p(0)), (2, p(0)), (3, p(0)), (4, p(0))];
        // Unnamed failure of four events: halves [..=2], [..=4].
        assert_eq!(
            c.failed(
                Failure {
                    partitions: &[p(0)],
                    up_to: 4,
                    handed: &evs,
                    position: None
                },
                now
            ),
            Verdict::Narrowed
        );
        let first_half = c.next_step(now).unwrap();
        assert_eq!(first_half.up_to, 2);
        // The first half holds the poison (event 1); its halving finds it alone.
        c.failed(
            Failure {
                partitions: &[p(0)],
                up_to: 2,
                handed: &evs[..2],
                position: None,
            },
            now,
        );
        let alone = c.next_step(now).unwrap();
        assert_eq!(alone.up_to, 1);
        let v = c.failed(
            Failure {
                partitions: &[p(0)],
                up_to: 1,
                handed: &evs[..1],
                position: None,
            },
            now,
        );
        assert!(matches!(v, Verdict::Retry { attempt: 1, .. }), "{v:?}");
        let before = c.next_step(now).unwrap();
        assert_eq!(before.up_to, 0, "only up to the event");
        c.succeeded(&before);
        assert_eq!(
            c.next_step(now),
            None,
            "the retry waits; no later step of p0 runs"
        );
    }

    #[test]
    fn a_failure_with_no_event_handed_is_not_narrowed() {
        let mut c = Containment::new(3);
        let v = c.failed(
            Failure {
                partitions: &[p(0)],
                up_to: 0,
                handed: &[],
                position: None,
            },
            Instant::now(),
        );
        assert_eq!(v, Verdict::Unlocated);
        assert!(c.is_idle());
    }

    #[test]
    fn narrowing_a_large_batch_takes_logarithmic_steps_per_partition() {
        let evs = events(10_000, 32);
        let parts: Vec<PartitionId> = (0..32).map(p).collect();
        let (committed, verdicts) = run(&evs, &parts, 5_000, false, 0);
        let failures = verdicts.len();
        // 1 for the batch, 1 for its partition alone, about log2(312) halvings, 1 give-up.
        assert!(failures <= 14, "{failures} failures");
        assert!(committed.len() <= 32 + 12, "{} steps", committed.len());
    }
}
