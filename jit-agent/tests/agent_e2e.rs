//! The agent end to end, through the real binaries: `jit-agent run` in a server namespace with
//! the gate on its veth, `jitctl` in a client namespace, real TCP traffic between them.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use jit_tests::{
    PinDirGuard, TempDir,
    echo::{EchoServer, round_trip},
    netns::{CLIENT_V4, Link, SERVER_V4, SERVER_V6},
    remove_pin_dir, require_root,
    tun::Tun,
    unique,
};

const AGENT: &str = env!("CARGO_BIN_EXE_jit-agent");
/// jitctl is its own crate: its binary is found (or built) in the workspace's target directory.
fn jitctl_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| jit_tests::fixtures::workspace_bin("jitctl"))
}
const ECHO_PORT: u16 = 8443;
const DEPLOY_PORT: u16 = 9443;
const SHORT_PORT: u16 = 9444;
/// A second client address, statically bound to the CI identity.
const CI_V4: &str = "10.213.0.3";

/// Everything one test needs: namespaces, certificates, config, pin dir, the agent process.
struct World {
    link: Link,
    dir: TempDir,
    pin_dir: PathBuf,
    _pins: PinDirGuard,
    config: PathBuf,
    agent: Option<Child>,
    /// Run the agent with `--log-format json` (through `JIT_LOG_FORMAT`).
    json_logs: bool,
    /// Run the agent with exactly these capabilities (as a container whose every other one is
    /// dropped), through `setpriv`; `None`: as root with all.
    capabilities: Option<Vec<String>>,
}

/// The policies the tests run under (the example set is tested on its own).
const POLICIES: &str = r#"
@id("anyone-requests-echo")
permit (principal, action == Jit::Action::"request", resource == Jit::Service::"echo");
@id("alice-short")
permit (principal == Jit::Identity::"spiffe://jit.test/alice", action in [Jit::Action::"request", Jit::Action::"auto_approve"], resource == Jit::Service::"short");
@id("ci-deploys")
permit (principal in Jit::Group::"ci", action in [Jit::Action::"request", Jit::Action::"auto_approve"], resource == Jit::Service::"deploy");
@id("approvers-decide-echo")
permit (principal in Jit::Group::"approvers", action in [Jit::Action::"approve", Jit::Action::"deny"], resource == Jit::Service::"echo");
@id("sre-revokes")
permit (principal in Jit::Group::"sre", action == Jit::Action::"revoke", resource);
@id("sre-break-glass")
permit (principal in Jit::Group::"sre", action == Jit::Action::"break_glass", resource) when { context.reason != "" };
"#;

fn config_text(dir: &Path, pin_dir: &Path, iface: &str, request_ttl: &str) -> String {
    let agent = jit_tests::fixtures::AgentFiles {
        dir,
        certs: &dir.join("certs"),
        pin_dir,
        listen: &format!("{SERVER_V4}:7443"),
        interfaces: &[iface],
        request_ttl: Some(request_ttl),
    }
    .sections();
    format!(
        r#"{agent}
[[groups]]
name = "sre"
members = ["spiffe://jit.test/sre/*"]

[[groups]]
name = "approvers"
members = ["spiffe://jit.test/sre/*", "spiffe://jit.test/bob"]

[[groups]]
name = "ci"
members = ["spiffe://jit.test/ci/deployer"]

[[services]]
name = "echo"
destinations = ["{SERVER_V4}:{ECHO_PORT}/tcp"]
max_duration = "30m"
break_glass_max = "1m"
bind_requester_address = true

[[services]]
name = "short"
destinations = ["{SERVER_V4}:{SHORT_PORT}/tcp"]
max_duration = "2s"
bind_requester_address = true

[[services]]
name = "deploy"
destinations = ["{SERVER_V4}:{DEPLOY_PORT}/tcp"]
max_duration = "10m"
require_reason = false

[[identities]]
spiffe_id = "spiffe://jit.test/ci/deployer"
sources = ["{CI_V4}/32"]
"#
    )
}

impl World {
    fn new(request_ttl: &str) -> Self {
        let link = Link::new();
        link.client.exec_ip(&[
            "addr",
            "add",
            &format!("{CI_V4}/24"),
            "dev",
            &link.client_if,
        ]);
        let dir = TempDir::new("jit-agent-e2e-");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-cli-")));
        let out = Command::new(AGENT)
            .args([
                "certs",
                "init",
                "--trust-domain",
                "jit.test",
                "--host",
                SERVER_V4,
            ])
            .args([
                "--identity",
                "alice",
                "--identity",
                "bob",
                "--identity",
                "sre/carol",
            ])
            .args(["--identity", "ci/deployer", "--dir"])
            .arg(dir.0.join("certs"))
            .output()
            .expect("certs init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.0.join("agent.toml");
        std::fs::write(
            &config,
            config_text(&dir.0, &pin_dir, &link.server_if, request_ttl),
        )
        .expect("config");
        std::fs::write(dir.0.join("policies.cedar"), POLICIES).expect("policies");
        Self {
            _pins: PinDirGuard(pin_dir.clone()),
            link,
            dir,
            pin_dir,
            config,
            agent: None,
            json_logs: false,
            capabilities: None,
        }
    }

    /// Starts `jit-agent run` in the server namespace and waits until it answers.
    fn start_agent(&mut self) {
        let log = std::fs::File::create(self.dir.0.join("agent.log")).expect("log");
        let mut cmd = match &self.capabilities {
            Some(caps) => {
                let mut c = self.link.server.command("setpriv");
                c.args(setpriv_args(caps)).arg("--").arg(AGENT);
                c
            }
            None => self.link.server.command(AGENT),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env(
                "JIT_LOG_FORMAT",
                if self.json_logs { "json" } else { "text" },
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting jit-agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.local(&["status"]);
            if out.status.success() {
                return;
            }
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(Child::try_wait) {
                panic!("jit-agent exited ({st}):\n{}", self.agent_log());
            }
            assert!(
                Instant::now() < deadline,
                "jit-agent did not come up:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agent cleanly (SIGTERM), as an operator would; waits at most 10 s.
    fn stop(&mut self) {
        let Some(mut c) = self.agent.take() else {
            return;
        };
        let pid = i32::try_from(c.id()).expect("pid");
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().expect("wait").is_none() {
            if Instant::now() >= deadline {
                let _ = c.kill();
                panic!("jit-agent did not stop on SIGTERM:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The audit log's files (rotated ones first).
    fn audit_files(&self) -> Vec<PathBuf> {
        jit_tests::fixtures::audit_files(&self.dir.0.join("state/audit"))
    }

    /// Every record of the audit log.
    fn audit_records(&self) -> Vec<serde_json::Value> {
        self.audit_files()
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .expect("audit file")
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("audit record"))
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect()
    }

    /// `jitctl audit verify` on the audit files (and `extra` arguments).
    fn verify_audit(&self, files: &[PathBuf], extra: &[&str]) -> Output {
        Command::new(jitctl_bin())
            .args(["audit", "verify"])
            .args(files)
            .args(extra)
            .output()
            .expect("jitctl audit verify")
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("agent.log")).unwrap_or_default()
    }

    /// A jitctl command in the client namespace, trusting `ca` and presenting `cert`/`key`.
    fn jitctl(&self, ca: &Path, cert: &Path, key: &Path) -> Command {
        let mut cmd = self.link.client.command(jitctl_bin());
        cmd.env("HOME", &self.dir.0)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("JITCTL_CONFIG")
            .env("JIT_AGENT", format!("https://{SERVER_V4}:7443"))
            .env("JIT_CA", ca)
            .env("JIT_CERT", cert)
            .env("JIT_KEY", key);
        cmd
    }

    /// Runs jitctl as `who` (a certificate stem in `certs`) from the client namespace.
    fn ctl_in(&self, certs: &Path, who: &str, args: &[&str]) -> Output {
        self.jitctl(
            &certs.join("ca.pem"),
            &certs.join(format!("{who}.pem")),
            &certs.join(format!("{who}.key")),
        )
        .args(args)
        .output()
        .expect("running jitctl")
    }

    /// Signs a client certificate with `params` by the test CA, written to `dir/<stem>.pem` and
    /// `.key`.
    fn sign_client(&self, params: rcgen::CertificateParams, dir: &Path, stem: &str) {
        sign_client_by(&self.dir.0.join("certs"), params, dir, stem);
    }
}

/// Signs a client certificate with `params` by the CA in `certs` (`ca.pem`, `ca.key`), written to
/// `dir/<stem>.pem` and `.key`.
/// Waits at most `within` for `child` (stderr piped) to end; it must fail. Returns its stderr,
/// or `None` (after killing it) when it did not end in time.
fn ended_within(child: &mut Child, within: Duration) -> Option<String> {
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    Some(err)
}

/// `setpriv` arguments that leave root with exactly `caps` (names as in a pod's
/// `securityContext`: `BPF`, `NET_ADMIN`), no inheritable or ambient ones, and no way to gain
/// more (`allowPrivilegeEscalation: false`).
fn setpriv_args(caps: &[String]) -> Vec<String> {
    let keep: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    vec![
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set=-all,{}", keep.join(",")),
    ]
}

/// The bit of a capability in `/proc/<pid>/status`'s masks.
fn capability_bit(name: &str) -> u64 {
    match name {
        "NET_ADMIN" => 1 << 12,
        "PERFMON" => 1 << 38,
        "BPF" => 1 << 39,
        other => panic!("capability {other}: add its number here"),
    }
}

fn sign_client_by(certs: &Path, mut params: rcgen::CertificateParams, dir: &Path, stem: &str) {
    {
        let ca_key = rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(certs.join("ca.key")).expect("ca key"),
        )
        .expect("key");
        let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let key = rcgen::KeyPair::generate().expect("key");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).expect("write");
    }
}

impl World {
    /// Runs jitctl as `who` with the test's certificates.
    fn ctl(&self, who: &str, args: &[&str]) -> Output {
        self.ctl_in(&self.dir.0.join("certs"), who, args)
    }

    /// Runs jitctl on the agent's local socket (as root).
    fn local(&self, args: &[&str]) -> Output {
        Command::new(jitctl_bin())
            .arg("--socket")
            .arg(self.dir.0.join("agent.sock"))
            .args(args)
            .env("HOME", &self.dir.0)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("JITCTL_CONFIG")
            .output()
            .expect("running jitctl")
    }

    fn json(&self, who: &str, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(who, args);
        serde_json::from_str(&ok(&out)).expect("JSON")
    }

    fn connect(&self, from: &str, port: u16) -> Option<TcpStream> {
        let from: std::net::IpAddr = from.parse().expect("addr");
        let to: SocketAddr = format!("{SERVER_V4}:{port}").parse().expect("addr");
        self.link.client.run(move || {
            let sock = socket2_connect(from, to);
            sock.ok()
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill9();
        remove_pin_dir(&self.pin_dir);
    }
}

/// Connects from a chosen source address, with a bounded timeout.
fn socket2_connect(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    // Bind the source through a raw socket: std's TcpStream cannot bind before connect.
    // SAFETY: plain socket calls on a fresh descriptor that the TcpStream then owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let std::net::IpAddr::V4(v4) = from else {
            return Err(std::io::Error::other("IPv4 only"));
        };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.octets()),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_nonblocking(true)?;
        let std::net::SocketAddr::V4(t) = to else {
            return Err(std::io::Error::other("IPv4 only"));
        };
        let ta = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: t.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(t.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&raw const ta).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(std::io::Error::last_os_error());
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        if libc::poll(&raw mut pfd, 1, 1500) != 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ));
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn fails(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

fn request_id(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.starts_with("req-"))
        .unwrap_or_else(|| panic!("no request id in {out:?}"))
        .to_string()
}

#[test]
#[ignore = "needs root"]
fn request_approve_revoke_expire_restart() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    // Denials are recorded per window; a short one is flushed long before the kill -9 below
    // (a kill -9 loses the window in progress, as README says).
    let mut text = std::fs::read_to_string(&w.config).expect("config");
    text.push_str("\n[audit]\ndenial_window = \"3s\"\n");
    std::fs::write(&w.config, text).expect("config");
    w.start_agent();
    let _echo = EchoServer::start(
        &w.link.server,
        format!("{SERVER_V4}:{ECHO_PORT}").parse().expect("addr"),
    );
    let _short = EchoServer::start(
        &w.link.server,
        format!("{SERVER_V4}:{SHORT_PORT}").parse().expect("addr"),
    );

    // Dropped without a grant.
    assert!(
        w.connect(CLIENT_V4, ECHO_PORT).is_none(),
        "connected without a grant"
    );

    // Request → pending → self-approval refused → approval → granted.
    let out = ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "10m", "--reason", "ticket 1"],
    ));
    assert!(out.contains("pending"), "{out}");
    let id = request_id(&out);
    fails(
        &w.ctl("alice", &["approve", &id]),
        1,
        "never approve its own request",
    );
    fails(
        &w.ctl("sre_carol", &["approve", "req-000000000000"]),
        1,
        "no request with id",
    );
    let out = ok(&w.ctl("bob", &["approve", &id, "--comment", "ok"]));
    assert!(out.contains("granted"), "{out}");
    fails(&w.ctl("sre_carol", &["approve", &id]), 1, "already granted");

    // Traffic passes; revoking cuts the established connection.
    let mut conn = w.connect(CLIENT_V4, ECHO_PORT).expect("granted connection");
    assert!(round_trip(&mut conn, b"hello", Duration::from_secs(2)));
    let grants = w.json("alice", &["ls", "grants", "--active", "--json"]);
    let grant_id = grants[0]["id"].as_str().expect("grant id").to_string();
    assert_eq!(grants[0]["sources"][0], format!("{CLIENT_V4}/32"));
    // The kernel's count of the grant's packets, live: the handshake and the data at least.
    let usage = &grants[0]["usage"];
    assert!(usage["packets"].as_u64().unwrap_or(0) >= 3, "{usage}");
    assert_eq!(usage["live"], true, "{usage}");
    let first_seen = usage["first_seen_unix_ms"].as_i64().unwrap_or(0);
    let last_seen = usage["last_seen_unix_ms"].as_i64().unwrap_or(0);
    let now = jit_agent::model::now_ms();
    assert!(
        now - 10_000 < first_seen && first_seen <= last_seen && last_seen <= now + 1_000,
        "{usage} (now {now})"
    );
    let table = ok(&w.ctl("alice", &["ls", "grants", "--active"]));
    assert!(table.contains("USED"), "{table}");
    ok(&w.ctl("sre_carol", &["revoke", &grant_id, "--reason", "done"]));
    assert!(
        !round_trip(&mut conn, b"again", Duration::from_millis(1500)),
        "data flowed after revoke"
    );
    assert!(w.connect(CLIENT_V4, ECHO_PORT).is_none());
    fails(
        &w.ctl("sre_carol", &["revoke", &grant_id]),
        1,
        "already revoked",
    );
    // Once the kernel entry is gone, its final figures are the grant's (and on the audit log).
    let mut ended = serde_json::Value::Null;
    for _ in 0..50 {
        let all = w.json("alice", &["ls", "grants", "--json"]);
        ended = all
            .as_array()
            .and_then(|a| a.iter().find(|g| g["id"] == grant_id.as_str()))
            .cloned()
            .unwrap_or_default();
        if ended["usage"]["live"] == false {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ended["usage"]["live"], false, "{ended}");
    assert!(
        ended["usage"]["packets"].as_u64().unwrap_or(0) >= usage["packets"].as_u64().unwrap_or(0),
        "{ended}"
    );

    // Clamped to 2 s, granted at once; the kernel and the sweeper end it.
    let out = ok(&w.ctl(
        "alice",
        &["request", "short", "--for", "1h", "--reason", "quick look"],
    ));
    assert!(out.contains("granted") && out.contains("clamped"), "{out}");
    let mut conn = w
        .connect(CLIENT_V4, SHORT_PORT)
        .expect("granted connection");
    assert!(round_trip(&mut conn, b"short", Duration::from_secs(1)));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !round_trip(&mut conn, b"late", Duration::from_millis(1000)),
        "data flowed after expiry"
    );
    assert!(w.connect(CLIENT_V4, SHORT_PORT).is_none());
    let expired = w.json("alice", &["ls", "grants", "--json"]);
    assert!(
        expired
            .as_array()
            .expect("array")
            .iter()
            .any(|g| g["service"] == "short" && g["state"] == "expired"),
        "{expired}"
    );

    // A live grant survives kill -9 of the agent, and the revoked one stays revoked.
    let out = ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "10m", "--reason", "ticket 2"],
    ));
    let id2 = request_id(&out);
    ok(&w.ctl("sre_carol", &["approve", &id2]));
    let mut conn = w.connect(CLIENT_V4, ECHO_PORT).expect("granted connection");
    w.kill9();
    assert!(
        round_trip(&mut conn, b"agent down", Duration::from_secs(2)),
        "enforcement changed while the agent is down"
    );
    w.start_agent();
    assert!(round_trip(&mut conn, b"agent back", Duration::from_secs(2)));
    let grants = w.json("sre_carol", &["ls", "grants", "--json"]);
    let states: Vec<(String, String)> = grants
        .as_array()
        .expect("array")
        .iter()
        .filter(|g| g["service"] == "echo")
        .map(|g| {
            (
                g["id"].as_str().unwrap_or("").to_string(),
                g["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&(grant_id.clone(), "revoked".into())),
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|(_, s)| s == "active").count(),
        1,
        "{states:?}"
    );
    let kernel = Command::new(AGENT)
        .args(["bpf", "grants", "--json", "--pin-dir"])
        .arg(&w.pin_dir)
        .arg("--state-dir")
        .arg(w.dir.0.join("state"))
        .output()
        .expect("bpf grants");
    let kernel: serde_json::Value = serde_json::from_str(&ok(&kernel)).expect("JSON");
    assert_eq!(
        kernel.as_array().map(Vec::len),
        Some(1),
        "kernel holds exactly the live grant: {kernel}"
    );
    // The ids come with the names the agent recorded.
    assert_eq!(kernel[0]["service_name"], "echo", "{kernel}");
    assert_eq!(
        kernel[0]["identity_name"], "spiffe://jit.test/alice",
        "{kernel}"
    );
    let table = Command::new(AGENT)
        .args(["bpf", "grants", "--pin-dir"])
        .arg(&w.pin_dir)
        .arg("--state-dir")
        .arg(w.dir.0.join("state"))
        .output()
        .expect("bpf grants");
    assert!(ok(&table).contains("(echo)"), "{}", ok(&table));

    // The audit log over the API: from a seq, exactly as written; resuming gives no gap and no
    // duplicate; a new line arrives live; only root (or audit.readers) may follow it.
    let lines = |out: &Output| -> Vec<serde_json::Value> {
        ok(out)
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line"))
            .collect()
    };
    let first = lines(&w.local(&["audit", "watch", "--from", "0", "--count", "6"]));
    let seqs: Vec<u64> = first
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 5]);
    let resumed = lines(&w.local(&["audit", "watch", "--from", "3", "--count", "3"]));
    assert_eq!(
        resumed,
        first[3..].to_vec(),
        "resuming from seq 3 repeats nothing, skips nothing"
    );
    let last = w
        .audit_records()
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .expect("a last seq");
    let mut live = Command::new(jitctl_bin())
        .arg("--socket")
        .arg(w.dir.0.join("agent.sock"))
        .args(["audit", "watch", "--count", "1", "--from"])
        .arg((last + 1).to_string())
        .env("HOME", &w.dir.0)
        .stdout(Stdio::piped())
        .spawn()
        .expect("jitctl audit watch");
    std::thread::sleep(Duration::from_millis(300));
    ok(&w.ctl(
        "alice",
        &["request", "short", "--for", "1s", "--reason", "live line"],
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = live.kill();
            panic!("no live audit line within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = live.wait_with_output().expect("output");
    let got = lines(&out);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["seq"], last + 1, "the next line, live");
    fails(
        &w.ctl("alice", &["audit", "watch", "--from", "0", "--count", "1"]),
        1,
        "may not read the audit log",
    );

    // The audit log answers who had access, approved by whom, and that nobody edited it.
    let key = w.dir.0.join("state/audit-signing.key.pub");
    let key = key.to_str().expect("utf-8");
    let running = w.verify_audit(&w.audit_files(), &["--key", key]);
    assert!(
        matches!(running.status.code(), Some(0 | 5)),
        "{:?}: {}{}",
        running.status,
        String::from_utf8_lossy(&running.stdout),
        String::from_utf8_lossy(&running.stderr)
    );
    w.stop();
    let sealed = w.verify_audit(&w.audit_files(), &["--key", key]);
    assert_eq!(
        sealed.status.code(),
        Some(0),
        "a cleanly stopped agent leaves a sealed, intact log: {}",
        String::from_utf8_lossy(&sealed.stdout)
    );
    let records = w.audit_records();
    let events: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap_or(""))
        .collect();
    for want in [
        "agent.start",
        "request.created",
        "request.approved",
        "grant.issued",
        "grant.enforced",
        "grant.revoked",
        "grant.expired",
        "grant.usage",
        "agent.stop",
        "checkpoint",
    ] {
        assert!(events.contains(&want), "no {want} in {events:?}");
    }
    assert_eq!(
        events.iter().filter(|e| **e == "agent.start").count(),
        2,
        "the restart is on the record"
    );
    // The SYNs dropped before the grant are on the record, aggregated (retransmissions of one
    // attempt make one record with a count, not one record each).
    let denials: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            r["event"] == "kernel.denials"
                && r["source"] == CLIENT_V4
                && r["service"] == "echo"
                && r["kind"] == "deny"
        })
        .collect();
    assert!(
        !denials.is_empty(),
        "no kernel denials from {CLIENT_V4} to echo in {:?}",
        records
            .iter()
            .filter(|r| r["event"] == "kernel.denials")
            .collect::<Vec<_>>()
    );
    let packets: u64 = denials
        .iter()
        .map(|r| r["packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(packets >= 1, "{denials:?}");
    // A refused connection attempt is a SYN and its retransmission a second later: counted
    // together within a window, not a record each.
    assert!(
        (denials.len() as u64) < packets
            && denials
                .iter()
                .any(|r| r["packets"].as_u64().unwrap_or(0) >= 2),
        "aggregated per window, not per packet: {denials:?}"
    );
    let issued = records
        .iter()
        .find(|r| r["event"] == "grant.issued" && r["grant"]["id"] == grant_id)
        .expect("the first grant's issue");
    assert_eq!(
        issued["approved_by"][0], "spiffe://jit.test/bob",
        "{issued}"
    );
    assert_eq!(issued["grant"]["sources"][0], format!("{CLIENT_V4}/32"));
    let revoked = records
        .iter()
        .find(|r| r["event"] == "grant.revoked" && r["grant"]["id"] == grant_id)
        .expect("the revoke");
    assert_eq!(revoked["actor"], "spiffe://jit.test/sre/carol", "{revoked}");
    assert_eq!(revoked["reason"], "done");
    // What each ended grant did is on the record when its kernel entry went: the revoked one,
    // and the short one that expired by itself.
    let used = |id: &str| -> u64 {
        records
            .iter()
            .filter(|r| r["event"] == "grant.usage" && r["grant_id"] == id)
            .map(|r| r["packets"].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(used(&grant_id) >= 3, "{events:?}");
    let short = records
        .iter()
        .find(|r| r["event"] == "grant.expired" && r["grant"]["service"] == "short")
        .expect("the short grant's expiry");
    let short_id = short["grant"]["id"].as_str().expect("id");
    assert!(
        used(short_id) >= 3,
        "the short grant carried the round trip"
    );
    // Who had access to echo while the first grant lived: from the log alone.
    let at_ms = issued["grant"]["not_before_unix_ms"]
        .as_i64()
        .expect("time")
        + 1;
    let at = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).expect("ms")),
    )
    .to_string();
    let out = Command::new(jitctl_bin())
        .args([
            "audit",
            "who",
            "--service",
            "echo",
            "--at",
            &at,
            "--json",
            "--key",
            key,
        ])
        .args(w.audit_files())
        .output()
        .expect("jitctl audit who");
    let held: serde_json::Value = serde_json::from_str(&ok(&out)).expect("JSON");
    let held = held.as_array().expect("array");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["identity"], "spiffe://jit.test/alice");
    assert_eq!(held[0]["grant_id"], grant_id.as_str());
    assert_eq!(held[0]["approved_by"][0], "spiffe://jit.test/bob");
    assert_eq!(
        held[0]["usage"]["packets"].as_u64(),
        Some(used(&grant_id)),
        "{held:?}"
    );
    assert!(
        held[0]["ended"]
            .as_str()
            .unwrap_or("")
            .starts_with("revoked by spiffe://jit.test/sre/carol"),
        "{held:?}"
    );

    // One changed byte in a copy is found, and named.
    let current = w.dir.0.join("state/audit/audit.jsonl");
    let copy = w.dir.0.join("tampered.jsonl");
    let text = std::fs::read_to_string(&current).expect("audit");
    std::fs::write(&copy, text.replacen("ticket 1", "ticket 7", 1)).expect("copy");
    let mut files = w.audit_files();
    files.retain(|f| f != &current);
    files.push(copy);
    let tampered = w.verify_audit(&files, &["--key", key]);
    assert_eq!(tampered.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&tampered.stdout).contains("tampered.jsonl:"),
        "{}",
        String::from_utf8_lossy(&tampered.stdout)
    );
}

#[test]
#[ignore = "needs root"]
fn exec_holds_access_for_the_length_of_the_command() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    w.start_agent();
    let to: SocketAddr = format!("{SERVER_V4}:{DEPLOY_PORT}").parse().expect("addr");
    let _deploy = EchoServer::start(&w.link.server, to);

    // Connection settings from ~/.config/jit/config.toml when flags and environment say nothing.
    let cfg_dir = w.dir.0.join(".config/jit");
    std::fs::create_dir_all(&cfg_dir).expect("dir");
    let certs = w.dir.0.join("certs");
    std::fs::write(
        cfg_dir.join("config.toml"),
        format!(
            "agent = \"https://{SERVER_V4}:7443\"\ncert = \"{c}/ci_deployer.pem\"\nkey = \"{c}/ci_deployer.key\"\nca = \"{c}/ca.pem\"\n",
            c = certs.display()
        ),
    )
    .expect("jitctl config");
    let out = w
        .link
        .client
        .command(jitctl_bin())
        .arg("whoami")
        .env("HOME", &w.dir.0)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("JITCTL_CONFIG")
        .env_remove("JIT_AGENT")
        .env_remove("JIT_CERT")
        .env_remove("JIT_KEY")
        .env_remove("JIT_CA")
        .output()
        .expect("jitctl");
    assert!(
        ok(&out).contains("spiffe://jit.test/ci/deployer"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(w.connect(CI_V4, DEPLOY_PORT).is_none());

    // The grant is released when the command exits, and its exit code passes through.
    let script = w.dir.0.join("deploy.sh");
    std::fs::write(&script, "#!/bin/sh\nsleep 0.2\nexit 7\n").expect("script");
    let out = w.ctl(
        "ci_deployer",
        &[
            "exec",
            "deploy",
            "--for",
            "5m",
            "--",
            "sh",
            script.to_str().unwrap_or(""),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("released grant"));
    let grants = w.json("ci_deployer", &["ls", "grants", "--json"]);
    assert_eq!(grants[0]["state"], "revoked", "{grants}");
    assert!(
        w.connect(CI_V4, DEPLOY_PORT).is_none(),
        "access outlived the command"
    );

    // During the command, access is there: hold it open with a long command and probe meanwhile.
    let mut child = w
        .jitctl(
            &w.dir.0.join("certs/ca.pem"),
            &w.dir.0.join("certs/ci_deployer.pem"),
            &w.dir.0.join("certs/ci_deployer.key"),
        )
        .args(["exec", "deploy", "--for", "5m", "--", "sleep", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("jitctl exec");
    std::thread::sleep(Duration::from_millis(1500));
    let mut conn = w
        .connect(CI_V4, DEPLOY_PORT)
        .expect("access during the command");
    assert!(round_trip(&mut conn, b"mid-deploy", Duration::from_secs(1)));
    let st = child.wait().expect("jitctl exec");
    assert!(st.success());
    assert!(!round_trip(
        &mut conn,
        b"after",
        Duration::from_millis(1000)
    ));

    // A pipeline identity may not request what it is not allowed to.
    fails(
        &w.ctl(
            "ci_deployer",
            &["request", "short", "--for", "5m", "--reason", "x"],
        ),
        1,
        "may not request",
    );
}

#[test]
#[ignore = "needs root"]
fn bad_input_is_refused_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let mut w = World::new("2s");
    w.start_agent();
    let cases: [(&[&str], &str); 8] = [
        (
            &["request", "nosuch", "--for", "5m", "--reason", "x"],
            "not configured",
        ),
        (&["request", "echo", "--for", "0s", "--reason", "x"], "zero"),
        (
            &["request", "echo", "--for", "-5m", "--reason", "x"],
            "negative",
        ),
        (
            &["request", "echo", "--for", "soon", "--reason", "x"],
            "not a duration",
        ),
        (&["request", "echo", "--for", "5m"], "requires a reason"),
        (&["approve", "req-ffffffffffff"], "no request with id"),
        (&["revoke", "grant-ffffffffffff"], "no grant with id"),
        (&["deny", ""], "request_id"),
    ];
    for (args, needle) in cases {
        let out = w.ctl("alice", args);
        assert_ne!(out.status.code(), Some(0), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} lacks {needle:?}\nagent log:\n{}",
            w.agent_log()
        );
    }
    // None of the refused calls left a trace.
    let listed = w.json("sre_carol", &["ls", "requests", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");

    // Approving twice; approving an expired request.
    let id = request_id(&ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "5m", "--reason", "r"],
    )));
    std::thread::sleep(Duration::from_millis(2300));
    fails(&w.ctl("bob", &["approve", &id]), 1, "expired");
    let listed = w.json("alice", &["ls", "requests", "--json"]);
    assert_eq!(listed[0]["state"], "expired", "{listed}");

    // A certificate without a SPIFFE ID, and one from another CA, are refused at the handshake.
    let other = w.dir.0.join("other");
    let out = Command::new(AGENT)
        .args([
            "certs",
            "init",
            "--trust-domain",
            "jit.test",
            "--identity",
            "alice",
            "--dir",
        ])
        .arg(&other)
        .output()
        .expect("certs init");
    assert!(out.status.success());
    let out = w
        .jitctl(
            &w.dir.0.join("certs/ca.pem"),
            &other.join("alice.pem"),
            &other.join("alice.key"),
        )
        .args(["whoami"])
        .output()
        .expect("jitctl");
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );
    // The agent's own certificate has a SPIFFE ID; a plain server certificate without one is
    // made here with rcgen from the test CA.
    let p = rcgen::CertificateParams::new(vec!["nobody.example".to_string()]).expect("params");
    w.sign_client(p, &w.dir.0, "nosan");
    let out = w
        .jitctl(
            &w.dir.0.join("certs/ca.pem"),
            &w.dir.0.join("nosan.pem"),
            &w.dir.0.join("nosan.key"),
        )
        .args(["whoami"])
        .output()
        .expect("jitctl");
    assert!(
        !out.status.success(),
        "a certificate without a SPIFFE ID was accepted"
    );
    assert!(w.agent_log().contains("refused"), "{}", w.agent_log());

    // No certificate at all: a clear message, before any connection.
    let out = w
        .link
        .client
        .command(jitctl_bin())
        .args(["whoami"])
        .env("HOME", &w.dir.0)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("JITCTL_CONFIG")
        .env_remove("JIT_CERT")
        .env_remove("JIT_KEY")
        .output()
        .expect("jitctl");
    fails(&out, 1, "no client certificate found");

    // A bad config is refused at start, naming the field, and nothing is attached.
    w.kill9();
    let text = std::fs::read_to_string(&w.config).expect("config");
    std::fs::write(
        &w.config,
        text.replace(&format!("{CI_V4}/32"), "10.213.0.300/32"),
    )
    .expect("config");
    let out = w
        .link
        .server
        .command(AGENT)
        .args(["run", "--config"])
        .arg(&w.config)
        .output()
        .expect("jit-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("identities[0].sources[0]") && err.contains("10.213.0.300"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root"]
fn wait_exit_codes_expired_certificates_and_rotation() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    w.start_agent();

    // --wait: timed out (3), denied (2), granted (0).
    let out = w.ctl(
        "alice",
        &[
            "request",
            "echo",
            "--for",
            "5m",
            "--reason",
            "r",
            "--wait",
            "--timeout",
            "1s",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let timed_out = request_id(&String::from_utf8_lossy(&out.stdout));
    ok(&w.ctl("bob", &["deny", &timed_out, "--comment", "too slow"]));
    for (decision, code) in [("deny", 2), ("approve", 0)] {
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                w.ctl(
                    "alice",
                    &[
                        "request",
                        "echo",
                        "--for",
                        "5m",
                        "--reason",
                        "r",
                        "--wait",
                        "--timeout",
                        "20s",
                    ],
                )
            });
            // Decide the newest pending request once it shows up.
            let deadline = Instant::now() + Duration::from_secs(10);
            let id = loop {
                let pending = w.json("bob", &["ls", "requests", "--pending", "--json"]);
                if let Some(id) = pending[0]["id"].as_str() {
                    break id.to_string();
                }
                assert!(Instant::now() < deadline, "the request never showed up");
                std::thread::sleep(Duration::from_millis(100));
            };
            ok(&w.ctl("bob", &[decision, &id]));
            let out = waiter.join().expect("waiter");
            assert_eq!(
                out.status.code(),
                Some(code),
                "{decision}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    }

    // An expired client certificate (signed by the right CA) is refused at the handshake.
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://jit.test/alice".try_into().expect("uri"),
    ));
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let stale = w.dir.0.join("stale");
    std::fs::create_dir_all(&stale).expect("dir");
    std::fs::copy(w.dir.0.join("certs/ca.pem"), stale.join("ca.pem")).expect("copy");
    w.sign_client(p, &stale, "alice");
    let out = w.ctl_in(&stale, "alice", &["whoami"]);
    assert!(!out.status.success(), "an expired certificate was accepted");

    // A stream lasts no longer than the certificate that opened it.
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://jit.test/alice".try_into().expect("uri"),
    ));
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let brief = w.dir.0.join("brief");
    std::fs::create_dir_all(&brief).expect("dir");
    std::fs::copy(w.dir.0.join("certs/ca.pem"), brief.join("ca.pem")).expect("copy");
    w.sign_client(p, &brief, "alice");
    let mut watch = w
        .jitctl(
            &brief.join("ca.pem"),
            &brief.join("alice.pem"),
            &brief.join("alice.key"),
        )
        .arg("watch")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jitctl watch");
    let started = Instant::now();
    let err = ended_within(&mut watch, Duration::from_secs(20))
        .expect("the watch outlived its certificate by 15 s");
    assert!(err.contains("expired"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it ended before its certificate did: {err}"
    );

    // Rotation: a new CA and agent certificate replace the old files in place; the agent picks
    // them up without a restart. New clients work, clients of the old CA no longer do.
    let fresh = w.dir.0.join("fresh");
    let out = Command::new(AGENT)
        .args([
            "certs",
            "init",
            "--trust-domain",
            "jit.test",
            "--host",
            SERVER_V4,
        ])
        .args(["--identity", "alice", "--dir"])
        .arg(&fresh)
        .output()
        .expect("certs init");
    assert!(out.status.success());
    ok(&w.ctl("alice", &["whoami"]));
    for f in ["ca.pem", "agent.pem", "agent.key"] {
        // Write to a temporary name and rename, as a certificate manager would.
        let tmp = w.dir.0.join("certs").join(format!(".{f}.new"));
        std::fs::copy(fresh.join(f), &tmp).expect("copy");
        std::fs::rename(&tmp, w.dir.0.join("certs").join(f)).expect("rename");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = w.ctl_in(&fresh, "alice", &["whoami"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never picked up the new certificates:\n{}",
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The old CA's alice no longer gets in (the agent now trusts only the new CA).
    let out = w
        .jitctl(
            &fresh.join("ca.pem"),
            &w.dir.0.join("certs/alice.pem"),
            &w.dir.0.join("certs/alice.key"),
        )
        .args(["whoami"])
        .output()
        .expect("jitctl");
    assert!(
        !out.status.success(),
        "a client of the replaced CA still got in"
    );
    assert!(w.agent_log().contains("TLS certificates reloaded"));
}

/// A webhook receiver on the server namespace's loopback: records every POST body with the
/// status it answered; the first delivery is refused with 503 to exercise the retry.
struct Receiver {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(u16, serde_json::Value)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    fn start(ns: &jit_tests::netns::Netns) -> Self {
        use std::{
            io::{BufRead as _, BufReader, Read as _, Write as _},
            sync::{Arc, Mutex, atomic::AtomicBool, atomic::Ordering},
        };
        let seen: Arc<Mutex<Vec<(u16, serde_json::Value)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        ns.spawn(move || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            let _ = tx.send(l.local_addr().expect("addr").port());
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut first = true;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((conn, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(conn);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                let status = if first { 503 } else { 200 };
                first = false;
                let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                seen2.lock().expect("lock").push((status, json));
                let mut conn = r.into_inner();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("receiver port");
        Self { port, seen, stop }
    }

    /// Accepted deliveries of `event` (waits up to 10 s for at least one).
    fn accepted(&self, event: &str) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<serde_json::Value> = self
                .seen
                .lock()
                .expect("lock")
                .iter()
                .filter(|(st, b)| *st == 200 && b["event"] == event)
                .map(|(_, b)| b.clone())
                .collect();
            if !got.is_empty() || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
#[ignore = "needs root"]
fn policies_break_glass_webhooks_and_policy_reload() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    let hooks = Receiver::start(&w.link.server);
    // The audit log's HTTP sink, to a collector that refuses its first delivery.
    let collector = Receiver::start(&w.link.server);
    let mut text = std::fs::read_to_string(&w.config).expect("config");
    text.push_str(&format!(
        "\n[[webhooks]]\nurl = \"http://127.0.0.1:{}/jit\"\n\n[audit]\nsink_url = \
         \"http://127.0.0.1:{}/audit\"\nsink_batch = 3\n",
        hooks.port, collector.port
    ));
    std::fs::write(&w.config, text).expect("config");
    w.start_agent();

    // Pending → notified; approved → notified; the approval was checked against policy.
    let out = ok(&w.ctl(
        "alice",
        &[
            "request", "echo", "--for", "5m", "--reason", "ticket 9", "--ticket", "OPS-9",
        ],
    ));
    let id = request_id(&out);
    fails(
        &w.ctl("ci_deployer", &["approve", &id]),
        1,
        "no policy permits it",
    );
    ok(&w.ctl("bob", &["approve", &id]));
    let pending = hooks.accepted("request.pending");
    assert_eq!(pending.len(), 1, "{pending:?}");
    let p = &pending[0];
    assert_eq!(p["schema"], "jit.v1.notification");
    assert_eq!(p["actor"], "spiffe://jit.test/alice");
    assert_eq!(p["service"], "echo");
    assert_eq!(p["request"]["id"], id.as_str());
    assert_eq!(p["request"]["ticket"], "OPS-9");
    assert_eq!(p["request"]["state"], "pending");
    assert_eq!(p["request"]["approvals_required"], 1);
    assert!(p["grant"].is_null());
    assert!(p["at_unix_ms"].as_i64() > Some(0));
    let granted = hooks.accepted("request.granted");
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0]["actor"], "spiffe://jit.test/bob");
    assert_eq!(granted[0]["grant"]["state"], "active");
    // The first delivery was refused with 503 and retried.
    assert!(
        hooks
            .seen
            .lock()
            .expect("lock")
            .iter()
            .any(|(st, _)| *st == 503)
    );

    // Deny → notified.
    let id2 = request_id(&ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "5m", "--reason", "again"],
    )));
    ok(&w.ctl("bob", &["deny", &id2, "--comment", "not now"]));
    let denied = hooks.accepted("request.denied");
    assert_eq!(denied[0]["request"]["state"], "denied");

    // Alice's grant goes first: carol connects from the same client address, and one address
    // carries one identity at a time.
    ok(&w.ctl(
        "sre_carol",
        &["revoke", "--identity", "spiffe://jit.test/alice"],
    ));

    // Break-glass: needs a reason, capped at break_glass_max (1m), marked, announced.
    fails(
        &w.ctl(
            "sre_carol",
            &["request", "echo", "--for", "1h", "--break-glass"],
        ),
        1,
        "needs a reason",
    );
    fails(
        &w.ctl(
            "alice",
            &[
                "request",
                "echo",
                "--for",
                "1h",
                "--break-glass",
                "--reason",
                "x",
            ],
        ),
        1,
        "may not break the glass",
    );
    let out = ok(&w.ctl(
        "sre_carol",
        &[
            "request",
            "echo",
            "--for",
            "1h",
            "--break-glass",
            "--reason",
            "db on fire",
        ],
    ));
    assert!(
        out.contains("BREAK-GLASS") && out.contains("granted") && out.contains("(1m)"),
        "{out}"
    );
    let bg = hooks.accepted("grant.break_glass");
    assert_eq!(bg.len(), 1);
    assert_eq!(bg[0]["grant"]["break_glass"], true);
    let listed = w.json("sre_carol", &["ls", "grants", "--active", "--json"]);
    let g = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|g| g["break_glass"] == true)
        .expect("break-glass grant listed");
    let len =
        g["expires_unix_ms"].as_i64().unwrap_or(0) - g["not_before_unix_ms"].as_i64().unwrap_or(0);
    assert_eq!(len, 60_000, "{g}");

    // Revoke → notified.
    let gid = g["id"].as_str().expect("id").to_string();
    ok(&w.ctl("sre_carol", &["revoke", &gid, "--reason", "fixed"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let revoked = hooks.accepted("grant.revoked");
        if let Some(r) = revoked.iter().find(|r| r["grant"]["id"] == gid.as_str()) {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no revocation notice for {gid}: {revoked:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r["grant"]["revoke_reason"], "fixed");
    assert_eq!(r["grant"]["break_glass"], true);

    // An invalid policy file is refused and the previous set stays in force.
    let pol = w.dir.0.join("policies.cedar");
    let good = std::fs::read_to_string(&pol).expect("policies");
    std::fs::write(
        &pol,
        format!("{good}\npermit (principal, action, resource) when {{ context.nope }};\n"),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !w.agent_log().contains("policy reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        w.agent_log().contains("policies.cedar:"),
        "the refusal names the position:\n{}",
        w.agent_log()
    );
    let out = ok(&w.ctl(
        "alice",
        &[
            "request",
            "short",
            "--for",
            "1s",
            "--reason",
            "still allowed",
        ],
    ));
    assert!(out.contains("granted"), "{out}");

    // A valid change takes effect without a restart: alice loses "short".
    std::fs::write(
        &pol,
        good.replace(
            "@id(\"alice-short\")\npermit",
            "@id(\"alice-short\")\nforbid",
        ),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = w.ctl(
            "alice",
            &["request", "short", "--for", "1s", "--reason", "now?"],
        );
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("forbidden by alice-short"), "{err}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new policy never took effect"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // The collector has every line, in order, exactly as written, though it refused the first
    // delivery: nothing lost (duplicates would be allowed, and deduplicated by seq).
    let written: Vec<String> = w
        .audit_files()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .expect("audit")
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut got: std::collections::BTreeMap<u64, String> = std::collections::BTreeMap::new();
        for (status, body) in collector.seen.lock().expect("lock").iter() {
            if *status != 200 {
                continue;
            }
            for l in body["lines"].as_array().into_iter().flatten() {
                got.insert(
                    l["seq"].as_u64().expect("seq"),
                    l["line"].as_str().expect("line").to_string(),
                );
            }
        }
        let have: Vec<String> = got.values().cloned().collect();
        if have.len() >= written.len() {
            assert_eq!(
                have[..written.len()],
                written[..],
                "every line, as written, in order"
            );
            assert!(
                got.keys().copied().eq(0..got.len() as u64),
                "no gap in the seqs the collector has"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the collector has {} of {} lines",
            have.len(),
            written.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        collector
            .seen
            .lock()
            .expect("lock")
            .iter()
            .any(|(s, _)| *s == 503),
        "the first delivery was refused and retried"
    );
    // Its position survives a restart: the sink resumes after the last acknowledged line and
    // sends nothing twice beyond a batch.
    let position: u64 = std::fs::read_to_string(w.dir.0.join("state/audit-sink.position"))
        .expect("position")
        .trim()
        .parse()
        .expect("a seq");
    assert!(position + 4 >= written.len() as u64, "{position}");
    let delivered = |c: &Receiver| -> usize {
        c.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(st, _)| *st == 200)
            .map(|(_, b)| b["lines"].as_array().map_or(0, Vec::len))
            .sum()
    };
    let before = delivered(&collector);
    w.kill9();
    w.start_agent();
    let new_lines = w.audit_records().len() - written.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while delivered(&collector) < before + new_lines {
        assert!(
            Instant::now() < deadline,
            "the lines after the restart never arrived"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let resent = delivered(&collector) - before - new_lines;
    assert!(resent <= 3, "{resent} line(s) sent again after the restart");
}

/// Whether a TCP connection from the client namespace to `to` is accepted.
fn reaches(link: &Link, to: SocketAddr) -> bool {
    link.client
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(1200)).is_ok())
}

/// Entries of the services map, from `jit-agent bpf status --json`.
fn kernel_services(w: &World) -> u64 {
    let out = Command::new(AGENT)
        .args(["bpf", "status", "--json", "--pin-dir"])
        .arg(&w.pin_dir)
        .output()
        .expect("bpf status");
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).expect("JSON");
    v["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == "JIT_SERVICES")
        .and_then(|m| m["entries"].as_u64())
        .expect("JIT_SERVICES fill")
}

/// Problem 2 of datapath v2: a service named by one of the node's addresses is covered on every
/// address of the node, both families, link-local included, and on addresses added while the
/// agent runs; check-config warns about a listening socket a configuration leaves reachable.
#[test]
#[ignore = "needs root"]
fn a_service_named_by_one_address_is_covered_on_every_path() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    let (server_if, client_if) = (w.link.server_if.clone(), w.link.client_if.clone());
    w.link
        .server
        .exec_ip(&["addr", "add", "10.213.0.9/24", "dev", &server_if]);
    w.link
        .server
        .exec_ip(&["addr", "add", "fe80::213:1/64", "dev", &server_if, "nodad"]);
    w.link
        .client
        .exec_ip(&["addr", "add", "fe80::213:2/64", "dev", &client_if, "nodad"]);
    w.start_agent();
    // A dual-stack server on every address, as most servers are.
    let _echo = EchoServer::start(
        &w.link.server,
        format!("[::]:{ECHO_PORT}").parse().expect("addr"),
    );
    let client_index = w.link.client.run(move || {
        let name = std::ffi::CString::new(client_if).expect("name");
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    let link_local = SocketAddr::V6(std::net::SocketAddrV6::new(
        "fe80::213:1".parse().expect("addr"),
        ECHO_PORT,
        0,
        client_index,
    ));
    let paths: Vec<SocketAddr> = vec![
        format!("{SERVER_V4}:{ECHO_PORT}").parse().expect("addr"),
        format!("10.213.0.9:{ECHO_PORT}").parse().expect("addr"),
        format!("[{SERVER_V6}]:{ECHO_PORT}").parse().expect("addr"),
        link_local,
    ];
    for to in &paths {
        assert!(!reaches(&w.link, *to), "{to} reached without a grant");
    }

    // An address added while the agent runs is covered as soon as the agent has seen it.
    let before = kernel_services(&w);
    w.link
        .server
        .exec_ip(&["addr", "add", "10.213.0.10/24", "dev", &server_if]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while kernel_services(&w) <= before {
        assert!(
            Instant::now() < deadline,
            "the new address was not covered:\n{}",
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let added: SocketAddr = format!("10.213.0.10:{ECHO_PORT}").parse().expect("addr");
    assert!(!reaches(&w.link, added), "the new address is open");

    // A grant bound to the requester's address opens the service on every path to it.
    let out = ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "10m", "--reason", "paths"],
    ));
    ok(&w.ctl("bob", &["approve", &request_id(&out)]));
    for to in [paths[0], paths[1], added] {
        assert!(reaches(&w.link, to), "{to} closed with a grant");
    }

    // A configuration naming an address that is not this node's leaves the listening socket
    // reachable on the node's own addresses: check-config says so.
    let text = std::fs::read_to_string(&w.config).expect("config").replace(
        &format!("\"{SERVER_V4}:{ECHO_PORT}/tcp\""),
        &format!("\"10.213.0.99:{ECHO_PORT}/tcp\""),
    );
    let other = w.dir.0.join("elsewhere.toml");
    std::fs::write(&other, text).expect("config");
    let out = w
        .link
        .server
        .command(AGENT)
        .args(["check-config", "--config"])
        .arg(&other)
        .output()
        .expect("check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("reachable ungated")
            && stderr.contains("10.213.0.9")
            && stderr.contains("echo"),
        "{stderr}"
    );
}

/// A configured device that is deleted and created again (a VPN restarting its tun device) is
/// gated again at once: the old link died with the old device.
#[test]
#[ignore = "needs root"]
fn a_recreated_device_is_gated_again() {
    use std::net::UdpSocket;
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    let name = format!("jt{}", jit_tests::short_tag());
    let mut tun = Tun::create(&w.link.server, &name, "10.77.0.1/24");
    let veth = format!("interfaces = [\"{}\"]", w.link.server_if);
    let text = std::fs::read_to_string(&w.config).expect("config").replace(
        &veth,
        &format!("interfaces = [\"{}\", \"{name}:tc\"]", w.link.server_if),
    );
    let text = format!(
        "{text}\n[[services]]\nname = \"tunnel\"\ndestinations = [\"10.77.0.1:9999/udp\"]\n\
         require_reason = false\n"
    );
    std::fs::write(&w.config, text).expect("config");
    w.start_agent();
    let bind = |w: &World, port: u16| {
        let sock = w
            .link
            .server
            .run(move || UdpSocket::bind(("10.77.0.1", port)).expect("bind"));
        sock.set_read_timeout(Some(Duration::from_millis(800)))
            .expect("timeout");
        sock
    };
    let arrives = |tun: &mut Tun, sock: &UdpSocket, port: u16| {
        tun.send_udp([10, 77, 0, 2].into(), [10, 77, 0, 1].into(), port);
        sock.recv(&mut [0u8; 64]).is_ok()
    };
    let (gated, open) = (bind(&w, 9999), bind(&w, 9998));
    assert!(arrives(&mut tun, &open, 9998), "the tun path delivers");
    assert!(!arrives(&mut tun, &gated, 9999), "gated before");

    drop((tun, gated, open));
    w.link
        .server
        .exec_ip(&["tuntap", "del", "dev", &name, "mode", "tun"]);
    let mut tun = Tun::create(&w.link.server, &name, "10.77.0.1/24");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !w.agent_log().contains("created again") {
        assert!(
            Instant::now() < deadline,
            "the agent did not attach to the new device:\n{}",
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (gated, open) = (bind(&w, 9999), bind(&w, 9998));
    assert!(arrives(&mut tun, &open, 9998), "the new tun path delivers");
    assert!(
        !arrives(&mut tun, &gated, 9999),
        "the recreated device is not gated"
    );
}

/// `GET path` on the agent's metrics and health listener (127.0.0.1:9464 in the server
/// namespace): status code, content type and body.
fn http_get(w: &World, path: &str) -> (u16, String, String) {
    http_get_accepting(w, path, "*/*")
}

/// [`http_get`] with an `Accept` header.
fn http_get_accepting(w: &World, path: &str, accept: &str) -> (u16, String, String) {
    use std::io::{Read as _, Write as _};
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    let raw = w.link.server.run(move || {
        let mut s = TcpStream::connect_timeout(
            &"127.0.0.1:9464".parse().expect("addr"),
            Duration::from_secs(5),
        )
        .expect("connecting to the metrics listener");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("request");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("response");
        String::from_utf8(out).expect("utf-8")
    });
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    // Bodies may come chunked: drop the chunk-size lines.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, content_type, body)
}

/// The value of the sample `name` (with its labels, exactly as exposed), if present.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

#[test]
#[ignore = "needs root"]
fn metrics_health_and_structured_logs() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    w.json_logs = true;
    w.start_agent();
    let _echo = EchoServer::start(
        &w.link.server,
        format!("{SERVER_V4}:{ECHO_PORT}").parse().expect("addr"),
    );

    let (code, _, body) = http_get(&w, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _, body) = http_get(&w, "/readyz");
    assert_eq!(code, 200, "{body}");
    for check in ["gate: ok", "store: ok", "audit: ok"] {
        assert!(body.contains(check), "{body}");
    }
    let (code, _, _) = http_get(&w, "/nothing-here");
    assert_eq!(code, 404);

    // Dropped, then granted after a human approval, then passing.
    assert!(w.connect(CLIENT_V4, ECHO_PORT).is_none());
    let out = ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "10m", "--reason", "metrics"],
    ));
    let id = request_id(&out);
    ok(&w.ctl("bob", &["approve", &id]));
    let mut conn = w.connect(CLIENT_V4, ECHO_PORT).expect("granted connection");
    assert!(round_trip(&mut conn, b"counted", Duration::from_secs(2)));

    // What Prometheus asks for (OpenMetrics), and the classic text format for everyone else.
    let (code, content_type, metrics) = http_get_accepting(
        &w,
        "/metrics",
        "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5",
    );
    assert_eq!(code, 200, "{metrics}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    let (code, content_type, classic) = http_get(&w, "/metrics");
    assert_eq!(code, 200, "{classic}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(!classic.contains("# EOF"), "{classic}");
    let value =
        |name: &str| sample(&metrics, name).unwrap_or_else(|| panic!("no {name} in:\n{metrics}"));
    assert!(value(r#"jit_packets_allowed_total{service="echo"}"#) >= 3.0);
    assert!(value(r#"jit_packets_dropped_total{service="echo",reason="no_grant"}"#) >= 1.0);
    assert_eq!(
        value(r#"jit_packets_dropped_total{service="",reason="fragment"}"#),
        0.0
    );
    assert_eq!(value("jit_grants_active"), 1.0);
    assert_eq!(value("jit_requests_pending"), 0.0);
    assert_eq!(value(r#"jit_map_entries{map="JIT_GRANTS"}"#), 1.0);
    assert_eq!(
        value(r#"jit_map_capacity_entries{map="JIT_GRANTS"}"#),
        65_536.0
    );
    assert_eq!(value("jit_kernel_up"), 1.0);
    assert_eq!(value("jit_store_up"), 1.0);
    assert_eq!(value("jit_audit_write_failures_total"), 0.0);
    assert_eq!(
        value(r#"jit_decision_duration_seconds_count{outcome="pending"}"#),
        1.0
    );
    assert_eq!(value("jit_approval_wait_seconds_count"), 1.0);
    assert_eq!(
        value(r#"jit_kernel_events_dropped_total{cause="ring_full"}"#),
        0.0
    );

    // Prometheus's own checker accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    {
        use std::io::Write as _;
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(classic.as_bytes())
            .expect("feeding promtool");
    }
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics refused the exposition: {}{}\n{classic}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The log is JSON, one object per line, with the ids as fields.
    let lines: Vec<serde_json::Value> = w
        .agent_log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let approved = lines
        .iter()
        .find(|l| l["message"] == "request approved" && l["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no approval line for {id}: {lines:?}"));
    assert_eq!(approved["level"], "INFO");
    let grant_id = approved["grant_id"].as_str().expect("grant id").to_string();
    assert!(grant_id.starts_with("grant-"), "{approved}");
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "grant enforced" && l["grant_id"] == grant_id.as_str()),
        "{lines:?}"
    );

    // Clients that connect and say nothing cannot hold the listener: the connections over the
    // cap are closed at once, the idle ones once their headers are late, and it answers again.
    let idle = w.link.server.run(|| {
        (0..40)
            .filter_map(|_| {
                TcpStream::connect_timeout(
                    &"127.0.0.1:9464".parse().expect("addr"),
                    Duration::from_secs(2),
                )
                .ok()
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(idle.len(), 40, "the kernel accepts the connections");
    std::thread::sleep(Duration::from_secs(6));
    let closed = idle
        .into_iter()
        .filter(|mut c| {
            use std::io::Read as _;
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            // End of stream or a reset: closed by the agent (a timeout would mean still open).
            match c.read(&mut [0u8; 1]) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .count();
    assert_eq!(closed, 40, "every idle connection was closed");
    assert_eq!(http_get(&w, "/healthz").0, 200);

    // Not ready once the gate is gone from the interface; alive all the same.
    let out = Command::new(AGENT)
        .args(["bpf", "detach", "--iface", &w.link.server_if, "--pin-dir"])
        .arg(&w.pin_dir)
        .output()
        .expect("bpf detach");
    ok(&out);
    let (code, _, body) = http_get(&w, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("gate: not attached to {}", w.link.server_if)),
        "{body}"
    );
    assert!(body.contains("store: ok"), "{body}");
    assert_eq!(http_get(&w, "/healthz").0, 200);
}

/// Trust domains are pinned per CA: the main CA issues `jit.test` identities only, a partner
/// CA (federation) `partner.test` only; an identity of another trust domain is refused at the
/// handshake, whichever CA signed it.
#[test]
#[ignore = "needs root"]
fn each_ca_issues_only_for_its_trust_domains() {
    if !require_root() {
        return;
    }
    let mut w = World::new("1h");
    let partner = w.dir.0.join("partner");
    let out = Command::new(AGENT)
        .args(["certs", "init", "--trust-domain", "partner.test"])
        .args(["--identity", "bob", "--dir"])
        .arg(&partner)
        .output()
        .expect("certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&w.config).expect("config");
    let text = text.replacen("[tls]\n", "[tls]\ntrust_domains = [\"jit.test\"]\n", 1)
        + &format!(
            "\n[[tls.authorities]]\nca = {:?}\ntrust_domains = [\"partner.test\"]\n",
            partner.join("ca.pem").display().to_string()
        );
    std::fs::write(&w.config, text).expect("config");
    w.start_agent();

    let whoami = |certs: &Path, ca: &Path, stem: &str| {
        w.jitctl(
            ca,
            &certs.join(format!("{stem}.pem")),
            &certs.join(format!("{stem}.key")),
        )
        .arg("whoami")
        .output()
        .expect("jitctl")
    };
    let main_ca = w.dir.0.join("certs/ca.pem");
    // The main CA's own identity: accepted.
    let out = whoami(&w.dir.0.join("certs"), &main_ca, "alice");
    assert!(ok(&out).contains("spiffe://jit.test/alice"));
    // The partner's identity from the partner's CA: accepted (federation).
    let out = whoami(&partner, &main_ca, "bob");
    assert!(ok(&out).contains("spiffe://partner.test/bob"));
    // The main CA minting another trust domain, and the partner minting ours: refused.
    let forged = w.dir.0.join("forged");
    std::fs::create_dir_all(&forged).expect("dir");
    let params = |id: &str| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names
            .push(rcgen::SanType::URI(id.try_into().expect("uri")));
        p
    };
    sign_client_by(
        &w.dir.0.join("certs"),
        params("spiffe://partner.test/mallory"),
        &forged,
        "main-mints-partner",
    );
    sign_client_by(
        &partner,
        params("spiffe://jit.test/sre/carol"),
        &forged,
        "partner-mints-ours",
    );
    for stem in ["main-mints-partner", "partner-mints-ours"] {
        let out = whoami(&forged, &main_ca, stem);
        assert!(!out.status.success(), "{stem} was accepted: {}", ok(&out));
    }
    let log = w.agent_log();
    assert!(
        log.contains("may not issue identities of trust domain"),
        "the refusal is logged with its reason:\n{log}"
    );

    // The partner's CA removed (its file now holds another CA): a stream the partner's identity
    // opened before ends, and so does every call it makes; our own identity's stream goes on.
    let watch = |certs: &Path, stem: &str| {
        w.jitctl(
            &main_ca,
            &certs.join(format!("{stem}.pem")),
            &certs.join(format!("{stem}.key")),
        )
        .arg("watch")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jitctl watch")
    };
    let mut bobs = watch(&partner, "bob");
    let mut alices = watch(&w.dir.0.join("certs"), "alice");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        bobs.try_wait().expect("wait").is_none(),
        "bob's watch ended early"
    );
    let other = w.dir.0.join("other");
    let out = Command::new(AGENT)
        .args(["certs", "init", "--trust-domain", "partner.test", "--dir"])
        .arg(&other)
        .output()
        .expect("certs init");
    assert!(out.status.success());
    std::fs::copy(other.join("ca.pem"), partner.join("ca.pem")).expect("replace the CA");
    let err = ended_within(&mut bobs, Duration::from_secs(40))
        .expect("bob's watch outlived the removal of its CA by 40 s");
    assert!(err.contains("no longer trusted"), "{err}");
    assert!(
        alices.try_wait().expect("wait").is_none(),
        "a stream of a CA still trusted ended"
    );
    let _ = alices.kill();
    let _ = alices.wait();
    assert!(!whoami(&partner, &main_ca, "bob").status.success());
    assert!(ok(&whoami(&w.dir.0.join("certs"), &main_ca, "alice")).contains("jit.test/alice"));
}

/// The agent as the DaemonSet runs it (deploy/kubernetes/daemonset.yaml): with exactly the
/// capabilities the manifest adds, each of them needed. A pod restart (SIGTERM, then a new
/// agent) never opens the gate: while no agent runs, a granted connection keeps flowing, a new
/// granted one is accepted and one without a grant is dropped; the next agent takes over the
/// pinned link and maps and revokes as before.
#[test]
#[ignore = "needs root"]
fn the_daemonset_capabilities_suffice_and_a_restart_keeps_the_gate() {
    if !require_root() {
        return;
    }
    let caps = jit_tests::deploy::daemonset_capabilities();
    assert!(!caps.is_empty());
    let mut w = World::new("1h");
    // Each capability is needed: without any one the gate cannot be set up.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let out = w
            .link
            .server
            .command("setpriv")
            .args(setpriv_args(&fewer))
            .arg("--")
            .arg(AGENT)
            .args(["bpf", "attach", "--iface", &w.link.server_if, "--pin-dir"])
            .arg(&w.pin_dir)
            .output()
            .expect("setpriv jit-agent bpf attach");
        assert!(
            !out.status.success(),
            "the gate was set up without CAP_{missing}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    w.capabilities = Some(caps.clone());
    w.start_agent();
    // The agent holds these capabilities and no other.
    let pid = w.agent.as_ref().expect("agent").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    let wanted = caps.iter().fold(0, |m, c| m | capability_bit(c));
    assert_eq!(effective, wanted, "CapEff {effective:x}, wanted {wanted:x}");

    let _echo = EchoServer::start(
        &w.link.server,
        format!("{SERVER_V4}:{ECHO_PORT}").parse().expect("addr"),
    );
    assert!(
        w.connect(CLIENT_V4, ECHO_PORT).is_none(),
        "open without a grant"
    );
    let out = ok(&w.ctl(
        "alice",
        &["request", "echo", "--for", "10m", "--reason", "rollout"],
    ));
    let id = request_id(&out);
    ok(&w.ctl("bob", &["approve", &id]));
    let mut conn = w.connect(CLIENT_V4, ECHO_PORT).expect("granted connection");
    assert!(round_trip(&mut conn, b"before", Duration::from_secs(2)));

    // The pod stops (SIGTERM): the gate stays, both ways.
    w.stop();
    assert!(
        !w.local(&["status"]).status.success(),
        "an agent still answers"
    );
    assert!(
        round_trip(&mut conn, b"between", Duration::from_secs(2)),
        "the granted connection stopped while no agent ran"
    );
    assert!(
        w.connect(CLIENT_V4, ECHO_PORT).is_some(),
        "a granted connection was refused while no agent ran"
    );
    assert!(
        w.connect(CI_V4, ECHO_PORT).is_none(),
        "a connection without a grant passed while no agent ran"
    );

    // The next pod: same capabilities, same pins; it enforces and revokes as before.
    w.start_agent();
    let status = ok(&w.local(&["status"]));
    assert!(status.contains(&w.link.server_if), "{status}");
    assert!(round_trip(&mut conn, b"after", Duration::from_secs(2)));
    assert!(w.connect(CI_V4, ECHO_PORT).is_none());
    let grants = w.json("alice", &["ls", "grants", "--active", "--json"]);
    let grant_id = grants[0]["id"].as_str().expect("grant id").to_string();
    ok(&w.ctl(
        "sre_carol",
        &["revoke", &grant_id, "--reason", "rolled out"],
    ));
    assert!(
        !round_trip(&mut conn, b"revoked", Duration::from_millis(1500)),
        "data flowed after revoke"
    );
    assert!(w.connect(CLIENT_V4, ECHO_PORT).is_none());
    w.stop();
}
