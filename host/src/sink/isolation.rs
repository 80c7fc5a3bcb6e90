//! Confining a projection's SQL to its own schema.
//!
//! With `SQL_ISOLATION=role` every projection gets a role (`ph_<name>_<db hash>`, NOLOGIN) that
//! owns its schema and nothing else; `setup` and each batch run `SET LOCAL ROLE` to it, so the
//! plugin's SQL and its keyed writes cannot read the events table, touch the host's tables or
//! write another projection's schema. The host returns to its own role (`RESET ROLE`) only after
//! the plugin's part of the transaction, to record checkpoints.
//!
//! A role switch can be undone by the session, so plugin SQL that could change the role is
//! refused before it reaches PostgreSQL (see [`check_statement`]), and the role is checked again
//! after every plugin call.

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use super::EffectError;
use crate::db::quote_ident;

/// The role of a projection in the current database.
pub async fn role_name(conn: &mut PgConnection, projection: &str) -> Result<String, sqlx::Error> {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await?;
    // Roles are per cluster; the database hash keeps two databases' projections apart.
    let hash = hex::encode(&Sha256::digest(database.as_bytes())[..4]);
    Ok(format!("ph_{projection}_{hash}"))
}

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error(
        "the database user may not create the projection's role {role} (it needs CREATEROLE): \
         grant it (ALTER ROLE <user> CREATEROLE), or run with SQL_ISOLATION=schema"
    )]
    CannotCreateRole { role: String },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Creates the projection's role and schema (idempotent) and gives the schema and its tables
/// to the role. Runs inside the setup transaction.
pub async fn prepare(
    conn: &mut PgConnection,
    schema: &str,
    role: &str,
) -> Result<(), IsolationError> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&mut *conn)
            .await?;
    let r = quote_ident(role);
    let s = quote_ident(schema);
    if !exists {
        sqlx::query("SAVEPOINT create_role")
            .execute(&mut *conn)
            .await?;
        match sqlx::query(&format!("CREATE ROLE {r} NOLOGIN"))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => {}
            // Another host created it a moment ago.
            Err(e) if crate::db::sqlstate(&e).as_deref() == Some("42710") => {
                sqlx::query("ROLLBACK TO SAVEPOINT create_role")
                    .execute(&mut *conn)
                    .await?;
            }
            Err(e) if crate::db::sqlstate(&e).as_deref() == Some("42501") => {
                return Err(IsolationError::CannotCreateRole {
                    role: role.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Membership lets the host SET ROLE to it (and read the read model as its owner).
    let member: bool = sqlx::query_scalar("SELECT pg_has_role(current_user, $1, 'MEMBER')")
        .bind(role)
        .fetch_one(&mut *conn)
        .await?;
    if !member {
        sqlx::query(&format!("GRANT {r} TO CURRENT_USER"))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION {r}"
    ))
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!("ALTER SCHEMA {s} OWNER TO {r}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("REVOKE ALL ON SCHEMA {s} FROM PUBLIC"))
        .execute(&mut *conn)
        .await?;
    // Tables created before isolation was on belong to the host's user: hand them over.
    let foreign: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND pg_get_userbyid(c.relowner) <> $2",
    )
    .bind(schema)
    .bind(role)
    .fetch_all(&mut *conn)
    .await?;
    for table in foreign {
        sqlx::query(&format!("ALTER TABLE {s}.{table} OWNER TO {r}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Whether the transaction still runs as `role`.
pub async fn still_confined(conn: &mut PgConnection, role: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT current_user = $1")
        .bind(role)
        .fetch_one(&mut *conn)
        .await
}

/// Statement kinds a plugin may run: data and its own schema's objects. Everything that could
/// change the session (SET, RESET, transaction control), run arbitrary code (DO, functions,
/// procedures, triggers) or reach outside the database (COPY, LISTEN) is refused.
pub fn check_statement(sql: &str) -> Result<(), EffectError> {
    let words = leading_words(sql, 4);
    let first = words.first().map(String::as_str).unwrap_or("");
    let allowed = match first {
        "select" | "insert" | "update" | "delete" | "merge" | "with" | "values" | "table"
        | "truncate" | "comment" => true,
        "create" | "alter" | "drop" => {
            // CREATE [UNIQUE] INDEX, CREATE [UNLOGGED] TABLE, CREATE [OR REPLACE] VIEW ...
            let object = words[1..]
                .iter()
                .find(|w| {
                    !matches!(
                        w.as_str(),
                        "unique"
                            | "unlogged"
                            | "or"
                            | "replace"
                            | "temporary"
                            | "temp"
                            | "materialized"
                    )
                })
                .map(String::as_str)
                .unwrap_or("");
            matches!(object, "table" | "index" | "view" | "sequence" | "type")
        }
        _ => false,
    };
    if !allowed {
        return Err(EffectError::invalid(format!(
            "plugins may not run '{}' statements (allowed: SELECT, INSERT, UPDATE, DELETE, MERGE, WITH, VALUES, TRUNCATE, \
             and CREATE/ALTER/DROP of tables, indexes, views, sequences and types)",
            words.join(" ").to_uppercase()
        )));
    }
    let lowered = sql.to_ascii_lowercase();
    // set_config('role', ...) switches roles like SET ROLE; U&"..." could spell it in escapes.
    for forbidden in [
        "set_config",
        "u&\"",
        "u&'",
        "dblink",
        "pg_read",
        "lo_import",
        "lo_export",
    ] {
        if lowered.contains(forbidden) {
            return Err(EffectError::invalid(format!(
                "plugins may not use {forbidden} in SQL"
            )));
        }
    }
    Ok(())
}

/// The first `n` words of a statement, lowercase, after comments and parentheses.
fn leading_words(sql: &str, n: usize) -> Vec<String> {
    let mut text = sql;
    let mut words = Vec::new();
    while words.len() < n {
        text = text.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(rest) = text.strip_prefix("--") {
            text = rest.split_once('\n').map_or("", |(_, r)| r);
            continue;
        }
        if let Some(rest) = text.strip_prefix("/*") {
            text = rest.split_once("*/").map_or("", |(_, r)| r);
            continue;
        }
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len());
        if end == 0 {
            break;
        }
        words.push(text[..end].to_ascii_lowercase());
        text = &text[end..];
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_own_tables_are_allowed() {
        for sql in [
            "SELECT 1",
            "  -- a comment\n insert into t values (1)",
            "/* x */ UPDATE t SET a = 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "CREATE TABLE IF NOT EXISTS t (a int)",
            "CREATE UNIQUE INDEX i ON t (a)",
            "create or replace view v as select 1",
            "ALTER TABLE t ADD COLUMN b int",
            "(SELECT 1) UNION (SELECT 2)",
        ] {
            assert!(check_statement(sql).is_ok(), "{sql}");
        }
    }

    #[test]
    fn statements_that_could_leave_the_role_are_refused() {
        for sql in [
            "RESET ROLE",
            "SET ROLE postgres",
            "set session authorization postgres",
            "DO $$ BEGIN EXECUTE 'RESET ROLE'; END $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
            "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS ''",
            "SELECT set_config('role', 'postgres', true)",
            "SELECT U&\"\\0073et_config\"('role', 'postgres', true)",
            "COMMIT",
            "COPY t TO PROGRAM 'x'",
            "CALL p()",
            "CREATE TRIGGER tr AFTER INSERT ON t EXECUTE FUNCTION f()",
            "LISTEN x",
        ] {
            assert!(check_statement(sql).is_err(), "{sql}");
        }
    }
}
