//! What a worker publishes about its partitions: each one's state and lag (halted, paused and
//! held partitions count in full: their lag keeps growing with the head), the projection's lag
//! and lowest checkpoint, and whether `--once` reached its target.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::checkpoints::Checkpoints;
use super::ProjectionWorker;
use crate::ids::{Epoch, PartitionId};
use crate::metrics::PartitionReport;

/// Longest interval between two publications of the per-partition series.
const PARTITION_REPORT_EVERY: Duration = Duration::from_millis(250);

/// A partition's published state: partition, state, halted position.
type PublishedState = (u32, &'static str, Option<i64>);

/// What the partition reports are computed from.
pub(super) struct PartitionsSeen<'a> {
    pub halted: &'a HashMap<PartitionId, i64>,
    /// Held aside while their failing event waits for a retry.
    pub retrying: &'a HashSet<PartitionId>,
    pub paused: bool,
    pub checkpoints: &'a Checkpoints,
}

/// Each leased partition's state and lag against `raw_head`, and their summed lag.
pub(super) fn partition_reports(
    leased: &[(PartitionId, Epoch)],
    seen: &PartitionsSeen<'_>,
    raw_head: i64,
) -> (Vec<PartitionReport>, i64) {
    let mut gap = 0i64;
    let mut reports = Vec::with_capacity(leased.len());
    for (p, _) in leased {
        let halted_at = seen.halted.get(p).copied();
        let lag = match halted_at {
            // Nothing from the halted event on is applied.
            Some(at) => raw_head - at + 1,
            None => raw_head - seen.checkpoints.get(*p),
        }
        .max(0);
        gap += lag;
        let state = if halted_at.is_some() {
            "halted"
        } else if seen.paused {
            "paused"
        } else if seen.retrying.contains(p) {
            "retrying"
        } else {
            "running"
        };
        reports.push(PartitionReport {
            partition: p.0,
            state,
            lag,
            halted_at,
        });
    }
    (reports, gap)
}

/// Per-partition series cost a few label lookups each: with small batches they are published
/// when a state changes, else at most every [`PARTITION_REPORT_EVERY`].
#[derive(Default)]
pub(super) struct ReportThrottle {
    last: Option<(Vec<PublishedState>, Instant)>,
}

impl ReportThrottle {
    /// Whether `reports` are to be published now; if so, they count as published.
    pub fn due(&mut self, reports: &[PartitionReport], force: bool, now: Instant) -> bool {
        let states: Vec<PublishedState> = reports
            .iter()
            .map(|r| (r.partition, r.state, r.halted_at))
            .collect();
        let due = force
            || self.last.as_ref().is_none_or(|(last, at)| {
                *last != states || now.duration_since(*at) >= PARTITION_REPORT_EVERY
            });
        if due {
            self.last = Some((states, now));
        }
        due
    }
}

impl ProjectionWorker {
    /// Publishes each held partition's state and lag, the projection's lag and lowest
    /// checkpoint, and whether `--once` reached its target.
    pub(super) fn report_position(
        &mut self,
        leased: &[(PartitionId, Epoch)],
        raw_head: i64,
        force: bool,
    ) {
        let paused = self.controls.borrow().paused.contains(self.name());
        let retrying: HashSet<PartitionId> = self.failures.containment.held().collect();
        let (reports, gap) = partition_reports(
            leased,
            &PartitionsSeen {
                halted: &self.failures.halted,
                retrying: &retrying,
                paused,
                checkpoints: &self.checkpoints,
            },
            raw_head,
        );
        if self.published.due(&reports, force, Instant::now()) {
            for report in &reports {
                self.metrics.set_partition(self.name(), report);
            }
            let kept: BTreeSet<u32> = leased.iter().map(|(p, _)| p.0).collect();
            self.metrics.retain_partitions(Some(self.name()), &kept);
        }
        let lowest = leased.iter().map(|(p, _)| self.checkpoints.get(*p)).min();
        let lag = gap as f64 / f64::from(self.config.partitions.max(1));
        self.metrics.set_lag(self.name(), lag, lowest);
        let lowest = lowest.unwrap_or(0);
        let caught_up = self.config.once_target.is_some_and(|target| {
            leased.len() as u32 == self.config.partitions
                && self.failures.halted.is_empty()
                && self.failures.containment.is_idle()
                && lowest >= target
        });
        self.board.update(self.name(), |s| {
            s.lowest_checkpoint = lowest;
            s.lag_events = lag;
            s.behind = gap;
            s.caught_up |= caught_up;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u32) -> PartitionId {
        PartitionId(n)
    }

    fn leased(partitions: &[u32]) -> Vec<(PartitionId, Epoch)> {
        partitions.iter().map(|n| (p(*n), Epoch(1))).collect()
    }

    #[test]
    fn a_halted_partition_lags_by_everything_from_its_halted_event_on() {
        let mut halted = HashMap::new();
        halted.insert(p(0), 41);
        let mut checkpoints = Checkpoints::default();
        checkpoints.loaded(p(0), Epoch(1), 40);
        checkpoints.loaded(p(1), Epoch(1), 90);
        let (reports, gap) = partition_reports(
            &leased(&[0, 1]),
            &PartitionsSeen {
                halted: &halted,
                retrying: &HashSet::new(),
                paused: false,
                checkpoints: &checkpoints,
            },
            100,
        );
        assert_eq!(reports[0].state, "halted");
        assert_eq!(reports[0].lag, 60);
        assert_eq!(reports[0].halted_at, Some(41));
        assert_eq!(reports[1].state, "running");
        assert_eq!(reports[1].lag, 10);
        assert_eq!(gap, 70);
    }

    #[test]
    fn halted_wins_over_paused_and_paused_over_retrying() {
        let mut halted = HashMap::new();
        halted.insert(p(0), 1);
        let retrying: HashSet<PartitionId> = [p(0), p(1)].into_iter().collect();
        let checkpoints = Checkpoints::default();
        let seen = |paused| PartitionsSeen {
            halted: &halted,
            retrying: &retrying,
            paused,
            checkpoints: &checkpoints,
        };
        let (reports, _) = partition_reports(&leased(&[0, 1, 2]), &seen(true), 10);
        let states: Vec<&str> = reports.iter().map(|r| r.state).collect();
        assert_eq!(states, ["halted", "paused", "paused"]);
        let (reports, _) = partition_reports(&leased(&[0, 1, 2]), &seen(false), 10);
        let states: Vec<&str> = reports.iter().map(|r| r.state).collect();
        assert_eq!(states, ["halted", "retrying", "running"]);
    }

    #[test]
    fn a_checkpoint_ahead_of_this_hosts_head_view_counts_as_no_lag() {
        let mut checkpoints = Checkpoints::default();
        checkpoints.loaded(p(0), Epoch(1), 120);
        let (reports, gap) = partition_reports(
            &leased(&[0]),
            &PartitionsSeen {
                halted: &HashMap::new(),
                retrying: &HashSet::new(),
                paused: false,
                checkpoints: &checkpoints,
            },
            100,
        );
        assert_eq!(reports[0].lag, 0);
        assert_eq!(gap, 0);
    }

    fn report(state: &'static str) -> PartitionReport {
        PartitionReport {
            partition: 0,
            state,
            lag: 5,
            halted_at: None,
        }
    }

    #[test]
    fn unchanged_states_are_published_again_only_after_the_interval() {
        let mut throttle = ReportThrottle::default();
        let start = Instant::now();
        assert!(throttle.due(&[report("running")], false, start));
        assert!(!throttle.due(&[report("running")], false, start));
        assert!(throttle.due(&[report("running")], false, start + PARTITION_REPORT_EVERY));
    }

    #[test]
    fn a_changed_state_or_a_forced_report_is_published_at_once() {
        let mut throttle = ReportThrottle::default();
        let start = Instant::now();
        assert!(throttle.due(&[report("running")], false, start));
        assert!(throttle.due(&[report("retrying")], false, start));
        assert!(throttle.due(&[report("retrying")], true, start));
    }
}
