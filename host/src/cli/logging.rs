//! Where the host's log lines go and how they look: the tracing subscriber, panics through
//! tracing, and a command-line error as one JSON line when JSON logs were asked for.

use tracing_subscriber::EnvFilter;

use super::LogFormat;

/// A command line that does not parse: help and version print as usual; an error is one JSON
/// line when JSON logs were asked for (`LOG_FORMAT=json` or `--log-format json`).
pub(super) fn argument_error(e: clap::Error) -> std::process::ExitCode {
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
pub(super) fn log_panics_through_tracing() {
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

pub(super) fn init(level: &str, format: LogFormat) {
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
