//! `cargo xtask`: set up a fresh Debian machine, build, lint and test JIT Gate.

mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// JIT Gate developer tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what a fresh Debian machine lacks: rust-src for nightly, LLVM 22 development
    /// packages, bpf-linker, and what the tests use (iproute2, etcd, promtool, libfaketime).
    /// Idempotent: present pieces are only checked.
    Setup {
        /// Only what a release build needs (nightly rust-src, LLVM 22, protoc, bpf-linker): the
        /// container image's build stage (deploy/Dockerfile).
        #[arg(long)]
        build_only: bool,
    },
    /// Build the agent (and, through its build.rs, the kernel program).
    Build,
    /// rustfmt check, then clippy with warnings denied: host crates, then the eBPF crate on its
    /// own for the BPF target. Also checks that jitctl builds alone: no eBPF-toolchain crate in
    /// its dependency tree, built on stable with no bpf-linker on PATH.
    Lint,
    /// Set up, build, and show the whole story in two network namespaces: a connection dropped,
    /// a request, an approval, the connection passing, a revoke cutting it, a grant expiring.
    /// Needs root; cleans up on exit and on Ctrl-C. `--nodes 3`: a fleet instead, three agents
    /// in three namespaces on a three-member etcd cluster (approve on one node, enforce on
    /// another, revoke from a third, etcd members lost and back).
    Demo {
        /// 1 (the default): one node. 3: the fleet.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
    },
    /// Set up, build in release, and run the benchmarks: the gate's per-packet cost and grant
    /// loading against a pass-everything XDP program; the drop rate of a SYN flood and the
    /// overhead on allowed traffic (iperf3, round trips) against nftables and iptables, per
    /// attach mode, on a veth pair; the control path (time to grant and to revoke, requests per
    /// second at concurrencies 1/16/64 with history in the store); an agent with 1 000 000
    /// grants (reconciliation, memory); and a fleet's approval to first packet across nodes.
    /// Writes BENCHMARKS.md. Needs root.
    Bench {
        /// Fewer rounds and samples, for a first look (a few minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Set up, lint, then run every test. Tests that need the kernel are marked
    /// `#[ignore = "needs root"]` and run as root (`--include-ignored`); without root they are
    /// counted as skipped, and with CI set the task refuses to run without root.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup { build_only } => setup::run_for(if build_only {
            setup::Scope::Build
        } else {
            setup::Scope::Everything
        }),
        Task::Build => {
            setup::run()?;
            cargo(&["build", "--workspace", "--exclude", "jit-ebpf"])
        }
        Task::Lint => lint(),
        Task::Bench { quick } => {
            setup::run()?;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the benchmarks need root (they load BPF programs)");
            }
            step("building and running the benchmarks (release)");
            // The fleet section runs the release agent and jitctl found beside the benchmark.
            cargo(&[
                "build",
                "--quiet",
                "--release",
                "--package",
                "jit-agent",
                "--package",
                "jitctl",
                "--bins",
            ])?;
            cargo(&[
                "run",
                "--quiet",
                "--release",
                "--package",
                "jit-tests",
                "--bin",
                "jit-bench",
                "--",
                if quick { "--quick" } else { "--full" },
            ])
        }
        Task::Demo { nodes } => {
            if nodes == 2 {
                bail!("--nodes takes 1 (one node) or 3 (a fleet on a three-member etcd cluster)");
            }
            let demo = if nodes == 3 {
                "jit-fleet-demo"
            } else {
                "jit-demo"
            };
            setup::run()?;
            step("building jit-agent, jitctl and the demo");
            cargo(&[
                "build",
                "--quiet",
                "--package",
                "jit-agent",
                "--package",
                "jitctl",
                "--bins",
                "--package",
                "jit-tests",
                "--bin",
                demo,
            ])?;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the demo needs root (it loads BPF and creates network namespaces)");
            }
            cargo(&["run", "--quiet", "--package", "jit-tests", "--bin", demo])
        }
        Task::Test { args } => {
            setup::run()?;
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if !root && std::env::var_os("CI").is_some() {
                bail!(
                    "CI is set but this is not root: the kernel tests (marked `needs root`) would \
                     not run, and CI never skips them"
                );
            }
            lint()?;
            let mut test_args = vec![
                "test",
                "--workspace",
                "--exclude",
                "jit-ebpf",
                "--no-fail-fast",
                "--",
            ];
            if root {
                // Tests that need the kernel are `#[ignore = "needs root"]`: as root, all run.
                test_args.push("--include-ignored");
            }
            test_args.extend(args.iter().map(String::as_str));
            step("running the tests");
            if !root {
                println!(
                    "    not root: tests marked `needs root` (BPF, namespaces, the binaries end to \
                     end) are skipped and counted as skipped"
                );
            }
            // The program's aya-log records, with the program and agent built with logging
            // (a second build of both; the shipped ones have no log calls).
            let mut log_args = vec![
                "test",
                "--package",
                "jit-tests",
                "--features",
                "ebpf-log",
                "--test",
                "ebpf_log",
                "--",
            ];
            if root {
                log_args.push("--include-ignored");
            }
            log_args.extend(args.iter().map(String::as_str));
            test_with_summary(&[&test_args, &log_args])
        }
    }
}

/// Runs each `cargo test` command, echoing its output, and ends with one line totalling every
/// test binary's `test result:` line, so a reader (or CI) sees the whole count at the end. Every
/// command runs even when one fails.
fn test_with_summary(runs: &[&[&str]]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};

    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for args in runs {
        let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(*args)
            .current_dir(workspace_root())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting cargo test")?;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line.context("reading cargo test output")?;
                println!("{line}");
                if let Some(rest) = line.strip_prefix("test result: ") {
                    for part in rest.split(';') {
                        let mut words = part.split_whitespace().rev();
                        let (Some(word), Some(n)) = (words.next(), words.next()) else {
                            continue;
                        };
                        let n: u64 = n.trim_start_matches("ok.").trim().parse().unwrap_or(0);
                        match word {
                            "passed" => passed += n,
                            "failed" => failed += n,
                            "ignored" => ignored += n,
                            _ => {}
                        }
                    }
                }
            }
        }
        let status = child.wait().context("waiting for cargo test")?;
        if !status.success() {
            failures.push(format!("cargo {} ({status})", args.join(" ")));
        }
    }
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !failures.is_empty() {
        bail!("failed: {}", failures.join("; "));
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--", "--check"]).context("run `cargo fmt --all` and commit")?;
    step("clippy (host crates)");
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "jit-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("clippy (the ebpf-log build of the agent and its test)");
    cargo(&[
        "clippy",
        "--package",
        "jit-agent",
        "--package",
        "jit-tests",
        "--features",
        "jit-tests/ebpf-log",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    jitctl_alone()?;
    step("clippy (jit-ebpf, BPF target)");
    // On its own: a workspace-wide run would unify features and pull std into the program.
    for features in ["", "log"] {
        run(Command::new("cargo")
            .args([
                "+nightly",
                "clippy",
                "--package",
                "jit-ebpf",
                "--features",
                features,
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(workspace_root()))?;
    }
    Ok(())
}

/// Crates jitctl must never depend on: they need the eBPF toolchain (nightly, bpf-linker, LLVM)
/// or are the agent's own.
const NOT_FOR_JITCTL: &[&str] = &[
    "aya",
    "aya-obj",
    "aya-build",
    "aya-log",
    "jit-ebpf",
    "jit-common",
    "jit-agent",
    "redb",
    "cedar-policy",
];

/// Keeps jitctl buildable anywhere: its dependency tree holds none of [`NOT_FOR_JITCTL`], and it
/// builds on the stable toolchain with a PATH that holds no bpf-linker.
fn jitctl_alone() -> anyhow::Result<()> {
    step("jitctl builds alone (stable, no eBPF toolchain)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "tree",
            "--package",
            "jitctl",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(workspace_root())
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = tree
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|name| NOT_FOR_JITCTL.contains(&name))
        })
        .collect();
    if !bad.is_empty() {
        bail!("jitctl must build without the eBPF toolchain, but depends on: {bad:?}");
    }
    // A PATH with cargo, rustc and rustup only (from the toolchain's bin directory), then the
    // system's: a build step that needed bpf-linker would fail here.
    let tools = std::env::temp_dir().join(format!("jitctl-alone-{}", std::process::id()));
    std::fs::create_dir_all(&tools).context("creating a tools directory")?;
    let result = (|| {
        for tool in ["cargo", "rustc", "rustup"] {
            let found = which_in_path(tool).with_context(|| format!("{tool} is not on PATH"))?;
            let link = tools.join(tool);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&found, &link)
                .with_context(|| format!("linking {}", found.display()))?;
        }
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin", tools.display());
        run(Command::new(tools.join("cargo"))
            .args(["build", "--quiet", "--package", "jitctl", "--locked"])
            .env("PATH", path)
            .env("RUSTUP_TOOLCHAIN", "stable")
            .current_dir(workspace_root()))
    })();
    let _ = std::fs::remove_dir_all(&tools);
    result
}

fn which_in_path(tool: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Prints a progress line.
pub(crate) fn step(what: &str) {
    println!("==> {what}");
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| ".".into(), std::path::Path::to_path_buf)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(workspace_root()),
    )
}

/// Runs a command, inheriting stdio; fails naming the command when it fails.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, workspace_root};

    /// Every `cargo xtask ...` the container image's build runs is a command this xtask takes.
    #[test]
    fn the_dockerfile_runs_commands_xtask_takes() {
        let dockerfile = workspace_root().join("deploy/Dockerfile");
        let text = std::fs::read_to_string(&dockerfile).expect("deploy/Dockerfile");
        let calls: Vec<Vec<&str>> = text
            .split(['\n', '&', ';'])
            .filter_map(|part| {
                part.trim()
                    .trim_start_matches("RUN ")
                    .strip_prefix("cargo xtask ")
            })
            .map(|rest| rest.trim_end_matches('\\').split_whitespace().collect())
            .collect();
        assert!(
            !calls.is_empty(),
            "no `cargo xtask` in {}",
            dockerfile.display()
        );
        for args in calls {
            let parsed = Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.clone()));
            assert!(
                parsed.is_ok(),
                "cargo xtask {}: {:?}",
                args.join(" "),
                parsed.err()
            );
        }
        // And a command it does not take would be caught.
        assert!(Cli::try_parse_from(["cargo xtask", "setup", "--build-onyl"]).is_err());
    }
}
