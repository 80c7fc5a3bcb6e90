//! Faults and isolation: lost connections and database restarts, poison events under the stop
//! and dead-letter policies, plugins that reach outside their read model, and limits.

mod dead_letter;
mod isolation;
mod limits;
mod stop_policy;
mod transient;

use projection_host::ids::PartitionId;

/// Aggregate ids of the `Faults` context that fall into different partitions (of 32).
pub fn ids_in_distinct_partitions(n: usize) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    (0..)
        .map(|i| format!("agg-{i}"))
        .filter(|id| seen.insert(PartitionId::of(id, 32)))
        .take(n)
        .collect()
}
