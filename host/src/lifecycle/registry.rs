//! The registry rows and the operations on them. Every change bumps the replica set's
//! generation (a swap is a generation change on every host) and is announced with NOTIFY.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::read_models::{publish_views, stable_schema, ReaderGrants};
use crate::base::stored_enum::stored_enum;
use crate::db::quote_ident;
use crate::runtime::bindings::{INTERFACE, INTERFACE_VERSION};
use crate::runtime::Plugin;

stored_enum! {
    /// How a new version takes over.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum Mode("plugins.mode") {
        /// At each partition's next batch boundary, from its checkpoint, on the same read model.
        Continue => "continue",
        /// Builds its own read model from position 0 beside the active one; promoted once caught
        /// up.
        Rebuild => "rebuild",
    }
}

stored_enum! {
    /// Where a registered version stands (`plugins.state`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum State("plugins.state") {
        /// Registered, not activated (`plugins push --no-activate`).
        Pending => "pending",
        /// A rebuild building its own read model beside the active version.
        Building => "building",
        /// The version the fleet runs.
        Active => "active",
        /// Replaced; kept for rollback until its data is dropped.
        Retired => "retired",
    }
}

impl State {
    /// A version hosts run: the active one, or a rebuild.
    pub fn runs(self) -> bool {
        matches!(self, State::Active | State::Building)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct PluginRow {
    pub projection: String,
    pub sha256: String,
    pub version: String,
    pub interface: String,
    #[sqlx(try_from = "String")]
    pub state: State,
    #[sqlx(try_from = "String")]
    pub mode: Mode,
    pub track: String,
    pub namespace: String,
    pub source: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub activated_at: Option<chrono::DateTime<chrono::Utc>>,
    pub retired_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A version that runs: the active one of each projection, and a rebuild in progress.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Running {
    pub projection: String,
    pub sha256: String,
    #[sqlx(try_from = "String")]
    pub state: State,
    pub track: String,
    pub namespace: String,
    /// The generation that activated it: orders builds of one read model.
    pub activated_generation: i64,
}

/// What every host runs, as the coordinator last read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub running: Vec<Running>,
}

impl Registry {
    pub fn track(&self, track: &str) -> Option<&Running> {
        self.running.iter().find(|r| r.track == track)
    }
}

const COLUMNS: &str = "projection, sha256, version, interface, state, mode, track, namespace, source, created_at, activated_at, retired_at";

pub async fn load(pool: &PgPool, replica_set: &str) -> Result<Arc<Registry>, sqlx::Error> {
    let running = sqlx::query_as(
        "SELECT projection, sha256, state, track, namespace, activated_generation FROM projection_host.plugins
          WHERE replica_set = $1 AND state IN ('active', 'building') ORDER BY projection, state",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await?;
    Ok(Arc::new(Registry { running }))
}

pub async fn list(pool: &PgPool, replica_set: &str) -> Result<Vec<PluginRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projection_host.plugins WHERE replica_set = $1 ORDER BY projection, created_at"
    ))
    .bind(replica_set)
    .fetch_all(pool)
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// What registering a mounted file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounted {
    /// The projection had no version: this file is now active.
    FirstVersion,
    /// A new file for a known projection: activated in continue mode (mounting deploys).
    Activated,
    /// The registry already has these bytes; the registered active version runs.
    Known,
}

/// Serialises changes to one projection's registry rows (push, promote, retire, removal).
pub(super) async fn lock(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
) -> Result<(), sqlx::Error> {
    crate::db::host_lock(
        tx,
        crate::base::locks::HostLock::Plugins {
            replica_set,
            projection,
        },
    )
    .await
}

async fn active(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> Result<Option<PluginRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projection_host.plugins WHERE replica_set = $1 AND projection = $2 AND state = 'active'"
    ))
    .bind(replica_set)
    .bind(projection)
    .fetch_optional(&mut *conn)
    .await
}

async fn find(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    sha256: &str,
) -> Result<Option<PluginRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projection_host.plugins WHERE replica_set = $1 AND projection = $2 AND sha256 = $3"
    ))
    .bind(replica_set)
    .bind(projection)
    .bind(sha256)
    .fetch_optional(&mut *conn)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn insert(
    conn: &mut PgConnection,
    replica_set: &str,
    plugin: &Plugin,
    bytes: &[u8],
    state: State,
    mode: Mode,
    track: &str,
    namespace: &str,
    source: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_host.plugins
             (replica_set, projection, sha256, version, interface, wasm, state, mode, track, namespace, source, activated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $7 = 'active' THEN now() END)",
    )
    .bind(replica_set)
    .bind(&*plugin.name)
    .bind(&plugin.sha256)
    .bind(&plugin.version)
    .bind(format!("{INTERFACE}@{INTERFACE_VERSION}"))
    .bind(bytes)
    .bind(state.as_str())
    .bind(mode.as_str())
    .bind(track)
    .bind(namespace)
    .bind(source)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Bumps the generation, records why, and wakes every host.
pub(super) async fn new_generation(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    reason: &str,
) -> Result<i64, sqlx::Error> {
    let generation = crate::store::replica_sets::new_generation(
        tx,
        replica_set,
        &crate::store::replica_sets::StartedBy::Registry,
        reason,
    )
    .await?;
    if let Some(generation) = generation {
        tracing::info!(replica_set, generation, reason, "new generation");
    }
    crate::base::notify::coordination(&mut **tx, replica_set).await?;
    Ok(generation.unwrap_or(0))
}

/// A new generation that starts a build, recorded on the build (it orders the builds of one
/// read model).
async fn start_build(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
    sha256: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let generation = new_generation(tx, replica_set, reason).await?;
    sqlx::query("UPDATE projection_host.plugins SET activated_generation = $4 WHERE replica_set = $1 AND projection = $2 AND sha256 = $3")
        .bind(replica_set)
        .bind(projection)
        .bind(sha256)
        .bind(generation)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Retires the projection's active version (its successor is activated in the same
/// transaction).
async fn retire_active(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_host.plugins SET state = 'retired', retired_at = now()
          WHERE replica_set = $1 AND projection = $2 AND state = 'active'",
    )
    .bind(replica_set)
    .bind(projection)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Retires the active version and makes `sha256` active on the same read model (continue).
async fn activate_continue(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
    sha256: &str,
) -> Result<(), RegistryError> {
    let current = active(tx, replica_set, projection).await?;
    let (track, namespace) = match &current {
        Some(c) => (c.track.clone(), c.namespace.clone()),
        None => (
            projection.to_string(),
            stable_schema(tx, replica_set, projection).await?,
        ),
    };
    retire_active(tx, replica_set, projection).await?;
    sqlx::query(
        "UPDATE projection_host.plugins SET state = 'active', mode = 'continue', track = $4, namespace = $5,
                activated_at = now(), retired_at = NULL
          WHERE replica_set = $1 AND projection = $2 AND sha256 = $3",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(sha256)
    .bind(&track)
    .bind(&namespace)
    .execute(&mut **tx)
    .await?;
    let from = current.map_or("none".to_string(), |c| c.version + " " + &c.sha256[..12]);
    start_build(
        tx,
        replica_set,
        projection,
        sha256,
        &format!(
            "plugin {projection}: {from} -> {} (continue)",
            &sha256[..12]
        ),
    )
    .await?;
    Ok(())
}

/// A file found in the plugins directory at start (or when it changed).
pub async fn register_mounted(
    pool: &PgPool,
    replica_set: &str,
    plugin: &Plugin,
    bytes: &[u8],
    host: &str,
) -> Result<Mounted, RegistryError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx, replica_set, &plugin.name).await?;
    if find(&mut tx, replica_set, &plugin.name, &plugin.sha256)
        .await?
        .is_some()
    {
        return Ok(Mounted::Known);
    }
    let source = format!("mounted on {host}: {}", plugin.source.display());
    let stable = stable_schema(&mut tx, replica_set, &plugin.name).await?;
    let outcome = match active(&mut tx, replica_set, &plugin.name).await? {
        None => {
            insert(
                &mut tx,
                replica_set,
                plugin,
                bytes,
                State::Active,
                Mode::Continue,
                &plugin.name,
                &stable,
                &source,
            )
            .await?;
            start_build(
                &mut tx,
                replica_set,
                &plugin.name,
                &plugin.sha256,
                &format!(
                    "plugin {}: first version {}",
                    plugin.name,
                    &plugin.sha256[..12]
                ),
            )
            .await?;
            Mounted::FirstVersion
        }
        Some(_) => {
            insert(
                &mut tx,
                replica_set,
                plugin,
                bytes,
                State::Pending,
                Mode::Continue,
                &plugin.name,
                &stable,
                &source,
            )
            .await?;
            activate_continue(&mut tx, replica_set, &plugin.name, &plugin.sha256).await?;
            Mounted::Activated
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// An upload (`plugins push`): continue swaps at once; rebuild starts building beside the
/// active version; `activate = false` only registers it.
pub async fn push(
    pool: &PgPool,
    replica_set: &str,
    plugin: &Plugin,
    bytes: &[u8],
    mode: Mode,
    activate: bool,
) -> Result<PluginRow, RegistryError> {
    let name = plugin.name.to_string();
    let mut tx = pool.begin().await?;
    lock(&mut tx, replica_set, &name).await?;
    let existing = find(&mut tx, replica_set, &name, &plugin.sha256).await?;
    if let Some(row) = &existing {
        if row.state.runs() {
            return Err(RegistryError::Refused(format!(
                "{name} {} is already {}",
                &plugin.sha256[..12],
                row.state
            )));
        }
    } else {
        let stable = stable_schema(&mut tx, replica_set, &name).await?;
        insert(
            &mut tx,
            replica_set,
            plugin,
            bytes,
            State::Pending,
            mode,
            &name,
            &stable,
            "upload",
        )
        .await?;
    }
    let current = active(&mut tx, replica_set, &name).await?;
    match (mode, activate, current) {
        (_, false, _) => {}
        (Mode::Continue, true, _) | (Mode::Rebuild, true, None) => {
            activate_continue(&mut tx, replica_set, &name, &plugin.sha256).await?
        }
        (Mode::Rebuild, true, Some(_)) => {
            let building: Option<String> = sqlx::query_scalar(
                "SELECT sha256 FROM projection_host.plugins WHERE replica_set = $1 AND projection = $2 AND state = 'building'",
            )
            .bind(replica_set)
            .bind(&name)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(other) = building {
                return Err(RegistryError::Refused(format!(
                    "{name} is already rebuilding {}; promote or retire it first",
                    &other[..12]
                )));
            }
            let short = &plugin.sha256[..8];
            let stable = stable_schema(&mut tx, replica_set, &name).await?;
            sqlx::query(
                "UPDATE projection_host.plugins SET state = 'building', mode = 'rebuild', track = $4, namespace = $5
                  WHERE replica_set = $1 AND projection = $2 AND sha256 = $3",
            )
            .bind(replica_set)
            .bind(&name)
            .bind(&plugin.sha256)
            .bind(format!("{name}@{short}"))
            .bind(format!("{stable}_{short}"))
            .execute(&mut *tx)
            .await?;
            start_build(
                &mut tx,
                replica_set,
                &name,
                &plugin.sha256,
                &format!("plugin {name}: rebuilding {}", &plugin.sha256[..12]),
            )
            .await?;
        }
    }
    let row = find(&mut tx, replica_set, &name, &plugin.sha256)
        .await?
        .expect("inserted or found above");
    tx.commit().await?;
    Ok(row)
}

/// Makes a version active: a rebuild that caught up (its read model replaces the active one's
/// under the stable schema name, atomically), or a pending/retired version (continue).
pub async fn promote(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    sha256: &str,
) -> Result<PluginRow, RegistryError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx, replica_set, projection).await?;
    let row = find(&mut tx, replica_set, projection, sha256)
        .await?
        .ok_or_else(|| RegistryError::Refused(format!("{projection} has no version {sha256}")))?;
    match row.state {
        State::Active => {
            return Err(RegistryError::Refused(format!(
                "{projection} {} is already active",
                &sha256[..12]
            )))
        }
        State::Building => promote_rebuild(&mut tx, replica_set, projection, &row).await?,
        _ => activate_continue(&mut tx, replica_set, projection, sha256).await?,
    }
    let row = find(&mut tx, replica_set, projection, sha256)
        .await?
        .expect("exists");
    tx.commit().await?;
    Ok(row)
}

/// Back to the version that was active before the current one (continue mode).
pub async fn rollback(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
) -> Result<PluginRow, RegistryError> {
    let previous: Option<String> = sqlx::query_scalar(
        "SELECT sha256 FROM projection_host.plugins
          WHERE replica_set = $1 AND projection = $2 AND state = 'retired' AND activated_at IS NOT NULL
          ORDER BY retired_at DESC LIMIT 1",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_optional(pool)
    .await?;
    let previous = previous.ok_or_else(|| {
        RegistryError::Refused(format!(
            "{projection} has no earlier version to roll back to"
        ))
    })?;
    promote(pool, replica_set, projection, &previous).await
}

/// The rebuild's read model becomes the stable one: the active version's tables move to a
/// schema of their own (kept for a grace period), and the stable schema gets views onto the
/// rebuilt tables; all in the caller's transaction, so readers switch atomically.
async fn promote_rebuild(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
    building: &PluginRow,
) -> Result<(), RegistryError> {
    let current = active(tx, replica_set, projection).await?;
    let stable_name = stable_schema(tx, replica_set, projection).await?;
    let stable = quote_ident(&stable_name);
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
    )
    .bind(&building.namespace)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| {
        RegistryError::Refused(format!(
            "the rebuild of {projection} has not created its read model {} yet",
            building.namespace
        ))
    })?;
    let grants = ReaderGrants::of(tx, &stable_name).await?;
    if let Some(current) = &current {
        if current.namespace == stable_name {
            // The active version's tables live in the stable schema itself: move them out.
            let keep = format!("{stable_name}_{}", &current.sha256[..8]);
            sqlx::query(&format!(
                "CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}",
                quote_ident(&keep),
                quote_ident(&owner)
            ))
            .execute(&mut **tx)
            .await?;
            for (name, kind) in relations(tx, &stable_name).await? {
                let what = if kind == "v" { "VIEW" } else { "TABLE" };
                sqlx::query(&format!(
                    "ALTER {what} {stable}.{} SET SCHEMA {}",
                    quote_ident(&name),
                    quote_ident(&keep)
                ))
                .execute(&mut **tx)
                .await?;
            }
            sqlx::query("UPDATE projection_host.plugins SET namespace = $3 WHERE replica_set = $1 AND track = $2")
                .bind(replica_set)
                .bind(&current.track)
                .bind(&keep)
                .execute(&mut **tx)
                .await?;
        } else {
            for (name, _) in relations(tx, &stable_name).await? {
                sqlx::query(&format!(
                    "DROP VIEW IF EXISTS {stable}.{}",
                    quote_ident(&name)
                ))
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    publish_views(tx, &stable_name, &building.namespace, &owner).await?;
    grants.apply(tx, &stable_name).await?;
    retire_active(tx, replica_set, projection).await?;
    sqlx::query(
        "UPDATE projection_host.plugins SET state = 'active', activated_at = now()
          WHERE replica_set = $1 AND projection = $2 AND sha256 = $3",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(&building.sha256)
    .execute(&mut **tx)
    .await?;
    new_generation(
        tx,
        replica_set,
        &format!(
            "plugin {projection}: rebuild {} promoted",
            &building.sha256[..12]
        ),
    )
    .await?;
    Ok(())
}

/// Tables and views of a schema (name, relkind).
pub(super) async fn relations(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.relname::text, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v') ORDER BY c.relname",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
}

/// A rebuild that caught up (lag at most `max_lag` positions over every partition) is promoted.
/// Run by the leader.
pub async fn promote_caught_up(
    pool: &PgPool,
    replica_set: &str,
    partitions: u32,
    max_lag: i64,
    head: i64,
) -> Result<Vec<String>, RegistryError> {
    let ready =
        crate::store::checkpoints::rebuilds_caught_up(pool, replica_set, partitions, max_lag, head)
            .await?;
    let mut promoted = Vec::new();
    for (projection, sha) in ready {
        promote(pool, replica_set, &projection, &sha).await?;
        tracing::info!(%projection, sha256 = %sha, "rebuild caught up: promoted");
        promoted.push(projection);
    }
    Ok(promoted)
}

/// Drops the schemas of rebuild-era versions retired longer than `grace` ago. Run by the leader.
pub async fn drop_retired_data(
    pool: &PgPool,
    replica_set: &str,
    grace: std::time::Duration,
) -> Result<(), sqlx::Error> {
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT r.namespace FROM projection_host.plugins r
          WHERE r.replica_set = $1 AND r.state = 'retired'
            AND NOT EXISTS (SELECT 1 FROM projection_host.read_models m WHERE m.stable_schema = r.namespace)
            AND r.retired_at < now() - $2 * interval '1 millisecond'
            AND NOT EXISTS (SELECT 1 FROM projection_host.plugins a
                             WHERE a.replica_set = $1 AND a.namespace = r.namespace AND a.state IN ('active', 'building'))
            AND EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = r.namespace)",
    )
    .bind(replica_set)
    .bind(grace.as_millis() as f64)
    .fetch_all(pool)
    .await?;
    for schema in stale {
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", quote_ident(&schema)))
            .execute(pool)
            .await?;
        tracing::info!(%schema, "dropped the read model of a retired plugin version after its grace period");
    }
    Ok(())
}
