//! Identifiers and tokens, as newtypes that print the way the logs show them.

use std::fmt;

/// A logical partition of a replica set: `fnv1a_32(aggregate_id) mod P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl PartitionId {
    /// The seed's routing (pupsourcing `HashPartitionStrategy`): FNV-1a 32-bit over the raw bytes
    /// of the aggregate id, modulo the partition count. Kept identical so that partition
    /// reasoning carries over from existing deployments.
    pub fn of(aggregate_id: &str, partitions: u32) -> PartitionId {
        PartitionId(fnv1a_32(aggregate_id.as_bytes()) % partitions.max(1))
    }

    pub fn as_i32(self) -> i32 {
        self.0 as i32
    }

    /// Several partitions for a log line: one string, numbers separated by spaces.
    pub fn list(partitions: &[PartitionId]) -> String {
        partitions
            .iter()
            .map(|p| p.0.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

fn fnv1a_32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes.iter().fold(OFFSET_BASIS, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(PRIME)
    })
}

/// The fencing token of one claim of a partition. Minted by the database (`epoch + 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub i64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A numbered configuration of a replica set (membership and assignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub i64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A worker's stable identity within its replica set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub String);

impl WorkerId {
    /// `POD_NAME` when set (stable across container restarts), else host name plus a random
    /// suffix (a new identity per process).
    pub fn from_environment(pod_name: Option<&str>) -> WorkerId {
        match pod_name.map(str::trim).filter(|s| !s.is_empty()) {
            Some(pod) => WorkerId(pod.to_string()),
            None => {
                let host = gethostname::gethostname().to_string_lossy().into_owned();
                let suffix: u32 = rand::random();
                WorkerId(format!("{host}-{:06x}", suffix & 0xff_ffff))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret of this host process that proves to `projection_host_api` that a call comes from
/// the host and not from the plugin SQL that shares the batch's session. Only its sha256 is
/// stored (with the worker row).
#[derive(Clone)]
pub struct CommitToken(String);

impl CommitToken {
    pub fn generate() -> CommitToken {
        CommitToken(hex::encode(rand::random::<[u8; 32]>()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }

    /// What the database keeps.
    pub fn digest(&self) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

impl fmt::Debug for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CommitToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_routing_matches_the_go_seed() {
        // Values of Go's fnv.New32a over the same bytes.
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
        // The seed lineage's worked example: order-2 -> mod3=1, mod2=0; order-5 -> mod3=2, mod2=1.
        assert_eq!(PartitionId::of("order-2", 3), PartitionId(1));
        assert_eq!(PartitionId::of("order-2", 2), PartitionId(0));
        assert_eq!(PartitionId::of("order-5", 3), PartitionId(2));
        assert_eq!(PartitionId::of("order-5", 2), PartitionId(1));
    }

    #[test]
    fn pod_name_is_the_worker_identity() {
        assert_eq!(
            WorkerId::from_environment(Some("projections-7d9f")).0,
            "projections-7d9f"
        );
        let a = WorkerId::from_environment(None);
        let b = WorkerId::from_environment(Some("  "));
        assert_ne!(
            a, b,
            "without a pod name every process gets its own identity"
        );
    }
}
