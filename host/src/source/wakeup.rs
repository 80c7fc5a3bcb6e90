//! Wake-ups on LISTEN/NOTIFY. Notifications only shorten waits: every waiter also polls, so a
//! lost notification (or a dropped listener connection) costs at most one poll interval.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::DbConfig;

/// A cheap handle that can be woken and waited on.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

/// Listens on `channels` and wakes the matching handle for each notification; reconnects with
/// backoff and wakes everyone after a reconnect (notifications may have been missed).
pub async fn listen(config: DbConfig, routes: Vec<(String, Wakeup)>, cancel: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let result = async {
            // Same target, TLS and options as every other host session.
            let pool = config
                .lazy_single()
                .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
            let mut listener = PgListener::connect_with(&pool).await?;
            let channels: Vec<&str> = routes.iter().map(|(c, _)| c.as_str()).collect();
            listener.listen_all(channels).await?;
            tracing::debug!(channels = ?routes.iter().map(|(c, _)| c).collect::<Vec<_>>(), "listening for notifications");
            routes.iter().for_each(|(_, w)| w.wake());
            failures = 0;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok::<_, sqlx::Error>(()),
                    n = listener.recv() => {
                        let n = n?;
                        for (channel, wakeup) in &routes {
                            if channel == n.channel() {
                                wakeup.wake();
                            }
                        }
                    }
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                let delay = crate::base::retry::backoff(
                    failures,
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                );
                tracing::warn!(error = %e, retry_in = ?delay, "notification listener failed; polling continues meanwhile");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
