//! The control path end to end, for `cargo xtask bench`: one agent with the embedded store in a
//! namespace (the fleet harness's node 1, on its own), driven by a Rust client that keeps one
//! mTLS connection per caller, as real clients do.
//!
//! - Time to grant: an auto-approved `RequestAccess` to the first packet of the requester
//!   passing. The requester sends a SYN every few microseconds throughout; the first one that
//!   passed is read from the kernel's own record of the grant's first packet (`first_seen`,
//!   `CLOCK_BOOTTIME`), against the boot clock read just before the call.
//! - Time to revoke: from the start of `Revoke` to the kernel entry gone (the first packet after
//!   it is dropped: the gate looks the grant up on every packet), read by polling the entry every
//!   few tens of microseconds (sleeping in between). Beside it the `Revoke` call, which returns
//!   only once the entry is gone (checked after).
//! - Beside both, a no-op call (`WhoAmI`) on the same connection, and a durable write (200
//!   bytes and `fsync`) on the agent's file system, in the same run.
//! - Throughput: auto-approved requests per second at concurrencies 1, 16 and 64, each caller on
//!   its own connection, with no history and with 10 000 (and 100 000) ended grants and their
//!   requests already in the store.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use jit_agent::{
    datapath::{GateMaps, boottime_ns},
    model::{Grant, GrantState, Request, RequestState},
    store::{Record, RedbStore, Store as _, Txn},
};
use jit_api::pb::{self, jit_gate_client::JitGateClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    TempDir,
    echo::EchoServer,
    etcd::Cluster,
    fleet::{ECHO_PORT, Node, agent_bin, host_ip, node_ip, ok},
};

/// `ci` asks and is granted at once; `sre/carol` revokes.
const POLICIES: &str = r#"
permit (principal == Jit::Identity::"spiffe://jit.test/ci", action in [Jit::Action::"request", Jit::Action::"auto_approve"], resource);
permit (principal == Jit::Identity::"spiffe://jit.test/sre/carol", action == Jit::Action::"revoke", resource);
"#;

/// What one run measured.
#[derive(Debug, Default)]
pub struct Figures {
    /// `WhoAmI` calls.
    pub noop: Vec<Duration>,
    /// Auto-approved `RequestAccess` calls.
    pub grant_call: Vec<Duration>,
    /// From the start of `RequestAccess` to the first packet that passed.
    pub first_packet: Vec<Duration>,
    /// `Revoke` calls (the kernel entry is gone when they return).
    pub revoke_call: Vec<Duration>,
    /// From the start of `Revoke` to the kernel entry seen gone (the next packet is dropped).
    pub revoke_drop: Vec<Duration>,
    /// `(ended grants in the store, concurrency, requests per second)`.
    pub throughput: Vec<(usize, usize, f64)>,
    /// One Cedar decision, µs ([`cedar_decision_us`]).
    pub cedar_us: f64,
    /// `(concurrency, requests per second)` on the etcd backend ([`throughput_on_etcd`]).
    pub etcd_throughput: Vec<(usize, f64)>,
    /// A durable write on the agent's file system (200 bytes, then `fsync`): what each of the
    /// store commit and the audit record waits for.
    pub fsync: Vec<Duration>,
    /// One store commit of one grant (the embedded store, the agent's file system): what a
    /// grant waits for twice before the kernel may hold it.
    pub store_commit: Vec<Duration>,
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Samples of time to grant, time to revoke and the no-op call.
    pub samples: usize,
    /// Histories for the throughput runs.
    pub histories: &'static [usize],
    /// Concurrencies for the throughput runs.
    pub concurrencies: &'static [usize],
    /// Length of one throughput run.
    pub run_for: Duration,
}

/// One agent alone and its clients.
struct Bench {
    node: Node,
    config: PathBuf,
    certs: PathBuf,
    _echo: EchoServer,
    rt: tokio::runtime::Runtime,
    _home: TempDir,
    /// The etcd cluster of an agent on the etcd backend (dropped after the agent).
    _etcd: Option<Cluster>,
}

/// Where the bench's agent keeps its state.
enum Backend {
    /// The embedded store; `max_grants` sizes the kernel grants map (from its first start).
    Embedded { max_grants: Option<u32> },
    /// A three-member etcd cluster on this host.
    Etcd,
}

type Client = JitGateClient<Channel>;

impl Bench {
    fn start() -> Self {
        Self::start_with(Backend::Embedded { max_grants: None })
    }

    /// An agent alone on `backend`.
    fn start_with(backend: Backend) -> Self {
        let home = TempDir::new("jit-bench-");
        let certs = home.path().join("certs");
        ok(&Command::new(agent_bin())
            .args(["certs", "init", "--trust-domain", "jit.test", "--host"])
            .arg(node_ip(1))
            .args(["--identity", "ci", "--identity", "sre/carol", "--dir"])
            .arg(&certs)
            .output()
            .expect("certs init"));
        let mut node = Node::new(1);
        let (config, etcd) = match backend {
            Backend::Embedded { max_grants } => {
                let config = node.config_alone(1, &certs, POLICIES);
                if let Some(n) = max_grants {
                    let text = std::fs::read_to_string(&config).expect("config");
                    assert!(text.contains("[agent]\n"), "no [agent] section in {text}");
                    let text =
                        text.replacen("[agent]\n", &format!("[agent]\nmax_grants = {n}\n"), 1);
                    std::fs::write(&config, text).expect("config");
                }
                (config, None)
            }
            Backend::Etcd => {
                let etcd = Cluster::start_on(3, &[host_ip(1).as_str()]);
                let config = node.config(1, &certs, &etcd.endpoints_at(&host_ip(1)));
                // The fleet's configuration, with the bench's policies (ci auto-approved).
                std::fs::write(node.dir.path().join("policies.cedar"), POLICIES).expect("policies");
                (config, Some(etcd))
            }
        };
        node.start(&config);
        let echo = EchoServer::start(
            &node.ns,
            format!("{}:{ECHO_PORT}", node_ip(1)).parse().expect("addr"),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            node,
            config,
            certs,
            _echo: echo,
            rt,
            _home: home,
            _etcd: etcd,
        }
    }

    /// A new connection as `who` (`ci`, `sre_carol`).
    fn client(&self, who: &str) -> Client {
        let read =
            |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(self.certs.join("ca.pem"))))
            .identity(Identity::from_pem(
                read(self.certs.join(format!("{who}.pem"))),
                read(self.certs.join(format!("{who}.key"))),
            ));
        let endpoint = Endpoint::from_shared(format!("https://{}:7443", node_ip(1)))
            .expect("agent URL")
            .tls_config(tls)
            .expect("TLS");
        JitGateClient::new(self.rt.block_on(endpoint.connect()).expect("connect"))
    }

    /// Auto-approved requests per second from `concurrency` callers, each on its own
    /// connection, for `run_for`.
    fn throughput(&self, concurrency: usize, run_for: Duration) -> f64 {
        let clients: Vec<Client> = (0..concurrency).map(|_| self.client("ci")).collect();
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        self.rt.block_on(async {
            let mut tasks = Vec::new();
            for mut c in clients {
                let done = Arc::clone(&done);
                tasks.push(tokio::spawn(async move {
                    while started.elapsed() < run_for {
                        c.request_access(ask()).await.expect("request");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                t.await.expect("caller");
            }
        });
        // A count over seconds: exact in f64.
        #[allow(clippy::cast_precision_loss)]
        let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        rate
    }

    /// Ends every grant of `ci` (between throughput runs).
    fn revoke_all(&self, carol: &mut Client) {
        self.rt
            .block_on(carol.revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::Identity(
                    "spiffe://jit.test/ci".into(),
                )),
                reason: "bench".into(),
            }))
            .expect("revoke all");
    }

    /// Stops the agent, writes `count` ended grants and their requests into its store, and
    /// starts it again.
    fn add_history(&mut self, from: usize, count: usize) {
        self.node.kill9();
        let store = RedbStore::open(&self.node.dir.path().join("state/state.redb")).expect("store");
        let now = jit_agent::model::now_ms();
        for chunk in (from..from + count).collect::<Vec<_>>().chunks(5_000) {
            let mut txn = Txn::default();
            for &i in chunk {
                let (req, grant) = ended_pair(i, now);
                txn = txn
                    .and_put(Record::Request(req), 0)
                    .and_put(Record::Grant(grant), 0);
            }
            store.commit(txn).expect("history");
        }
        drop(store);
        self.node.start(&self.config);
    }
}

/// One sample of each control-path figure.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// A `WhoAmI` call.
    pub noop: Duration,
    /// An auto-approved `RequestAccess` call.
    pub grant_call: Duration,
    /// From the start of `RequestAccess` to the first packet that passed.
    pub first_packet: Duration,
    /// A `Revoke` call (the kernel entry is gone when it returns).
    pub revoke_call: Duration,
    /// From the start of `Revoke` to the kernel entry seen gone.
    pub revoke_drop: Duration,
}

/// A no-op call, then a grant with the requester knocking throughout, then its revocation.
fn round(
    b: &Bench,
    ci: &mut Client,
    carol: &mut Client,
    maps: &GateMaps,
    echo: SocketAddrV4,
) -> Round {
    let t = Instant::now();
    b.rt.block_on(ci.who_am_i(pb::WhoAmIRequest::default()))
        .expect("whoami");
    let noop = t.elapsed();

    // The requester knocks throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                syn(echo);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2));
    let boot_start = boottime_ns().expect("boot clock");
    let t = Instant::now();
    let granted =
        b.rt.block_on(ci.request_access(ask()))
            .expect("request")
            .into_inner();
    let grant_call = t.elapsed();
    let gid = jit_agent::kernel_sync::numeric_grant_id(&granted.grant_id)
        .unwrap_or_else(|e| panic!("granted at once? {granted:?}: {e}"));
    let mut first_seen = 0;
    let mut key = None;
    let deadline = Instant::now() + Duration::from_secs(2);
    while first_seen == 0 && Instant::now() < deadline {
        if let Some(e) = maps
            .grants()
            .expect("grants")
            .iter()
            .find(|e| e.grant_id == gid)
        {
            first_seen = e.usage.first_seen_ns;
            key = Some(e.key());
        }
    }
    assert!(
        first_seen > 0,
        "no packet passed under {}",
        granted.grant_id
    );
    let key = key.expect("the grant's key");
    let first_packet = Duration::from_nanos(first_seen.saturating_sub(boot_start));

    stop.store(true, Ordering::Relaxed);
    let _ = prober.join();

    // The entry is polled (every few tens of microseconds, sleeping in between: a spinning
    // poller on 2 cores would slow the agent it measures) until it is gone: the first packet
    // after that is dropped (the gate looks the grant up on every packet).
    let t = Instant::now();
    let (revoke_call, revoke_drop) = std::thread::scope(|s| {
        let poller = s.spawn(|| {
            // SAFETY: prctl with an integer argument changes this thread's timer slack only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
            let deadline = t + Duration::from_secs(2);
            while Instant::now() < deadline {
                match maps.grant(&key).expect("grant entry") {
                    Some(e) if e.grant_id == gid => {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    _ => break,
                }
            }
            t.elapsed()
        });
        b.rt.block_on(carol.revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::GrantId(
                granted.grant_id.clone(),
            )),
            reason: "bench".into(),
        }))
        .expect("revoke");
        let took = t.elapsed();
        (took, poller.join().expect("poller"))
    });
    assert!(
        !maps
            .grants()
            .expect("grants")
            .iter()
            .any(|e| e.grant_id == gid),
        "the kernel still held {} after Revoke returned",
        granted.grant_id
    );
    Round {
        noop,
        grant_call,
        first_packet,
        revoke_call,
        revoke_drop,
    }
}

/// The request every caller of the bench makes (auto-approved for `ci`).
fn ask() -> pb::RequestAccessRequest {
    pb::RequestAccessRequest {
        service: "echo".into(),
        duration: "10m".into(),
        // The fleet's configuration (the etcd backend's) requires a reason.
        reason: "bench".into(),
        ..pb::RequestAccessRequest::default()
    }
}

/// An ended grant `i` and its request, as history.
fn ended_pair(i: usize, now: i64) -> (Request, Grant) {
    let (rid, gid) = (format!("req-b{i:011x}"), format!("grant-b{i:011x}"));
    let request = Request {
        id: rid.clone(),
        requester: "spiffe://jit.test/ci".into(),
        service: "echo".into(),
        duration_s: 60,
        clamped: false,
        reason: String::new(),
        state: RequestState::Granted,
        created_ms: now - 86_400_000,
        pending_until_ms: now - 86_400_000,
        approvals: Vec::new(),
        approvals_required: 0,
        denied_by: String::new(),
        denial_reason: String::new(),
        grant_id: gid.clone(),
        peer_address: String::new(),
        ticket: String::new(),
        break_glass: false,
        policies: Vec::new(),
    };
    let grant = Grant {
        id: gid,
        request_id: rid,
        identity: "spiffe://jit.test/ci".into(),
        service: "echo".into(),
        not_before_ms: now - 86_400_000,
        expires_ms: now - 86_340_000,
        state: GrantState::Expired,
        revoked_by: String::new(),
        revoke_reason: String::new(),
        ended_ms: now - 86_340_000,
        extra_sources: Vec::new(),
        break_glass: false,
        issued: true,
        usage: None,
    };
    (request, grant)
}

/// Sends one SYN to `to` and forgets the socket (non-blocking connect, then close).
fn syn(to: SocketAddrV4) {
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a socket this function owns, a sockaddr_in that lives across the call.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return;
        }
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16);
        libc::connect(fd, (&raw const addr).cast(), len);
        libc::close(fd);
    }
}

/// Measures the control path; `plan` says how much.
///
/// # Panics
/// When the agent cannot be started or a call fails.
#[must_use]
pub fn run(plan: Plan) -> Figures {
    let mut b = Bench::start();
    let mut figures = Figures::default();
    let mut ci = b.client("ci");
    let mut carol = b.client("sre_carol");
    let maps = GateMaps::open(&b.node.pin_dir).expect("the gate's maps");
    let echo: SocketAddrV4 = format!("{}:{ECHO_PORT}", node_ip(1)).parse().expect("addr");
    // The floor of a durable write where the agent keeps its store and audit log.
    {
        use std::io::Write as _;
        let path = b.node.dir.path().join("fsync-probe");
        let mut f = std::fs::File::create(&path).expect("probe file");
        for _ in 0..plan.samples.min(100) {
            let t = Instant::now();
            f.write_all(&[0u8; 200]).expect("write");
            f.sync_data().expect("fsync");
            figures.fsync.push(t.elapsed());
        }
        let _ = std::fs::remove_file(path);
    }
    // A commit of the embedded store there, one grant each.
    {
        let path = b.node.dir.path().join("commit-probe.redb");
        let store = RedbStore::open(&path).expect("probe store");
        let now = jit_agent::model::now_ms();
        for i in 0..plan.samples.min(100) {
            let (_, grant) = ended_pair(i, now);
            let t = Instant::now();
            store
                .commit(Txn::put(Record::Grant(grant), 0))
                .expect("probe commit");
            figures.store_commit.push(t.elapsed());
        }
        drop(store);
        let _ = std::fs::remove_file(path);
    }
    // Warm up the connections and the agent.
    for _ in 0..20 {
        b.rt.block_on(ci.who_am_i(pb::WhoAmIRequest::default()))
            .expect("whoami");
    }

    for _ in 0..plan.samples {
        let r = round(&b, &mut ci, &mut carol, &maps, echo);
        figures.noop.push(r.noop);
        figures.grant_call.push(r.grant_call);
        figures.first_packet.push(r.first_packet);
        figures.revoke_call.push(r.revoke_call);
        figures.revoke_drop.push(r.revoke_drop);
    }

    let mut history = 0;
    for &target in plan.histories {
        if target > history {
            b.add_history(history, target - history);
            history = target;
            ci = b.client("ci");
            carol = b.client("sre_carol");
        }
        for &concurrency in plan.concurrencies {
            let rate = b.throughput(concurrency, plan.run_for);
            figures.throughput.push((history, concurrency, rate));
            b.revoke_all(&mut carol);
        }
    }
    drop(ci);
    figures
}

/// What the run at scale measured.
#[derive(Debug, Default)]
pub struct Scale {
    /// Live grants in the store (each for its own bound host address: one kernel entry each).
    pub grants: usize,
    /// Seconds to write them (and their requests) into the store directly.
    pub write_s: f64,
    /// First start after they were written: from exec to the agent answering, and the
    /// reconciliation within it (as the agent logs it), seconds; kernel entries written.
    pub first_start_s: f64,
    /// As logged by the agent.
    pub first_reconcile_s: f64,
    /// Entries the first reconciliation wrote.
    pub first_written: u64,
    /// Restart after a `kill -9`, with the kernel still holding everything.
    pub restart_s: f64,
    /// As logged by the agent.
    pub restart_reconcile_s: f64,
    /// Entries the restart's reconciliation wrote (0: the kernel kept them).
    pub restart_written: u64,
    /// Median of 3 auto-approved `RequestAccess` calls with the grants live, ms.
    pub request_ms: f64,
    /// The agent's resident memory after the restart, and its peak, KiB.
    pub rss_kib: u64,
    /// Peak resident memory of the agent, KiB.
    pub hwm_kib: u64,
    /// Kernel memory of the gate's maps (`memlock` of each pinned map), bytes, by map.
    pub maps: Vec<(String, u64)>,
    /// The store file's size, bytes.
    pub store_bytes: u64,
}

/// A live grant `i` bound to its own host address (10.64.0.0 + i), and its request.
fn live_pair(i: usize, now: i64) -> (Request, Grant) {
    let (mut request, mut grant) = ended_pair(i, now);
    request.created_ms = now;
    request.pending_until_ms = now;
    grant.not_before_ms = now - 1_000;
    grant.expires_ms = now + 3_600_000;
    grant.state = GrantState::Active;
    grant.ended_ms = 0;
    let host = std::net::Ipv4Addr::from(0x0a40_0000 + u32::try_from(i).expect("index"));
    grant.extra_sources = vec![format!("{host}/32")];
    (request, grant)
}

/// Seconds and entries written from the agent log's reconciliation line.
fn reconciled(log: &str) -> (f64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("kernel reconciled with the store in"))
        .unwrap_or_else(|| panic!("no reconciliation line in the agent's log:\n{log}"));
    let after = |key: &str| {
        line.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(|w| w.trim_end_matches([':', ',']).to_string())
            .unwrap_or_default()
    };
    let secs = after("store in ").parse().unwrap_or(f64::NAN);
    let written = after(" s: ").parse().unwrap_or(0);
    (secs, written)
}

/// `VmRSS` and `VmHWM` of `pid`, KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `memlock` of every map pinned in `dir` (not the links), by name.
fn maps_memlock(dir: &std::path::Path) -> Vec<(String, u64)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("pin dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        let Ok(map) = aya::maps::MapData::from_pin(&path) else {
            continue;
        };
        let fd = map.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        let memlock = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push((entry.file_name().to_string_lossy().into_owned(), memlock));
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.1));
    out
}

/// One agent with `count` live grants in its store: the time to reconcile them into the
/// kernel at a start and at a restart, the agent's memory and the maps'.
#[must_use]
pub fn at_scale(count: usize) -> Scale {
    let capacity = u32::try_from(count + count / 4)
        .expect("capacity")
        .next_power_of_two();
    let mut b = Bench::start_with(Backend::Embedded {
        max_grants: Some(capacity),
    });
    b.node.kill9();
    let db = b.node.dir.path().join("state/state.redb");
    let written = Instant::now();
    {
        let store = RedbStore::open(&db).expect("store");
        let now = jit_agent::model::now_ms();
        for start in (0..count).step_by(10_000) {
            let mut txn = Txn::default();
            for i in start..(start + 10_000).min(count) {
                let (req, grant) = live_pair(i, now);
                txn = txn
                    .and_put(Record::Request(req), 0)
                    .and_put(Record::Grant(grant), 0);
            }
            store.commit(txn).expect("live grants");
        }
    }
    let write_s = written.elapsed().as_secs_f64();
    let patience = Duration::from_secs(600);
    let t = Instant::now();
    b.node.start_within(&b.config, &[], patience);
    let first_start_s = t.elapsed().as_secs_f64();
    let (first_reconcile_s, first_written) = reconciled(&b.node.log());
    b.node.kill9();
    let t = Instant::now();
    b.node.start_within(&b.config, &[], patience);
    let restart_s = t.elapsed().as_secs_f64();
    let (restart_reconcile_s, restart_written) = reconciled(&b.node.log());
    let (rss_kib, hwm_kib) = memory_kib(b.node.agent_pid().expect("agent running"));
    // Requests with that many live grants of the same service in the store.
    let mut ci = b.client("ci");
    let mut request_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        b.rt.block_on(ci.request_access(ask()))
            .expect("request at scale");
        request_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    request_ms.sort_by(f64::total_cmp);
    Scale {
        grants: count,
        write_s,
        first_start_s,
        first_reconcile_s,
        first_written,
        restart_s,
        restart_reconcile_s,
        restart_written,
        request_ms: request_ms[request_ms.len() / 2],
        rss_kib,
        hwm_kib,
        maps: maps_memlock(&jit_agent::datapath::maps_dir(&b.node.pin_dir)),
        store_bytes: std::fs::metadata(&db).map_or(0, |m| m.len()),
    }
}

/// Auto-approved requests per second on the etcd backend (one agent, a three-member etcd
/// cluster on this host), at each of `concurrencies`, with no history.
#[must_use]
pub fn throughput_on_etcd(concurrencies: &[usize], run_for: Duration) -> Vec<(usize, f64)> {
    let b = Bench::start_with(Backend::Etcd);
    let mut carol = b.client("sre_carol");
    concurrencies
        .iter()
        .map(|&c| {
            let rate = b.throughput(c, run_for);
            b.revoke_all(&mut carol);
            (c, rate)
        })
        .collect()
}

/// One Cedar decision (`request`) against the shipped example policies and schema, µs: the
/// median of 11 runs of 1 000.
#[must_use]
pub fn cedar_decision_us() -> f64 {
    use jit_agent::policy::{Action, Facts, Policies, load_files};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let policies = Policies::from_loaded(
        load_files(
            &dir.join("policies.cedar"),
            Some(&dir.join("jit.cedarschema")),
        )
        .unwrap_or_else(|e| panic!("the example policies: {e}")),
    );
    let facts = Facts {
        principal: "spiffe://jit.test/ci",
        principal_groups: Vec::new(),
        service: "payments-db",
        environment: "production",
        max_duration_seconds: 3600,
        duration_seconds: 600,
        reason: "bench",
        ticket: "",
        source_ip: None,
        now_ms: jit_agent::model::now_ms(),
        requester: "spiffe://jit.test/ci",
        requester_groups: Vec::new(),
        approvals: 0,
    };
    let mut runs: Vec<f64> = (0..11)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..1_000 {
                std::hint::black_box(policies.decide(Action::Request, &facts));
            }
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}
