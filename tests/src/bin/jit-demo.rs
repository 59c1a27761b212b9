//! `cargo xtask demo`: the whole story on one machine, in two network namespaces: a connection
//! dropped in the kernel, a request, an approval, the connection passing, a revoke cutting it,
//! and a short grant expiring by itself. Cleans up on exit and on Ctrl-C.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use jit_tests::{
    echo::{EchoServer, round_trip},
    netns::{CLIENT_V4, Link, SERVER_V4},
    remove_pin_dir, unique,
};

/// What to remove on Ctrl-C (the guards handle a normal exit).
struct Cleanup {
    agent_pid: Option<u32>,
    namespaces: Vec<String>,
    pin_dir: PathBuf,
    dir: PathBuf,
}

static CLEANUP: Mutex<Option<Cleanup>> = Mutex::new(None);

fn cleanup_now() {
    let Some(c) = CLEANUP.lock().ok().and_then(|mut g| g.take()) else {
        return;
    };
    if let Some(pid) = c.agent_pid {
        // SAFETY: sending a signal to a child we started.
        unsafe {
            libc::kill(i32::try_from(pid).unwrap_or(0), libc::SIGKILL);
        }
    }
    for ns in &c.namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    remove_pin_dir(&c.pin_dir);
    let _ = std::fs::remove_dir_all(&c.dir);
}

fn say(step: &str) {
    println!("\n\x1b[1m==> {step}\x1b[0m");
}

fn show(cmd: &str) {
    println!("\x1b[2m$ {cmd}\x1b[0m");
}

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("JIT_BIN_DIR").map_or_else(
        || {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    dir.join(name)
}

fn try_connect(link: &Link, port: u16) -> Option<TcpStream> {
    let to: SocketAddr = format!("{SERVER_V4}:{port}").parse().ok()?;
    link.client
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok())
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e}");
        cleanup_now();
        std::process::exit(1);
    }
    cleanup_now();
}

fn run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the demo needs root (it loads BPF and creates network namespaces)".into());
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        cleanup_now();
        std::process::exit(130);
    })
    .map_err(|e| format!("installing the Ctrl-C handler: {e}"))?;

    let agent_bin = bin("jit-agent");
    let jitctl = bin("jitctl");
    for b in [&agent_bin, &jitctl] {
        if !b.exists() {
            return Err(format!(
                "{} is missing: run `cargo xtask demo`",
                b.display()
            ));
        }
    }
    let dir = std::env::temp_dir().join(unique("jit-demo-"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-test-")));
    let link = Link::new();
    *CLEANUP.lock().map_err(|e| e.to_string())? = Some(Cleanup {
        agent_pid: None,
        namespaces: vec![link.server.name().into(), link.client.name().into()],
        pin_dir: pin_dir.clone(),
        dir: dir.clone(),
    });

    say("Setting up: a server namespace (the node) and a client namespace, joined by a veth pair");
    println!(
        "    server {SERVER_V4} ({}), client {CLIENT_V4} ({})",
        link.server.name(),
        link.client.name()
    );
    let certs = dir.join("certs");
    let out = Command::new(&agent_bin)
        .args([
            "certs",
            "init",
            "--trust-domain",
            "demo.jit",
            "--host",
            SERVER_V4,
        ])
        .args(["--identity", "alice", "--identity", "sre/bob", "--dir"])
        .arg(&certs)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    show("jit-agent certs init --identity alice --identity sre/bob");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"{agent}
[[groups]]
name = "sre"
members = ["spiffe://demo.jit/sre/*"]

[[groups]]
name = "eng"
members = ["spiffe://demo.jit/alice"]

[[services]]
name = "payments-db"
destinations = ["{SERVER_V4}:5432/tcp"]
max_duration = "15m"
approvals_required = 1
bind_requester_address = true

[[services]]
name = "staging-api"
destinations = ["{SERVER_V4}:8080/tcp"]
environment = "staging"
max_duration = "4s"
bind_requester_address = true
"#,
            agent = jit_tests::fixtures::AgentFiles {
                dir: &dir,
                certs: &certs,
                pin_dir: &pin_dir,
                listen: &format!("{SERVER_V4}:7443"),
                interfaces: &[&link.server_if],
                request_ttl: None,
            }
            .sections(),
        ),
    )
    .map_err(|e| e.to_string())?;

    std::fs::write(
        dir.join("policies.cedar"),
        r#"// Engineers may ask for anything, with a reason.
@id("eng-may-request")
permit (principal in Jit::Group::"eng", action == Jit::Action::"request", resource)
when { context.reason != "" };

// Staging is granted at once.
@id("staging-auto")
permit (principal in Jit::Group::"eng", action == Jit::Action::"auto_approve", resource)
when { resource.environment == "staging" };

// SREs approve, deny and revoke.
@id("sre-decides")
permit (principal in Jit::Group::"sre",
        action in [Jit::Action::"approve", Jit::Action::"deny", Jit::Action::"revoke"], resource);
"#,
    )
    .map_err(|e| e.to_string())?;
    show("policies: eng may request (with a reason); staging is granted at once; SREs decide");
    let log = std::fs::File::create(dir.join("agent.log")).map_err(|e| e.to_string())?;
    let child = link
        .server
        .command(&agent_bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting jit-agent: {e}"))?;
    if let Ok(mut g) = CLEANUP.lock()
        && let Some(c) = g.as_mut()
    {
        c.agent_pid = Some(child.id());
    }
    let mut agent = Agent(child);
    show("jit-agent run --config agent.toml   (in the server namespace)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("agent.sock").exists() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            return Err(format!("the agent did not start:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _db = EchoServer::start(
        &link.server,
        format!("{SERVER_V4}:5432").parse().map_err(|_| "addr")?,
    );
    let _api = EchoServer::start(
        &link.server,
        format!("{SERVER_V4}:8080").parse().map_err(|_| "addr")?,
    );
    println!("    payments-db listens on {SERVER_V4}:5432, staging-api on {SERVER_V4}:8080");

    let ctl = |who: &str, args: &[&str]| -> Result<String, String> {
        show(&format!("jitctl {}   (as {who})", args.join(" ")));
        let out = link
            .client
            .command(&jitctl)
            .args(args)
            .env("JIT_AGENT", format!("https://{SERVER_V4}:7443"))
            .env("JIT_CA", certs.join("ca.pem"))
            .env(
                "JIT_CERT",
                certs.join(format!("{}.pem", who.replace('/', "_"))),
            )
            .env(
                "JIT_KEY",
                certs.join(format!("{}.key", who.replace('/', "_"))),
            )
            .env("HOME", &dir)
            .output()
            .map_err(|e| e.to_string())?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines() {
            println!("    {line}");
        }
        Ok(text)
    };

    say("1. Alice connects to payments-db without a grant: the kernel drops the SYN");
    match try_connect(&link, 5432) {
        None => println!("    connection timed out: dropped by XDP before it reached the service"),
        Some(_) => return Err("the connection passed without a grant".into()),
    }

    say("2. Alice asks for 10 minutes of access");
    let out = ctl(
        "alice",
        &[
            "request",
            "payments-db",
            "--for",
            "10m",
            "--reason",
            "INC-4711: check stuck payments",
        ],
    )?;
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("req-"))
        .ok_or("no request id")?
        .to_string();
    ctl("sre/bob", &["ls", "requests", "--pending"])?;

    say("3. Bob (SRE) approves");
    ctl("sre/bob", &["approve", &id, "--comment", "go ahead"])?;

    say("4. Alice connects again: the kernel lets her through");
    let mut conn = try_connect(&link, 5432).ok_or("granted, yet the connection failed")?;
    if !round_trip(&mut conn, b"SELECT 1", Duration::from_secs(2)) {
        return Err("the service did not answer".into());
    }
    println!("    connected; the service answered");
    ctl("alice", &["ls", "grants", "--active"])?;

    say("5. Bob revokes the grant: Alice's open connection is cut at its next packet");
    let grant = ctl("sre/bob", &["ls", "grants", "--active", "--json"])?;
    let grant_id = grant
        .split('"')
        .find(|w| w.starts_with("grant-"))
        .ok_or("no grant id")?
        .to_string();
    ctl(
        "sre/bob",
        &["revoke", &grant_id, "--reason", "incident closed"],
    )?;
    if round_trip(&mut conn, b"SELECT 2", Duration::from_millis(1500)) {
        return Err("data still flowed after the revoke".into());
    }
    println!("    the established connection no longer gets through");

    say("6. Expiry: staging-api grants at once, for at most 4 seconds");
    ctl(
        "alice",
        &[
            "request",
            "staging-api",
            "--for",
            "1h",
            "--reason",
            "smoke test",
        ],
    )?;
    let mut api = try_connect(&link, 8080).ok_or("granted, yet the connection failed")?;
    println!(
        "    connected: {}",
        round_trip(&mut api, b"GET /", Duration::from_secs(1))
    );
    println!("    waiting 5 seconds ...");
    std::thread::sleep(Duration::from_secs(5));
    let cut = !round_trip(&mut api, b"GET /again", Duration::from_millis(1000));
    println!("    after expiry the connection is cut: {cut}");
    if !cut {
        return Err("the expired grant still let data through".into());
    }

    say("What the kernel counted");
    show("jit-agent bpf status");
    let out = Command::new(&agent_bin)
        .args(["bpf", "status", "--pin-dir"])
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .map_err(|e| e.to_string())?;
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(2) {
        println!("    {line}");
    }
    say("The paper trail: stop the agent cleanly, verify its audit log, ask who had access");
    show("kill -TERM <jit-agent>   (the log is sealed with a signed checkpoint)");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(
            i32::try_from(agent.0.id()).map_err(|e| e.to_string())?,
            libc::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.0.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() >= deadline {
            return Err("jit-agent did not stop on SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let audit_dir = dir.join("state/audit");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&audit_dir)
        .map_err(|e| format!("{}: {e}", audit_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let key = dir.join("state/audit-signing.key.pub");
    let audit = |args: &[&str]| -> Result<(i32, String), String> {
        show(&format!(
            "jitctl audit {} {}/*.jsonl --key {}",
            args.join(" "),
            audit_dir.display(),
            key.display()
        ));
        let out = Command::new(&jitctl)
            .arg("audit")
            .args(args)
            .args(&files)
            .arg("--key")
            .arg(&key)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in text.lines() {
            println!("    {line}");
        }
        Ok((out.status.code().unwrap_or(-1), text))
    };
    let (code, _) = audit(&["verify"])?;
    if code != 0 {
        return Err(format!(
            "the demo's own audit log did not verify (exit {code})"
        ));
    }
    let (code, text) = audit(&["who", "--service", "payments-db"])?;
    if code != 0 || !text.contains("spiffe://demo.jit/alice") {
        return Err("the audit log does not say that alice held payments-db".into());
    }
    let _ = std::io::stdout().flush();
    say("Done: cleaning up namespaces, pins and processes");
    Ok(())
}
