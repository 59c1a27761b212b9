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
    /// Operate and inspect the kernel gate (attach, detach, status, grants).
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
}

/// Options every `bpf` subcommand takes.
#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// bpffs directory holding the gate's maps and links.
    #[arg(long, env = "JIT_PIN_DIR", default_value = crate::datapath::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bpf(cmd) => bpf::run(cmd),
    }
}
