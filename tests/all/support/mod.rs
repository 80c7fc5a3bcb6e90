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

/// A local port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A host with its HTTP listeners on free local ports.
pub struct HttpHost {
    pub host: Host,
    pub health: String,
    pub metrics: String,
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl HttpHost {
    pub fn run(label: &str, db_url: &str, args: &[&str]) -> HttpHost {
        let health = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut all = vec![
            "--health-addr",
            &health,
            "--metrics-addr",
            &metrics,
            "--admin-token",
            ADMIN_TOKEN,
        ];
        all.extend_from_slice(args);
        let host = Host::run(label, db_url, &all);
        HttpHost {
            host,
            health: format!("http://{health}"),
            metrics: format!("http://{metrics}"),
        }
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("{}{path}", self.health)).await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    /// The metrics page; empty while the host is not listening yet.
    pub async fn scrape(&self) -> String {
        match reqwest::get(format!("{}/metrics", self.metrics)).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

/// The value of one series in a Prometheus scrape (`name{labels}` as printed), if present.
pub fn series(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs a `projection-host` subcommand against the admin API of `health`; panics on failure,
/// returns stdout.
pub fn admin_cli(health: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(host::BIN)
        .args(args)
        .args(["--admin-url", health])
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
