//! Taking an existing read-model table over in place: the table moves into the projection's
//! schema (rows, indexes, constraints and owned sequences go with it; nothing is copied) and is
//! handed to the projection's role; its old name becomes a view on it with the same readers,
//! which refuses writes (a worker of the old deployment still running gets an error, not a
//! silent double write).

use std::str::FromStr;

use anyhow::Context;
use sqlx::PgConnection;

use crate::base::sqlstate;
use crate::db::{quote_ident, quote_literal, QualifiedName};
use crate::store::adopted::Adopted;

/// `OLD[=NEW]`: the table readers query today, and its name in the projection's schema (the
/// same name when omitted).
#[derive(Debug, Clone)]
pub struct Adopt {
    pub table: QualifiedName,
    pub name: String,
}

impl FromStr for Adopt {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (old, new) = match s.split_once('=') {
            Some((old, new)) => (old, Some(new)),
            None => (s, None),
        };
        let table: QualifiedName = old.parse()?;
        let name = match new {
            Some(new) => {
                let parsed: QualifiedName = new.parse()?;
                if parsed.schema.is_some() {
                    return Err(format!(
                        "'{new}': name the table only; it moves into the projection's schema"
                    ));
                }
                parsed.name
            }
            None => table.name.clone(),
        };
        Ok(Adopt { table, name })
    }
}

/// One table as the plan found it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    /// `schema.table`, resolved.
    pub from: String,
    pub from_schema: String,
    pub from_name: String,
    /// The table in the projection's schema.
    pub to: String,
    pub to_name: String,
    /// The planner's estimate (reltuples).
    pub rows_estimate: i64,
    pub owner: String,
    /// Roles with SELECT on the table (its owner included; `None` is PUBLIC); the view gets
    /// the same.
    pub readers: Vec<Option<String>>,
}

/// Checks one table: it exists, is a table, is not in the projection's schema yet, and the
/// name it takes there is free.
pub async fn inspect(
    conn: &mut PgConnection,
    adopt: &Adopt,
    schema: &str,
) -> anyhow::Result<Found> {
    let Some((qualified, oid)) = adopt.table.resolve(conn).await? else {
        anyhow::bail!(
            "table {} does not exist (name it as readers do, e.g. public.account_balances)",
            adopt.table
        );
    };
    let from_schema = qualified.schema.clone().unwrap_or_default();
    let (kind, rows, owner): (String, f32, String) = sqlx::query_as(
        "SELECT relkind::text, reltuples, pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = $1::oid",
    )
    .bind(oid)
    .fetch_one(&mut *conn)
    .await?;
    if kind == "p" {
        anyhow::bail!(
            "{qualified} is a partitioned table: moving it would leave its partitions behind, owned by the old deployment; adopt a plain table"
        );
    }
    if kind != "r" {
        anyhow::bail!(
            "{qualified} is not a table (relkind {kind}); adopt the table a view reads from instead"
        );
    }
    let secured: bool = sqlx::query_scalar(
        "SELECT relrowsecurity OR relforcerowsecurity OR EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = $1::oid)
           FROM pg_class WHERE oid = $1::oid",
    )
    .bind(oid)
    .fetch_one(&mut *conn)
    .await?;
    if secured {
        anyhow::bail!(
            "{qualified} has row-level security, which a projection's tables may not have (its policies would run as every reader); disable it (ALTER TABLE ... DISABLE ROW LEVEL SECURITY, DROP POLICY) or keep the table out"
        );
    }
    let children: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = $1::oid")
            .bind(oid)
            .fetch_one(&mut *conn)
            .await?;
    if children > 0 {
        anyhow::bail!(
            "{qualified} has {children} inheriting tables, which would stay behind; adopt a plain table"
        );
    }
    if from_schema == schema {
        anyhow::bail!("{qualified} is already in the projection's schema {schema}");
    }
    let target = QualifiedName {
        schema: Some(schema.to_string()),
        name: adopt.name.clone(),
    };
    if target.resolve(conn).await?.is_some() {
        anyhow::bail!(
            "{target} exists already (did a host run create it?); drop it if it is empty, or adopt under another name with {}=OTHER",
            adopt.table
        );
    }
    // The old owner reads it too (it no longer owns the table); `None` is PUBLIC.
    let readers: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END
           FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) AS a
          WHERE c.oid = $1::oid AND a.privilege_type = 'SELECT'
          ORDER BY 1",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Found {
        from: qualified.to_string(),
        from_name: qualified.name.clone(),
        from_schema,
        to: target.to_string(),
        to_name: adopt.name.clone(),
        rows_estimate: rows.max(0.0) as i64,
        owner,
        readers,
    })
}

/// Moves the table (inside the import's transaction) and leaves the view behind.
pub async fn adopt(
    conn: &mut PgConnection,
    found: &Found,
    replica_set: &str,
    schema: &str,
    role: &str,
    projection: &str,
) -> anyhow::Result<()> {
    let s = quote_ident(schema);
    let moved = format!("{s}.{}", quote_ident(&found.from_name));
    let mut statements = vec![format!("ALTER TABLE {} SET SCHEMA {s}", found.from)];
    if found.from_name != found.to_name {
        statements.push(format!(
            "ALTER TABLE {moved} RENAME TO {}",
            quote_ident(&found.to_name)
        ));
    }
    statements.extend([
        format!("ALTER TABLE {} OWNER TO {}", found.to, quote_ident(role)),
        format!("CREATE VIEW {} AS SELECT * FROM {}", found.from, found.to),
        format!(
            "COMMENT ON VIEW {} IS {}",
            found.from,
            quote_literal(&format!(
                "projection-host: the read model of projection {projection}, adopted into {}; read-only",
                found.to
            ))
        ),
        format!(
            "CREATE TRIGGER projection_host_read_only INSTEAD OF INSERT OR UPDATE OR DELETE ON {}
             FOR EACH ROW EXECUTE FUNCTION projection_host.refuse_write_to_adopted_view({})",
            found.from,
            quote_literal(&found.to)
        ),
    ]);
    for sql in &statements {
        sqlx::query(sql).execute(&mut *conn).await.map_err(|e| {
            let hint = if sqlstate::of(&e).as_deref() == Some(sqlstate::INSUFFICIENT_PRIVILEGE) {
                format!(
                    " (the host's user must own {} or be a member of its owner {}: GRANT {} TO <host user>, or run the import as {})",
                    found.from,
                    found.owner,
                    quote_ident(&found.owner),
                    found.owner
                )
            } else {
                String::new()
            };
            anyhow::anyhow!("adopting {}: `{sql}` failed: {e}{hint}", found.from)
        })?;
    }
    crate::store::adopted::record(
        conn,
        replica_set,
        projection,
        &Adopted {
            from_schema: found.from_schema.clone(),
            from_name: found.from_name.clone(),
            to_schema: schema.to_string(),
            to_name: found.to_name.clone(),
            owner: found.owner.clone(),
        },
    )
    .await?;
    for reader in &found.readers {
        let grantee = reader.as_deref().map_or("PUBLIC".to_string(), quote_ident);
        sqlx::query(&format!("GRANT SELECT ON {} TO {grantee}", found.from))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A table put back where it was adopted from.
#[derive(Debug, Clone)]
pub struct Restored {
    pub table: String,
    pub from: String,
}

/// Puts every table adopted for the projection back (inside the rollback's transaction): the
/// view goes, the table returns under its old schema, name and owner. Its grants never left it.
pub async fn restore(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> anyhow::Result<Vec<Restored>> {
    let rows = crate::store::adopted::of_projection(conn, replica_set, projection, true).await?;
    let mut restored = Vec::new();
    for Adopted {
        from_schema,
        from_name,
        to_schema,
        to_name,
        owner,
    } in rows
    {
        let old = format!("{}.{}", quote_ident(&from_schema), quote_ident(&from_name));
        let adopted = format!("{}.{}", quote_ident(&to_schema), quote_ident(&to_name));
        let back_in_place = format!("{}.{}", quote_ident(&from_schema), quote_ident(&to_name));
        let mut statements = vec![
            format!("DROP VIEW IF EXISTS {old}"),
            format!(
                "ALTER TABLE {adopted} SET SCHEMA {}",
                quote_ident(&from_schema)
            ),
        ];
        if from_name != to_name {
            statements.push(format!(
                "ALTER TABLE {back_in_place} RENAME TO {}",
                quote_ident(&from_name)
            ));
        }
        statements.push(format!(
            "ALTER TABLE {old} OWNER TO {}",
            quote_ident(&owner)
        ));
        for sql in &statements {
            sqlx::query(sql)
                .execute(&mut *conn)
                .await
                .with_context(|| format!("putting {adopted} back as {old}: `{sql}`"))?;
        }
        restored.push(Restored {
            table: adopted,
            from: old,
        });
    }
    crate::store::adopted::forget(conn, replica_set, projection).await?;
    Ok(restored)
}

/// How a plan names the readers.
pub fn readers_text(readers: &[Option<String>]) -> String {
    readers
        .iter()
        .map(|r| r.clone().unwrap_or_else(|| "PUBLIC".to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}
