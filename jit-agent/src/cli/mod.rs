//! The `jit-agent` command line.

mod bpf;
mod table;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// JIT Gate node agent.
#[derive(Debug, Parser)]
#[command(name = "jit-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the gate and serve the API until SIGTERM (the gate stays attached).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "JIT_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        overrides: RunOverrides,
    },
    /// Check a configuration file and print what it configures.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short, env = "JIT_CONFIG")]
        config: PathBuf,
    },
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Operate and inspect the kernel gate (attach, detach, status, grants).
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
}

/// Flags of `run` that override the file.
#[derive(Debug, clap::Args)]
pub struct RunOverrides {
    /// mTLS listen address (overrides agent.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Unix socket path (overrides agent.unix_socket).
    #[arg(long)]
    pub unix_socket: Option<PathBuf>,
    /// State directory (overrides agent.state_dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// bpffs pin directory (overrides agent.pin_dir).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Interface to gate, `eth0` or `eth0:tc` (repeatable; replaces agent.interfaces).
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
}

/// `certs` commands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a development CA, the agent's certificate and identity certificates.
    Init {
        /// Output directory.
        #[arg(long, default_value = "./jit-certs")]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "jit.local")]
        trust_domain: String,
        /// Extra host name or address of the agent (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Identity path, e.g. alice or ci/deployer (repeatable).
        #[arg(long = "identity")]
        identities: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

/// Options every `bpf` subcommand takes.
#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// bpffs directory holding the gate's maps and links.
    #[arg(long, env = "JIT_PIN_DIR", default_value = crate::datapath::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Renders a plain-text table (for people; scripts use `--json`).
#[must_use]
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    table::render(header, rows)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, overrides } => {
            let cfg = crate::config::Config::load(
                &config,
                &crate::config::Overrides {
                    listen: overrides.listen,
                    unix_socket: overrides.unix_socket,
                    state_dir: overrides.state_dir,
                    pin_dir: overrides.pin_dir,
                    interfaces: overrides.interfaces,
                },
            )?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::daemon::run(cfg))
        }
        Command::CheckConfig { config } => {
            let cfg = crate::config::Config::load(&config, &crate::config::Overrides::default())?;
            println!("{}: valid", config.display());
            println!("  listen {} and {}", cfg.listen, cfg.unix_socket.display());
            for (iface, mode) in &cfg.interfaces {
                println!("  gate on {iface} ({mode})");
            }
            for s in cfg.services.values() {
                println!(
                    "  service {} ({:?}): {} destination(s), max {}, {} approval(s)",
                    s.name,
                    s.mode,
                    s.destinations.len(),
                    crate::duration::format_duration(s.max_duration),
                    s.approvals_required
                );
            }
            for (id, nets) in &cfg.identities {
                let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
                println!("  identity {id} from {}", nets.join(", "));
            }
            Ok(())
        }
        Command::Certs(CertsCommand::Init {
            dir,
            trust_domain,
            hosts,
            identities,
            days,
        }) => {
            let w = crate::certs::init(&crate::certs::CertsPlan {
                dir,
                trust_domain: trust_domain.clone(),
                hosts,
                identities: identities.clone(),
                days,
            })?;
            for f in &w.files {
                println!("wrote {}", f.display());
            }
            for id in identities {
                println!("identity spiffe://{trust_domain}/{id}");
            }
            Ok(())
        }
        Command::Bpf(cmd) => bpf::run(cmd),
    }
}
