//! The names of the host's locks: rows of the host's lock table (see `db::host_lock`; not
//! advisory locks, which any session could take to block the fleet) that serialise one kind of
//! change across hosts. Each name is made here so that two places that must exclude each other
//! cannot drift apart.

/// Lock names, by what they serialise.
#[derive(Debug, Clone, Copy)]
pub enum HostLock<'a> {
    /// Applying the host's migrations.
    Migrate,
    /// Creating or changing a projection's login role.
    Role(&'a str),
    /// A read model's setup (schema and the plugin's `setup`).
    Setup { namespace: &'a str },
    /// Changes to a projection's plugin registry rows.
    Plugins {
        replica_set: &'a str,
        projection: &'a str,
    },
    /// Changes to which schema readers see (switch, removal).
    ReadModels,
}

impl HostLock<'_> {
    /// The row's key in the lock table.
    pub fn key(&self) -> String {
        match self {
            HostLock::Migrate => "migrate".to_string(),
            HostLock::Role(role) => format!("role:{role}"),
            HostLock::Setup { namespace } => format!("setup:{namespace}"),
            HostLock::Plugins {
                replica_set,
                projection,
            } => format!("plugins:{replica_set}/{projection}"),
            HostLock::ReadModels => "read-models".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lock_has_its_own_key_and_keys_keep_their_stored_spelling() {
        // The keys are rows other hosts of an older release may hold: their spelling is fixed.
        assert_eq!(HostLock::Migrate.key(), "migrate");
        assert_eq!(HostLock::Role("ph_a").key(), "role:ph_a");
        assert_eq!(HostLock::Setup { namespace: "bank" }.key(), "setup:bank");
        assert_eq!(
            HostLock::Plugins {
                replica_set: "default",
                projection: "bank"
            }
            .key(),
            "plugins:default/bank"
        );
        assert_eq!(HostLock::ReadModels.key(), "read-models");
    }
}
