//! A fleet: three agents, each in its own network namespace as a node, sharing a real
//! three-member etcd cluster that the test starts (Debian's `etcd-server`), with real traffic
//! from the host into the nodes. A grant requested and approved through node A's API passes
//! traffic on node B; revoking it through node C cuts the live connection on B; losing one etcd
//! member changes nothing users see; losing quorum refuses new grants with `UNAVAILABLE` while the
//! grants in force keep being enforced; once quorum is back the agents work again without a
//! restart. Everything the test makes (namespaces, veth pairs, pins, processes, etcd data) is
//! removed on drop, also when it fails.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use jit_tests::{
    PinDirGuard, TempDir,
    echo::{EchoServer, round_trip},
    etcd::Cluster,
    netns::{Netns, ip},
    remove_pin_dir, require_root, short_tag, unique,
};

const AGENT: &str = env!("CARGO_BIN_EXE_jit-agent");
const ECHO_PORT: u16 = 8443;
const NODES: usize = 3;

const POLICIES: &str = r#"
permit (principal == Jit::Identity::"spiffe://jit.test/ci", action == Jit::Action::"request", resource);
permit (principal == Jit::Identity::"spiffe://jit.test/sre/carol", action in [Jit::Action::"approve", Jit::Action::"deny", Jit::Action::"revoke"], resource);
"#;

/// The host end of node `i`'s link (the test connects from it; etcd serves on it).
fn host_ip(i: usize) -> String {
    format!("10.216.{i}.1")
}

/// Node `i`'s address.
fn node_ip(i: usize) -> String {
    format!("10.216.{i}.2")
}

/// One node: a namespace joined to the host by a veth pair, its agent and its files.
struct Node {
    ns: Netns,
    iface: String,
    dir: TempDir,
    pin_dir: PathBuf,
    _pins: PinDirGuard,
    agent: Option<Child>,
}

impl Node {
    fn new(i: usize) -> Self {
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

    fn config(&self, i: usize, certs: &Path, etcd: &[String]) -> PathBuf {
        let sections = jit_tests::fixtures::AgentFiles {
            dir: self.dir.path(),
            certs,
            pin_dir: &self.pin_dir,
            listen: &format!("{}:7443", node_ip(i)),
            interfaces: &[&self.iface],
            request_ttl: None,
        }
        .sections();
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

    fn start(&mut self, config: &Path) {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).expect("log");
        let child = self
            .ns
            .command(AGENT)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,jit_agent::store=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting jit-agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
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

    fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// jitctl as root on the node's local socket.
    fn local(&self, args: &[&str]) -> Output {
        Command::new(jit_tests::fixtures::workspace_bin("jitctl"))
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
fn ctl(certs: &Path, home: &Path, i: usize, who: &str, args: &[&str]) -> Output {
    Command::new(jit_tests::fixtures::workspace_bin("jitctl"))
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

#[track_caller]
fn ok(out: &Output) -> String {
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
fn connect() -> Option<TcpStream> {
    let to: SocketAddr = format!("{}:{ECHO_PORT}", node_ip(1)).parse().expect("addr");
    TcpStream::connect_timeout(&to, Duration::from_millis(700)).ok()
}

/// Polls `f` every 50 ms for at most `within`.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
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

fn request_id(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.starts_with("req-"))
        .map(|w| w.trim_end_matches([',', ':', '.']).to_string())
        .unwrap_or_else(|| panic!("no request id in {out:?}"))
}

/// Three nodes, their agents running, on a three-member etcd cluster; the echo service runs on
/// node 1. Field order is drop order: agents and namespaces go before etcd.
struct Fleet {
    nodes: Vec<Node>,
    configs: Vec<PathBuf>,
    _echo: EchoServer,
    etcd: Cluster,
    home: TempDir,
    /// One fleet at a time: they use the same addresses on the host.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_FLEET: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Fleet {
    fn start() -> Self {
        let one_at_a_time = ONE_FLEET
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut nodes: Vec<Node> = (0..NODES).map(Node::new).collect();
        let hosts: Vec<String> = (0..NODES).map(host_ip).collect();
        let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let etcd = Cluster::start_on(3, &host_refs);
        let home = TempDir::new("jit-fleet-certs-");
        let certs = home.path().join("certs");
        let mut init = Command::new(AGENT);
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
    fn kernel_grants(&self, i: usize) -> Vec<String> {
        kernel_grants(&self.nodes[i].pin_dir)
    }
}

/// The grant ids the kernel under `pin_dir` holds.
fn kernel_grants(pin_dir: &Path) -> Vec<String> {
    {
        let out = Command::new(AGENT)
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

#[test]
#[ignore = "needs root and etcd"]
fn a_fleet_on_etcd_enforces_everywhere_and_survives_etcd_failures() {
    if !require_root() {
        return;
    }
    let mut f = Fleet::start();
    let (certs, home) = (f.home.path().join("certs"), f.home.path().to_path_buf());
    let ctl = |i: usize, who: &str, args: &[&str]| ctl(&certs, &home, i, who, args);

    assert!(connect().is_none(), "connected without a grant");

    // Asked and approved through node 0; enforced on node 1.
    let out = ok(&ctl(
        0,
        "ci",
        &["request", "echo", "--for", "10m", "--reason", "deploy"],
    ));
    assert!(out.contains("pending"), "{out}");
    let id = request_id(&out);
    let approved_at = Instant::now();
    ok(&ctl(0, "sre_carol", &["approve", &id]));
    let mut conn = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            conn = connect();
            conn.is_some()
        }),
        "the grant approved on node 0 never opened node 1:\n{}",
        f.nodes[1].log()
    );
    eprintln!(
        "approval on node 0 to first connection on node 1: {:?}",
        approved_at.elapsed()
    );
    let mut conn = conn.expect("connected");
    assert!(round_trip(&mut conn, b"hello", Duration::from_secs(2)));
    let grants: serde_json::Value = serde_json::from_str(&ok(&ctl(
        2,
        "sre_carol",
        &["ls", "grants", "--active", "--json"],
    )))
    .expect("JSON");
    let grant_id = grants[0]["id"].as_str().expect("grant id").to_string();

    // Revoked through node 2: the live connection on node 1 is cut.
    ok(&ctl(
        2,
        "sre_carol",
        &["revoke", &grant_id, "--reason", "done"],
    ));
    assert!(
        eventually(Duration::from_secs(3), || !round_trip(
            &mut conn,
            b"again",
            Duration::from_millis(300)
        )),
        "data still flowed on node 1 after the revoke through node 2"
    );
    assert!(connect().is_none());

    // One etcd member down: nothing visible to users.
    f.etcd.kill(0);
    let out = ok(&ctl(
        1,
        "ci",
        &["request", "echo", "--for", "10m", "--reason", "again"],
    ));
    let id = request_id(&out);
    ok(&ctl(2, "sre_carol", &["approve", &id]));
    let mut conn = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            conn = connect();
            conn.is_some()
        }),
        "no access with one etcd member down"
    );
    let mut conn = conn.expect("connected");

    // Quorum lost: no new grant (UNAVAILABLE, within the store's bound), the grant in force is
    // still enforced.
    f.etcd.kill(1);
    let started = Instant::now();
    let refused = ctl(
        0,
        "ci",
        &["request", "echo", "--for", "10m", "--reason", "no quorum"],
    );
    assert!(!refused.status.success(), "granted without quorum");
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        stderr.contains("store") || stderr.contains("unavailable"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        round_trip(&mut conn, b"still", Duration::from_secs(2)),
        "the grant in force stopped working without quorum"
    );

    // Quorum back: the agents work again, no restart.
    f.etcd.restart(0);
    f.etcd.restart(1);
    f.etcd.wait_healthy(Duration::from_secs(30));
    let mut back = false;
    for _ in 0..50 {
        let out = ctl(
            0,
            "ci",
            &["request", "echo", "--for", "5m", "--reason", "back"],
        );
        if out.status.success() {
            back = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(back, "requests never worked again after quorum came back");

    // An agent killed with kill -9 and started again: the kernel kept enforcing, and the grant
    // is still there when it is back.
    f.nodes[1].kill9();
    assert!(round_trip(&mut conn, b"agent down", Duration::from_secs(2)));
    f.nodes[1].start(&f.configs[1]);
    assert!(round_trip(&mut conn, b"agent back", Duration::from_secs(2)));
}

/// The enforcing agent is killed with `kill -9` and started again, over and over, while grants
/// are approved and revoked through the other nodes: no acknowledged grant is lost and no
/// acknowledged revoke undone; once it is back, its kernel holds exactly the live grant.
#[test]
#[ignore = "needs root and etcd"]
fn acknowledged_grants_and_revokes_survive_kill_9_loops() {
    if !require_root() {
        return;
    }
    let mut f = Fleet::start();
    let (certs, home) = (f.home.path().join("certs"), f.home.path().to_path_buf());
    let ctl = |i: usize, who: &str, args: &[&str]| ctl(&certs, &home, i, who, args);
    let config1 = f.configs[1].clone();
    const ROUNDS: usize = 6;
    let mut revoked = Vec::new();
    let mut live = String::new();
    std::thread::scope(|s| {
        let node1 = &mut f.nodes[1];
        let killer = s.spawn(move || {
            for i in 0..ROUNDS {
                std::thread::sleep(Duration::from_millis(150 + 100 * (i as u64 % 3)));
                node1.kill9();
                std::thread::sleep(Duration::from_millis(200));
                node1.start(&config1);
            }
        });
        for round in 0..ROUNDS {
            let out = ok(&ctl(
                0,
                "ci",
                &["request", "echo", "--for", "10m", "--reason", "loop"],
            ));
            let id = request_id(&out);
            ok(&ctl(2, "sre_carol", &["approve", &id]));
            let got: serde_json::Value = serde_json::from_str(&ok(&ctl(
                2,
                "sre_carol",
                &[
                    "ls",
                    "requests",
                    "--json",
                    "--identity",
                    "spiffe://jit.test/ci",
                ],
            )))
            .expect("JSON");
            let grant = got
                .as_array()
                .and_then(|a| a.iter().find(|r| r["id"] == id.as_str()))
                .and_then(|r| r["grant_id"].as_str())
                .unwrap_or_default()
                .to_string();
            assert!(grant.starts_with("grant-"), "round {round}: {got}");
            if round + 1 < ROUNDS {
                ok(&ctl(
                    2,
                    "sre_carol",
                    &["revoke", &grant, "--reason", "loop"],
                ));
                revoked.push(grant);
            } else {
                live = grant;
            }
        }
        killer.join().expect("killer");
    });
    // The store has every acknowledged outcome.
    let all: serde_json::Value =
        serde_json::from_str(&ok(&ctl(0, "sre_carol", &["ls", "grants", "--json"]))).expect("JSON");
    let state = |id: &str| -> String {
        all.as_array()
            .and_then(|a| a.iter().find(|g| g["id"] == id))
            .map(|g| g["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    for id in &revoked {
        assert_eq!(state(id), "revoked", "{id}");
    }
    assert_eq!(state(&live), "active");
    // The kernel that was killed over and over holds exactly the live grant, and enforces it.
    assert!(
        eventually(Duration::from_secs(15), || f.kernel_grants(1)
            == vec![live.clone()]),
        "node 1's kernel holds {:?}, not [{live}]:\n{}",
        f.kernel_grants(1),
        f.nodes[1].log()
    );
    assert!(
        connect().is_some(),
        "the live grant does not pass on node 1"
    );
}
