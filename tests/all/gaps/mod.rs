//! Gap-safe reading: no committed event is ever skipped, whatever the commit order; holes left
//! by writers that never commit are passed once proven final, and recorded.

mod holes;
mod late_commit;
mod stress;
mod wakeup;

use sqlx::{Postgres, Transaction};

/// Inserts W1 events g = from..=to (amounts and accounts as in bench/README.md) inside `tx`,
/// returning their positions.
pub async fn insert_w1(
    tx: &mut Transaction<'static, Postgres>,
    from: i64,
    to: i64,
    k: i64,
) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version,
                             event_id, event_type, event_version, payload, metadata, created_at)
         SELECT 'Bank', 'Account', 'acct-' || (g % $3), (g / $3) + 1,
                md5('w1-event-' || g)::uuid,
                CASE WHEN g % 10 < 7 THEN 'Deposited' ELSE 'Withdrawn' END, 1,
                convert_to('{\"amount\":' || (1 + (g * 7919) % 1000) || '}', 'UTF8'),
                '{}'::jsonb, now()
           FROM generate_series($1::int8, $2::int8) AS g ORDER BY g
         RETURNING global_position",
    )
    .bind(from)
    .bind(to)
    .bind(k)
    .fetch_all(&mut **tx)
    .await
    .unwrap()
}

/// Host arguments with every timeout far below how long the tests hold transactions open.
pub const QUICK: [&str; 10] = [
    "--poll-interval",
    "200ms",
    "--plugin-call-timeout",
    "1s",
    "--heartbeat-interval",
    "200ms",
    "--stale-worker-timeout",
    "1s",
    "--shutdown-timeout",
    "1s",
];
