//! The attack corpus: escalation (nested comments, dynamic SQL through functions, `set_config`,
//! `SECURITY DEFINER`, catalog secrets, server programs and files, forged checkpoints, large
//! objects, event triggers, role grants) and session state that must not outlive a batch
//! (temporary tables shadowing `events`, advisory locks, `DEALLOCATE`, settings, LISTEN,
//! cursors, hijacked statement names). Run with the host as the least-privilege role of
//! docs/operations.md and, to show the boundary does not depend on it, as a superuser.

use std::time::Duration;

use serde_json::json;

use super::support::{append_attacks, applied, hostile_role, outside_state, parked, Attack};
use crate::support::{eventually, Host, TestDb};

/// (attack, what the failure must say): each of these must fail and change nothing.
fn escalations(host_role: &str, db: &str) -> Vec<(Attack, &'static str)> {
    let steal = "UPDATE projection_host.checkpoints SET position = 0";
    vec![
        (
            Attack {
                name: "reset_role",
                steps: json!([
            {"execute": "RESET ROLE"},
            {"execute": "INSERT INTO bank_balances.account_balances VALUES ('stolen', 1, 1, 1)"}]),
            },
            "permission denied for schema bank_balances",
        ),
        (
            Attack {
                name: "nested_comment",
                steps: json!([
            {"execute": "/* /* */ SELECT 1 */ RESET ROLE"},
            {"execute": steal}]),
            },
            "permission denied for schema projection_host",
        ),
        (
            Attack {
                name: "set_config_role",
                steps: json!([
            {"query": format!("SELECT set_config('role', '{host_role}', false)")}]),
            },
            "permission denied to set role",
        ),
        (
            Attack {
                name: "set_config_superuser",
                steps: json!([
            {"query": "SELECT set_config('role', 'postgres', false)"}]),
            },
            "permission denied to set role",
        ),
        (
            Attack {
                name: "set_role",
                steps: json!([
            {"execute": format!("SET ROLE \"{host_role}\"")}]),
            },
            "permission denied to set role",
        ),
        (
            Attack {
                name: "session_authorization",
                steps: json!([
            {"execute": "SET SESSION AUTHORIZATION postgres"}]),
            },
            "permission denied to set session authorization",
        ),
        (
            Attack {
                name: "do_block",
                steps: json!([
            {"execute": format!("DO $$ BEGIN EXECUTE 'RESET ROLE'; EXECUTE '{steal}'; END $$")}]),
            },
            "permission denied for schema projection_host",
        ),
        (
            Attack {
                name: "query_to_xml",
                steps: json!([
            {"keep": "SELECT query_to_xml('SELECT rolname, rolpassword FROM pg_authid', true, true, '')::text"}]),
            },
            "permission denied for table pg_authid",
        ),
        (
            Attack {
                name: "security_definer",
                steps: json!([
            {"execute": format!("CREATE OR REPLACE FUNCTION hostile.steal() RETURNS void SECURITY DEFINER LANGUAGE plpgsql AS $$ BEGIN {steal}; END $$")},
            {"query": "SELECT hostile.steal()"}]),
            },
            "permission denied for schema projection_host",
        ),
        (
            Attack {
                name: "execute_in_function",
                steps: json!([
            {"execute": "CREATE OR REPLACE FUNCTION hostile.run(q text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE q; END $$"},
            {"query": format!("SELECT hostile.run('SET ROLE \"{host_role}\"')")}]),
            },
            "permission denied to set role",
        ),
        (
            Attack {
                name: "copy_program",
                steps: json!([
            {"execute": format!("COPY (SELECT 1) TO PROGRAM 'touch /tmp/ph_pwned_{db}'")}]),
            },
            "pg_execute_server_program",
        ),
        (
            Attack {
                name: "read_file",
                steps: json!([
            {"keep": "SELECT pg_read_file('/etc/passwd')"}]),
            },
            "permission denied for function pg_read_file",
        ),
        (
            Attack {
                name: "lo_import",
                steps: json!([
            {"query": "SELECT lo_import('/etc/passwd')"}]),
            },
            "permission denied for function lo_import",
        ),
        (
            Attack {
                name: "read_events",
                steps: json!([
            {"keep": "SELECT aggregate_id FROM public.events"}]),
            },
            "permission denied for table events",
        ),
        (
            Attack {
                name: "read_other_projection",
                steps: json!([
            {"keep": "SELECT account_id FROM bank_balances.account_balances"}]),
            },
            "permission denied for schema bank_balances",
        ),
        (
            Attack {
                name: "read_host_tables",
                steps: json!([
            {"keep": "SELECT secret FROM projection_host.projection_roles"}]),
            },
            "permission denied for schema projection_host",
        ),
        (
            Attack {
                name: "forged_checkpoint",
                steps: json!([
            {"query": "SELECT * FROM projection_host_api.commit_batch('default', 'worker', 'guessed', 'bank_balances', ARRAY[0], ARRAY[1::bigint], 0, 999999999, 1, 'v', 'x', 0)"}]),
            },
            "only the projection host may record batches",
        ),
        (
            Attack {
                name: "forged_dead_letter",
                steps: json!([
            {"query": "SELECT projection_host_api.unpark_dead_letters('default', 'worker', 'guessed', 'bank_balances', ARRAY[1::bigint])"}]),
            },
            "only the projection host may record batches",
        ),
        (
            Attack {
                name: "large_object",
                steps: json!([
            {"query": "SELECT lo_create(0)::text"}]),
            },
            "large objects",
        ),
        (
            Attack {
                name: "row_level_security_trap",
                steps: json!([
            {"execute": "CREATE TABLE IF NOT EXISTS hostile.trap (x int)"},
            {"execute": "ALTER TABLE hostile.trap ENABLE ROW LEVEL SECURITY"},
            {"execute": "CREATE POLICY trap ON hostile.trap USING (pg_catalog.pg_reload_conf())"}]),
            },
            "row-level security",
        ),
        (
            Attack {
                name: "event_trigger",
                steps: json!([
            {"execute": "CREATE OR REPLACE FUNCTION hostile.et() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$"},
            {"execute": "CREATE EVENT TRIGGER hostile_et ON ddl_command_start EXECUTE FUNCTION hostile.et()"}]),
            },
            "permission denied to create event trigger",
        ),
        (
            Attack {
                name: "grant_role",
                steps: json!([
            {"execute": format!("GRANT \"{host_role}\" TO CURRENT_USER")}]),
            },
            "SQLSTATE 42501",
        ),
        (
            Attack {
                name: "alter_role",
                steps: json!([
            {"execute": "ALTER ROLE CURRENT_USER CREATEROLE"}]),
            },
            "SQLSTATE 42501",
        ),
        (
            Attack {
                name: "create_schema",
                steps: json!([
            {"execute": "CREATE SCHEMA evil"}]),
            },
            "permission denied for database",
        ),
        (
            Attack {
                name: "public_schema",
                steps: json!([
            {"execute": "CREATE FUNCTION public.unnest(integer[], bigint[]) RETURNS SETOF record LANGUAGE sql AS 'SELECT NULL::record'"}]),
            },
            "permission denied for schema public",
        ),
        (
            Attack {
                name: "terminate_host",
                steps: json!([
            {"query": format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{host_role}'")}]),
            },
            "SQLSTATE 42501",
        ),
    ]
}

/// Session state a batch may leave; each succeeds (its own session), and must reach no one.
fn session_state(db: &str) -> Vec<Attack> {
    let forged_events = "CREATE TEMP TABLE IF NOT EXISTS events (global_position bigint, bounded_context text, aggregate_type text, aggregate_id text, aggregate_version bigint, event_id uuid, event_type text, event_version int, payload bytea, metadata jsonb, trace_id text, correlation_id text, causation_id text, created_at timestamptz)";
    vec![
        Attack {
            name: "temp_events",
            steps: json!([
            {"execute": forged_events},
            {"execute": "INSERT INTO events SELECT g, 'Bank', 'Account', 'acct-0', 1000 + g, gen_random_uuid(), 'Deposited', 1, convert_to('{\"amount\":1000000}', 'UTF8'), NULL, NULL, NULL, NULL, now() FROM generate_series(1, 100) g"},
            {"execute": "CREATE TEMP TABLE IF NOT EXISTS account_balances (account_id text PRIMARY KEY, balance bigint, event_count bigint, last_position bigint)"}]),
        },
        Attack {
            name: "advisory_locks",
            steps: json!([
            {"query": "SELECT pg_advisory_lock(8100954414154756980)::text"},
            {"query": "SELECT pg_advisory_lock(42)::text"},
            {"query": "SELECT pg_advisory_lock(hashtext('projection_host.setup'), hashtext('bank_balances'))::text"}]),
        },
        // Breaks only its own session's prepared statements: its batch either succeeds or fails
        // as a plugin failure (not a retry loop), and the session is reset for the next one.
        Attack {
            name: "deallocate",
            steps: json!([
            {"execute": "DEALLOCATE ALL"},
            {"execute": "PREPARE sqlx_s_1 AS SELECT 1"},
            {"execute": "PREPARE sqlx_s_2 AS SELECT 2"},
            {"write_bytes": [1, 10]}]),
        },
        Attack {
            name: "settings",
            steps: json!([
            {"execute": "SET statement_timeout = 0"},
            {"execute": "SET search_path = hostile, public, pg_catalog"},
            {"execute": "SET default_transaction_read_only = on"},
            {"query": "UPDATE pg_settings SET setting = '0' WHERE name = 'idle_in_transaction_session_timeout'"}]),
        },
        Attack {
            name: "listen",
            steps: json!([
            {"execute": "LISTEN projection_host_coordination"},
            {"execute": format!("LISTEN ph_{db}")}]),
        },
        Attack {
            name: "cursor",
            steps: json!([
            {"execute": "DECLARE hostile_cursor CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 1000000) g"}]),
        },
        // Runs after all of the above, in later batches of the same sessions.
        Attack {
            name: "after",
            steps: json!([
            {"query": "SELECT 1"},
            {"execute": "INSERT INTO loot (what, data) VALUES ('after', 'fine')"}]),
        },
    ]
}

async fn run_corpus(label: &str, superuser_host: bool) {
    let db = TestDb::new(label).await;
    db.append_w1(0, 1999, 50).await;
    let (host_role, url) = if superuser_host {
        ("postgres".to_string(), db.url.clone())
    } else {
        db.least_privilege_host().await
    };
    let mut host = Host::run(
        label,
        &url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_HOSTILE,
            "--projection",
            "hostile:on_failure=dead-letter,max_retries=0",
            "--heartbeat-interval",
            "200ms",
            "--stale-worker-timeout",
            "2s",
        ],
    );
    // Both read models set up, and the W1 events applied, before the attacks start.
    eventually(
        "bank_balances to catch up",
        Duration::from_secs(90),
        || async { (super::support::bank_events(&db).await == 2000).then_some(()) },
    )
    .await;
    eventually("the hostile projection to be set up", Duration::from_secs(30), || async {
        (db.scalar_i64_or_zero("SELECT count(*) FROM projection_host.projection_roles WHERE projection = 'hostile'").await == 1)
            .then_some(())
    })
    .await;
    let before = outside_state(&db).await;

    let escalations = escalations(&host_role, &db.name);
    let state = session_state(&db.name);
    let mut attacks: Vec<Attack> = vec![Attack {
        name: "own_work",
        steps: json!([{"execute": "INSERT INTO loot (what, data) VALUES ('own', 'fine')"}]),
    }];
    attacks.extend(state);
    attacks.extend(escalations.iter().map(|(a, _)| Attack {
        name: a.name,
        steps: a.steps.clone(),
    }));
    append_attacks(&db, &attacks).await;
    // More W1 events after the attacks: projected exactly, through the same fleet.
    db.append_w1(2000, 2999, 50).await;
    let expected_failures = escalations.len();
    let started = std::time::Instant::now();
    while super::support::handled(&db).await < attacks.len() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not every attack was handled within 120s; parked {:#?}, applied {:?}; log:\n{}",
            parked(&db).await,
            applied(&db).await,
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let parked = parked(&db).await;
    let wrong: Vec<String> = escalations
        .iter()
        .filter_map(|(attack, expected)| match parked.get(attack.name) {
            None => Some(format!("{} was not refused", attack.name)),
            Some(error) if !error.contains(expected) => Some(format!(
                "{}: expected '{expected}' in: {error}",
                attack.name
            )),
            Some(_) => None,
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{}\n(parked: {parked:#?})",
        wrong.join("\n")
    );
    let deallocate_parked = match parked.get("deallocate") {
        Some(error) => {
            assert!(error.contains("prepared statement"), "{error}");
            1
        }
        None => 0,
    };
    assert_eq!(
        parked.len(),
        expected_failures + deallocate_parked,
        "only the escalations fail: {parked:#?}"
    );
    let applied = applied(&db).await;
    for name in [
        "own_work",
        "temp_events",
        "advisory_locks",
        "settings",
        "listen",
        "cursor",
        "after",
    ] {
        assert!(
            applied.iter().any(|a| a == name),
            "{name} was not applied: {applied:?}\n{parked:#?}"
        );
    }

    // Nothing outside the projection changed ...
    eventually(
        "bank_balances to apply the later events",
        Duration::from_secs(60),
        || async { (super::support::bank_events(&db).await == 3000).then_some(()) },
    )
    .await;
    let check = db.check_w1().await;
    assert!(check.exact(), "{check:?}");
    assert_eq!(
        outside_state(&db).await,
        before,
        "something outside the hostile schema changed"
    );
    assert!(!std::path::Path::new(&format!("/tmp/ph_pwned_{}", db.name)).exists());
    // ... and nothing from outside was copied in.
    let loot: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT what, data FROM hostile.loot ORDER BY what")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        loot,
        vec![
            ("after".to_string(), Some("fine".to_string())),
            ("own".to_string(), Some("fine".to_string()))
        ]
    );

    // No session state of the plugin's reaches past its batches: no advisory lock, LISTEN or
    // temporary table is left, while its sessions stay open for the next batch.
    let role = hostile_role(&db).await;
    let sessions = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await;
    assert!(
        sessions >= 1,
        "the projection's session is kept open between batches"
    );
    let advisory = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND a.usename = '{role}'"
        ))
        .await;
    assert_eq!(advisory, 0, "advisory locks outlived the batch");
    let temp = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM pg_class c WHERE c.relpersistence = 't' AND pg_get_userbyid(c.relowner) = '{role}'"
        ))
        .await;
    assert_eq!(temp, 0, "temporary tables outlived the batch");
    // `migrate` (which every joining host runs) is not blocked by anything the plugin took.
    let migrate = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(crate::support::host::BIN)
            .args(["migrate", "--database-url", &url])
            .output(),
    )
    .await
    .expect("migrate must not wait on a lock a plugin holds")
    .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(
        !host.log().contains("batch rolled back: database error"),
        "the host's own statements failed after the plugin's session changes:\n{}",
        host.log()
    );
    host.kill9();
    db.drop_db().await;
}

#[tokio::test]
async fn no_plugin_sql_acts_with_any_privilege_but_its_own() {
    run_corpus("corpus", false).await;
}

#[tokio::test]
async fn confinement_holds_when_the_host_itself_is_a_superuser() {
    run_corpus("corpus_su", true).await;
}
