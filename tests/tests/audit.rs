//! The audit log under failure, against the real kernel and a real filesystem that fills up: no
//! grant reaches the kernel while the log cannot be written (fail closed), a revocation still takes
//! effect, and once the log is writable again the held records are written and the chain holds.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use jit_agent::{
    datapath::GateMaps,
    engine::{Engine, RequestOptions, RevokeTarget},
    identity::Caller,
    kernel_sync::KernelSync,
    node::{Node, NodeError},
    notify::Notifier,
    store::{RedbStore, Store as _},
};
use jit_api::audit::verify;
use jit_tests::{TempDir, TestGate, fixtures, require_root};

/// One service, `db`, and the identity `ci` with a static prefix.
const DB: &str = "[[services]]\nname = \"db\"\ndestinations = [\"10.99.0.1:5432/tcp\"]\n\
                  require_reason = false\n[[identities]]\nspiffe_id = \"spiffe://t.test/ci\"\n\
                  sources = [\"10.1.0.0/24\"]\n";

const POLICIES: &str = r#"
permit (principal, action in [Jit::Action::"request", Jit::Action::"auto_approve"], resource);
"#;

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "jit-audit-test"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(ok.success(), "mounting a tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A node over a real kernel gate (its own pin directory), a redb store and an audit log, built
/// from `cfg`, deciding with `policies`.
struct NodeWorld {
    gate: TestGate,
    store: Arc<RedbStore>,
    sync: Arc<KernelSync<RedbStore>>,
    audit: Arc<jit_agent::audit::AuditLog>,
    node: Node<RedbStore>,
}

impl NodeWorld {
    fn new(dir: &TempDir, cfg: &Arc<jit_agent::config::Config>, policies: &str) -> Self {
        let gate = TestGate::load();
        let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let maps = GateMaps::open(gate.pin_dir()).expect("maps");
        let sync = Arc::new(KernelSync::new(Arc::clone(&store), Arc::clone(cfg), maps));
        sync.resync().expect("resync");
        let audit = fixtures::audit_log(cfg);
        let engine = Engine::new(
            Arc::clone(&store),
            Arc::clone(cfg),
            fixtures::policies(policies),
            Arc::new(jit_agent::model::now_ms),
        );
        let node = Node::new(
            engine,
            Arc::clone(&sync),
            Notifier::disabled(),
            Arc::clone(&audit),
        );
        Self {
            gate,
            store,
            sync,
            audit,
            node,
        }
    }
}

/// Every record of the audit series in `dir`, parsed.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    fixtures::audit_series(dir)
        .iter()
        .flat_map(|f| {
            String::from_utf8_lossy(&f.bytes)
                .lines()
                .map(|l| serde_json::from_str(l).expect("record"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn ci() -> Caller {
    Caller::Spiffe("spiffe://t.test/ci".into())
}

fn request(node: &Node<RedbStore>) -> Result<String, NodeError> {
    node.request_access(&ci(), "db", "10m", &RequestOptions::default())
        .map(|r| r.grant_id)
}

#[test]
#[ignore = "needs root"]
fn no_grant_without_its_record_and_revocation_goes_on() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-audit-");
    let fs = Tmpfs::mount(&dir.path().join("auditfs"));
    let audit_dir = fs.0.join("log");
    let cfg = fixtures::config_in(
        dir.path(),
        &format!(
            "[[services]]\nname = \"db\"\ndestinations = [\"10.99.0.1:5432/tcp\"]\n\
             require_reason = false\n[[identities]]\nspiffe_id = \"spiffe://t.test/ci\"\n\
             sources = [\"10.1.0.0/24\"]\n[audit]\ndir = {:?}\ncheckpoint_every_records = 1000\n",
            audit_dir.display().to_string()
        ),
    );
    // Bound by name: the gate lives (and its pins with it) until the test ends.
    let NodeWorld {
        gate: _gate,
        store: _store,
        sync,
        audit,
        node,
    } = NodeWorld::new(&dir, &cfg, POLICIES);
    let key = audit.public_key().to_string();
    let kernel_grants = || sync.kernel_grants().expect("kernel grants");

    let first = request(&node).expect("granted while the log is writable");
    assert_eq!(kernel_grants(), 1);
    node.revoke(&ci(), &RevokeTarget::Grant(first), "next")
        .expect("revoke");

    // Fill the filesystem; from the first record that cannot be written on, no grant is issued.
    let mut filler = std::fs::File::create(fs.0.join("filler")).expect("filler");
    for _ in 0..1_000 {
        if filler
            .write_all(&[0u8; 4096])
            .and_then(|()| filler.sync_all())
            .is_err()
        {
            break;
        }
    }
    let mut held = None;
    for _ in 0..50 {
        match request(&node) {
            Ok(id) => held = Some(id),
            Err(NodeError::AuditUnavailable(m)) => {
                assert!(m.contains("audit"), "{m}");
                held = held.or(Some(String::new()));
                break;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    let granted_before = held.expect("the log filled up within 50 requests");
    let in_kernel_while_failing = kernel_grants();
    for _ in 0..3 {
        assert!(
            matches!(request(&node), Err(NodeError::AuditUnavailable(_))),
            "no grant while the log cannot be written"
        );
    }
    assert_eq!(
        kernel_grants(),
        in_kernel_while_failing,
        "nothing reached the kernel"
    );

    // A revocation still takes effect (its record is held).
    if !granted_before.is_empty() {
        node.revoke(
            &ci(),
            &RevokeTarget::Grant(granted_before.clone()),
            "audit down",
        )
        .expect("revoke while the log is down");
        assert_eq!(kernel_grants(), 0, "revoked in the kernel at once");
    }
    node.revoke(
        &ci(),
        &RevokeTarget::Identity("spiffe://t.test/ci".into()),
        "all",
    )
    .expect("revoke by identity");
    assert_eq!(kernel_grants(), 0);

    // Writable again: the held records are written after an audit.resumed line, and the chain
    // holds; grants are issued again.
    drop(filler);
    std::fs::remove_file(fs.0.join("filler")).expect("free the space");
    audit.flush().expect("the log is writable again");
    request(&node).expect("granted again");
    audit.close().expect("seal");
    let files = fixtures::audit_series(&audit_dir);
    let v = verify(&files, Some(&key)).expect("the chain holds across the outage");
    assert_eq!(v.unsealed, 0);
    let text: String = files
        .iter()
        .map(|f| String::from_utf8_lossy(&f.bytes).into_owned())
        .collect();
    let resumed = text
        .lines()
        .position(|l| l.contains("\"event\":\"audit.resumed\""))
        .expect("an audit.resumed line");
    if !granted_before.is_empty() {
        let revoked = text
            .lines()
            .position(|l| l.contains("\"event\":\"grant.revoked\"") && l.contains(&granted_before))
            .expect("the revoke made while the log was down is on the record");
        assert!(revoked > resumed, "held records follow audit.resumed");
    }
}

/// A grant the store holds but whose `grant.issued` record never became durable (the agent
/// stopped in between) is never enforced, not even by reconciliation, and is revoked at start.
#[test]
#[ignore = "needs root"]
fn a_grant_without_its_audit_record_never_reaches_the_kernel() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-audit-");
    let cfg = fixtures::config_in(dir.path(), DB);
    let gate = TestGate::load();
    let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
    let maps = GateMaps::open(gate.pin_dir()).expect("maps");
    let sync = Arc::new(KernelSync::new(Arc::clone(&store), Arc::clone(&cfg), maps));
    let engine = |cfg: &Arc<jit_agent::config::Config>| {
        Engine::new(
            Arc::clone(&store),
            Arc::clone(cfg),
            fixtures::policies(POLICIES),
            Arc::new(jit_agent::model::now_ms),
        )
    };
    // Stored, granted at once, but the process "stops" before recording it.
    let stored = engine(&cfg)
        .request_access(&ci(), "db", "10m", &RequestOptions::default())
        .expect("granted in the store");
    sync.resync().expect("resync");
    sync.reconcile().expect("reconcile");
    assert_eq!(
        sync.kernel_grants().expect("kernel grants"),
        0,
        "not in the kernel without its audit record"
    );
    let node = Node::new(
        engine(&cfg),
        Arc::clone(&sync),
        Notifier::disabled(),
        fixtures::audit_log(&cfg),
    );
    assert_eq!(
        node.revoke_unissued(std::time::Duration::ZERO)
            .expect("revoke at start"),
        1
    );
    let g = store
        .grant(&stored.grant_id)
        .expect("store")
        .expect("grant")
        .value;
    assert_eq!(g.state, jit_agent::model::GrantState::Revoked);
    // Through the node, a grant is recorded, then enforced.
    request(&node).expect("granted");
    assert_eq!(sync.kernel_grants().expect("kernel grants"), 1);
}

/// A flood of denied packets makes one aggregated `kernel.denials` record with its count; what
/// the kernel's budget left out is recorded as `kernel.events_dropped`.
#[test]
#[ignore = "needs root"]
fn a_flood_of_denials_makes_one_record_with_counts() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-audit-");
    let cfg = fixtures::config_in(dir.path(), "");
    let mut gate = TestGate::load();
    gate.maps
        .add_service(
            jit_agent::spec::ServiceDest {
                addr: "10.0.0.1".parse().expect("addr"),
                port: 443,
                proto: jit_agent::spec::Protocol::Tcp,
            },
            3,
            jit_agent::spec::Mode::Enforce,
        )
        .expect("service");
    let audit = fixtures::audit_log(&cfg);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut reader = jit_agent::denials::DenialReader::open(
        gate.pin_dir(),
        cfg.state_dir.clone(),
        Arc::clone(&audit),
        std::time::Duration::from_millis(300),
        Arc::clone(&stop),
    )
    .expect("reader");
    // The budget is renewed when the window starts; the flood comes from one source.
    gate.maps
        .refill_event_tokens(jit_agent::denials::EVENTS_PER_SECOND)
        .expect("budget");
    let frame = jit_tests::frames::Packet::tcp(
        "10.1.0.9".parse().expect("src"),
        "10.0.0.1".parse().expect("dst"),
        443,
    )
    .build();
    assert_eq!(gate.run_xdp(&frame, 5_000), 1, "dropped (XDP_DROP)");
    reader.run_window().expect("one window");
    audit.close().expect("seal");
    let records = records(&cfg.audit.dir);
    let denials: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"] == "kernel.denials")
        .collect();
    assert_eq!(denials.len(), 1, "one aggregated record: {denials:?}");
    let d = denials[0];
    assert_eq!(d["source"], "10.1.0.9");
    assert_eq!(d["reason"], "no_grant");
    assert_eq!(d["dst_port"], 443);
    let reported = d["packets"].as_u64().expect("packets");
    let dropped = records
        .iter()
        .find(|r| r["event"] == "kernel.events_dropped")
        .expect("the budget's leftovers are on the record");
    let left_out =
        dropped["rate_limited"].as_u64().expect("count") + dropped["lost"].as_u64().expect("count");
    assert_eq!(
        reported + left_out,
        5_000,
        "every denied packet is accounted for"
    );
    assert!(reported <= u64::from(jit_agent::denials::EVENTS_PER_SECOND) * 2);
}

/// Usage per grant: the kernel counts each grant's packets; the node reads them live, and when
/// an entry leaves the kernel its figures go on the audit log (`grant.usage`) and into the
/// grant's record, so an unused grant shows as unused, and `jitctl audit who` says so.
#[test]
#[ignore = "needs root"]
fn usage_per_grant_is_live_then_recorded_when_the_grant_ends() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-audit-");
    let cfg = fixtures::config_in(
        dir.path(),
        "[[services]]\nname = \"db\"\ndestinations = [\"10.99.0.1:5432/tcp\"]\n\
         require_reason = false\n[[services]]\nname = \"cache\"\n\
         destinations = [\"10.99.0.2:6379/tcp\"]\nrequire_reason = false\n\
         [[identities]]\nspiffe_id = \"spiffe://t.test/ci\"\nsources = [\"10.1.0.0/24\"]\n",
    );
    let NodeWorld {
        gate,
        store,
        sync,
        audit,
        node,
    } = NodeWorld::new(&dir, &cfg, POLICIES);
    let mut ended = sync.ended_entries().expect("the ended entries, once");
    assert!(sync.ended_entries().is_none(), "handed out once");
    let grant_of = |service: &str| {
        node.request_access(&ci(), service, "10m", &RequestOptions::default())
            .expect("granted")
            .grant_id
    };
    let used = grant_of("db");
    let unused = grant_of("cache");
    let view = |id: &str| {
        let g = store.grant(id).expect("store").expect("grant").value;
        node.grant_view(&g)
    };
    assert_eq!(view(&used).usage.expect("known").packets, 0);

    let frame = |dst: &str, port| {
        jit_tests::frames::Packet::tcp(
            "10.1.0.9".parse().expect("src"),
            dst.parse().expect("dst"),
            port,
        )
        .build()
    };
    let before = jit_agent::model::now_ms();
    assert_eq!(gate.run_xdp(&frame("10.99.0.1", 5432), 25), 2, "passed");
    // Another source's packets, denied, count under no grant.
    assert_eq!(
        gate.run_xdp(
            &jit_tests::frames::Packet::tcp(
                "10.7.0.9".parse().expect("src"),
                "10.99.0.1".parse().expect("dst"),
                5432
            )
            .build(),
            5
        ),
        1
    );
    let after = jit_agent::model::now_ms();
    let live = view(&used).usage.expect("known");
    assert_eq!(live.packets, 25);
    assert!(live.live);
    assert!(before - 5 <= live.first_seen_unix_ms && live.last_seen_unix_ms <= after + 5);
    assert_eq!(view(&unused).usage.expect("known").packets, 0);

    for id in [&used, &unused] {
        node.revoke(&ci(), &RevokeTarget::Grant(id.clone()), "done")
            .expect("revoke");
    }
    let mut figures = Vec::new();
    while let Ok(e) = ended.try_recv() {
        node.record_usage(&e);
        figures.push((e.grant_id, e.usage.packets));
    }
    figures.sort();
    let mut want = vec![(used.clone(), 25), (unused.clone(), 0)];
    want.sort();
    assert_eq!(figures, want, "one ended entry per grant, with its count");
    let done = view(&used).usage.expect("recorded");
    assert_eq!((done.packets, done.live), (25, false));
    assert_eq!(view(&unused).usage.expect("recorded").packets, 0);
    audit.close().expect("seal");

    // From the log alone: who held db and cache, and whether they used it.
    let who = |service: &str| -> serde_json::Value {
        let out = std::process::Command::new(fixtures::workspace_bin("jitctl"))
            .args(["audit", "who", "--service", service, "--json"])
            .args(fixtures::audit_files(&cfg.audit.dir))
            .output()
            .expect("jitctl audit who");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let db = who("db");
    assert_eq!(db[0]["usage"]["packets"], 25, "{db}");
    let cache = who("cache");
    assert_eq!(
        cache[0]["usage"]["packets"], 0,
        "unused, and visible: {cache}"
    );
    let out = std::process::Command::new(fixtures::workspace_bin("jitctl"))
        .args(["audit", "who", "--service", "cache"])
        .args(fixtures::audit_files(&cfg.audit.dir))
        .output()
        .expect("jitctl audit who");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.trim_end().ends_with("no"), "{table}");
}

/// A revoke by identity (or service) also ends that identity's pending requests: each is denied,
/// and the denial is on the audit log like any other.
#[test]
#[ignore = "needs root"]
fn requests_a_revoke_ends_are_denied_on_the_record() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-audit-");
    let cfg = fixtures::config_in(dir.path(), DB);
    // Requests wait for a human: nothing is approved by policy.
    let NodeWorld {
        gate: _gate,
        sync: _sync,
        store,
        audit,
        node,
    } = NodeWorld::new(
        &dir,
        &cfg,
        r#"permit (principal, action == Jit::Action::"request", resource);"#,
    );
    let pending = node
        .request_access(&ci(), "db", "10m", &RequestOptions::default())
        .expect("asked");
    assert_eq!(pending.state, jit_agent::model::RequestState::Pending);
    let revoked = node
        .revoke(
            &Caller::Local { uid: 0 },
            &RevokeTarget::Identity("spiffe://t.test/ci".into()),
            "offboarded",
        )
        .expect("revoke by identity");
    assert!(revoked.is_empty(), "no grant to revoke: {revoked:?}");
    let stored = store
        .request(&pending.id)
        .expect("store")
        .expect("request")
        .value;
    assert_eq!(stored.state, jit_agent::model::RequestState::Denied);
    audit.close().expect("seal");
    let denied: Vec<serde_json::Value> = records(&cfg.audit.dir)
        .into_iter()
        .filter(|r| r["event"] == "request.denied")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["request"]["id"], pending.id.as_str());
    assert_eq!(denied[0]["actor"], "local:uid=0");
    assert!(
        denied[0]["comment"]
            .as_str()
            .is_some_and(|c| c.contains("offboarded")),
        "{}",
        denied[0]
    );
}
