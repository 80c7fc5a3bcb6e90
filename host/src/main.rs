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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return argument_error(e),
    };
    let format = cli.log.log_format;
    init_tracing(&cli.log.log_level, format);
    log_panics_through_tracing();
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Bench(_) | Command::Demo(_)
    ) {
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

/// A command line that does not parse: help and version print as usual; an error is one JSON
/// line when JSON logs were asked for (`LOG_FORMAT=json` or `--log-format json`).
fn argument_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
        || std::env::args()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == "--log-format" && w[1].eq_ignore_ascii_case("json"))
        || std::env::args().any(|a| a.eq_ignore_ascii_case("--log-format=json"));
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let message = e.render().to_string();
    let line = serde_json::json!({
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "level": "ERROR",
        "message": message.trim().trim_start_matches("error: "),
        "target": "projection_host::cli",
    });
    eprintln!("{line}");
    std::process::ExitCode::from(2)
}

/// A panic anywhere (a pipeline task included) is logged through tracing with its message and
/// location, so that it reaches the log collector in the configured format.
fn log_panics_through_tracing() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            panic = %message,
            location = %location,
            thread = thread.name().unwrap_or("unnamed"),
            "a task panicked"
        );
    }));
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
        Command::Bench(BenchCommand::Poison(args)) => projection_host::bench::poison(args).await,
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
