//! `jit-agent`: the JIT Gate node daemon and its operator commands.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = jit_agent::cli::Cli::parse();
    if !matches!(cli.command, jit_agent::cli::Command::Run { .. }) {
        // One-shot commands behave like other tools when piped into `head`: they end quietly on
        // a closed pipe instead of panicking on the failed write. The daemon keeps SIGPIPE
        // ignored: a client hanging up must never kill it.
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    jit_agent::logging::init(cli.log_format);
    match jit_agent::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
