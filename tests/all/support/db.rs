//! A fresh database per test on the test server, with the pupsourcing schema.

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

async fn admin() -> PgConnection {
    let options: sqlx::postgres::PgConnectOptions =
        server_url().parse().expect("a valid TEST_DATABASE_URL");
    PgConnection::connect_with(&options.disable_statement_logging())
        .await
        .expect("the test PostgreSQL server must be reachable (set TEST_DATABASE_URL)")
}

impl TestDb {
    /// Creates `t_<label>_<random>` with the events table of the pupsourcing layout.
    pub async fn new(label: &str) -> TestDb {
        let name = format!("t_{label}_{:08x}", rand::random::<u32>());
        let mut admin = admin().await;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        let mut url = url::Url::parse(&server_url()).unwrap();
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.disable_statement_logging())
            .await
            .unwrap();
        sqlx::raw_sql(include_str!("../../../bench/w1/w1-schema.sql"))
            .execute(&pool)
            .await
            .unwrap();
        TestDb { name, url, pool }
    }

    /// Appends W1 events g = from..=to over k accounts, in one transaction.
    pub async fn append_w1(&self, from: u64, to: u64, k: u64) {
        append_w1(&self.pool, from, to, k).await;
    }

    /// Appends one event with a JSON payload, committed at once; returns its position.
    pub async fn append(
        &self,
        context: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, event_id, event_type, payload)
             VALUES ($1, 'Test', $2,
                     (SELECT coalesce(max(aggregate_version), 0) + 1 FROM events WHERE bounded_context = $1 AND aggregate_type = 'Test' AND aggregate_id = $2),
                     gen_random_uuid(), $3, convert_to($4, 'UTF8'))
             RETURNING global_position",
        )
        .bind(context)
        .bind(aggregate_id)
        .bind(event_type)
        .bind(payload.to_string())
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn check_w1(&self) -> projection_host::bench::Check {
        projection_host::bench::check_w1(&self.url, "bank_balances")
            .await
            .unwrap()
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    /// Like `scalar_i64`, but 0 while the host has not created its tables yet.
    pub async fn scalar_i64_or_zero(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(sql)
            .fetch_one(&self.pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Lowest checkpoint of a projection over all partitions (0 when none was written, or the
    /// host has not created its tables yet).
    pub async fn lowest_checkpoint(&self, projection: &str) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(
            // A partition without a checkpoint row has applied nothing: it counts as 0.
            "SELECT CASE WHEN count(*) < max(r.partitions) THEN 0 ELSE min(c.position) END
               FROM projection_host.checkpoints c
               JOIN projection_host.replica_sets r ON r.name = c.replica_set
              WHERE c.projection = $1",
        )
        .bind(projection)
        .fetch_one(&self.pool)
        .await
        .unwrap_or(None)
        .unwrap_or(0)
    }

    /// Highest checkpoint of any projection (0 as above).
    pub async fn highest_checkpoint(&self) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT max(position) FROM projection_host.checkpoints",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap_or(None)
        .unwrap_or(0)
    }

    /// A login role with exactly the grants `docs/operations.md` lists for the host (no
    /// superuser), and the URL of this database as that role.
    pub async fn least_privilege_host(&self) -> (String, String) {
        let role = format!("host_{}", self.name);
        let statements = [
            format!("CREATE ROLE \"{role}\" LOGIN CREATEROLE"),
            format!("GRANT CONNECT, CREATE ON DATABASE \"{}\" TO \"{role}\"; GRANT pg_signal_backend TO \"{role}\"", self.name),
            format!("GRANT USAGE ON SCHEMA public TO \"{role}\""),
            format!("GRANT SELECT ON public.events TO \"{role}\""),
        ];
        let mut admin = admin().await;
        sqlx::query(&statements[0])
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::raw_sql(&statements[1])
            .execute(&mut admin)
            .await
            .unwrap();
        for statement in &statements[2..] {
            sqlx::query(statement).execute(&self.pool).await.unwrap();
        }
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_username(&role).unwrap();
        url.set_password(None).unwrap();
        (role, url.to_string())
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        let mut admin = admin().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await;
        // Roles are per cluster: the projections' roles, a test host role and a test reader
        // role of this database.
        let roles: Vec<String> = sqlx::query_scalar(
            "SELECT r.rolname::text FROM pg_roles r
              WHERE shobj_description(r.oid, 'pg_authid') LIKE '%in database ' || $1
                 OR r.rolname = 'host_' || $1 OR r.rolname = 'reader_' || $1
              ORDER BY (r.rolname = 'host_' || $1)",
        )
        .bind(&self.name)
        .fetch_all(&mut admin)
        .await
        .unwrap_or_default();
        for role in roles {
            let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{role}\""))
                .execute(&mut admin)
                .await;
        }
    }
}

/// Creates the W1 events table in a database of its own (a private server's, say).
pub async fn create_w1_schema(pool: &PgPool) {
    sqlx::raw_sql(include_str!("../../../bench/w1/w1-schema.sql"))
        .execute(pool)
        .await
        .unwrap();
}

/// Appends W1 events g = from..=to over k accounts to `pool`'s database, in one transaction.
pub async fn append_w1(pool: &PgPool, from: u64, to: u64, k: u64) {
    let sql = include_str!("../../../bench/w1/w1-append.sql")
        .replace(":from", &from.to_string())
        .replace(":to", &to.to_string())
        .replace(":k", &k.to_string());
    sqlx::raw_sql(&sql).execute(pool).await.unwrap();
}
