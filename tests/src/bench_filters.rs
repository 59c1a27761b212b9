//! The filters the system benchmarks compare, on the server's end of a [`Link`]: the gate in
//! each attach mode, and what a user would pick instead for time-limited access: an nftables
//! set with per-element timeouts, and iptables (legacy backend) with one rule per grant. Each
//! holds the same grants (`(source, port)` for the benchmark's service) and drops the rest of
//! the traffic to that service; each reports how many packets it dropped.
//!
//! Every filter is removed by [`Installed::remove`] or on drop; the namespaces themselves are
//! the [`Link`]'s and go with it.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
};

use jit_agent::{
    datapath::{GrantEntry, GrantScope, boottime_ns, detach},
    spec::{AttachMode, Mode, Protocol, ServiceDest},
};

use crate::{TestGate, netns::Link};

/// The protected service's port (on the link's server address).
pub const PORT: u16 = 443;
/// First granted source (10.64.0.0 and up).
pub const GRANTED_BASE: u32 = 0x0a40_0000;

/// A filter in front of the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Nothing: the stack alone.
    None,
    /// The gate, attached in this mode.
    Gate(AttachMode),
    /// An nftables set of `(source, port)` with a timeout per element, at the earliest hook
    /// nftables has (netdev ingress on the device), accept on a match, count and drop the rest.
    NftSet,
    /// iptables (legacy), one `ACCEPT` rule per grant in `INPUT`, then a `DROP` for the port:
    /// the shape of a rule set that grows with grants.
    Iptables(u32),
}

impl Filter {
    /// A short name for reports.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::None => "no filter".into(),
            Self::Gate(m) => format!("gate, {m}"),
            Self::NftSet => "nftables set".into(),
            Self::Iptables(n) => format!("iptables, {n} rules"),
        }
    }
}

/// Runs `cmd`, panicking with its output when it fails.
fn checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (run `cargo xtask setup`)"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `program` in `ns` with `input` on stdin.
fn with_stdin(link: &Link, program: &str, args: &[&str], input: &str) {
    use std::io::Write as _;
    let mut child = link
        .server
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e} (run `cargo xtask setup`)"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing to {program}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The granted sources: `count` addresses from [`GRANTED_BASE`].
fn granted(count: u32) -> impl Iterator<Item = Ipv4Addr> {
    (0..count).map(|i| Ipv4Addr::from(GRANTED_BASE + i))
}

/// A gate loaded with `grants` host grants (plus `extra` sources) on the link's service,
/// ready to attach in any mode.
pub struct GateFixture {
    /// The gate and its maps.
    pub gate: TestGate,
}

impl GateFixture {
    /// Loads the gate: the service `server:PORT/tcp` enforced, `grants` sources granted for an
    /// hour, and `extra` (the benchmark's own client) granted too.
    #[must_use]
    pub fn load(server: Ipv4Addr, grants: u32, extra: &[Ipv4Addr]) -> Self {
        let mut gate = TestGate::load_with((grants + 16).next_power_of_two());
        gate.maps
            .add_service(
                ServiceDest {
                    addr: IpAddr::V4(server),
                    port: PORT,
                    proto: Protocol::Tcp,
                },
                1,
                Mode::Enforce,
            )
            .expect("service");
        let now = boottime_ns().expect("clock");
        let entries: Vec<GrantEntry> = granted(grants)
            .chain(extra.iter().copied())
            .enumerate()
            .map(|(i, a)| {
                let id = u64::try_from(i).unwrap_or(u64::MAX) + 1;
                crate::fixtures::grant_between(
                    GrantScope::Host(IpAddr::V4(a)),
                    u32::try_from(id % 1000).unwrap_or(0) + 1,
                    1,
                    id,
                    now,
                    now + 3_600_000_000_000,
                )
            })
            .collect();
        gate.maps.put_new_grants(&entries).expect("grants");
        Self { gate }
    }
}

/// A filter in place; removed on drop.
pub struct Installed<'a> {
    filter: Filter,
    link: &'a Link,
    gate: Option<&'a mut GateFixture>,
    removed: bool,
}

const NFT_TABLE: &str = "jitbench";

impl<'a> Installed<'a> {
    /// Puts `filter` in front of the service on the link's server side, holding `grants`
    /// granted sources plus `extra`. `gate` is the loaded gate for the gate's modes.
    pub fn new(
        link: &'a Link,
        filter: Filter,
        mut gate: Option<&'a mut GateFixture>,
        grants: u32,
        extra: &[Ipv4Addr],
    ) -> Self {
        let server: Ipv4Addr = crate::netns::SERVER_V4.parse().expect("address");
        match filter {
            Filter::None => {}
            Filter::Gate(mode) => {
                let g = gate
                    .as_deref_mut()
                    .expect("the gate's modes need the loaded gate");
                let iface = link.server_if.clone();
                link.server
                    .run(|| g.gate.gate.attach(&iface, mode))
                    .unwrap_or_else(|e| panic!("attaching the gate in {mode} mode: {e}"));
            }
            Filter::NftSet => {
                let mut elements = String::new();
                for a in granted(grants).chain(extra.iter().copied()) {
                    if !elements.is_empty() {
                        elements.push_str(", ");
                    }
                    elements.push_str(&format!("{a} . {PORT} timeout 1h"));
                }
                let ruleset = format!(
                    "table netdev {NFT_TABLE} {{\n\
                     set grants {{ type ipv4_addr . inet_service; flags timeout; \
                     elements = {{ {elements} }} }}\n\
                     chain ingress {{ type filter hook ingress device \"{dev}\" priority 0; \
                     policy accept;\n\
                     ip daddr {server} tcp dport {PORT} ip saddr . tcp dport @grants accept\n\
                     ip daddr {server} tcp dport {PORT} counter drop\n}}\n}}\n",
                    dev = link.server_if
                );
                with_stdin(link, "nft", &["-f", "-"], &ruleset);
            }
            Filter::Iptables(rules) => {
                let mut text = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
                for a in granted(rules.saturating_sub(u32::try_from(extra.len()).unwrap_or(0)))
                    .chain(extra.iter().copied())
                {
                    text.push_str(&format!(
                        "-A INPUT -s {a}/32 -d {server}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT\n"
                    ));
                }
                text.push_str(&format!(
                    "-A INPUT -d {server}/32 -p tcp -m tcp --dport {PORT} -j DROP\nCOMMIT\n"
                ));
                with_stdin(link, "iptables-legacy-restore", &[], &text);
            }
        }
        Self {
            filter,
            link,
            gate,
            removed: false,
        }
    }

    /// The filter this is.
    #[must_use]
    pub fn filter(&self) -> Filter {
        self.filter
    }

    /// Packets the filter dropped so far (`None` for no filter).
    #[must_use]
    pub fn dropped(&self) -> Option<u64> {
        match self.filter {
            Filter::None => None,
            Filter::Gate(_) => Some(self.gate.as_ref().map_or(0, |g| g.gate.counter("no_grant"))),
            Filter::NftSet => {
                let text = checked(
                    self.link
                        .server
                        .command("nft")
                        .args(["list", "chain", "netdev", NFT_TABLE, "ingress"]),
                    "nft list chain",
                );
                let n = text
                    .split("counter packets ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse().ok());
                Some(n.unwrap_or_else(|| panic!("no counter in {text}")))
            }
            Filter::Iptables(_) => {
                let text = checked(
                    self.link
                        .server
                        .command("iptables-legacy")
                        .args(["-L", "INPUT", "-v", "-x", "-n"]),
                    "iptables-legacy -L",
                );
                let n = text
                    .lines()
                    .find(|l| l.contains("DROP"))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|n| n.parse().ok());
                Some(n.unwrap_or_else(|| panic!("no DROP rule in {text}")))
            }
        }
    }

    /// Removes the filter.
    pub fn remove(mut self) {
        self.take_down();
    }

    fn take_down(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        let ok = |r: std::io::Result<std::process::Output>, what: &str| {
            if !matches!(r, Ok(ref o) if o.status.success()) {
                eprintln!("cleanup: {what} failed: {r:?}");
            }
        };
        match self.filter {
            Filter::None => {}
            Filter::Gate(mode) => {
                if let Some(g) = self.gate.as_ref()
                    && let Err(e) = detach(g.gate.pin_dir(), &self.link.server_if, mode)
                {
                    eprintln!("cleanup: detaching the gate ({mode}): {e}");
                }
            }
            Filter::NftSet => ok(
                self.link
                    .server
                    .command("nft")
                    .args(["delete", "table", "netdev", NFT_TABLE])
                    .output(),
                "nft delete table",
            ),
            Filter::Iptables(_) => ok(
                self.link
                    .server
                    .command("iptables-legacy")
                    .args(["-F", "INPUT"])
                    .output(),
                "iptables-legacy -F INPUT",
            ),
        }
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        self.take_down();
    }
}
