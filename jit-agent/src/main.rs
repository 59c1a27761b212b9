//! `jit-agent`: the JIT Gate node daemon and its operator commands.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // Behave like other command-line tools when piped into `head`: end quietly on a closed pipe
    // instead of panicking on the failed write.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match jit_agent::cli::run(jit_agent::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
