//! Which schema readers query for each projection of a replica set (its stable name), and the
//! operator's move of that name from one replica set to another.
//!
//! Two replica sets on one database (a new partition count beside the old one, staging beside
//! production, a pod with the wrong `REPLICA_SET`) must never write the same tables. The first
//! set to register a projection claims the projection's own name; every other set gets
//! `<projection>__<set>`. The claim is a row with a unique schema name, taken in the transaction
//! that registers the set's first version. PostgreSQL itself enforces the separation: each set
//! has its own role per projection (`sink::role`), and a schema owned by another set's role is
//! never handed over.

use sha2::Digest as _;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::registry::{new_generation, relations, RegistryError};
use crate::db::quote_ident;

/// The stable schema of `projection` in `replica_set`, claimed now if the set has none yet.
pub async fn stable_schema(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> Result<String, RegistryError> {
    if let Some(schema) = claimed(conn, replica_set, projection).await? {
        return Ok(schema);
    }
    let own = own_schema_name(projection, replica_set);
    for candidate in [projection, own.as_str()] {
        let won: Option<String> = sqlx::query_scalar(
            "INSERT INTO projection_host.read_models (replica_set, projection, stable_schema)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING stable_schema",
        )
        .bind(replica_set)
        .bind(projection)
        .bind(candidate)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(schema) = won {
            if schema != projection {
                let holder = holder(conn, projection)
                    .await?
                    .map_or_else(String::new, |(set, _)| set);
                tracing::warn!(
                    replica_set,
                    projection,
                    schema = %schema,
                    "schema {projection} belongs to replica set {holder}: this replica set writes \
                     its own read model {schema}; readers keep querying {holder}'s until you run \
                     `projection-host replica-sets switch-readers --from {holder} --to {replica_set} --yes`"
                );
            }
            return Ok(schema);
        }
    }
    let (set, other) = holder(conn, &own).await?.unwrap_or_default();
    Err(RegistryError::Refused(format!(
        "projection {projection} of replica set {replica_set} has no schema of its own: {projection} \
         belongs to another replica set and {own} to projection {other} of replica set {set}; \
         rename the replica set"
    )))
}

/// The claimed stable schema, if any.
pub async fn claimed(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT stable_schema FROM projection_host.read_models WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_optional(conn)
    .await
}

/// The replica set and projection that hold a schema name as their stable schema.
pub async fn holder(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT replica_set, projection FROM projection_host.read_models WHERE stable_schema = $1",
    )
    .bind(schema)
    .fetch_optional(conn)
    .await
}

/// `<projection>__<set>` with the set's `-` and `.` as `_` (readers can write it unquoted),
/// cut with a hash to PostgreSQL's 63 bytes.
pub fn own_schema_name(projection: &str, replica_set: &str) -> String {
    let set: String = replica_set
        .chars()
        .map(|c| if c == '-' || c == '.' { '_' } else { c })
        .collect();
    let full = format!("{projection}__{set}");
    if full.len() <= 63 {
        return full;
    }
    let digest = sha2::Sha256::digest(full.as_bytes());
    let cut: String = full.chars().take(54).collect();
    format!("{cut}_{}", hex::encode(&digest[..4]))
}

/// The grants readers hold on a stable schema and its relations, to give them again to what
/// replaces it (new views are new objects: their grants would otherwise be lost).
pub struct ReaderGrants {
    schema: Vec<(String, String)>,
    relations: Vec<(String, String, String)>,
}

impl ReaderGrants {
    /// Grants to roles other than the owner (PUBLIC has none: the host revokes them).
    pub async fn of(conn: &mut PgConnection, schema: &str) -> Result<ReaderGrants, sqlx::Error> {
        let on_schema: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.grantee::regrole::text, a.privilege_type
               FROM pg_namespace n, aclexplode(n.nspacl) a
              WHERE n.nspname = $1 AND a.grantee <> n.nspowner AND a.grantee <> 0",
        )
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
        let on_relations: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.relname::text, a.grantee::regrole::text, a.privilege_type
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v')
                AND a.grantee <> c.relowner AND a.grantee <> 0 AND a.privilege_type = 'SELECT'",
        )
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
        Ok(ReaderGrants {
            schema: on_schema,
            relations: on_relations,
        })
    }

    /// Grants the same to the same roles on `schema` (relations that exist there).
    pub async fn apply(&self, conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
        let s = quote_ident(schema);
        for (grantee, privilege) in &self.schema {
            // Names come from the catalogue (regrole output is already quoted as needed).
            sqlx::query(&format!("GRANT {privilege} ON SCHEMA {s} TO {grantee}"))
                .execute(&mut *conn)
                .await?;
        }
        let present: Vec<String> = relations(&mut *conn, schema)
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        for (relation, grantee, privilege) in &self.relations {
            if present.contains(relation) {
                sqlx::query(&format!(
                    "GRANT {privilege} ON {s}.{} TO {grantee}",
                    quote_ident(relation)
                ))
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}

/// What `switch-readers` did for one projection.
#[derive(Debug, Clone)]
pub struct Switched {
    pub projection: String,
    /// The name readers query, now showing the new set's tables.
    pub readers: String,
    /// Where the old set's read model went.
    pub old_set_now_in: String,
}

/// Points the stable names readers query at `to`'s read models, for every projection `from`
/// publishes (or only `only`). `from` must have no live hosts, and `to` must have reached at
/// least the position `from` had committed, so readers never go back in time. One transaction:
/// readers see the old set's tables or the new set's, never a mix.
pub async fn switch_readers(
    pool: &PgPool,
    from: &str,
    to: &str,
    only: Option<&str>,
) -> Result<Vec<Switched>, RegistryError> {
    if from == to {
        return Err(RegistryError::Refused(format!(
            "--from and --to are both {from}"
        )));
    }
    let mut tx = pool.begin().await?;
    crate::db::host_lock(&mut tx, crate::base::locks::HostLock::ReadModels).await?;
    let live = crate::store::workers::live_hosts(&mut tx, from).await?;
    if !live.is_empty() {
        return Err(RegistryError::Refused(format!(
            "replica set {from} still has live hosts ({}): scale it to zero first (its read models \
             keep what it committed until the switch)",
            live.join(", ")
        )));
    }
    let published: Vec<(String, String)> = sqlx::query_as(
        "SELECT projection, stable_schema FROM projection_host.read_models
          WHERE replica_set = $1 AND ($2::text IS NULL OR projection = $2) ORDER BY projection",
    )
    .bind(from)
    .bind(only)
    .fetch_all(&mut *tx)
    .await?;
    if published.is_empty() {
        return Err(RegistryError::Refused(match only {
            Some(p) => format!("replica set {from} has no projection '{p}'"),
            None => format!("replica set {from} has no read models"),
        }));
    }
    let mut done = Vec::new();
    for (projection, readers) in published {
        done.push(switch_one(&mut tx, from, to, &projection, &readers).await?);
    }
    for set in [from, to] {
        let names: Vec<&str> = done.iter().map(|s| s.projection.as_str()).collect();
        new_generation(
            &mut tx,
            set,
            &format!(
                "readers of {} switched from {from} to {to}",
                names.join(", ")
            ),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(done)
}

async fn switch_one(
    tx: &mut Transaction<'static, Postgres>,
    from: &str,
    to: &str,
    projection: &str,
    readers: &str,
) -> Result<Switched, RegistryError> {
    let Some((namespace, track)) = active_version(tx, to, projection).await? else {
        return Err(RegistryError::Refused(format!(
            "replica set {to} runs no version of {projection}: start it with REPLICA_SET={to} and \
             let it catch up before switching readers"
        )));
    };
    let reached = crate::store::checkpoints::lowest_of_track(tx, to, &track).await?;
    if let Some((_, old_track)) = active_version(tx, from, projection).await? {
        let old = crate::store::checkpoints::lowest_of_track(tx, from, &old_track).await?;
        if reached < old {
            return Err(RegistryError::Refused(format!(
                "replica set {to} has applied {projection} up to position {reached} in every \
                 partition, {from} up to {old}: readers would go back in time; wait until \
                 `projection-host status --replica-set {to}` shows it caught up"
            )));
        }
    }
    let moved_to = own_schema_name(projection, from);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&moved_to)
            .fetch_one(&mut **tx)
            .await?;
    if exists {
        return Err(RegistryError::Refused(format!(
            "schema {moved_to} already exists: the old read model of {from} would move there; \
             drop or rename it first"
        )));
    }
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
    )
    .bind(&namespace)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| {
        RegistryError::Refused(format!(
            "replica set {to} has not created its read model {namespace} yet"
        ))
    })?;
    let grants = ReaderGrants::of(tx, readers).await?;
    sqlx::query(&format!(
        "ALTER SCHEMA {} RENAME TO {}",
        quote_ident(readers),
        quote_ident(&moved_to)
    ))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE projection_host.plugins SET namespace = $3 WHERE replica_set = $1 AND namespace = $2",
    )
    .bind(from)
    .bind(readers)
    .bind(&moved_to)
    .execute(&mut **tx)
    .await?;
    // The old set first: the name is unique, so it must be free before the new set takes it.
    set_stable(tx, from, projection, &moved_to).await?;
    set_stable(tx, to, projection, readers).await?;
    publish_views(tx, readers, &namespace, &owner).await?;
    grants.apply(tx, readers).await?;
    tracing::info!(projection, readers, from, to, old = %moved_to, "readers switched");
    Ok(Switched {
        projection: projection.to_string(),
        readers: readers.to_string(),
        old_set_now_in: moved_to,
    })
}

/// The (namespace, track) of a set's active version of a projection.
async fn active_version(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT namespace, track FROM projection_host.plugins
          WHERE replica_set = $1 AND projection = $2 AND state = 'active'",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_optional(&mut **tx)
    .await
}

async fn set_stable(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    projection: &str,
    schema: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_host.read_models SET stable_schema = $3, claimed_at = now()
          WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(schema)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates `stable` (owned by `owner`) holding one view per table or view of `namespace`.
pub async fn publish_views(
    tx: &mut Transaction<'static, Postgres>,
    stable: &str,
    namespace: &str,
    owner: &str,
) -> Result<(), sqlx::Error> {
    let (s, o) = (quote_ident(stable), quote_ident(owner));
    sqlx::query(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION {o}"
    ))
    .execute(&mut **tx)
    .await?;
    for (name, _) in relations(tx, namespace).await? {
        let n = quote_ident(&name);
        sqlx::query(&format!(
            "CREATE VIEW {s}.{n} AS SELECT * FROM {}.{n}",
            quote_ident(namespace)
        ))
        .execute(&mut **tx)
        .await?;
        sqlx::query(&format!("ALTER VIEW {s}.{n} OWNER TO {o}"))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::own_schema_name;

    #[test]
    fn own_schema_names_include_the_set_and_fit_postgres() {
        assert_eq!(own_schema_name("bank_balances", "b"), "bank_balances__b");
        assert_eq!(
            own_schema_name("orders", "blue-green.2"),
            "orders__blue_green_2"
        );
        let long = own_schema_name(&"p".repeat(40), &"s".repeat(40));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, own_schema_name(&"p".repeat(40), &"t".repeat(40)));
    }
}
