//! Which projections a replica set knows: any row of the host's about them, in the plugin
//! registry, the read models, the roles or the controls.

use sqlx::PgConnection;

pub async fn known(conn: &mut PgConnection, replica_set: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT projection FROM projection_host.plugins WHERE replica_set = $1
         UNION SELECT projection FROM projection_host.read_models WHERE replica_set = $1
         UNION SELECT projection FROM projection_host.projection_roles WHERE replica_set = $1
         UNION SELECT projection FROM projection_host.projection_controls WHERE replica_set = $1
         ORDER BY 1",
    )
    .bind(replica_set)
    .fetch_all(conn)
    .await
}
