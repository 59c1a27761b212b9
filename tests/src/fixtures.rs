//! Fixtures shared by every test: configurations, policies, kernel grant literals and the
//! workspace's binaries. Defined once here, so a change of shape is made in one place.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use jit_agent::{
    config::{Config, Overrides},
    datapath::{GrantEntry, GrantScope, boottime_ns},
    policy::{DEFAULT_SCHEMA, Policies, load_text},
};

/// The `[tls]` and `[policy]` sections an in-process test needs: required by the configuration,
/// never read by an engine or a kernel sync.
pub const STUB_SECTIONS: &str =
    "[tls]\nca = 'x'\ncert = 'x'\nkey = 'x'\n[policy]\nfile = 'p.cedar'\n";

/// A validated configuration of `body` (`[[services]]`, `[[identities]]`, `[[groups]]` ...)
/// under [`STUB_SECTIONS`]; panics naming the field when it is invalid.
#[must_use]
pub fn config(body: &str) -> Arc<Config> {
    parse_config(&format!("{STUB_SECTIONS}{body}"))
}

/// [`config`], with the state directory in `state_dir` (for code that writes there, such as
/// the kernel sync's names).
#[must_use]
pub fn config_in(state_dir: &Path, body: &str) -> Arc<Config> {
    parse_config(&format!(
        "[agent]\nstate_dir = {:?}\n{STUB_SECTIONS}{body}",
        state_dir.display().to_string()
    ))
}

fn parse_config(text: &str) -> Arc<Config> {
    Arc::new(
        Config::from_text(Path::new("t.toml"), text, &Overrides::default())
            .unwrap_or_else(|e| panic!("config: {e}")),
    )
}

/// The audit log `cfg` names (under its state directory), opened as the daemon opens it.
#[must_use]
pub fn audit_log(cfg: &Config) -> Arc<jit_agent::audit::AuditLog> {
    let (log, _) = jit_agent::audit::AuditLog::open(jit_agent::audit::AuditOptions {
        dir: cfg.audit.dir.clone(),
        key_file: cfg.audit.signing_key.clone(),
        rotate_bytes: cfg.audit.rotate_bytes,
        checkpoint_every_records: cfg.audit.checkpoint_every_records,
        checkpoint_every: cfg.audit.checkpoint_every,
        node: "test".into(),
        anchor_file: cfg.state_dir.join("audit-anchor.json"),
    })
    .unwrap_or_else(|e| panic!("opening the audit log: {e}"));
    Arc::new(log)
}

/// The files of an audit series in `dir` (`audit-*.jsonl` before `audit.jsonl`).
#[must_use]
pub fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
}

/// The audit series in `dir`, read, for `jit_api::audit::verify`.
#[must_use]
pub fn audit_series(dir: &Path) -> Vec<jit_api::audit::AuditFile> {
    audit_files(dir)
        .into_iter()
        .map(|p| jit_api::audit::AuditFile {
            name: p.display().to_string(),
            bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        })
        .collect()
}

/// Cedar policies from `text`, validated against the built-in schema.
#[must_use]
pub fn policies(text: &str) -> Arc<Policies> {
    Arc::new(Policies::from_loaded(
        load_text("p.cedar", text, "schema", DEFAULT_SCHEMA).unwrap_or_else(|e| panic!("{e}")),
    ))
}

/// The sections of a real agent's configuration file, for tests and the demo that run
/// `jit-agent run`: `[agent]`, `[tls]` from the files `jit-agent certs init --dir <certs>`
/// writes, and `[policy]` from `<dir>/policies.cedar`. Services, groups and identities follow.
pub struct AgentFiles<'a> {
    /// Directory for the socket, the state and the policy file.
    pub dir: &'a Path,
    /// Directory `jit-agent certs init` wrote to.
    pub certs: &'a Path,
    /// bpffs pin directory.
    pub pin_dir: &'a Path,
    /// mTLS listen address.
    pub listen: &'a str,
    /// Interfaces to gate (`"veth0"`, `"tun0:tc"`).
    pub interfaces: &'a [&'a str],
    /// `request_ttl`, when not the default.
    pub request_ttl: Option<&'a str>,
}

impl AgentFiles<'_> {
    /// The sections as TOML.
    #[must_use]
    pub fn sections(&self) -> String {
        let d = self.dir.display();
        let c = self.certs.display();
        let interfaces: Vec<String> = self.interfaces.iter().map(|i| format!("{i:?}")).collect();
        let ttl = self
            .request_ttl
            .map(|t| format!("request_ttl = {t:?}\n"))
            .unwrap_or_default();
        format!(
            "[agent]\nlisten = {listen:?}\nunix_socket = \"{d}/agent.sock\"\nstate_dir = \
             \"{d}/state\"\npin_dir = \"{pin}\"\ninterfaces = [{ifaces}]\n{ttl}\n[tls]\nca = \
             \"{c}/ca.pem\"\ncert = \"{c}/agent.pem\"\nkey = \"{c}/agent.key\"\n\n[policy]\nfile \
             = \"{d}/policies.cedar\"\n",
            listen = self.listen,
            pin = self.pin_dir.display(),
            ifaces = interfaces.join(", "),
        )
    }
}

/// A kernel grant of `identity_id` for `service_id` valid from `not_before_ns` until
/// `expires_at_ns` (`CLOCK_BOOTTIME`).
#[must_use]
pub fn grant_between(
    scope: GrantScope,
    identity_id: u32,
    service_id: u32,
    grant_id: u64,
    not_before_ns: u64,
    expires_at_ns: u64,
) -> GrantEntry {
    GrantEntry {
        scope,
        identity_id,
        service_id,
        grant_id,
        not_before_ns,
        expires_at_ns,
        usage: jit_agent::datapath::Usage::default(),
    }
}

/// A kernel grant in force now: from a second ago for an hour.
#[must_use]
pub fn live_grant(
    scope: GrantScope,
    identity_id: u32,
    service_id: u32,
    grant_id: u64,
) -> GrantEntry {
    let now = boottime_ns().expect("clock");
    grant_between(
        scope,
        identity_id,
        service_id,
        grant_id,
        now.saturating_sub(1_000_000_000),
        now + 3_600_000_000_000,
    )
}

/// A host grant scope for `addr`.
#[must_use]
pub fn host(addr: &str) -> GrantScope {
    GrantScope::Host(
        addr.parse::<IpAddr>()
            .unwrap_or_else(|e| panic!("{addr:?}: {e}")),
    )
}

/// A binary of the workspace (`jit-agent`, `jitctl`), next to the running test's target
/// directory; built once if a single-package test run has not built it.
#[must_use]
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let package = if name == "jitctl" {
            "jitctl"
        } else {
            "jit-agent"
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "--package", package, "--bin", name]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building {name} failed");
    }
    assert!(bin.exists(), "{} is missing after the build", bin.display());
    bin
}
