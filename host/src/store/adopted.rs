//! `adopted_tables`: read-model tables `import` took over (`adoption::tables` moves them),
//! where each came from, so that `import --rollback` can put it back and a removal can refuse
//! to drop a table that was the old deployment's.

use sqlx::PgConnection;

/// One adopted table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Adopted {
    pub from_schema: String,
    pub from_name: String,
    pub to_schema: String,
    pub to_name: String,
    pub owner: String,
}

pub async fn record(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    table: &Adopted,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_host.adopted_tables
             (replica_set, projection, from_schema, from_name, to_schema, to_name, owner)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(&table.from_schema)
    .bind(&table.from_name)
    .bind(&table.to_schema)
    .bind(&table.to_name)
    .bind(&table.owner)
    .execute(conn)
    .await?;
    Ok(())
}

/// The projection's adopted tables, locked (`for_update`) for a rollback or not.
pub async fn of_projection(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    for_update: bool,
) -> sqlx::Result<Vec<Adopted>> {
    sqlx::query_as(&format!(
        "SELECT from_schema, from_name, to_schema, to_name, owner FROM projection_host.adopted_tables
          WHERE replica_set = $1 AND projection = $2 ORDER BY adopted_at{}",
        if for_update { " FOR UPDATE" } else { "" }
    ))
    .bind(replica_set)
    .bind(projection)
    .fetch_all(conn)
    .await
}

/// Every adopted table of the set, as `schema.table (from schema.table)`.
pub async fn of_replica_set(
    conn: &mut PgConnection,
    replica_set: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT to_schema || '.' || to_name || ' (from ' || from_schema || '.' || from_name || ', projection ' || projection || ')'
           FROM projection_host.adopted_tables WHERE replica_set = $1 ORDER BY adopted_at",
    )
    .bind(replica_set)
    .fetch_all(conn)
    .await
}

pub async fn forget(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM projection_host.adopted_tables WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .execute(conn)
    .await?;
    Ok(())
}
