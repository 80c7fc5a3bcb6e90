//! The partitions this worker holds right now, shared between the coordinator (which claims
//! and releases them) and the projection pipelines (which process them).
//!
//! A pipeline takes a [`Lease`] for each batch. Revoking a partition first stops new leases
//! from including it, then waits for the leases that do to end: the in-flight batch finishes
//! (or is abandoned after a timeout, in which case fencing makes its commit fail) before the
//! partition is released in the database. Partitions that are not revoked never pause.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::ids::{Epoch, PartitionId};

#[derive(Debug)]
struct Held {
    epoch: Epoch,
    revoking: bool,
    in_use: u32,
}

#[derive(Default)]
struct State {
    held: BTreeMap<PartitionId, Held>,
    /// Shutting down: no new leases.
    closed: bool,
}

pub struct Ownership {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    released: Notify,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            state: Mutex::default(),
            changed: watch::channel(0).0,
            released: Notify::new(),
        }
    }
}

impl Ownership {
    pub fn new() -> Arc<Ownership> {
        Arc::new(Ownership::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data; keep going with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Changes whenever the set of usable partitions changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The partitions usable for the next batch, held until the lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        let mut state = self.state();
        if state.closed {
            return Lease {
                ownership: self.clone(),
                partitions: Vec::new(),
            };
        }
        let partitions: Vec<(PartitionId, Epoch)> = state
            .held
            .iter_mut()
            .filter(|(_, h)| !h.revoking)
            .map(|(p, h)| {
                h.in_use += 1;
                (*p, h.epoch)
            })
            .collect();
        Lease {
            ownership: self.clone(),
            partitions,
        }
    }

    /// Records a successful claim.
    pub fn grant(&self, partition: PartitionId, epoch: Epoch) {
        let mut state = self.state();
        state.held.insert(
            partition,
            Held {
                epoch,
                revoking: false,
                in_use: 0,
            },
        );
        drop(state);
        self.bump();
    }

    /// Stops handing out `partition`, waits up to `timeout` for batches using it to end, and
    /// forgets it. Returns the epoch it was held at (for the release), if it was held.
    pub async fn revoke(&self, partition: PartitionId, timeout: Duration) -> Option<Epoch> {
        {
            let mut state = self.state();
            let held = state.held.get_mut(&partition)?;
            held.revoking = true;
        }
        self.bump();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.released.notified();
            {
                let mut state = self.state();
                match state.held.get(&partition) {
                    None => return None,
                    Some(h) if h.in_use == 0 || tokio::time::Instant::now() >= deadline => {
                        if h.in_use > 0 {
                            tracing::warn!(partition = partition.0, "in-flight batch did not finish in time; releasing anyway (its commit will be fenced)");
                        }
                        let epoch = h.epoch;
                        state.held.remove(&partition);
                        return Some(epoch);
                    }
                    Some(_) => {}
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Forgets partitions at once (lost to another worker, or fenced).
    pub fn forfeit(&self, partitions: &[PartitionId]) {
        let mut state = self.state();
        let mut any = false;
        for p in partitions {
            any |= state.held.remove(p).is_some();
        }
        drop(state);
        if any {
            self.bump();
        }
    }

    /// Forgets every partition (this worker was removed, or its identity taken).
    pub fn forfeit_all(&self) {
        let held: Vec<PartitionId> = self.state().held.keys().copied().collect();
        self.forfeit(&held);
    }

    /// Every held partition and its epoch (including those being revoked).
    pub fn held(&self) -> Vec<(PartitionId, Epoch)> {
        self.state()
            .held
            .iter()
            .map(|(p, h)| (*p, h.epoch))
            .collect()
    }

    /// Stops new leases (shutdown). Existing ones run to their end.
    pub fn close(&self) {
        self.state().closed = true;
        self.bump();
    }
}

/// The partitions one batch may touch, at the epochs they are held at.
pub struct Lease {
    ownership: Arc<Ownership>,
    pub partitions: Vec<(PartitionId, Epoch)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.partitions.is_empty() {
            return;
        }
        let mut state = self.ownership.state();
        for (p, e) in &self.partitions {
            if let Some(h) = state.held.get_mut(p) {
                if h.epoch == *e {
                    h.in_use = h.in_use.saturating_sub(1);
                }
            }
        }
        drop(state);
        self.ownership.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revoking_waits_for_the_in_flight_batch_and_leaves_other_partitions_usable() {
        let ownership = Ownership::new();
        ownership.grant(PartitionId(1), Epoch(3));
        ownership.grant(PartitionId(2), Epoch(7));
        let in_flight = ownership.lease();
        assert_eq!(in_flight.partitions.len(), 2);

        let o = ownership.clone();
        let revoke =
            tokio::spawn(async move { o.revoke(PartitionId(1), Duration::from_secs(30)).await });
        // While the batch runs, new leases no longer include p1 but still include p2.
        let next = loop {
            let lease = ownership.lease();
            if !lease.partitions.iter().any(|(p, _)| *p == PartitionId(1)) {
                break lease;
            }
            drop(lease);
            tokio::task::yield_now().await;
        };
        assert_eq!(next.partitions, vec![(PartitionId(2), Epoch(7))]);
        assert!(
            !revoke.is_finished(),
            "revoke must wait for the in-flight batch"
        );
        drop(in_flight);
        assert_eq!(revoke.await.unwrap(), Some(Epoch(3)));
        assert_eq!(ownership.held(), vec![(PartitionId(2), Epoch(7))]);
    }

    #[tokio::test]
    async fn a_stuck_batch_does_not_block_revocation_forever() {
        let ownership = Ownership::new();
        ownership.grant(PartitionId(1), Epoch(1));
        let _stuck = ownership.lease();
        let epoch = ownership
            .revoke(PartitionId(1), Duration::from_millis(50))
            .await;
        assert_eq!(epoch, Some(Epoch(1)));
        assert!(ownership.held().is_empty());
    }

    #[tokio::test]
    async fn closing_stops_new_leases() {
        let ownership = Ownership::new();
        ownership.grant(PartitionId(0), Epoch(1));
        ownership.close();
        assert!(ownership.lease().partitions.is_empty());
    }
}
