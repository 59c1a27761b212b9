//! `cargo xtask setup`: everything a fresh Debian machine lacks, installed idempotently.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{run as run_command, step};

/// Debian packages a release build needs: LLVM 22 for bpf-linker, protobuf-compiler for
/// etcd-client's generated code.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "protobuf-compiler",
];

/// Debian packages the tests and demos need besides: iproute2 for the namespace tests,
/// prometheus for `promtool check metrics` (the metrics test checks the agent's exposition with
/// Prometheus's own checker), etcd-server for the store and fleet tests against real etcd,
/// faketime (libfaketime) for the agent whose clock is off in the fleet test.
const TEST_PACKAGES: &[&str] = &["iproute2", "prometheus", "etcd-server", "faketime"];

/// Debian packages the benchmarks compare with or drive: nftables and iptables (the legacy
/// backend) as the alternatives to the gate, iperf3 for throughput, ethtool for the veth's GRO,
/// TSO and NAPI statistics.
const BENCH_PACKAGES: &[&str] = &["nftables", "iptables", "iperf3", "ethtool"];

/// What `setup` installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// What `cargo build --release` needs (the container image's build stage).
    Build,
    /// That, and what linting, the tests, the demos and the benchmarks need.
    Everything,
}

/// bpf-linker release built against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub(crate) fn run() -> anyhow::Result<()> {
    run_for(Scope::Everything)
}

pub(crate) fn run_for(scope: Scope) -> anyhow::Result<()> {
    step("setup: checking the toolchain and system packages");
    nightly_rust_src(scope)?;
    let mut packages = BUILD_PACKAGES.to_vec();
    if scope == Scope::Everything {
        packages.extend_from_slice(TEST_PACKAGES);
        packages.extend_from_slice(BENCH_PACKAGES);
    }
    debian_packages(&packages)?;
    bpf_linker()?;
    step("setup: done");
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src(scope: Scope) -> anyhow::Result<()> {
    if !quiet_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("    installing the nightly toolchain (the eBPF program needs -Z build-std)");
        run_command(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("installing the nightly toolchain")?;
    }
    // rust-src for -Z build-std=core; clippy for linting the eBPF crate; rustfmt and clippy on
    // the default toolchain for the host crates.
    if scope == Scope::Build {
        return components("nightly", &["rust-src"]);
    }
    components("nightly", &["rust-src", "clippy"])?;
    components("stable", &["rustfmt", "clippy"])
}

fn components(toolchain: &str, wanted: &[&str]) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if missing.is_empty() {
        println!("    ok: {} ({toolchain})", wanted.join(", "));
        return Ok(());
    }
    println!("    installing {} for {toolchain}", missing.join(", "));
    run_command(
        Command::new("rustup")
            .args(["component", "add", "--toolchain", toolchain])
            .args(&missing),
    )
}

fn debian_packages(wanted: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("    ok: Debian packages ({})", wanted.join(" "));
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root, or install them with \
             apt-get",
            missing.join(" ")
        );
    }
    println!("    installing Debian packages: {}", missing.join(" "));
    run_command(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update")?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install")
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        println!("    ok: {}", v.trim());
        return Ok(());
    }
    println!("    installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_command(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("cargo install bpf-linker")?;
    if !quiet_ok(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}
