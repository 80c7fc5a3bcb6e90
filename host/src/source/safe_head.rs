//! The safe head: the highest position below which every position is either a visible event or
//! a hole proven final. Readers never read past it, so no committed event is ever skipped.
//!
//! `global_position` comes from a sequence, so a position can become visible after a higher one
//! (its transaction commits later), and a rolled-back transaction leaves a hole forever. The
//! tracker scans positions in order and remembers every hole it sees. A hole is passed only
//! once it is proven final:
//!
//! 1. When the hole is first seen (a higher position is visible), the transaction that took it
//!    from the sequence has either ended or is still running. A pupsourcing append takes its
//!    position from the column default inside `INSERT`, and `INSERT` holds a `RowExclusiveLock`
//!    on the events table from before `nextval` until its transaction ends. So the tracker
//!    records the virtual transaction ids of every transaction holding a lock on the events
//!    table other than `AccessShareLock` (read in the same statement, after its snapshot).
//! 2. The hole becomes a candidate once none of those transactions is alive any more
//!    (`pg_locks` no longer lists them; PostgreSQL never reuses a virtual transaction id while
//!    the server runs).
//! 3. A candidate is passed if it is still invisible in a snapshot taken after step 2: its
//!    transaction ended without committing it.
//!
//! No timeout is involved: a writer that holds a position for an hour holds the safe head for an
//! hour, and a rolled-back writer's hole is passed on the first poll after it ended.
//!
//! At start the tracker scans from the lowest checkpoint `L` (every reader that exists reads
//! above it). What is published as safe comes from that scan alone: a checkpoint, which is
//! something written, only decides where the scan starts, never how far anyone may read. The
//! prefix up to `L` is proven at once from the events table, for readers that start below it
//! later (a new projection, a rebuild): by the same argument, every transaction that may still
//! commit a position at or below `L` holds a write lock on the events table when the head is
//! read at start; once all of those have ended, the prefix is visible or final. Until then
//! such readers wait (`Head::unproven_below`). Requirement: the sequence must not cache values
//! per session (`CACHE 1`, the default of BIGSERIAL); the host checks this at start.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use sqlx::PgConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::wakeup::Wakeup;
use crate::db::{DbConfig, QualifiedName};
use crate::metrics::HostMetrics;

/// Positions read per scan query while catching up.
const SCAN_PAGE: i64 = 200_000;
/// Poll cadence while a hole waits for its proof.
const HOLE_POLL: Duration = Duration::from_millis(20);
/// Shortest idle poll; it doubles up to the configured poll interval.
const MIN_POLL: Duration = Duration::from_millis(5);

/// What readers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// Read up to (inclusive) this position.
    pub safe: i64,
    /// The highest visible position: lag is measured against it.
    pub raw: i64,
    /// How long the oldest unproven hole has held the safe head back.
    pub held_back_ms: u64,
    /// Age of the oldest open transaction that writes to the events table.
    pub oldest_writer_ms: u64,
    /// Positions at or below this are not proven yet (the start's proof is still open): a
    /// reader whose checkpoint is below it waits.
    pub unproven_below: i64,
}

impl Head {
    /// How far a reader whose checkpoint is `from` may read.
    pub fn readable_from(&self, from: i64) -> i64 {
        if from < self.unproven_below {
            from
        } else {
            self.safe
        }
    }
}

/// A receiver of safe-head updates.
#[derive(Clone)]
pub struct SafeHead {
    rx: watch::Receiver<Head>,
}

impl SafeHead {
    pub fn current(&self) -> Head {
        *self.rx.borrow()
    }

    /// Waits until the safe head passes `position` or `timeout` elapses; returns the head.
    pub async fn wait_past(&mut self, position: i64, timeout: Duration) -> Head {
        let _ = tokio::time::timeout(
            timeout,
            self.rx.wait_for(|h| h.readable_from(position) > position),
        )
        .await;
        *self.rx.borrow()
    }
}

#[derive(Debug, Clone)]
struct Hole {
    /// Inclusive.
    to: i64,
    /// Writers (virtual transaction ids) alive when the hole was first seen.
    writers: Vec<String>,
    seen_at: Instant,
    seen_at_wall: SystemTime,
}

/// The single task per host that advances the safe head.
pub struct SafeHeadTracker {
    config: DbConfig,
    events: QualifiedName,
    events_oid: i64,
    scanned_to: i64,
    holes: BTreeMap<i64, Hole>,
    tx: watch::Sender<Head>,
    wakeup: Wakeup,
    max_poll: Duration,
    metrics: HostMetrics,
    /// The start's proof: the head read then, and the writers that were open then; the safe
    /// head stays at 0 until every one of them has ended.
    start: Option<(i64, Vec<String>, Instant)>,
    last_start_report: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum SafeHeadError {
    #[error("the events table {table} does not exist (set --events-table / EVENTS_TABLE)")]
    NoEventsTable { table: String },
    #[error("the events table {table} does not have the pupsourcing layout: {problems}")]
    Layout { table: String, problems: String },
    #[error(
        "the sequence behind {table}.global_position caches {cache} values per session; \
         positions would then be handed out out of order and gap proofs would be unsound. \
         Run: ALTER SEQUENCE {sequence} CACHE 1"
    )]
    CachedSequence {
        table: String,
        sequence: String,
        cache: i64,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl SafeHeadTracker {
    /// Checks the events table and prepares a tracker whose first proof covers the stream up to
    /// its current head.
    pub async fn new(
        config: DbConfig,
        events: QualifiedName,
        wakeup: Wakeup,
        max_poll: Duration,
        metrics: HostMetrics,
    ) -> Result<(SafeHeadTracker, SafeHead), SafeHeadError> {
        let mut conn = crate::db::connect_one(&config).await?;
        let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::int8")
            .bind(events.to_string())
            .fetch_one(&mut conn)
            .await?;
        let Some(events_oid) = oid else {
            return Err(SafeHeadError::NoEventsTable {
                table: events.to_string(),
            });
        };
        let problems = super::layout::problems(&mut conn, events_oid).await?;
        if !problems.is_empty() {
            return Err(SafeHeadError::Layout {
                table: events.to_string(),
                problems: problems.join("; "),
            });
        }
        check_sequence(&mut conn, &events).await?;
        // One statement: its snapshot is taken before it reads pg_locks.
        let (head, writers): (i64, Vec<String>) = sqlx::query_as(&format!(
            "SELECT (SELECT coalesce(max(global_position), 0) FROM {events}),
                    (SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{{}}')
                       FROM pg_locks l
                      WHERE l.locktype = 'relation' AND l.relation::int8 = $1
                        AND l.mode <> 'AccessShareLock' AND l.pid IS DISTINCT FROM pg_backend_pid())"
        ))
        .bind(events_oid)
        .fetch_one(&mut conn)
        .await?;
        // Positions at or below the lowest checkpoint are below every reader that exists; the
        // scan starts there. Lower positions matter only to a reader that starts later (a new
        // projection, a rebuild): they count as proven once every writer open now has ended.
        // A checkpoint only moves where scanning starts, never what is published as safe.
        let lowest = crate::store::checkpoints::lowest_of_all(&mut conn).await?;
        let prefix = lowest.unwrap_or(0).clamp(0, head);
        let (tx, rx) = watch::channel(Head {
            safe: 0,
            raw: head,
            unproven_below: prefix,
            ..Head::default()
        });
        let tracker = SafeHeadTracker {
            config,
            events,
            events_oid,
            scanned_to: prefix,
            holes: BTreeMap::new(),
            tx,
            wakeup,
            max_poll,
            metrics,
            start: (prefix > 0).then(|| (prefix, writers, Instant::now())),
            last_start_report: Instant::now(),
        };
        Ok((tracker, SafeHead { rx }))
    }

    /// Runs until cancelled; reconnects by itself.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut conn: Option<PgConnection> = None;
        let mut delay = MIN_POLL;
        let mut failures = 0u32;
        loop {
            if conn.is_none() {
                match crate::db::connect_one(&self.config).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "safe-head tracker cannot connect; retrying");
                    }
                }
            }
            let mut outcome = Poll::Idle;
            if let Some(c) = conn.as_mut() {
                match self.poll(c).await {
                    Ok(p) => {
                        outcome = p;
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "safe-head poll failed; reconnecting");
                        conn = None;
                    }
                }
            }
            delay = match outcome {
                _ if failures > 0 => crate::base::retry::backoff(
                    failures,
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                ),
                // More to read at once.
                Poll::FullPage => Duration::ZERO,
                // Events are arriving: look again soon.
                Poll::Found => MIN_POLL,
                // Quiet: back off towards the poll interval (a notification cuts the wait short).
                Poll::Idle => (delay * 2).clamp(MIN_POLL, self.max_poll),
            };
            if (!self.holes.is_empty() || self.start.is_some()) && failures == 0 {
                delay = delay.min(HOLE_POLL);
            }
            if delay.is_zero() {
                if cancel.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wakeup.notified() => delay = MIN_POLL,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One round: settle known holes, scan new positions, publish.
    async fn poll(&mut self, conn: &mut PgConnection) -> Result<Poll, sqlx::Error> {
        if self.start.is_some() {
            self.settle_start(conn).await?;
        }
        if !self.holes.is_empty() {
            self.settle_holes(conn).await?;
        }
        let scan = self.scan(conn).await?;
        let full_page = scan.positions.len() as i64 >= SCAN_PAGE;
        let mut expected = self.scanned_to + 1;
        let now = Instant::now();
        let now_wall = SystemTime::now();
        for &position in &scan.positions {
            if position > expected {
                self.holes.insert(
                    expected,
                    Hole {
                        to: position - 1,
                        writers: scan.writers.clone(),
                        seen_at: now,
                        seen_at_wall: now_wall,
                    },
                );
            }
            expected = position + 1;
        }
        if let Some(last) = scan.positions.last() {
            self.scanned_to = *last;
        }
        self.publish(scan.raw_head.max(self.scanned_to), scan.oldest_writer_ms);
        Ok(if full_page {
            Poll::FullPage
        } else if scan.positions.is_empty() {
            Poll::Idle
        } else {
            Poll::Found
        })
    }

    async fn scan(&self, conn: &mut PgConnection) -> Result<Scan, sqlx::Error> {
        let sql = format!(
            "WITH seen AS (
                 SELECT global_position FROM {t}
                  WHERE global_position > $1 ORDER BY global_position LIMIT $2)
             SELECT (SELECT coalesce(array_agg(global_position ORDER BY global_position), '{{}}') FROM seen),
                    (SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{{}}')
                       FROM pg_locks l
                      WHERE l.locktype = 'relation' AND l.relation::int8 = $3
                        AND l.mode <> 'AccessShareLock' AND l.pid IS DISTINCT FROM pg_backend_pid()),
                    (SELECT coalesce(max(global_position), 0) FROM {t}),
                    (SELECT coalesce(extract(epoch FROM now() - min(a.xact_start)) * 1000, 0)::int8
                       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'relation' AND l.relation::int8 = $3
                        AND l.mode <> 'AccessShareLock' AND l.pid IS DISTINCT FROM pg_backend_pid())",
            t = self.events
        );
        let (positions, writers, raw_head, oldest_writer_ms): (Vec<i64>, Vec<String>, i64, i64) =
            sqlx::query_as(&sql)
                .bind(self.scanned_to)
                .bind(SCAN_PAGE)
                .bind(self.events_oid)
                .fetch_one(&mut *conn)
                .await?;
        Ok(Scan {
            positions,
            writers,
            raw_head,
            oldest_writer_ms: oldest_writer_ms.max(0) as u64,
        })
    }

    /// The start's proof: true once every writer open at start has ended (the stream up to the
    /// head read then is settled). Reports the wait every few seconds.
    async fn settle_start(&mut self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let Some((head, writers, since)) = &self.start else {
            return Ok(true);
        };
        let alive: Vec<(String, Option<i32>)> = if writers.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT DISTINCT virtualtransaction, pid FROM pg_locks WHERE virtualtransaction = ANY($1)",
            )
            .bind(writers)
            .fetch_all(&mut *conn)
            .await?
        };
        if alive.is_empty() {
            tracing::debug!(
                head,
                "every position up to the stream head at start is settled"
            );
            self.start = None;
            return Ok(true);
        }
        if self.last_start_report.elapsed() >= Duration::from_secs(5) {
            let _ = head;
            let pids: Vec<String> = alive
                .iter()
                .filter_map(|(_, pid)| pid.map(|p| p.to_string()))
                .collect();
            tracing::warn!(
                waiting = ?since.elapsed(),
                transactions = alive.len(),
                pids = %pids.join(","),
                "waiting for transactions that were writing to the events table at start: a position they hold may still commit below the head, so reading waits (see pg_stat_activity for these pids)"
            );
            self.last_start_report = Instant::now();
        }
        Ok(false)
    }

    /// Splits filled positions out of holes and passes the holes proven final.
    async fn settle_holes(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        // Step 2: which recorded writers are still alive. Must run before the visibility check.
        let all_writers: Vec<String> = {
            let mut w: Vec<String> = self
                .holes
                .values()
                .flat_map(|h| h.writers.iter().cloned())
                .collect();
            w.sort();
            w.dedup();
            w
        };
        let alive: Vec<String> = if all_writers.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar(
                "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}') FROM pg_locks WHERE virtualtransaction = ANY($1)",
            )
            .bind(&all_writers)
            .fetch_one(&mut *conn)
            .await?
        };
        // Step 3: what became visible meanwhile (a fresh snapshot, taken after step 2).
        let starts: Vec<i64> = self.holes.keys().copied().collect();
        let ends: Vec<i64> = self.holes.values().map(|h| h.to).collect();
        let filled: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT coalesce(array_agg(e.global_position ORDER BY e.global_position), '{{}}')
               FROM unnest($1::int8[], $2::int8[]) AS r(s, e)
               JOIN {t} e ON e.global_position BETWEEN r.s AND r.e",
            t = self.events
        ))
        .bind(&starts)
        .bind(&ends)
        .fetch_one(&mut *conn)
        .await?;

        let mut next: BTreeMap<i64, Hole> = BTreeMap::new();
        let mut passed: Vec<(i64, i64, SystemTime, Duration)> = Vec::new();
        for (start, hole) in std::mem::take(&mut self.holes) {
            let proven = hole.writers.iter().all(|w| !alive.contains(w));
            // Remaining missing sub-ranges of this hole.
            let mut cursor = start;
            let mut pieces = Vec::new();
            for &p in filled.iter().filter(|p| **p >= start && **p <= hole.to) {
                if p > cursor {
                    pieces.push((cursor, p - 1));
                }
                cursor = p + 1;
            }
            if cursor <= hole.to {
                pieces.push((cursor, hole.to));
            }
            for (from, to) in pieces {
                if proven {
                    passed.push((from, to, hole.seen_at_wall, hole.seen_at.elapsed()));
                } else {
                    next.insert(from, Hole { to, ..hole.clone() });
                }
            }
        }
        self.holes = next;
        if !passed.is_empty() {
            self.record_passed(conn, &passed).await?;
        }
        Ok(())
    }

    async fn record_passed(
        &self,
        conn: &mut PgConnection,
        passed: &[(i64, i64, SystemTime, Duration)],
    ) -> Result<(), sqlx::Error> {
        let from: Vec<i64> = passed.iter().map(|p| p.0).collect();
        let to: Vec<i64> = passed.iter().map(|p| p.1).collect();
        let observed: Vec<chrono::DateTime<chrono::Utc>> =
            passed.iter().map(|p| p.2.into()).collect();
        let waited: Vec<i64> = passed.iter().map(|p| p.3.as_millis() as i64).collect();
        sqlx::query(
            "INSERT INTO projection_host.holes (from_position, to_position, observed_at, waited_ms, reason)
             SELECT f, t, o, w, 'no transaction that held a write lock on the events table when the gap was seen is still running, and the positions are still empty'
               FROM unnest($1::int8[], $2::int8[], $3::timestamptz[], $4::int8[]) AS x(f, t, o, w)
             ON CONFLICT (from_position) DO NOTHING",
        )
        .bind(&from)
        .bind(&to)
        .bind(&observed)
        .bind(&waited)
        .execute(&mut *conn)
        .await?;
        for (f, t, _, waited) in passed {
            let count = t - f + 1;
            self.metrics.holes_passed.inc_by(count as u64);
            tracing::info!(
                from = f,
                to = t,
                waited_ms = waited.as_millis() as u64,
                "passed a hole in global_position: proven final"
            );
        }
        Ok(())
    }

    fn publish(&self, raw: i64, oldest_writer_ms: u64) {
        let (safe, held_back_ms) = match self.holes.iter().next() {
            Some((start, hole)) => (start - 1, hole.seen_at.elapsed().as_millis() as u64),
            None => (self.scanned_to, 0),
        };
        let unproven_below = self.start.as_ref().map_or(0, |(prefix, _, _)| *prefix);
        let raw = raw.max(self.tx.borrow().raw);
        self.metrics
            .oldest_writer_seconds
            .set(oldest_writer_ms as f64 / 1000.0);
        self.metrics
            .safe_head_held_back_seconds
            .set(held_back_ms as f64 / 1000.0);
        self.metrics.stream_head.set(raw as f64);
        self.tx.send_if_modified(|head| {
            let next = Head {
                safe,
                raw,
                held_back_ms,
                oldest_writer_ms,
                unproven_below,
            };
            let moved = head.safe != next.safe
                || head.raw != next.raw
                || head.unproven_below != next.unproven_below;
            *head = next;
            moved
        });
    }
}

/// What one poll found.
enum Poll {
    Idle,
    Found,
    FullPage,
}

struct Scan {
    positions: Vec<i64>,
    writers: Vec<String>,
    raw_head: i64,
    oldest_writer_ms: u64,
}

async fn check_sequence(
    conn: &mut PgConnection,
    events: &QualifiedName,
) -> Result<(), SafeHeadError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT s.seqrelid::regclass::text, s.seqcache
           FROM pg_sequence s
          WHERE s.seqrelid = pg_get_serial_sequence($1, 'global_position')::regclass",
    )
    .bind(events.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some((sequence, cache)) if cache > 1 => Err(SafeHeadError::CachedSequence {
            table: events.to_string(),
            sequence,
            cache,
        }),
        _ => Ok(()),
    }
}
