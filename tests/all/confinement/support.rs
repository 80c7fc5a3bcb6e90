//! Shared pieces of the confinement tests.

use std::collections::BTreeMap;

use crate::support::TestDb;

/// One attack: an aggregate id (its name) and the steps of the hostile guest.
pub struct Attack {
    pub name: &'static str,
    pub steps: serde_json::Value,
}

pub async fn append_attacks(db: &TestDb, attacks: &[Attack]) {
    for attack in attacks {
        db.append(
            "Hostile",
            attack.name,
            "Attack",
            serde_json::json!({ "steps": attack.steps }),
        )
        .await;
    }
}

/// The dead-letter errors of the hostile projection, by attack name.
pub async fn parked(db: &TestDb) -> BTreeMap<String, String> {
    sqlx::query_as::<_, (String, String)>(
        "SELECT aggregate_id, error FROM projection_host.dead_letters WHERE projection = 'hostile'",
    )
    .fetch_all(&db.pool)
    .await
    .or_else(|e| match &e {
        // The host has not created its tables yet.
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        _ => Err(e),
    })
    .expect("reading the dead letters")
    .into_iter()
    .collect()
}

/// Positions the hostile projection applied (committed).
pub async fn applied(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT e.aggregate_id FROM hostile.applied a JOIN public.events e ON e.global_position = a.position ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap_or_default()
}

/// The hostile projection's role.
pub async fn hostile_role(db: &TestDb) -> String {
    sqlx::query_scalar(
        "SELECT role_name FROM projection_host.projection_roles WHERE projection = 'hostile'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Everything outside the hostile projection's schema that no batch should change: roles,
/// schemas, relations and functions of other schemas, event triggers, large objects.
pub async fn outside_state(db: &TestDb) -> String {
    let rows: Vec<(String,)> = sqlx::query_as(
        "WITH mine AS (
             SELECT oid, rolname FROM pg_roles
              WHERE shobj_description(oid, 'pg_authid') LIKE '%in database ' || $1 OR rolname = 'host_' || $1)
         SELECT concat_ws('|', 'role', r.rolname, rolsuper, rolcreaterole, rolcanlogin, rolinherit, rolbypassrls)
           FROM pg_roles r JOIN mine USING (oid)
         UNION ALL SELECT concat_ws('|', 'member', roleid::regrole::text, member::regrole::text)
           FROM pg_auth_members WHERE member IN (SELECT oid FROM mine) OR roleid IN (SELECT oid FROM mine)
         UNION ALL SELECT concat_ws('|', 'schema', nspname, pg_get_userbyid(nspowner), nspacl::text) FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_temp%' AND nspname NOT LIKE 'pg\\_toast\\_temp%'
         UNION ALL SELECT concat_ws('|', 'relation', n.nspname, c.relname, pg_get_userbyid(c.relowner), c.relacl::text)
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname NOT IN ('hostile', 'pg_catalog', 'information_schema', 'pg_toast') AND c.relpersistence <> 't'
         UNION ALL SELECT concat_ws('|', 'function', n.nspname, p.proname, pg_get_userbyid(p.proowner))
                     FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE n.nspname NOT IN ('hostile', 'pg_catalog', 'information_schema')
         UNION ALL SELECT concat_ws('|', 'event trigger', evtname) FROM pg_event_trigger
         UNION ALL SELECT concat_ws('|', 'large object', oid) FROM pg_largeobject_metadata
         ORDER BY 1",
    )
    .bind(&db.name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(r,)| r)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Peak resident memory of a running process, in bytes.
pub fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap()
}

/// Events bank_balances has applied (0 before its table exists).
pub async fn bank_events(db: &TestDb) -> i64 {
    db.scalar_i64_or_zero("SELECT sum(event_count)::int8 FROM bank_balances.account_balances")
        .await
}

/// Attack events the hostile projection has dealt with: parked or applied.
pub async fn handled(db: &TestDb) -> usize {
    parked(db).await.len() + applied(db).await.len()
}
