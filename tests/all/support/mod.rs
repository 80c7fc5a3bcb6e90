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
        // A port found free can be taken by a parallel test before the host binds it: the
        // host then exits naming the port, and is started again on other ports.
        for _ in 0..5 {
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
            let mut host = Host::run(label, db_url, &all);
            if bound_or_exited(&mut host, &health, &metrics) {
                return HttpHost {
                    host,
                    health: format!("http://{health}"),
                    metrics: format!("http://{metrics}"),
                };
            }
        }
        panic!("{label}: no free ports for the host's listeners after 5 tries");
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

/// Waits until the host listens on both ports (true), or exits because a port was taken (false).
/// A host that exits for another reason is returned as is (true): its test reports it.
fn bound_or_exited(host: &mut Host, health: &str, metrics: &str) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(30) {
        if !host.is_running() {
            // The log threads may still be reading the last lines.
            let taken = |log: String| log.contains("binding the") && log.contains("in use");
            let exited = std::time::Instant::now();
            while exited.elapsed() < std::time::Duration::from_secs(1) {
                if taken(host.log()) {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            return true;
        }
        let listening = |addr: &str| std::net::TcpStream::connect(addr).is_ok();
        if listening(health) && listening(metrics) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
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
