//! A projection's own database role: the boundary of everything its plugin's SQL can do.
//!
//! Each projection of a replica set gets a LOGIN role (`ph_<name>_<hash>`) with no attribute and
//! no membership in any other role, that owns the projection's schema and nothing else. The
//! host logs in *as* that role for the projection's batches (`sink::session`), so the session
//! user is the projection role: `RESET ROLE`, `SET ROLE`, `SET SESSION AUTHORIZATION`,
//! `set_config('role', ...)` and dynamic SQL in functions can reach no privilege the role does
//! not hold. No SQL text is inspected anywhere; PostgreSQL's privilege checks are the defence.
//!
//! The host keeps the role's password (a random secret, stored only in `projection_host`, which
//! the role cannot read) and rotates it after [`ROTATE_AFTER`]; the server only ever sees a
//! SCRAM-SHA-256 verifier, never the secret itself.

use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};

use crate::base::sqlstate;
use crate::db::{quote_ident, quote_literal, API_SCHEMA};

/// Secrets older than this are replaced at the next setup of the projection.
pub const ROTATE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Iterations of the SCRAM verifier (PostgreSQL's default).
const SCRAM_ITERATIONS: u32 = 4096;

/// How the host logs in for a projection's batches.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub name: String,
    pub secret: String,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(
        "the host's database user may not create the projection's role {role} (it needs CREATEROLE): \
         grant it (ALTER ROLE <host user> CREATEROLE), or run with SQL_ISOLATION=none for trusted plugins"
    )]
    CannotCreateRole { role: String },
    #[error(
        "the projection's role {role} has {what}, which would let its plugin's SQL act beyond its own \
         schema; remove it (as a superuser: ALTER ROLE {role} {fix})"
    )]
    Privileged {
        role: String,
        what: String,
        fix: String,
    },
    #[error(
        "the projection's role {role} is a member of {roles}, which would let its plugin's SQL act as \
         them; revoke it (REVOKE {roles} FROM {role})"
    )]
    Member { role: String, roles: String },
    #[error(
        "the projection's schema {schema} is reserved (it is PostgreSQL's, the host's, or public); \
         a projection cannot be named so: rename it in describe()"
    )]
    Reserved { schema: String },
    #[error(
        "the projection's schema {schema} already exists and belongs to {owner}{held_by}, not to this \
         projection: the host does not hand an existing schema to a plugin. {fix}"
    )]
    SchemaTaken {
        schema: String,
        owner: String,
        held_by: String,
        fix: String,
    },
    #[error(
        "the projection's schema {schema} has the name of a database role: sessions of that role would \
         find its tables first on their default search path (\"$user\"). Rename the projection"
    )]
    NamedAfterRole { schema: String },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// `ph_<projection>_<hash>`: roles are per cluster, so the hash keeps databases and replica sets
/// apart; the projection's name (cut to fit 63 bytes) keeps it readable.
pub fn role_name(database: &str, replica_set: &str, projection: &str) -> String {
    let digest = Sha256::digest(format!("{database}\0{replica_set}\0{projection}").as_bytes());
    let short = &projection[..projection.len().min(40)];
    format!("ph_{short}_{}", hex::encode(&digest[..4]))
}

/// Creates (or checks) the projection's role and schema, hands the schema to the role, lets it
/// call the host's batch functions, and returns the credentials to log in with. Idempotent;
/// serialised across hosts by a host lock. Runs on the host's own pool.
pub async fn prepare(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    schema: &str,
) -> Result<RoleCredentials, RoleError> {
    let mut tx = pool.begin().await?;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *tx)
        .await?;
    let role = role_name(&database, replica_set, projection);
    crate::db::host_lock(&mut tx, crate::base::locks::HostLock::Role(&role)).await?;
    let r = quote_ident(&role);
    let existed = ensure_role(&mut tx, &role).await?;
    let stored: Option<(String, bool)> = sqlx::query_as(
        "SELECT secret, rotated_at < now() - $2 * interval '1 second'
           FROM projection_host.projection_roles WHERE role_name = $1",
    )
    .bind(&role)
    .bind(ROTATE_AFTER.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let secret = match stored {
        Some((secret, false)) if existed => secret,
        _ => set_new_secret(&mut tx, &role, replica_set, projection).await?,
    };
    sqlx::query(&format!(
        "COMMENT ON ROLE {r} IS {}",
        quote_literal(&format!(
            "projection-host: projection {projection} of replica set {replica_set} in database {database}"
        ))
    ))
    .execute(&mut *tx)
    .await?;
    // The host's user must be a member to create the schema for the role, to hand tables over,
    // and to end the role's sessions of a stale worker. The reverse path does not exist.
    let member: bool = sqlx::query_scalar("SELECT pg_has_role(current_user, $1, 'MEMBER')")
        .bind(&role)
        .fetch_one(&mut *tx)
        .await?;
    if !member {
        sqlx::query(&format!("GRANT {r} TO CURRENT_USER"))
            .execute(&mut *tx)
            .await?;
    }
    let database_hash = hex::encode(&Sha256::digest(database.as_bytes())[..4]);
    check_schema(
        &mut tx,
        schema,
        &role,
        replica_set,
        projection,
        &database_hash,
    )
    .await?;
    give_schema(&mut tx, schema, &role).await?;
    // Settings the role gave itself (ALTER ROLE CURRENT_USER SET ...) would apply to every
    // later login of the host as it.
    sqlx::query(&format!("ALTER ROLE {r} RESET ALL"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("GRANT USAGE ON SCHEMA {API_SCHEMA} TO {r}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {API_SCHEMA} TO {r}"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    report_public_reach(pool, &role, schema).await;
    Ok(RoleCredentials { name: role, secret })
}

/// Replaces the role's secret now (after a login with the stored one failed: someone changed
/// the password, which the role itself may do). Returns the new credentials.
pub async fn rotate(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    role: &str,
) -> Result<RoleCredentials, RoleError> {
    let mut tx = pool.begin().await?;
    crate::db::host_lock(&mut tx, crate::base::locks::HostLock::Role(role)).await?;
    let secret = set_new_secret(&mut tx, role, replica_set, projection).await?;
    tx.commit().await?;
    Ok(RoleCredentials {
        name: role.to_string(),
        secret,
    })
}

/// The role a projection of the replica set runs as, if the host made one.
pub async fn role_of(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT role_name FROM projection_host.projection_roles WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_optional(conn)
    .await
}

/// The stored secret (another host may have rotated it).
pub async fn stored_secret(pool: &PgPool, role: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT secret FROM projection_host.projection_roles WHERE role_name = $1")
        .bind(role)
        .fetch_optional(pool)
        .await
}

/// Creates the role, or checks that an existing one has no attribute or membership that would
/// reach beyond it. Returns whether it existed.
async fn ensure_role(conn: &mut PgConnection, role: &str) -> Result<bool, RoleError> {
    for _ in 0..3 {
        if let Some(existed) = ensure_role_once(conn, role).await? {
            return Ok(existed);
        }
    }
    Err(RoleError::Sql(sqlx::Error::Protocol(format!(
        "the role {role} was created and dropped concurrently; try again"
    ))))
}

/// One attempt; `None` when another session created the role at the same moment.
async fn ensure_role_once(conn: &mut PgConnection, role: &str) -> Result<Option<bool>, RoleError> {
    let r = quote_ident(role);
    let found: Option<(bool, bool, bool, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolinherit, rolcanlogin
           FROM pg_roles WHERE rolname = $1",
    )
    .bind(role)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((superuser, createrole, createdb, replication, bypassrls, inherit, login)) = found
    else {
        // A random placeholder password; the real one is set right after.
        sqlx::query("SAVEPOINT create_role")
            .execute(&mut *conn)
            .await?;
        let created = sqlx::query(&format!(
            "CREATE ROLE {r} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        ))
        .execute(&mut *conn)
        .await;
        return match created {
            Ok(_) => Ok(Some(false)),
            Err(e) if sqlstate::of(&e).as_deref() == Some(sqlstate::DUPLICATE_OBJECT) => {
                // Created by another host a moment ago: check it again.
                sqlx::query("ROLLBACK TO SAVEPOINT create_role")
                    .execute(&mut *conn)
                    .await?;
                Ok(None)
            }
            Err(e) if sqlstate::of(&e).as_deref() == Some(sqlstate::INSUFFICIENT_PRIVILEGE) => {
                Err(RoleError::CannotCreateRole {
                    role: role.to_string(),
                })
            }
            Err(e) => Err(e.into()),
        };
    };
    let privileged: Vec<(&str, &str)> = [
        (superuser, "SUPERUSER", "NOSUPERUSER"),
        (createrole, "CREATEROLE", "NOCREATEROLE"),
        (createdb, "CREATEDB", "NOCREATEDB"),
        (replication, "REPLICATION", "NOREPLICATION"),
        (bypassrls, "BYPASSRLS", "NOBYPASSRLS"),
    ]
    .into_iter()
    .filter(|(set, _, _)| *set)
    .map(|(_, what, fix)| (what, fix))
    .collect();
    if !privileged.is_empty() {
        return Err(RoleError::Privileged {
            role: role.to_string(),
            what: privileged
                .iter()
                .map(|(w, _)| *w)
                .collect::<Vec<_>>()
                .join(", "),
            fix: privileged
                .iter()
                .map(|(_, f)| *f)
                .collect::<Vec<_>>()
                .join(" "),
        });
    }
    let memberships: Vec<String> = sqlx::query_scalar(
        "SELECT g.rolname::text FROM pg_auth_members m
           JOIN pg_roles g ON g.oid = m.roleid
           JOIN pg_roles r ON r.oid = m.member
          WHERE r.rolname = $1 ORDER BY 1",
    )
    .bind(role)
    .fetch_all(&mut *conn)
    .await?;
    if !memberships.is_empty() {
        return Err(RoleError::Member {
            role: role.to_string(),
            roles: memberships.join(", "),
        });
    }
    if inherit || !login {
        // A role from an earlier release of the host (NOLOGIN); bring it to the current shape.
        sqlx::query(&format!("ALTER ROLE {r} LOGIN NOINHERIT"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(Some(true))
}

async fn set_new_secret(
    conn: &mut PgConnection,
    role: &str,
    replica_set: &str,
    projection: &str,
) -> Result<String, sqlx::Error> {
    let secret = random_secret();
    sqlx::query(&format!(
        "ALTER ROLE {} PASSWORD {}",
        quote_ident(role),
        quote_literal(&scram_verifier(&secret))
    ))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO projection_host.projection_roles (role_name, replica_set, projection, secret, rotated_at)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (role_name) DO UPDATE SET secret = EXCLUDED.secret, rotated_at = now()",
    )
    .bind(role)
    .bind(replica_set)
    .bind(projection)
    .bind(&secret)
    .execute(&mut *conn)
    .await?;
    Ok(secret)
}

/// The schema a plugin names must be its own: new, or already the projection's. An existing
/// schema of anyone else (another projection's, an application's, the host's) is never handed
/// over, since its tables (and any trigger on them) would then be the plugin's.
async fn check_schema(
    conn: &mut PgConnection,
    schema: &str,
    role: &str,
    replica_set: &str,
    projection: &str,
    database_hash: &str,
) -> Result<(), RoleError> {
    if schema.starts_with("pg_")
        || schema.starts_with("projection_host")
        || schema == "public"
        || schema == "information_schema"
    {
        return Err(RoleError::Reserved {
            schema: schema.to_string(),
        });
    }
    let named_after_role: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(schema)
            .fetch_one(&mut *conn)
            .await?;
    if named_after_role {
        return Err(RoleError::NamedAfterRole {
            schema: schema.to_string(),
        });
    }
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
    )
    .bind(schema)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(owner) = owner else { return Ok(()) };
    if owner == role {
        return Ok(());
    }
    // Schemas of earlier releases: owned by the role of the old naming, or by the host's own
    // user, and only when this projection already committed batches there.
    let legacy_role = format!("ph_{projection}_{database_hash}");
    let host_user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *conn)
        .await?;
    if owner == legacy_role || owner == host_user {
        let ran_here = crate::store::checkpoints::committed_into_schema(
            &mut *conn,
            replica_set,
            projection,
            schema,
        )
        .await?;
        if ran_here {
            return Ok(());
        }
    }
    // Another replica set's role: say which set, and how two sets share a database.
    let holder: Option<(String, String)> = sqlx::query_as(
        "SELECT replica_set, projection FROM projection_host.projection_roles WHERE role_name = $1",
    )
    .bind(&owner)
    .fetch_optional(&mut *conn)
    .await?;
    let (held_by, fix) = match holder {
        Some((set, other)) => (
            format!(" (projection {other} of replica set {set})"),
            format!(
                "Replica set {replica_set} writes a schema of its own (see `projection-host status \
                 --replica-set {replica_set}`); if {set} is gone, remove it with `projection-host \
                 replica-sets remove {set} --yes`"
            ),
        ),
        None => (
            String::new(),
            "Rename the projection, or drop the schema if it is a leftover".to_string(),
        ),
    };
    Err(RoleError::SchemaTaken {
        schema: schema.to_string(),
        owner,
        held_by,
        fix,
    })
}

/// Creates the schema for the role, gives it (and relations made before the role owned it) to
/// the role, and closes it to everyone else.
async fn give_schema(conn: &mut PgConnection, schema: &str, role: &str) -> Result<(), sqlx::Error> {
    let (s, r) = (quote_ident(schema), quote_ident(role));
    for statement in [
        format!("CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION {r}"),
        format!("ALTER SCHEMA {s} OWNER TO {r}"),
        format!("REVOKE ALL ON SCHEMA {s} FROM PUBLIC"),
    ] {
        sqlx::query(&statement).execute(&mut *conn).await?;
    }
    let foreign: Vec<(String, String)> = sqlx::query_as(
        "SELECT quote_ident(c.relname), CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                       WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
            AND pg_get_userbyid(c.relowner) <> $2",
    )
    .bind(schema)
    .bind(role)
    .fetch_all(&mut *conn)
    .await?;
    for (relation, kind) in foreign {
        sqlx::query(&format!("ALTER {kind} {s}.{relation} OWNER TO {r}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// What the role can reach beyond its schema through grants to PUBLIC, which the host cannot
/// take from one role alone. Reported at every setup, with the statement that closes it.
async fn report_public_reach(pool: &PgPool, role: &str, schema: &str) {
    let found: Result<Vec<(String, String)>, sqlx::Error> = sqlx::query_as(
        "SELECT 'create objects in schema ' || quote_ident(n.nspname),
                'REVOKE CREATE ON SCHEMA ' || quote_ident(n.nspname) || ' FROM PUBLIC'
           FROM pg_namespace n
          WHERE n.nspname <> $2 AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'
            AND has_schema_privilege($1, n.oid, 'CREATE')
         UNION ALL
         SELECT 'create schemas in this database', 'REVOKE CREATE ON DATABASE ' || quote_ident(current_database()) || ' FROM PUBLIC'
          WHERE has_database_privilege($1, current_database(), 'CREATE')
         UNION ALL
         SELECT 'read ' || c.oid::regclass::text, 'REVOKE SELECT ON ' || c.oid::regclass::text || ' FROM PUBLIC'
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p', 'v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', $2)
            AND n.nspname NOT LIKE 'pg\\_toast%'
            AND has_table_privilege($1, c.oid, 'SELECT')",
    )
    .bind(role)
    .bind(schema)
    .fetch_all(pool)
    .await;
    match found {
        Ok(reach) => {
            for (what, fix) in reach {
                tracing::error!(
                    role,
                    "the projection's role can {what} through a grant to PUBLIC, so its plugin's SQL can too; close it with: {fix}"
                );
            }
        }
        Err(e) => {
            tracing::warn!(role, error = %e, "could not check what the projection's role can reach")
        }
    }
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, RFC 7677), so that
/// the secret itself never appears in a statement the server might log.
pub fn scram_verifier(password: &str) -> String {
    scram_verifier_with_salt(password, &rand::random::<[u8; 16]>())
}

fn scram_verifier_with_salt(password: &str, salt: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    type HmacSha256 = Hmac<Sha256>;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, SCRAM_ITERATIONS, &mut salted);
    let hmac = |key: &[u8], data: &[u8]| {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(data);
        mac.finalize().into_bytes()
    };
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${SCRAM_ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_fit_postgres_and_differ_per_database_and_replica_set() {
        let long = "a".repeat(48);
        let name = role_name("events", "default", &long);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(
            role_name("db1", "default", "orders"),
            role_name("db2", "default", "orders")
        );
        assert_ne!(
            role_name("db", "staging", "orders"),
            role_name("db", "production", "orders")
        );
        assert!(role_name("db", "default", "orders").starts_with("ph_orders_"));
    }

    #[test]
    fn the_scram_verifier_matches_the_rfc_7677_example() {
        // RFC 7677 section 3: user "user", password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ==".
        let salt = base64::engine::general_purpose::STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap();
        let verifier = scram_verifier_with_salt("pencil", &salt);
        // StoredKey and ServerKey computed independently (Python's hashlib and hmac).
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        let keys = verifier.rsplit('$').next().unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        assert_eq!(stored, "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=");
        assert_eq!(server, "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=");
    }

    #[test]
    fn secrets_are_random_and_long() {
        let (a, b) = (random_secret(), random_secret());
        assert_ne!(a, b);
        assert!(a.len() >= 40);
    }
}
