//! `jitctl`: the JIT Gate CLI for requesters, approvers and pipelines. It talks to an agent over
//! the `jit.v1` gRPC API (jit-api) and needs nothing else: it builds with stable Rust alone.
//!
//! Modules: `settings` (flags, environment, settings file), `connect` (mTLS or the local socket,
//! and errors that say what to do), `commands` (one API call or two per command), `render`
//! (lines, tables, JSON).

mod audit;
mod commands;
mod connect;
mod render;
mod settings;

use clap::{CommandFactory as _, FromArgMatches as _};

/// Exit code: the request was denied.
pub(crate) const EXIT_DENIED: u8 = 2;
/// Exit code: the request was not decided in time (or expired).
pub(crate) const EXIT_TIMEOUT: u8 = 3;
/// Exit code: any other error, a usage error included.
pub(crate) const EXIT_ERROR: u8 = 1;

/// jitctl: ask for, approve and revoke just-in-time access through a JIT Gate agent.
///
/// Connection settings come from flags, then the environment (JIT_AGENT, JIT_CERT, JIT_KEY,
/// JIT_CA, JIT_SOCKET), then the settings file (jit/config.toml in your configuration
/// directory: $XDG_CONFIG_HOME, else ~/.config; else ~/.config/jit/config.toml; or
/// --config/JITCTL_CONFIG) with the keys agent, cert, key, ca and socket. An agent named by flag
/// or environment wins over a socket named only in the file.
///
/// Exit codes: 0 done (granted), 1 error (usage errors too), 2 denied, 3 not decided in time or
/// expired; `exec` passes its command's code through; `audit verify` 4 tampered, 5 not sealed.
#[derive(Debug, clap::Parser)]
#[command(name = "jitctl", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    connection: settings::ConnectionArgs,
    /// What to do.
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TopCommand {
    #[command(flatten)]
    Agent(commands::Command),
    /// Check and query audit log files (no agent needed).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

fn main() -> std::process::ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let _ = e.print();
            // Help and version end well; a usage error is an error (1), never "denied" (2).
            return std::process::ExitCode::from(if e.use_stderr() { EXIT_ERROR } else { 0 });
        }
    };
    match run(cli, &matches) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<u8> {
    let command = match cli.command {
        TopCommand::Audit(audit::AuditCommand::Watch { from, count }) => {
            let settings = cli.connection.resolve()?;
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?
                .block_on(async {
                    let mut client = connect::connect(&settings).await?;
                    audit::watch(&mut client, from, count).await
                });
        }
        TopCommand::Audit(cmd) => {
            let key = cli.connection.key_from_command_line(matches);
            return audit::run(cmd, key.as_deref());
        }
        TopCommand::Agent(cmd) => cmd,
    };
    let settings = cli.connection.resolve()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
    runtime.block_on(async {
        let mut client = connect::connect(&settings).await?;
        commands::run(&mut client, command).await
    })
}
