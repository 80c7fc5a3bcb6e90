//! A writer that keeps appending W1 events in small transactions, like a live service.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

pub struct Writer {
    stop: Arc<AtomicBool>,
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Appends W1 events `start..` over `accounts`, `per_tx` per transaction, every `every`.
    pub fn start(pool: PgPool, start: u64, accounts: u64, per_tx: u64, every: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(start));
        let (s, n) = (stop.clone(), next.clone());
        let task = tokio::spawn(async move {
            let sql = include_str!("../../../bench/w1/w1-append.sql");
            while !s.load(Ordering::SeqCst) {
                let from = n.load(Ordering::SeqCst);
                let to = from + per_tx - 1;
                let statement = sql
                    .replace(":from", &from.to_string())
                    .replace(":to", &to.to_string())
                    .replace(":k", &accounts.to_string());
                sqlx::raw_sql(&statement)
                    .execute(&pool)
                    .await
                    .expect("appending W1 events");
                n.store(to + 1, Ordering::SeqCst);
                tokio::time::sleep(every).await;
            }
        });
        Writer { stop, next, task }
    }

    /// Events appended so far (the next g).
    pub fn appended(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Stops and returns how many events were appended in all.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("writer task");
        self.next.load(Ordering::SeqCst)
    }
}
