//! The coordination channel: every host LISTENs on it, and whoever changes a replica set's
//! membership, assignment, plugins or controls NOTIFYs it with the replica set's name, so that
//! hosts look again at once instead of at their next heartbeat.

/// NOTIFY channel for membership and assignment changes (payload: the replica set).
pub const COORDINATION_CHANNEL: &str = "projection_host_coordination";

/// Tells every host of `replica_set` to look at its coordination rows again. Inside a
/// transaction the notification is delivered at commit, with the change it announces.
pub async fn coordination<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    replica_set: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(COORDINATION_CHANNEL)
        .bind(replica_set)
        .execute(executor)
        .await?;
    Ok(())
}
