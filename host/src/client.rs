//! The CLI side of the admin API: subcommands that act on a running fleet call a host's admin
//! endpoint (any host will do; the state lives in PostgreSQL).

use anyhow::{bail, Context};
use serde_json::Value;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::lifecycle::Mode;

pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> anyhow::Result<AdminClient> {
        let token = args
            .admin_token
            .clone()
            .filter(|t| !t.is_empty())
            .context("ADMIN_TOKEN (--admin-token) is required to call the admin API")?;
        Ok(AdminClient {
            base: args.admin_url.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                .body(bytes),
        )
        .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("calling the admin API at {} (check ADMIN_URL)", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["error"].as_str().unwrap_or("no details");
            bail!("the admin API answered {status}: {message}");
        }
        Ok(body)
    }
}

/// `projection-host pause|resume NAME`.
pub async fn set_paused(
    args: &AdminArgs,
    projection: &str,
    paused: bool,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let action = if paused { "pause" } else { "resume" };
    let body = client
        .post(
            &format!("/admin/projections/{projection}/{action}"),
            serde_json::json!({ "reason": reason }),
        )
        .await?;
    println!(
        "{projection}: {} (every host acts at its next batch boundary)",
        if body["paused"].as_bool() == Some(true) {
            "paused"
        } else {
            "running"
        }
    );
    Ok(())
}

/// `projection-host dead-letters ...`.
pub async fn dead_letters(command: DeadLetterCommand) -> anyhow::Result<()> {
    use DeadLetterCommand as C;
    match command {
        C::List { admin, projection } => {
            let client = AdminClient::new(&admin)?;
            let path = match &projection {
                Some(p) => format!("/admin/dead-letters?projection={p}"),
                None => "/admin/dead-letters".to_string(),
            };
            let rows = client.get(&path).await?;
            let rows = rows.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                println!("no parked events");
            }
            for r in rows {
                println!(
                    "#{:<6} {:<24} position {:<10} aggregate {:<20} {:<16} {}{}",
                    r["id"],
                    r["projection"].as_str().unwrap_or(""),
                    r["position"],
                    r["aggregate_id"].as_str().unwrap_or(""),
                    r["event_type"].as_str().unwrap_or(""),
                    r["error"].as_str().unwrap_or(""),
                    if r["retry_requested"] == true {
                        " (retry requested)"
                    } else {
                        ""
                    }
                );
            }
        }
        C::Retry {
            admin,
            projection,
            aggregate,
        } => {
            let client = AdminClient::new(&admin)?;
            let body = client
                .post(
                    "/admin/dead-letters/retry",
                    serde_json::json!({ "projection": projection, "aggregate_id": aggregate }),
                )
                .await?;
            println!(
                "retrying {} parked event(s) of {aggregate} in {projection}, in order",
                body["events"]
            );
        }
        C::Skip { admin, id } => {
            let client = AdminClient::new(&admin)?;
            let body = client
                .post(
                    &format!("/admin/dead-letters/{id}/skip"),
                    serde_json::json!({}),
                )
                .await?;
            println!(
                "skipped #{id}: position {} of aggregate {} in {} (never applied)",
                body["position"],
                body["aggregate_id"].as_str().unwrap_or(""),
                body["projection"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn print_plugin(row: &Value) {
    println!(
        "{:<24} {:<10} {:<10} {:<9} {}  track {}  schema {}  ({})",
        row["projection"].as_str().unwrap_or(""),
        row["state"].as_str().unwrap_or(""),
        row["version"].as_str().unwrap_or(""),
        row["mode"].as_str().unwrap_or(""),
        row["sha256"].as_str().unwrap_or(""),
        row["track"].as_str().unwrap_or(""),
        row["namespace"].as_str().unwrap_or(""),
        row["source"].as_str().unwrap_or("")
    );
}

/// `projection-host plugins ...`.
pub async fn plugins(command: PluginCommand) -> anyhow::Result<()> {
    use PluginCommand as C;
    match command {
        C::List { admin } => {
            let rows = AdminClient::new(&admin)?.get("/admin/plugins").await?;
            for row in rows.as_array().cloned().unwrap_or_default() {
                print_plugin(&row);
            }
        }
        C::Push {
            admin,
            file,
            mode,
            no_activate,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mode = Mode::from(mode).as_str();
            let row = AdminClient::new(&admin)?
                .post_bytes(
                    &format!("/admin/plugins?mode={mode}&activate={}", !no_activate),
                    bytes,
                )
                .await?;
            print_plugin(&row);
        }
        C::Promote {
            admin,
            projection,
            sha256,
        } => {
            let row = AdminClient::new(&admin)?
                .post(
                    &format!("/admin/plugins/{projection}/promote"),
                    serde_json::json!({ "sha256": sha256 }),
                )
                .await?;
            print_plugin(&row);
        }
        C::Rollback { admin, projection } => {
            let row = AdminClient::new(&admin)?
                .post(
                    &format!("/admin/plugins/{projection}/rollback"),
                    serde_json::json!({}),
                )
                .await?;
            print_plugin(&row);
        }
    }
    Ok(())
}

/// Where the admin API is, and its token.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// Base URL of any host's health/admin port.
    #[arg(long, env = "ADMIN_URL", default_value = "http://127.0.0.1:8080")]
    pub admin_url: String,
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The projection's name.
    pub projection: String,
    /// Why (recorded with the control, shown in status).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Registered versions per projection.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Upload a component: continue mode swaps it in on every host at the next batch; rebuild
    /// mode builds its read model from the start beside the active one.
    Push {
        #[command(flatten)]
        admin: AdminArgs,
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ModeArg::Continue)]
        mode: ModeArg,
        /// Register only; activate later with `promote`.
        #[arg(long)]
        no_activate: bool,
    },
    /// Make a version active (a finished rebuild, or a pending or retired version).
    Promote {
        #[command(flatten)]
        admin: AdminArgs,
        projection: String,
        sha256: String,
    },
    /// Switch back to the previously active version.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        projection: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List parked events.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        projection: Option<String>,
    },
    /// Apply an aggregate's parked events again, in order.
    Retry {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        projection: String,
        #[arg(long)]
        aggregate: String,
    },
    /// Drop one parked event (by id) without applying it.
    Skip {
        #[command(flatten)]
        admin: AdminArgs,
        id: i64,
    },
}

/// `plugins push --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// At each partition's next batch boundary, from its checkpoint, on the same read model.
    Continue,
    /// Builds its own read model from position 0 beside the active one; promoted once caught up.
    Rebuild,
}

impl From<ModeArg> for Mode {
    fn from(arg: ModeArg) -> Mode {
        match arg {
            ModeArg::Continue => Mode::Continue,
            ModeArg::Rebuild => Mode::Rebuild,
        }
    }
}
