//! Removing a projection, or a whole replica set, and everything the host made for it: read-model
//! schemas, the projection's role, checkpoints, the batch audit, registry rows, controls, halts
//! and dead letters.
//!
//! A projection is first retired (hosts stop running it at the registry change they are
//! notified of), then the host waits until no session of its role is left, and then drops
//! everything in one transaction. Dropping the role is the fence: a host that still ran the
//! projection can no longer log in as it, and its open sessions are ended first.

use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::read_models::{claimed, own_schema_name};
use super::registry::{new_generation, RegistryError};
use crate::db::quote_ident;
use crate::store::replica_sets;
use crate::store::workers::live_hosts;

/// What was removed for one projection.
#[derive(Debug, Clone, Default)]
pub struct Removed {
    pub projection: String,
    pub schemas: Vec<String>,
    /// Schemas the projection named that belong to someone else: left alone.
    pub kept: Vec<String>,
    pub role: Option<String>,
    pub checkpoints: u64,
    pub dead_letters: u64,
}

/// The projections a replica set knows (any row of the host's about them).
pub async fn projections(
    conn: &mut PgConnection,
    replica_set: &str,
) -> Result<Vec<String>, sqlx::Error> {
    crate::store::projections::known(conn, replica_set).await
}

/// Tables `import` adopted from a Go deployment are that deployment's data: dropping them with
/// the projection's schema would lose them. `import --rollback` puts them back first.
async fn refuse_adopted(
    conn: &mut sqlx::PgConnection,
    replica_set: &str,
    projection: Option<&str>,
) -> Result<(), RegistryError> {
    let adopted: Vec<String> = crate::store::adopted::of_replica_set(conn, replica_set)
        .await?
        .into_iter()
        .filter(|a| projection.is_none_or(|p| a.ends_with(&format!(", projection {p})"))))
        .collect();
    if adopted.is_empty() {
        return Ok(());
    }
    Err(RegistryError::Refused(format!(
        "replica set {replica_set} holds tables adopted from a Go deployment by `projection-host import`: {}. \
         Removing would drop them; `projection-host import --rollback` puts them back where they were first",
        adopted.join("; ")
    )))
}

/// Removes one projection of a replica set whose hosts may be running. `progress` hears about
/// the wait for the projection's sessions to end.
pub async fn remove_projection(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    wait: Duration,
    progress: &dyn Fn(&str),
) -> Result<Removed, RegistryError> {
    let mut conn = pool.acquire().await?;
    let known = projections(&mut conn, replica_set).await?;
    if !known.iter().any(|p| p == projection) {
        return Err(RegistryError::Refused(format!(
            "replica set {replica_set} has no projection '{projection}'; known: {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    refuse_adopted(&mut conn, replica_set, Some(projection)).await?;
    let role = crate::sink::role::role_of(&mut conn, replica_set, projection).await?;
    drop(conn);
    retire_everything(pool, replica_set, projection).await?;
    if let Some(role) = &role {
        wait_for_sessions(pool, role, wait, progress).await?;
    }
    let mut tx = pool.begin().await?;
    // The set's row first, as a resize takes it: a removal that waited behind a resize's
    // rewrite of the checkpoints would not see (and not delete) the rows it inserted.
    crate::store::replica_sets::lock(&mut tx, replica_set).await?;
    super::registry::lock(&mut tx, replica_set, projection).await?;
    let removed = drop_projection(&mut tx, replica_set, projection).await?;
    new_generation(
        &mut tx,
        replica_set,
        &format!("projection {projection} removed"),
    )
    .await?;
    tx.commit().await?;
    Ok(removed)
}

/// Removes a replica set that has no live hosts, with all its projections. Refused while it
/// still holds the name readers query for a projection another set also runs (switch readers
/// first).
pub async fn remove_replica_set(
    pool: &PgPool,
    replica_set: &str,
) -> Result<Vec<Removed>, RegistryError> {
    let mut tx = pool.begin().await?;
    crate::db::host_lock(&mut tx, crate::base::locks::HostLock::ReadModels).await?;
    let exists = replica_sets::exists(&mut tx, replica_set).await?
        || sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM projection_host.plugins WHERE replica_set = $1)",
        )
        .bind(replica_set)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        let sets = replica_sets::names(&mut tx).await?;
        return Err(RegistryError::Refused(format!(
            "there is no replica set '{replica_set}'; known: {}",
            if sets.is_empty() {
                "none".to_string()
            } else {
                sets.join(", ")
            }
        )));
    }
    refuse_adopted(&mut tx, replica_set, None).await?;
    let live = live_hosts(&mut tx, replica_set).await?;
    if !live.is_empty() {
        return Err(RegistryError::Refused(format!(
            "replica set {replica_set} still has live hosts ({}): scale it to zero first",
            live.join(", ")
        )));
    }
    let mut removed = Vec::new();
    for projection in projections(&mut tx, replica_set).await? {
        if claimed(&mut tx, replica_set, &projection).await?.as_deref() == Some(projection.as_str())
        {
            let others: Vec<String> = sqlx::query_scalar(
                "SELECT replica_set FROM projection_host.read_models WHERE projection = $1 AND replica_set <> $2 ORDER BY 1",
            )
            .bind(&projection)
            .bind(replica_set)
            .fetch_all(&mut *tx)
            .await?;
            if let Some(other) = others.first() {
                return Err(RegistryError::Refused(format!(
                    "readers of {projection} still query replica set {replica_set}'s read model; \
                     switch them first: projection-host replica-sets switch-readers --from \
                     {replica_set} --to {other} --yes"
                )));
            }
        }
        removed.push(drop_projection(&mut tx, replica_set, &projection).await?);
    }
    replica_sets::delete(&mut tx, replica_set).await?;
    tx.commit().await?;
    Ok(removed)
}

/// Every version becomes retired: hosts stop running the projection at the registry change.
async fn retire_everything(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    super::registry::lock(&mut tx, replica_set, projection).await?;
    let retired = sqlx::query(
        "UPDATE projection_host.plugins SET state = 'retired', retired_at = now()
          WHERE replica_set = $1 AND projection = $2 AND state <> 'retired'",
    )
    .bind(replica_set)
    .bind(projection)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if retired > 0 {
        new_generation(
            &mut tx,
            replica_set,
            &format!("projection {projection}: removing"),
        )
        .await?;
    }
    tx.commit().await
}

/// Waits (up to `wait`) until no session of the role is left: hosts close a projection's
/// sessions when they stop running it. What is left after the wait is ended when the role is
/// dropped.
async fn wait_for_sessions(
    pool: &PgPool,
    role: &str,
    wait: Duration,
    progress: &dyn Fn(&str),
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let mut said = 0;
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
                .bind(role)
                .fetch_one(pool)
                .await?;
        if open == 0 {
            return Ok(());
        }
        if started.elapsed() >= wait {
            progress(&format!(
                "{open} session(s) of {role} still open after {wait:?}: ending them"
            ));
            return Ok(());
        }
        if started.elapsed().as_secs() >= said {
            progress(&format!(
                "waiting for hosts to stop running it: {open} session(s) of {role} open"
            ));
            said = started.elapsed().as_secs() + 5;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drops the projection's schemas, role and host rows in the caller's transaction.
async fn drop_projection(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
) -> Result<Removed, RegistryError> {
    let mut removed = Removed {
        projection: projection.to_string(),
        ..Removed::default()
    };
    let tracks: Vec<String> = sqlx::query_scalar(
        "SELECT $2::text UNION SELECT track FROM projection_host.plugins WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_all(&mut **tx)
    .await?;
    let mut schemas: Vec<String> = sqlx::query_scalar(
        "SELECT namespace FROM projection_host.plugins WHERE replica_set = $1 AND projection = $2
         UNION SELECT stable_schema FROM projection_host.read_models WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_all(&mut **tx)
    .await?;
    schemas.push(own_schema_name(projection, replica_set));
    schemas.sort();
    schemas.dedup();
    let role = crate::sink::role::role_of(tx, replica_set, projection).await?;
    let host_user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut **tx)
        .await?;
    for schema in schemas {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
        )
        .bind(&schema)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(owner) = owner else { continue };
        // Only what the projection's role owns (or the host's user, for SQL_ISOLATION=none and
        // schemas of earlier releases); never another set's or an application's schema.
        if Some(&owner) == role.as_ref() || owner == host_user {
            sqlx::query(&format!("DROP SCHEMA {} CASCADE", quote_ident(&schema)))
                .execute(&mut **tx)
                .await?;
            removed.schemas.push(schema);
        } else {
            removed.kept.push(format!("{schema} (owned by {owner})"));
        }
    }
    if let Some(role) = &role {
        // Its sessions first: an open one would keep running as a role that no longer exists.
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
            .bind(role)
            .execute(&mut **tx)
            .await?;
        let r = quote_ident(role);
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role)
                .fetch_one(&mut **tx)
                .await?;
        if exists {
            sqlx::query(&format!("DROP OWNED BY {r}"))
                .execute(&mut **tx)
                .await?;
            sqlx::query(&format!("DROP ROLE {r}"))
                .execute(&mut **tx)
                .await?;
        }
        removed.role = Some(role.clone());
    }
    removed.checkpoints = delete(tx, "checkpoints", replica_set, &tracks).await?;
    removed.dead_letters = delete(tx, "dead_letters", replica_set, &tracks).await?;
    for table in [
        "batches",
        "halts",
        "projection_controls",
        "carried_checkpoints",
    ] {
        delete(tx, table, replica_set, &tracks).await?;
    }
    for table in [
        "plugins",
        "read_models",
        "projection_roles",
        "adopted_tables",
    ] {
        sqlx::query(&format!(
            "DELETE FROM projection_host.{table} WHERE replica_set = $1 AND projection = $2"
        ))
        .bind(replica_set)
        .bind(projection)
        .execute(&mut **tx)
        .await?;
    }
    Ok(removed)
}

/// Deletes a replica set's rows of `table` whose `projection` column is one of `tracks`.
async fn delete(
    tx: &mut Transaction<'static, Postgres>,
    table: &str,
    replica_set: &str,
    tracks: &[String],
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(&format!(
        "DELETE FROM projection_host.{table} WHERE replica_set = $1 AND projection = ANY($2)"
    ))
    .bind(replica_set)
    .bind(tracks)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}
