//! A fleet for tests and the multi-node demo: three nodes, each a network namespace joined to
//! the host by a veth pair, each running `jit-agent` on a shared three-member etcd cluster that
//! serves on the host ends of those links; the `echo` service runs on node 1. Field order is drop
//! order: agents and namespaces go before etcd, and everything is removed on drop.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    PinDirGuard, TempDir,
    echo::EchoServer,
    etcd::Cluster,
    netns::{Netns, ip},
    remove_pin_dir, short_tag, unique,
};

/// The echo service's port on node 1.
pub const ECHO_PORT: u16 = 8443;
/// Nodes in a fleet.
pub const NODES: usize = 3;

/// Who may do what: `ci` asks, `sre/carol` approves, denies and revokes.
pub const POLICIES: &str = r#"
permit (principal == Jit::Identity::"spiffe://jit.test/ci", action == Jit::Action::"request", resource);
permit (principal == Jit::Identity::"spiffe://jit.test/sre/carol", action in [Jit::Action::"approve", Jit::Action::"deny", Jit::Action::"revoke"], resource);
"#;

/// The host end of node `i`'s link (the test connects from it; etcd serves on it).
pub fn host_ip(i: usize) -> String {
    format!("10.216.{i}.1")
}

/// Node `i`'s address.
pub fn node_ip(i: usize) -> String {
    format!("10.216.{i}.2")
}

/// One node: a namespace joined to the host by a veth pair, its agent and its files.
pub struct Node {
    /// Its namespace.
    pub ns: Netns,
    iface: String,
    /// Its files (config, state, socket, log).
    pub dir: TempDir,
    /// Its pin directory.
    pub pin_dir: PathBuf,
    _pins: PinDirGuard,
    agent: Option<Child>,
}

impl Node {
    /// Node `i`: its namespace and link, not its agent.
    #[must_use]
    pub fn new(i: usize) -> Self {
        let ns = Netns::new("jits");
        let tag = short_tag();
        let (iface, host_if) = (format!("jn{tag}"), format!("jh{tag}"));
        // Made in the node's namespace with one end moved to the test's own: deleting the
        // namespace deletes both ends.
        let me = std::process::id().to_string();
        ns.exec_ip(&[
            "link", "add", &iface, "type", "veth", "peer", "name", &host_if, "netns", &me,
        ]);
        ns.exec_ip(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", &iface]);
        ns.exec_ip(&["link", "set", &iface, "up"]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", host_ip(i)),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-cli-")));
        Self {
            ns,
            iface,
            dir: TempDir::new("jit-fleet-"),
            _pins: PinDirGuard(pin_dir.clone()),
            pin_dir,
            agent: None,
        }
    }

    /// The agent, TLS and policy sections of node `i`'s configuration.
    fn sections(&self, i: usize, certs: &Path) -> String {
        crate::fixtures::AgentFiles {
            dir: self.dir.path(),
            certs,
            pin_dir: &self.pin_dir,
            listen: &format!("{}:7443", node_ip(i)),
            interfaces: &[&self.iface],
            request_ttl: None,
        }
        .sections()
    }

    /// Writes node `i`'s configuration (etcd at `etcd`) and policies; returns the file.
    #[must_use]
    pub fn config(&self, i: usize, certs: &Path, etcd: &[String]) -> PathBuf {
        let sections = self.sections(i, certs);
        let endpoints: Vec<String> = etcd.iter().map(|e| format!("{e:?}")).collect();
        // One service, on node 1; every node knows it (requests and approvals are cluster-wide),
        // only node 1 has its address.
        let text = format!(
            "{sections}\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\n\n\
             [[services]]\nname = \"echo\"\ndestinations = [\"{}:{ECHO_PORT}/tcp\"]\n\
             max_duration = \"30m\"\n\n[[identities]]\nspiffe_id = \"spiffe://jit.test/ci\"\n\
             sources = [\"{}/32\"]\n",
            endpoints.join(", "),
            node_ip(1),
            host_ip(1),
        );
        let path = self.dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("config");
        std::fs::write(self.dir.path().join("policies.cedar"), POLICIES).expect("policies");
        path
    }

    /// Writes node `i`'s configuration for an agent on its own, with the embedded store, and
    /// `policies`: the echo service on this node, `ci` bound to the host end of its link.
    #[must_use]
    pub fn config_alone(&self, i: usize, certs: &Path, policies: &str) -> PathBuf {
        let sections = self.sections(i, certs);
        let text = format!(
            "{sections}\n[[services]]\nname = \"echo\"\ndestinations = [\"{}:{ECHO_PORT}/tcp\"]\n\
             max_duration = \"30m\"\nrequire_reason = false\n\n[[identities]]\n\
             spiffe_id = \"spiffe://jit.test/ci\"\nsources = [\"{}/32\"]\n",
            node_ip(i),
            host_ip(i),
        );
        let path = self.dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("config");
        std::fs::write(self.dir.path().join("policies.cedar"), policies).expect("policies");
        path
    }

    /// Starts `agent` with `config` and waits (at most 30 s) until it answers.
    pub fn start(&mut self, config: &Path) {
        self.start_with(config, &[]);
    }

    /// Starts `agent` with `config` and `env` and waits (at most 30 s) until it answers.
    pub fn start_with(&mut self, config: &Path, env: &[(&str, String)]) {
        self.start_within(config, env, Duration::from_secs(30));
    }

    /// Starts `agent` with `config` and `env` and waits (at most `patience`) until it answers.
    pub fn start_within(&mut self, config: &Path, env: &[(&str, String)], patience: Duration) {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).expect("log");
        let child = self
            .ns
            .command(agent_bin())
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,jit_agent::store=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting jit-agent");
        self.agent = Some(child);
        let deadline = Instant::now() + patience;
        while !self.local(&["status"]).status.success() {
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(Child::try_wait) {
                panic!("jit-agent exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "jit-agent did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its agent's process id, while it runs.
    #[must_use]
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Kills its agent (`SIGKILL`).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its agent's log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// jitctl as root on the node's local socket.
    /// jitctl as root on its local socket.
    #[must_use]
    pub fn local(&self, args: &[&str]) -> Output {
        Command::new(jitctl_bin())
            .arg("--socket")
            .arg(self.dir.path().join("agent.sock"))
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("JITCTL_CONFIG")
            .output()
            .expect("jitctl")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!(
                "--- agent log of {} (last lines) ---\n{}",
                self.ns.name(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        remove_pin_dir(&self.pin_dir);
    }
}

/// jitctl as `who` against node `i`'s API, from the host.
#[must_use]
pub fn ctl(certs: &Path, home: &Path, i: usize, who: &str, args: &[&str]) -> Output {
    Command::new(jitctl_bin())
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("JITCTL_CONFIG")
        .env("JIT_AGENT", format!("https://{}:7443", node_ip(i)))
        .env("JIT_CA", certs.join("ca.pem"))
        .env("JIT_CERT", certs.join(format!("{who}.pem")))
        .env("JIT_KEY", certs.join(format!("{who}.key")))
        .output()
        .expect("jitctl")
}

/// The output of a command that must have succeeded.
#[track_caller]
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The echo service on node 1, from the host (source: the host end of node 1's link).
#[must_use]
pub fn connect() -> Option<TcpStream> {
    let to: SocketAddr = format!("{}:{ECHO_PORT}", node_ip(1)).parse().expect("addr");
    TcpStream::connect_timeout(&to, Duration::from_millis(700)).ok()
}

/// The environment that runs a program with its wall clock `offset` (as `+4s` or `-4s`) off
/// this machine's, through libfaketime (Debian's `faketime`, installed by `cargo xtask
/// setup`): `CLOCK_REALTIME` only; the monotonic and boot clocks stay true, as they do on a
/// node whose NTP is off.
///
/// # Panics
/// When libfaketime is not installed.
#[must_use]
pub fn clock_off_by(offset: &str) -> Vec<(&'static str, String)> {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime (Debian's faketime; cargo xtask setup installs it)");
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME", offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

/// Polls `f` every 50 ms for at most `within`.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The request id jitctl printed.
#[must_use]
pub fn request_id(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.starts_with("req-"))
        .map(|w| w.trim_end_matches([',', ':', '.']).to_string())
        .unwrap_or_else(|| panic!("no request id in {out:?}"))
}

/// Three nodes, their agents running, on a three-member etcd cluster; the echo service runs on
/// node 1. Field order is drop order: agents and namespaces go before etcd.
pub struct Fleet {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Their configuration files.
    pub configs: Vec<PathBuf>,
    _echo: EchoServer,
    /// The etcd cluster.
    pub etcd: Cluster,
    /// Certificates and jitctl's home.
    pub home: TempDir,
    /// One fleet at a time: they use the same addresses on the host.
    _one_at_a_time: OneFleet,
}

/// Whether a fleet exists in this process, and the waiters for it to go.
static FLEET_EXISTS: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

/// The right to make a fleet in this process; given back on drop.
struct OneFleet;

impl OneFleet {
    fn take() -> Self {
        let (lock, freed) = &FLEET_EXISTS;
        let mut exists = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *exists {
            exists = freed
                .wait(exists)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *exists = true;
        Self
    }
}

impl Drop for OneFleet {
    fn drop(&mut self) {
        let (lock, freed) = &FLEET_EXISTS;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        freed.notify_one();
    }
}

impl Fleet {
    /// Starts a fleet (one at a time per process: they share host addresses).
    #[must_use]
    pub fn start() -> Self {
        let one_at_a_time = OneFleet::take();
        let mut nodes: Vec<Node> = (0..NODES).map(Node::new).collect();
        let hosts: Vec<String> = (0..NODES).map(host_ip).collect();
        let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let etcd = Cluster::start_on(3, &host_refs);
        let home = TempDir::new("jit-fleet-certs-");
        let certs = home.path().join("certs");
        let mut init = Command::new(agent_bin());
        init.args(["certs", "init", "--trust-domain", "jit.test"]);
        for i in 0..NODES {
            init.args(["--host", &node_ip(i)]);
        }
        init.args(["--identity", "ci", "--identity", "sre/carol", "--dir"])
            .arg(&certs);
        ok(&init.output().expect("certs init"));
        let configs: Vec<PathBuf> = (0..NODES)
            .map(|i| nodes[i].config(i, &certs, &etcd.endpoints_at(&host_ip(i))))
            .collect();
        for (node, config) in nodes.iter_mut().zip(&configs) {
            node.start(config);
        }
        let echo = EchoServer::start(
            &nodes[1].ns,
            format!("{}:{ECHO_PORT}", node_ip(1)).parse().expect("addr"),
        );
        Self {
            nodes,
            configs,
            _echo: echo,
            etcd,
            home,
            _one_at_a_time: one_at_a_time,
        }
    }

    /// The grant ids node `i`'s kernel holds.
    #[must_use]
    pub fn kernel_grants(&self, i: usize) -> Vec<String> {
        kernel_grants(&self.nodes[i].pin_dir)
    }

    /// `jitctl` through node `i` as `who`.
    #[must_use]
    pub fn ctl(&self, i: usize, who: &str, args: &[&str]) -> Output {
        let home = self.home.path();
        ctl(&home.join("certs"), home, i, who, args)
    }

    /// One sample of propagation: a request pending on node 0 is approved through node 0, and
    /// connections to node 1's echo service are tried every 2 ms from the moment the approval
    /// starts (the `jitctl approve` process and its TLS handshake included). Returns the time to
    /// the first connection attempt that passed, and how long the approval call itself took;
    /// then revokes the grant and waits until node 1 drops again.
    ///
    /// # Panics
    /// When no connection passes within 5 s, or a call fails.
    #[must_use]
    pub fn approval_to_first_connection(&self) -> (Duration, Duration) {
        use std::sync::{Arc, Mutex};
        let id = request_id(&ok(&self.ctl(
            0,
            "ci",
            &["request", "echo", "--for", "5m", "--reason", "propagation"],
        )));
        let first: Arc<Mutex<Option<Duration>>> = Arc::default();
        let start = Instant::now();
        let approver = {
            let (home, id) = (self.home.path().to_path_buf(), id.clone());
            std::thread::spawn(move || {
                let out = ctl(
                    &home.join("certs"),
                    &home,
                    0,
                    "sre_carol",
                    &["approve", &id],
                );
                (ok(&out), start.elapsed())
            })
        };
        let to: SocketAddr = format!("{}:{ECHO_PORT}", node_ip(1)).parse().expect("addr");
        let mut probes = Vec::new();
        while start.elapsed() < Duration::from_secs(5)
            && first.lock().map(|f| f.is_none()).unwrap_or(false)
        {
            let (first, at) = (Arc::clone(&first), start.elapsed());
            probes.push(std::thread::spawn(move || {
                // A dropped SYN is not retransmitted within 300 ms: a success means the SYN
                // sent at `at` passed.
                if TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok()
                    && let Ok(mut f) = first.lock()
                {
                    *f = Some(f.map_or(at, |t| t.min(at)));
                }
            }));
            std::thread::sleep(Duration::from_millis(2));
        }
        for p in probes {
            let _ = p.join();
        }
        let (_, approve_took) = approver.join().expect("approver");
        let passed = first
            .lock()
            .ok()
            .and_then(|f| *f)
            .expect("no connection passed within 5 s of the approval");
        let grants: serde_json::Value = serde_json::from_str(&ok(&self.ctl(
            0,
            "sre_carol",
            &["ls", "grants", "--active", "--json"],
        )))
        .expect("JSON");
        for g in grants.as_array().into_iter().flatten() {
            if let Some(gid) = g["id"].as_str() {
                ok(&self.ctl(0, "sre_carol", &["revoke", gid, "--reason", "next sample"]));
            }
        }
        assert!(
            eventually(Duration::from_secs(5), || connect().is_none()),
            "node 1 still open after the revoke"
        );
        (passed, approve_took)
    }
}

/// The grant ids the kernel under `pin_dir` holds.
#[must_use]
pub fn kernel_grants(pin_dir: &Path) -> Vec<String> {
    {
        let out = Command::new(agent_bin())
            .args(["bpf", "grants", "--json", "--pin-dir"])
            .arg(pin_dir)
            .output()
            .expect("bpf grants");
        let v: serde_json::Value = serde_json::from_str(&ok(&out)).expect("JSON");
        v.as_array()
            .expect("array")
            .iter()
            .map(|g| format!("grant-{:012x}", g["grant_id"].as_u64().expect("id")))
            .collect()
    }
}

/// The agent binary: `$JIT_BIN_DIR/jit-agent` when set (the demo), else the workspace's.
#[must_use]
pub fn agent_bin() -> PathBuf {
    binary("jit-agent")
}

/// The jitctl binary, found like [`agent_bin`].
#[must_use]
pub fn jitctl_bin() -> PathBuf {
    binary("jitctl")
}

fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("JIT_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // A binary of this workspace (the demo) runs beside the others; a test runs from `deps/`.
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.exists());
    beside.unwrap_or_else(|| crate::fixtures::workspace_bin(name))
}
