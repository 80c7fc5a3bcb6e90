//! The flags of `demo` and `bench ...`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::OnFailureArg;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// PostgreSQL to use; without it a throwaway local server is started and removed on exit.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    #[arg(long, default_value_t = 1_000)]
    pub accounts: u64,
    /// The bank-balances component.
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Catch-up throughput on W1 against the set-based SQL ceiling.
    W1(BenchW1Args),
    /// Latency from an append's commit to the read model's commit, at a fixed append rate.
    Live(BenchLiveArgs),
    /// Pauses of partitions when a host joins, leaves gracefully, or is killed.
    Rebalance(BenchRebalanceArgs),
    /// Time from a continue-mode push to the new build on every partition of a 2-host fleet.
    Swap(BenchSwapArgs),
    /// One panicking event in one batch over 32 partitions: the other partitions' pause, and
    /// the time until the event is halted or parked.
    Poison(BenchPoisonArgs),
    /// `partitions resize` on a 2-host fleet under a live writer: each partition's pause, and
    /// exactness.
    Resize(BenchResizeArgs),
}

#[derive(Debug, Args)]
pub struct BenchResizeArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 32)]
    pub from: u32,
    #[arg(long, default_value_t = 64)]
    pub to: u32,
    /// The writer's events per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchPoisonArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Events of the batch that holds the panicking event (also the batch size).
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    #[arg(long, value_enum, default_value_t = OnFailureArg::Stop)]
    pub on_failure: OnFailureArg,
    /// Repeat the measurement and report medians.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    #[arg(
        long,
        default_value = "target/test-wasm/wasm32-wasip2/release/guest_faulty.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchSwapArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
    /// The build pushed during the run (same projection, another build).
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/guest_bank_balances_v2.wasm"
    )]
    pub new_plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchLiveArgs {
    /// PostgreSQL server to create the scratch database on; without it a throwaway local server
    /// is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Events appended per second (one transaction each).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Do not install the NOTIFY trigger: the host finds new events by polling only.
    #[arg(long)]
    pub no_trigger: bool,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchRebalanceArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    #[arg(long, default_value_t = 5000)]
    pub stale_timeout_ms: u64,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchW1Args {
    /// PostgreSQL server to create the scratch database on; without it a throwaway local server
    /// is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// Events per batch (live and largest: the host runs with a fixed batch size).
    #[arg(long, default_value_t = 50_000)]
    pub batch_size: u32,
    /// Run the host with no batch flags at all (its own defaults, as a user who does not tune
    /// gets them) instead of `--batch-size`.
    #[arg(long, conflicts_with = "batch_size")]
    pub host_defaults: bool,
    /// Repeat the whole measurement and report the median run.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}
