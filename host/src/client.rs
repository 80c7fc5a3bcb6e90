//! The CLI side of the admin API: subcommands that act on a running fleet call a host's admin
//! endpoint (any host will do; the state lives in PostgreSQL). Bodies are the types of
//! [`crate::http::api`], so an answer this client does not understand is an error, not a blank.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::http::api;
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
                .build()
                .context("building the admin API's HTTP client")?,
        })
    }

    pub async fn get<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> anyhow::Result<R> {
        self.send(self.http.get(self.url(path)).query(query)).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<R> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn post_bytes<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
        bytes: Vec<u8>,
    ) -> anyhow::Result<R> {
        self.send(
            self.http
                .post(self.url(path))
                .query(query)
                .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                .body(bytes),
        )
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<R: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<R> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("calling the admin API at {} (check ADMIN_URL)", self.base))?;
        let status = response.status();
        let body = response.bytes().await;
        if !status.is_success() {
            // A proxy in front of the host may answer without our error body.
            let message = body
                .ok()
                .and_then(|b| serde_json::from_slice::<api::ErrorBody>(&b).ok())
                .map_or_else(|| "no details".to_string(), |e| e.error);
            bail!("the admin API answered {status}: {message}");
        }
        let body =
            body.with_context(|| format!("reading the answer of the admin API at {}", self.base))?;
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "the admin API at {} answered {status} with a body this client does not understand (a host of another version?)",
                self.base
            )
        })
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
    let request = api::PauseRequest {
        reason: reason.map(str::to_string),
    };
    let result: api::ControlResult = client
        .post(
            &format!("/admin/projections/{projection}/{action}"),
            &request,
        )
        .await?;
    println!(
        "{projection}: {} (every host acts at its next batch boundary)",
        if result.paused { "paused" } else { "running" }
    );
    Ok(())
}

/// `projection-host dead-letters ...`.
pub async fn dead_letters(command: DeadLetterCommand) -> anyhow::Result<()> {
    use DeadLetterCommand as C;
    match command {
        C::List { admin, projection } => {
            let query = api::DeadLetterQuery { projection };
            let rows: Vec<api::DeadLetter> = AdminClient::new(&admin)?
                .get("/admin/dead-letters", &query)
                .await?;
            if rows.is_empty() {
                println!("no parked events");
            }
            for row in &rows {
                print_dead_letter(row);
            }
        }
        C::Retry {
            admin,
            projection,
            aggregate,
        } => {
            let request = api::RetryRequest {
                projection,
                aggregate_id: aggregate,
            };
            let result: api::RetryResult = AdminClient::new(&admin)?
                .post("/admin/dead-letters/retry", &request)
                .await?;
            println!(
                "retrying {} parked event(s) of {} in {}, in order",
                result.events, request.aggregate_id, request.projection
            );
        }
        C::Skip { admin, id } => {
            let skipped: api::DeadLetter = AdminClient::new(&admin)?
                .post(&format!("/admin/dead-letters/{id}/skip"), &api::Empty {})
                .await?;
            println!(
                "skipped #{id}: position {} of aggregate {} in {} (never applied)",
                skipped.position, skipped.aggregate_id, skipped.projection
            );
        }
    }
    Ok(())
}

fn print_dead_letter(row: &api::DeadLetter) {
    println!(
        "#{:<6} {:<24} position {:<10} aggregate {:<20} {:<16} {}{}",
        row.id,
        row.projection,
        row.position,
        row.aggregate_id,
        row.event_type,
        row.error,
        if row.retry_requested {
            " (retry requested)"
        } else {
            ""
        }
    );
}

fn print_plugin(row: &api::Plugin) {
    println!(
        "{:<24} {:<10} {:<10} {:<9} {}  track {}  schema {}  ({})",
        row.projection,
        row.state,
        row.version,
        row.mode,
        row.sha256,
        row.track,
        row.namespace,
        row.source
    );
}

/// `projection-host plugins ...`.
pub async fn plugins(command: PluginCommand) -> anyhow::Result<()> {
    use PluginCommand as C;
    match command {
        C::List { admin } => {
            let rows: Vec<api::Plugin> = AdminClient::new(&admin)?
                .get("/admin/plugins", &api::Empty {})
                .await?;
            for row in &rows {
                print_plugin(row);
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
            let query = api::PushQuery {
                mode: Some(Mode::from(mode)),
                activate: Some(!no_activate),
            };
            let row: api::Plugin = AdminClient::new(&admin)?
                .post_bytes("/admin/plugins", &query, bytes)
                .await?;
            print_plugin(&row);
        }
        C::Promote {
            admin,
            projection,
            sha256,
        } => {
            let row: api::Plugin = AdminClient::new(&admin)?
                .post(
                    &format!("/admin/plugins/{projection}/promote"),
                    &api::PromoteRequest { sha256 },
                )
                .await?;
            print_plugin(&row);
        }
        C::Rollback { admin, projection } => {
            let row: api::Plugin = AdminClient::new(&admin)?
                .post(
                    &format!("/admin/plugins/{projection}/rollback"),
                    &api::Empty {},
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
