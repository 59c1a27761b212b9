//! The `jit-agent bpf` commands, run as the real binary against the real kernel.

use std::{
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use jit_agent::datapath::{GateMaps, GrantScope, boottime_ns};
use jit_agent::spec::{Mode, Protocol, ServiceDest};
use jit_tests::{
    PinDirGuard,
    echo::EchoServer,
    netns::{CLIENT_V4, Link, Netns, SERVER_V4},
    require_root, unique,
};

const BIN: &str = env!("CARGO_BIN_EXE_jit-agent");

/// Runs `jit-agent` with `args`, inside `ns` when given (network namespace only).
fn agent(ns: Option<&Netns>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn");
    if let Some(ns) = ns {
        let file = std::fs::File::open(format!("/run/netns/{}", ns.name())).expect("netns");
        // SAFETY: only setns, which is async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().expect("running jit-agent")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "jit-agent failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected a failure, got success");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("valid JSON")
}

fn pin(dir: &Path) -> String {
    dir.display().to_string()
}

#[test]
#[ignore = "needs root"]
fn bpf_commands_end_to_end() {
    if !require_root() {
        return;
    }
    let link = Link::new();
    let dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-cli-")));
    let _pins = PinDirGuard(dir.clone());
    let d = pin(&dir);

    // Nothing loaded yet: a clear error, not a crash.
    fails_with(
        &agent(None, &["bpf", "status", "--pin-dir", &d]),
        "no gate is loaded",
    );
    // Bad input is refused before anything is attached.
    fails_with(
        &agent(
            Some(&link.server),
            &[
                "bpf",
                "attach",
                "--iface",
                &link.server_if,
                "--mode",
                "fast",
                "--pin-dir",
                &d,
            ],
        ),
        "expected auto, xdp, xdp-generic, xdp-native or tc",
    );
    fails_with(
        &agent(
            Some(&link.server),
            &["bpf", "attach", "--iface", "nosuchif0", "--pin-dir", &d],
        ),
        "no network interface named \"nosuchif0\"",
    );

    let out = ok(&agent(
        Some(&link.server),
        &[
            "bpf",
            "attach",
            "--iface",
            &link.server_if,
            "--mode",
            "xdp",
            "--pin-dir",
            &d,
        ],
    ));
    assert!(out.contains("attached to"), "{out}");

    let status = json(&agent(None, &["bpf", "status", "--json", "--pin-dir", &d]));
    let att = status["attachments"].as_array().expect("attachments");
    assert_eq!(att.len(), 1, "{status}");
    assert_eq!(att[0]["interface"], link.server_if.as_str());
    assert_eq!(att[0]["hook"], "xdp");

    // Program the maps through the library, as the agent will.
    let mut maps = GateMaps::open(&dir).expect("maps");
    maps.add_service(
        ServiceDest {
            addr: SERVER_V4.parse().expect("addr"),
            port: 9443,
            proto: Protocol::Tcp,
        },
        3,
        Mode::Enforce,
    )
    .expect("service");
    maps.bind_identity(format!("{CLIENT_V4}/32").parse().expect("net"), 11)
        .expect("identity");
    let to: SocketAddr = format!("{SERVER_V4}:9443").parse().expect("addr");
    let _server = EchoServer::start(&link.server, to);
    let connect = || {
        link.client
            .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok())
    };
    assert!(!connect());
    let now = boottime_ns().expect("clock");
    maps.put_grant(jit_tests::fixtures::grant_between(
        GrantScope::Identity,
        11,
        3,
        77,
        now,
        now + 600_000_000_000,
    ))
    .expect("grant");
    assert!(connect());

    let grants = json(&agent(None, &["bpf", "grants", "--json", "--pin-dir", &d]));
    let g = &grants.as_array().expect("array")[0];
    assert_eq!(g["grant_id"], 77);
    assert_eq!(g["state"], "live");
    // The connection's packets, counted under the grant by the kernel.
    assert!(g["usage"]["packets"].as_u64().unwrap_or(0) >= 1, "{g}");
    assert!(g["usage"]["first_seen_ns"].as_u64().unwrap_or(0) > 0, "{g}");
    assert_eq!(g["scope"]["kind"], "identity");
    let table = ok(&agent(None, &["bpf", "grants", "--pin-dir", &d]));
    assert!(
        table.starts_with("GRANT") && table.contains("live") && table.contains(" pkts"),
        "{table}"
    );

    let status = json(&agent(None, &["bpf", "status", "--json", "--pin-dir", &d]));
    assert!(
        status["counters"]["global"]["no_grant"].as_u64() > Some(0),
        "{status}"
    );
    assert!(
        status["counters"]["global"]["allowed"].as_u64() > Some(0),
        "{status}"
    );
    assert!(status["counters"]["per_service"]["3"]["allowed"].as_u64() > Some(0));
    let human = ok(&agent(None, &["bpf", "status", "--pin-dir", &d]));
    assert!(
        human.contains("INTERFACE") && human.contains("JIT_GRANTS"),
        "{human}"
    );

    // Detach is explicit; twice is an error that names what is missing.
    ok(&agent(
        None,
        &["bpf", "detach", "--iface", &link.server_if, "--pin-dir", &d],
    ));
    fails_with(
        &agent(
            None,
            &["bpf", "detach", "--iface", &link.server_if, "--pin-dir", &d],
        ),
        "not attached",
    );
}

#[test]
fn help_lists_the_bpf_commands() {
    let out = Command::new(BIN)
        .args(["bpf", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["attach", "detach", "status", "grants"] {
        assert!(text.contains(cmd), "{text}");
    }
}
