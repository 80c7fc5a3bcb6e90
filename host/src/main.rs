use clap::Parser;

// The batch pipeline allocates and frees many small strings per event; jemalloc keeps that
// cheap (glibc malloc took a quarter of the CPU time in profiles of the W1 benchmark).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Return freed pages to the OS within a second, so that the memory of a large catch-up batch
// does not stay resident.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";
use tracing_subscriber::EnvFilter;

use projection_host::cli::{BenchCommand, Cli, Command, LogFormat};
use projection_host::config::RunConfig;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log.log_level, cli.log.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => projection_host::status::migrate(args).await,
        Command::Run(args) => projection_host::app::run(RunConfig::from_args(*args)?).await,
        Command::Status(args) => projection_host::status::print(args).await,
        Command::Pause(args) => {
            projection_host::client::set_paused(
                &args.admin,
                &args.projection,
                true,
                args.reason.as_deref(),
            )
            .await
        }
        Command::Plugins(command) => projection_host::client::plugins(command).await,
        Command::DeadLetters(command) => projection_host::client::dead_letters(command).await,
        Command::Resume(args) => {
            projection_host::client::set_paused(&args.admin, &args.projection, false, None).await
        }
        Command::ReplicaSets(command) => projection_host::operator::replica_sets(command).await,
        Command::Projections(command) => projection_host::operator::projections(command).await,
        Command::Demo(args) => projection_host::bench::demo(args).await,
        Command::Bench(BenchCommand::W1(args)) => projection_host::bench::w1(args).await,
        Command::Bench(BenchCommand::Live(args)) => projection_host::bench::live(args).await,
        Command::Bench(BenchCommand::Rebalance(args)) => {
            projection_host::bench::rebalance(args).await
        }
        Command::Bench(BenchCommand::Swap(args)) => projection_host::bench::swap(args).await,
    }
}

fn init_tracing(level: &str, format: LogFormat) {
    // A bare level applies to our crates; sqlx and wasmtime stay at warn unless asked for.
    let directive = if level.contains('=') || level.contains(',') {
        level.to_string()
    } else {
        // Notices come from plugin SQL too (RAISE WARNING): not logged raw.
        format!("warn,sqlx::postgres::notice=off,projection_host={level},plugin={level}")
    };
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|e| {
        eprintln!("warning: LOG_LEVEL '{level}' is not a valid filter ({e}); using info");
        EnvFilter::new("warn,sqlx::postgres::notice=off,projection_host=info,plugin=info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}
