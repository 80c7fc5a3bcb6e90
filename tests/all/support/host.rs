//! The real `projection-host` binary as a child process, with its log captured.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_projection-host");

pub struct Host {
    child: Child,
    log: Arc<Mutex<String>>,
    pub label: String,
}

impl Host {
    /// `projection-host run` against `db_url` with extra arguments; HTTP off unless the
    /// arguments configure it.
    pub fn run(label: &str, db_url: &str, args: &[&str]) -> Host {
        let mut full = vec!["run", "--database-url", db_url];
        if !args.iter().any(|a| a.starts_with("--health-addr")) {
            full.push("--no-http");
        }
        full.extend_from_slice(args);
        Host::spawn(label, &full, &[])
    }

    pub fn spawn(label: &str, args: &[&str], env: &[(&str, &str)]) -> Host {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("LOG_LEVEL", "debug")
            .env_remove("DATABASE_URL")
            .env_remove("PLUGINS")
            .env_remove("PLUGINS_DIR")
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting projection-host");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Host {
            child,
            log,
            label: label.to_string(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid(), signal) };
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to end (polling; the test runtime stays free).
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "{} did not exit within {timeout:?}; log:\n{}",
                self.label,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the log contains `needle`.
    #[allow(dead_code)]
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let started = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                started.elapsed() < timeout,
                "{}: '{needle}' did not appear within {timeout:?}; log:\n{}",
                self.label,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let exited = self.child.try_wait().ok().flatten();
        if exited.is_none() {
            self.kill9();
        }
        // A failing test shows what its hosts said last (the debug log is long: its end).
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- host {} ({}), last lines of its log:\n{}",
                self.label,
                exited.map_or("killed by the test".to_string(), |s| format!("exited: {s}")),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}
