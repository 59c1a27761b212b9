//! `jitctl`: the JIT Gate CLI for requesters, approvers and pipelines.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = jit_agent::ctl::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::from(jit_agent::ctl::EXIT_ERROR);
        }
    };
    match runtime.block_on(jit_agent::ctl::run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(jit_agent::ctl::EXIT_ERROR)
        }
    }
}
