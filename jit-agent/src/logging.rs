//! The agent's own log, through `tracing` (the ecosystem tonic and tokio speak): human-readable
//! lines on stderr by default, one JSON object per line with `--log-format json` (for log
//! shippers). Events carry request and grant ids as fields (`request_id`, `grant_id`), so either
//! form can be filtered by them. `RUST_LOG` sets the filter (default `info`). Records made
//! through the `log` crate (aya-log's forwarding of the kernel program's records) join the same
//! stream.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level.
    Json,
}

/// Installs the process's subscriber. A `RUST_LOG` that does not parse is reported and the
/// default (`info`) used.
pub fn init(format: LogFormat) {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(e) => {
            if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() {
                eprintln!("RUST_LOG does not parse ({e}); logging at info");
            }
            EnvFilter::new("info")
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("installing the log subscriber: {e}");
    }
}
