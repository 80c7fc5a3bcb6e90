pub mod db;
pub mod host;
pub mod writer;

use std::future::Future;
use std::time::{Duration, Instant};

pub use db::TestDb;
pub use host::Host;
pub use writer::Writer;

/// Polls `check` until it yields a value or `timeout` passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
