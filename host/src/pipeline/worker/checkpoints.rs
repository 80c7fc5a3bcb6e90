//! The checkpoints of the partitions a worker holds, as it last read or committed them, keyed
//! by the epoch of the claim they were read under: a new claim means another worker may have
//! advanced the partition meanwhile, so its checkpoint is read again.

use std::collections::HashMap;

use crate::ids::{Epoch, PartitionId};

#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    by_partition: HashMap<PartitionId, (Epoch, i64)>,
}

impl Checkpoints {
    /// The partition's checkpoint (0: nothing applied yet, or not known).
    pub fn get(&self, partition: PartitionId) -> i64 {
        self.by_partition.get(&partition).map_or(0, |(_, c)| *c)
    }

    /// The epoch of the claim the partition's checkpoint was read under (`None`: not held).
    pub fn epoch(&self, partition: PartitionId) -> Option<Epoch> {
        self.by_partition.get(&partition).map(|(e, _)| *e)
    }

    /// The lowest checkpoint among `partitions`: a batch over them starts after it.
    pub fn lowest(&self, partitions: &[(PartitionId, Epoch)]) -> i64 {
        partitions
            .iter()
            .map(|(p, _)| self.get(*p))
            .min()
            .unwrap_or(0)
    }

    /// Partitions whose checkpoint must be read (again): not known, or known from another
    /// claim.
    pub fn stale(&self, leased: &[(PartitionId, Epoch)]) -> Vec<PartitionId> {
        leased
            .iter()
            .filter(|(p, e)| self.by_partition.get(p).is_none_or(|(epoch, _)| epoch != e))
            .map(|(p, _)| *p)
            .collect()
    }

    /// A checkpoint read from the database under the claim `epoch`.
    pub fn loaded(&mut self, partition: PartitionId, epoch: Epoch, position: i64) {
        self.by_partition.insert(partition, (epoch, position));
    }

    /// After a commit that covered `scope` up to `to`. A checkpoint never moves back.
    pub fn advance(&mut self, scope: &[(PartitionId, Epoch)], to: i64) {
        for (p, e) in scope {
            let entry = self.by_partition.entry(*p).or_insert((*e, 0));
            entry.1 = entry.1.max(to);
        }
    }

    /// Forgets `scope`'s checkpoints, so that they are read again before the next batch.
    pub fn forget(&mut self, scope: &[(PartitionId, Epoch)]) {
        for (p, _) in scope {
            self.by_partition.remove(p);
        }
    }

    /// Every partition with a known checkpoint.
    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.by_partition.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u32) -> PartitionId {
        PartitionId(n)
    }

    #[test]
    fn an_unknown_partition_starts_at_position_zero() {
        let checkpoints = Checkpoints::default();
        assert_eq!(checkpoints.get(p(3)), 0);
        assert_eq!(checkpoints.lowest(&[(p(3), Epoch(1))]), 0);
    }

    #[test]
    fn a_batch_starts_after_the_lowest_checkpoint_of_its_partitions() {
        let mut checkpoints = Checkpoints::default();
        checkpoints.loaded(p(0), Epoch(1), 50);
        checkpoints.loaded(p(1), Epoch(1), 20);
        checkpoints.loaded(p(2), Epoch(1), 90);
        assert_eq!(
            checkpoints.lowest(&[(p(0), Epoch(1)), (p(2), Epoch(1))]),
            50
        );
        assert_eq!(
            checkpoints.lowest(&[(p(0), Epoch(1)), (p(1), Epoch(1))]),
            20
        );
    }

    #[test]
    fn a_checkpoint_read_under_another_claim_is_stale() {
        let mut checkpoints = Checkpoints::default();
        checkpoints.loaded(p(0), Epoch(1), 50);
        checkpoints.loaded(p(1), Epoch(1), 20);
        let leased = [(p(0), Epoch(1)), (p(1), Epoch(2)), (p(2), Epoch(1))];
        assert_eq!(checkpoints.stale(&leased), vec![p(1), p(2)]);
    }

    #[test]
    fn a_commit_advances_its_partitions_and_never_moves_one_back() {
        let mut checkpoints = Checkpoints::default();
        checkpoints.loaded(p(0), Epoch(1), 80);
        checkpoints.advance(&[(p(0), Epoch(1)), (p(1), Epoch(1))], 60);
        assert_eq!(checkpoints.get(p(0)), 80);
        assert_eq!(checkpoints.get(p(1)), 60);
    }

    #[test]
    fn a_forgotten_checkpoint_is_read_again() {
        let mut checkpoints = Checkpoints::default();
        checkpoints.loaded(p(0), Epoch(1), 80);
        checkpoints.forget(&[(p(0), Epoch(1))]);
        assert_eq!(checkpoints.stale(&[(p(0), Epoch(1))]), vec![p(0)]);
        assert_eq!(checkpoints.get(p(0)), 0);
    }
}
