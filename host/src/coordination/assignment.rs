//! The leader's plan: a balanced and sticky assignment of partitions to live workers. Pure, so
//! that its properties are unit-tested without a database.
//!
//! Balanced: every worker gets ⌊P/W⌋ or ⌈P/W⌉ partitions. Sticky: a partition keeps its worker
//! unless that worker is gone or holds more than its share, so only the partitions that must
//! move, move.

use std::collections::HashMap;

use crate::ids::WorkerId;

/// `current[p]` is the worker partition `p` is assigned to now; `workers` are the live ones.
pub fn plan(workers: &[WorkerId], current: &[Option<WorkerId>]) -> Vec<Option<WorkerId>> {
    let partitions = current.len();
    let mut live: Vec<&WorkerId> = workers.iter().collect();
    live.sort();
    live.dedup();
    if live.is_empty() {
        return vec![None; partitions];
    }
    let base = partitions / live.len();
    let extra = partitions % live.len();

    let mut holding: HashMap<&WorkerId, usize> = live.iter().map(|w| (*w, 0)).collect();
    for w in current.iter().flatten() {
        if let Some(n) = holding.get_mut(w) {
            *n += 1;
        }
    }
    // The workers that already hold the most get the ⌈P/W⌉ shares: fewer moves.
    let mut by_holding = live.clone();
    by_holding.sort_by(|a, b| holding[b].cmp(&holding[a]).then(a.cmp(b)));
    let quota: HashMap<&WorkerId, usize> = by_holding
        .iter()
        .enumerate()
        .map(|(i, w)| (*w, base + usize::from(i < extra)))
        .collect();

    let mut kept: HashMap<&WorkerId, usize> = live.iter().map(|w| (*w, 0)).collect();
    let mut next: Vec<Option<WorkerId>> = vec![None; partitions];
    for (p, owner) in current.iter().enumerate() {
        if let Some(w) = owner.as_ref() {
            if let (Some(k), Some(q)) = (kept.get_mut(w), quota.get(w)) {
                if *k < *q {
                    *k += 1;
                    next[p] = Some(w.clone());
                }
            }
        }
    }
    // Hand the rest out in worker order, filling each worker up to its quota.
    let mut open: Vec<(&WorkerId, usize)> = live
        .iter()
        .map(|w| (*w, quota[w] - kept[w]))
        .filter(|(_, room)| *room > 0)
        .collect();
    open.reverse();
    for slot in next.iter_mut().filter(|s| s.is_none()) {
        let Some((w, room)) = open.last_mut() else {
            break;
        };
        *slot = Some((*w).clone());
        *room -= 1;
        if *room == 0 {
            open.pop();
        }
    }
    next
}

/// How many partitions change worker between two plans.
pub fn moved(before: &[Option<WorkerId>], after: &[Option<WorkerId>]) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(names: &[&str]) -> Vec<WorkerId> {
        names.iter().map(|n| WorkerId(n.to_string())).collect()
    }

    fn counts(plan: &[Option<WorkerId>]) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for w in plan.iter().flatten() {
            *c.entry(w.0.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn a_first_plan_is_balanced_and_complete() {
        let plan = plan(&w(&["a", "b", "c"]), &vec![None; 32]);
        assert!(plan.iter().all(Option::is_some));
        let c = counts(&plan);
        assert_eq!(c.values().sum::<usize>(), 32);
        assert!(c.values().all(|n| *n == 10 || *n == 11), "{c:?}");
    }

    #[test]
    fn a_joining_worker_takes_only_its_share() {
        let before = plan(&w(&["a", "b"]), &vec![None; 32]);
        let after = plan(&w(&["a", "b", "c"]), &before);
        assert_eq!(counts(&after)["c"], 10);
        assert_eq!(
            moved(&before, &after),
            10,
            "only the new worker's share moves"
        );
        for (b, a) in before.iter().zip(&after) {
            assert!(
                a == b || a.as_ref().unwrap().0 == "c",
                "partitions move only to the newcomer"
            );
        }
    }

    #[test]
    fn a_leaving_worker_s_partitions_are_spread_and_nothing_else_moves() {
        let before = plan(&w(&["a", "b", "c"]), &vec![None; 32]);
        let after = plan(&w(&["a", "c"]), &before);
        let c = counts(&after);
        assert_eq!(c["a"] + c["c"], 32);
        assert!(c.values().all(|n| *n == 16), "{c:?}");
        for (b, a) in before.iter().zip(&after) {
            if b.as_ref().unwrap().0 != "b" {
                assert_eq!(a, b, "partitions of remaining workers stay put");
            }
        }
    }

    #[test]
    fn an_unchanged_membership_is_a_fixed_point() {
        let first = plan(&w(&["x", "y", "z"]), &vec![None; 7]);
        assert_eq!(plan(&w(&["z", "y", "x"]), &first), first);
    }

    #[test]
    fn no_workers_means_no_assignment_and_more_workers_than_partitions_is_fine() {
        assert!(plan(&[], &vec![Some(WorkerId("a".into())); 4])
            .iter()
            .all(Option::is_none));
        let plan = plan(&w(&["a", "b", "c", "d", "e"]), &vec![None; 3]);
        assert_eq!(plan.iter().flatten().count(), 3);
        assert_eq!(counts(&plan).values().max(), Some(&1));
    }
}
