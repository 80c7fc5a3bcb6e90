//! The projection's own database session, in which its batches run.
//!
//! The host logs in as the projection's role (`sink::role`) for everything a batch does: the
//! plugin's SQL, the flush of its keyed writes, and the host's bookkeeping through
//! `projection_host_api`. So nothing the plugin leaves on a session (temporary tables, prepared
//! statements, settings, cursors) reaches any other projection or the host's own sessions. What
//! does reach beyond a session is released after every batch, committed or not: session-level
//! advisory locks (whose keys other applications use) and LISTEN registrations. A batch in
//! which the plugin ran its own SQL is followed by a full reset of the session.
//!
//! A statement the host abandons (a call past its deadline, an oversized result, a task that is
//! dropped) is ended on the server by terminating its backend, not left running.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row};

use super::role::{self, RoleCredentials};
use crate::base::sqlstate;
use crate::db::{quote_ident, quote_literal};

/// Connections per projection and host: a batch and, rarely, a setup or replay.
const SESSIONS: u32 = 2;

/// What every batch transaction is started with.
#[derive(Debug, Clone)]
pub struct TxSettings {
    /// The projection's schema: its unqualified names resolve there.
    pub schema: String,
    pub statement_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Sessions of one projection on this host.
pub struct ProjectionSession {
    pool: PgPool,
    /// The host's own pool: ends abandoned backends, re-reads a rotated secret.
    host: PgPool,
    base: PgConnectOptions,
    credentials: Option<RoleCredentials>,
    replica_set: String,
    projection: String,
}

impl ProjectionSession {
    /// Sessions that log in with `credentials` (the host's own login when `None`:
    /// `SQL_ISOLATION=none`). No connection is opened until the first batch.
    pub fn new(
        base: PgConnectOptions,
        host: PgPool,
        credentials: Option<RoleCredentials>,
        replica_set: &str,
        projection: &str,
    ) -> ProjectionSession {
        let base = base
            // A backend whose host died mid-statement notices within seconds.
            .options([("client_connection_check_interval", "2000")]);
        let pool = PgPoolOptions::new()
            .max_connections(SESSIONS)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(Duration::from_secs(300))
            .test_before_acquire(false)
            .connect_lazy_with(login(&base, credentials.as_ref()));
        ProjectionSession {
            pool,
            host,
            base,
            credentials,
            replica_set: replica_set.to_string(),
            projection: projection.to_string(),
        }
    }

    /// The role the plugin's SQL runs as (`None`: the host's own).
    pub fn role(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.name.as_str())
    }

    /// Starts a batch transaction.
    pub async fn begin(&mut self, settings: &TxSettings) -> Result<BatchTx, sqlx::Error> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "BEGIN; SELECT pg_catalog.pg_backend_pid(),
                    pg_catalog.set_config('search_path', {}, true),
                    pg_catalog.set_config('statement_timeout', '{}', true),
                    pg_catalog.set_config('idle_in_transaction_session_timeout', '{}', true),
                    pg_catalog.set_config('synchronous_commit', 'off', true)",
            quote_literal(&quote_ident(&settings.schema)),
            settings.statement_timeout.as_millis().max(1),
            settings.idle_timeout.as_millis().max(1),
        );
        // A plain `&str` runs as one simple-protocol query: BEGIN and the settings in one
        // round trip.
        let rows = match sqlx::Executor::fetch_all(&mut *conn, sql.as_str()).await {
            Ok(rows) => rows,
            Err(e) => {
                // The session is in an unknown state; never reuse it.
                drop(conn.detach());
                return Err(e);
            }
        };
        let pid: i32 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or_default();
        Ok(BatchTx {
            conn: Some(conn),
            pid,
            dirty: false,
            poisoned: false,
            host: self.host.clone(),
        })
    }

    /// A connection, logging in again with a fresh secret if the stored one was replaced (by
    /// another host's rotation) or the password was changed behind the host's back.
    async fn acquire(&mut self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        match self.pool.acquire().await {
            Err(e) if is_auth_failure(&e) && self.credentials.is_some() => {
                self.refresh_credentials().await?;
                self.pool.acquire().await
            }
            other => other,
        }
    }

    async fn refresh_credentials(&mut self) -> Result<(), sqlx::Error> {
        let Some(current) = self.credentials.clone() else {
            return Ok(());
        };
        let stored = role::stored_secret(&self.host, &current.name).await?;
        let fresh = match stored {
            Some(secret) if secret != current.secret => RoleCredentials {
                name: current.name.clone(),
                secret,
            },
            _ => {
                tracing::error!(
                    role = %current.name,
                    projection = %self.projection,
                    "the projection's role no longer accepts the host's secret: its password was changed outside the host \
                     (a plugin's SQL may change its own role's password); setting a new one. Restrict logins of ph_* roles \
                     to the host's network in pg_hba.conf"
                );
                role::rotate(
                    &self.host,
                    &self.replica_set,
                    &self.projection,
                    &current.name,
                )
                .await
                .map_err(|e| match e {
                    role::RoleError::Sql(e) => e,
                    other => sqlx::Error::Configuration(other.to_string().into()),
                })?
            }
        };
        self.pool
            .set_connect_options(login(&self.base, Some(&fresh)));
        self.credentials = Some(fresh);
        Ok(())
    }
}

fn login(base: &PgConnectOptions, credentials: Option<&RoleCredentials>) -> PgConnectOptions {
    match credentials {
        Some(c) => base.clone().username(&c.name).password(&c.secret),
        None => base.clone(),
    }
}

fn is_auth_failure(error: &sqlx::Error) -> bool {
    sqlstate::of(error)
        .is_some_and(|c| c == sqlstate::INVALID_PASSWORD || c == sqlstate::INVALID_AUTHORIZATION)
}

/// One batch transaction on a projection session. Ends with [`commit`](BatchTx::commit),
/// [`rollback`](BatchTx::rollback) or [`abandon`](BatchTx::abandon); dropped unfinished, it
/// ends its backend.
pub struct BatchTx {
    conn: Option<PoolConnection<Postgres>>,
    pid: i32,
    dirty: bool,
    poisoned: bool,
    host: PgPool,
}

/// Releases what outlives a transaction on the session and may reach others.
const RELEASE: &str = "SELECT pg_catalog.pg_advisory_unlock_all(); UNLISTEN *";

/// Returns the session to the state a fresh login has (after a batch that ran plugin SQL).
const RESET: &str =
    "RESET ALL; DEALLOCATE ALL; CLOSE ALL; DISCARD TEMP; DISCARD SEQUENCES; DISCARD PLANS; \
                     SELECT pg_catalog.pg_advisory_unlock_all(); UNLISTEN *";

impl BatchTx {
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("a batch transaction holds its connection until it ends")
    }

    /// The plugin ran its own SQL: reset the session after this transaction.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// The connection is mid-result or otherwise unknown: end it instead of reusing it.
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Ends the plugin's part of the transaction before the host's bookkeeping: deferred
    /// constraint triggers fire now (not at COMMIT, after the host's row locks are taken),
    /// cursors are closed (a WITH HOLD cursor would run its query at COMMIT), a large object
    /// kept by the session refuses the batch, and the settings that bound the host's own
    /// statements (and keep their parameters out of the server log) are pinned again.
    pub async fn seal(&mut self, statement_timeout: Duration) -> Result<(), sqlx::Error> {
        let sql = format!(
            "SET CONSTRAINTS ALL IMMEDIATE; CLOSE ALL;
             SELECT pg_catalog.set_config('statement_timeout', '{}', true),
                    pg_catalog.set_config('lock_timeout', '0', true),
                    pg_catalog.set_config('log_parameter_max_length_on_error', '0', true),
                    pg_catalog.set_config('debug_print_plan', 'off', true),
                    pg_catalog.set_config('debug_print_parse', 'off', true),
                    pg_catalog.set_config('debug_print_rewritten', 'off', true),
                    pg_catalog.set_config('search_path', 'pg_catalog', true)",
            statement_timeout.as_millis().max(1)
        );
        sqlx::Executor::execute(self.conn(), sql.as_str()).await?;
        Ok(())
    }

    /// Refuses a session that keeps large objects (they live outside every schema) or row-level
    /// security on its tables (policies run as every reader); for setup, whose commit does not
    /// pass through the host's batch functions, which check the same.
    pub async fn refuse_large_objects(&mut self) -> Result<(), sqlx::Error> {
        let (kept, secured): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_largeobject_metadata m
                       JOIN pg_catalog.pg_roles r ON r.oid = m.lomowner WHERE r.rolname = session_user),
                    (SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid = c.relowner
                      WHERE r.rolname = session_user
                        AND (c.relrowsecurity OR c.relforcerowsecurity
                             OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = c.oid)))",
        )
        .persistent(false)
        .fetch_one(self.conn())
        .await?;
        if kept > 0 {
            return Err(sqlx::Error::Protocol(format!(
                "the projection's session created {kept} large objects, which live outside its schema; they are not allowed"
            )));
        }
        if secured > 0 {
            return Err(sqlx::Error::Protocol(format!(
                "the projection put row-level security on {secured} of its tables, whose policies would run as every reader; it is not allowed"
            )));
        }
        Ok(())
    }

    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if self.poisoned {
            self.abandon().await;
            return Err(sqlx::Error::Protocol(
                "the batch's session was abandoned".into(),
            ));
        }
        let sql = format!("COMMIT; {RELEASE}");
        let result = sqlx::Executor::execute(self.conn(), sql.as_str()).await;
        match result {
            Ok(_) => {
                self.finish().await;
                Ok(())
            }
            Err(e) => {
                self.rollback_quietly().await;
                Err(e)
            }
        }
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        self.rollback_quietly().await;
        Ok(())
    }

    async fn rollback_quietly(&mut self) {
        if self.poisoned {
            self.end_backend().await;
            return;
        }
        let sql = format!("ROLLBACK; {RELEASE}");
        let rolled_back = sqlx::Executor::execute(self.conn(), sql.as_str()).await;
        match rolled_back {
            Ok(_) => self.finish().await,
            Err(_) => self.end_backend().await,
        }
    }

    /// Ends the backend (cancelling whatever it runs) and drops the connection.
    pub async fn abandon(mut self) {
        self.end_backend().await;
    }

    async fn end_backend(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
        terminate(&self.host, self.pid).await;
    }

    /// Back to the pool, reset first if the plugin ran its own SQL.
    async fn finish(&mut self) {
        if self.dirty {
            let conn = self.conn();
            let reset = async {
                sqlx::Executor::execute(&mut *conn, RESET).await?;
                // DEALLOCATE ALL dropped sqlx's prepared statements too.
                conn.clear_cached_statements().await
            }
            .await;
            if let Err(e) = reset {
                tracing::debug!(error = %e, "resetting a projection session failed; closing it");
                self.end_backend().await;
                return;
            }
        }
        self.conn.take();
    }
}

impl Drop for BatchTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Unfinished (its task was cancelled): the backend may still run a statement or
            // hold locks. Close the socket and end the backend.
            drop(conn.detach());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (host, pid) = (self.host.clone(), self.pid);
                runtime.spawn(async move { terminate(&host, pid).await });
            }
        }
    }
}

async fn terminate(host: &PgPool, pid: i32) {
    if pid == 0 {
        return;
    }
    if let Err(e) = sqlx::query("SELECT pg_catalog.pg_terminate_backend($1)")
        .bind(pid)
        .execute(host)
        .await
    {
        tracing::warn!(pid, error = %e, "could not end an abandoned projection session on the server");
    }
}
