//! The command line: the subcommands, each with the flags its module defines (`config` for
//! `run`, `status`, `client`, `operator`, `bench`), and the log flags every command shares.
//! No logic lives here; `config` validates.

mod logging;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[cfg(feature = "bench")]
use crate::bench::{BenchCommand, DemoArgs};
use crate::client::{ControlArgs, DeadLetterCommand, PluginCommand};
use crate::config::{RunArgs, RunConfig};
use crate::operator::{PartitionCommand, ProjectionCommand, ReplicaSetCommand};
use crate::status::{MigrateArgs, StatusArgs};

#[derive(Debug, Parser)]
#[command(
    name = "projection-host",
    version,
    about = "Runs event-sourced projections compiled to WebAssembly components against a PostgreSQL event store"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the host's own tables (idempotent), optionally installing the NOTIFY
    /// trigger on the events table.
    Migrate(MigrateArgs),
    /// Run projections: join the replica set, take a share of the partitions, and project events
    /// until stopped (or, with --once, until caught up).
    Run(Box<RunArgs>),
    /// Print the replica set's generation, workers, partition owners, checkpoints and lag.
    Status(StatusArgs),
    /// Pause a projection on every host (through the admin API).
    Pause(ControlArgs),
    /// Resume a paused projection, and lift halts of the stop policy (through the admin API).
    Resume(ControlArgs),
    /// Plugin versions of the fleet: list, push, promote, rollback (through the admin API).
    #[command(subcommand)]
    Plugins(PluginCommand),
    /// Events parked by the dead-letter policy: list, retry, skip (through the admin API).
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Replica sets on one database: point readers at another set's read models, remove a set.
    #[command(subcommand)]
    ReplicaSets(ReplicaSetCommand),
    /// Projections of a replica set: remove one with everything the host made for it.
    #[command(subcommand)]
    Projections(ProjectionCommand),
    /// Partitions of a replica set: change their count while the fleet runs.
    #[command(subcommand)]
    Partitions(PartitionCommand),
    /// Adopt a Go pupsourcing deployment (processors, orchestrator or core workers): continue
    /// after its checkpoints and take its read-model tables over in place, without a replay.
    Import(Box<crate::adoption::ImportArgs>),
    /// Seed a throwaway database with the W1 workload, project it with bank-balances and print
    /// the result: the quickest way to see the host work.
    #[cfg(feature = "bench")]
    Demo(DemoArgs),
    /// Benchmarks on the reference workload W1.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive list.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Command {
    /// Commands that run until stopped (or for a long time) rather than printing and ending.
    fn runs_long(&self) -> bool {
        match self {
            Command::Run(_) => true,
            #[cfg(feature = "bench")]
            Command::Bench(_) | Command::Demo(_) => true,
            _ => false,
        }
    }
}

/// Parses the command line, sets up logging and runs the command; the binary's `main`.
pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return logging::argument_error(e),
    };
    let format = cli.log.log_format;
    logging::init(&cli.log.log_level, format);
    logging::log_panics_through_tracing();
    if !cli.command.runs_long() {
        // A one-shot command piped into `head` ends quietly when the reader goes away, as
        // Unix tools do, instead of panicking on the broken pipe. (The long-running commands
        // keep SIGPIPE ignored: their sockets report a closed peer as an error.)
        // SAFETY: resetting a signal disposition before any thread writes to a pipe.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: through tracing in JSON mode (a log collector reads stderr), plainly
            // for a person at a terminal.
            match format {
                LogFormat::Json => tracing::error!("{e:#}"),
                LogFormat::Text => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => crate::status::migrate(args).await,
        Command::Run(args) => crate::app::run(RunConfig::from_args(*args)?).await,
        Command::Status(args) => crate::status::print(args).await,
        Command::Pause(args) => {
            crate::client::set_paused(&args.admin, &args.projection, true, args.reason.as_deref())
                .await
        }
        Command::Plugins(command) => crate::client::plugins(command).await,
        Command::DeadLetters(command) => crate::client::dead_letters(command).await,
        Command::Resume(args) => {
            crate::client::set_paused(&args.admin, &args.projection, false, None).await
        }
        Command::ReplicaSets(command) => crate::operator::replica_sets(command).await,
        Command::Projections(command) => crate::operator::projections(command).await,
        Command::Partitions(command) => crate::operator::partitions(command).await,
        Command::Import(args) => crate::adoption::import(*args).await,
        #[cfg(feature = "bench")]
        Command::Demo(args) => crate::bench::demo(args).await,
        #[cfg(feature = "bench")]
        Command::Bench(command) => crate::bench::run(command).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
