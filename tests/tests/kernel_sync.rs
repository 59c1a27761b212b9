//! The node's kernel sync against the real kernel: revoke means the kernel entry is gone,
//! enforce racing revoke never writes a revoked grant back, reconciliation repairs drift both
//! ways and counts it, a record that cannot be decoded stops nothing, and a failed delete is an
//! error to the revoker while the grant stays revoked.

use std::{
    net::IpAddr,
    sync::{Arc, Barrier},
};

use jit_agent::{
    datapath::{GateMaps, GrantScope, boottime_ns, grant_key, maps_dir},
    engine::{Engine, RequestOptions, RevokeTarget},
    identity::Caller,
    kernel_sync::KernelSync,
    model::{Grant, GrantState, Request},
    node::{Node, NodeError},
    notify::Notifier,
    store::{Change, GrantLookup, IdKind, Record, RedbStore, Store, StoreError, Txn, Versioned},
};
use jit_tests::{TempDir, TestGate, fixtures, frames::Packet, require_root};

const CONFIG: &str = r#"
[[services]]
name = "db"
destinations = ["10.99.0.1:5432/tcp"]
require_reason = false
[[services]]
name = "web"
destinations = ["10.99.0.1:443/tcp"]
require_reason = false
bind_requester_address = true
[[identities]]
spiffe_id = "spiffe://t.test/ci"
sources = ["10.1.0.0/24"]
"#;

const POLICIES: &str = r#"
permit (principal, action in [Jit::Action::"request", Jit::Action::"auto_approve"], resource);
"#;

struct World {
    gate: TestGate,
    node: Node<RedbStore>,
    /// The node's kernel sync (the node keeps it to itself).
    sync: Arc<KernelSync<RedbStore>>,
    store: Arc<RedbStore>,
    _dir: TempDir,
}

fn world_in(dir: TempDir) -> World {
    let gate = TestGate::load();
    let cfg = fixtures::config_in(dir.path(), CONFIG);
    let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
    let maps = GateMaps::open(gate.pin_dir()).expect("maps");
    let sync = Arc::new(KernelSync::new(Arc::clone(&store), Arc::clone(&cfg), maps));
    sync.resync().expect("resync");
    let audit = fixtures::audit_log(&cfg);
    let engine = Engine::new(
        Arc::clone(&store),
        cfg,
        fixtures::policies(POLICIES),
        Arc::new(jit_agent::model::now_ms),
    );
    World {
        gate,
        node: Node::new(engine, Arc::clone(&sync), Notifier::disabled(), audit),
        sync,
        store,
        _dir: dir,
    }
}

fn world() -> World {
    world_in(TempDir::new("jit-ks-"))
}

fn ci() -> Caller {
    Caller::Spiffe("spiffe://t.test/ci".into())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn request(w: &World, service: &str, peer: &str) -> String {
    let req = w
        .node
        .request_access(
            &ci(),
            service,
            "10m",
            &RequestOptions {
                peer: Some(ip(peer)),
                ..RequestOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("request {service}: {e}"));
    assert!(!req.grant_id.is_empty(), "granted at once");
    req.grant_id
}

fn stored_grant(w: &World, id: &str) -> jit_agent::model::Grant {
    w.store.grant(id).expect("store").expect("grant").value
}

fn db_frame(src: &str) -> Vec<u8> {
    Packet::tcp(ip(src), ip("10.99.0.1"), 5432).build()
}

fn request_for(w: &World, service: &str, peer: &str, duration: &str) -> String {
    let req = w
        .node
        .request_access(
            &ci(),
            service,
            duration,
            &RequestOptions {
                peer: Some(ip(peer)),
                ..RequestOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("request {service}: {e}"));
    assert!(!req.grant_id.is_empty(), "granted at once");
    req.grant_id
}

/// Grants that share one kernel key (the store finds them through its index of open grants):
/// the kernel holds the one that lasts longest; revoking it leaves the other in force, revoking
/// both removes the entry; a grant on another key is never touched. For identity keys and host
/// keys alike.
#[test]
#[ignore = "needs root"]
fn grants_sharing_a_kernel_key_hand_it_over_on_revoke() {
    if !require_root() {
        return;
    }
    let w = world();
    let revoke = |id: &str| {
        w.node
            .revoke(&ci(), &RevokeTarget::Grant(id.to_string()), "done")
            .expect("revoke");
    };
    let web_frame = |src: &str| Packet::tcp(ip(src), ip("10.99.0.1"), 443).build();
    let maps = GateMaps::open(w.gate.pin_dir()).expect("maps");
    let expiry = |key: jit_common::GrantKey| {
        maps.grants()
            .expect("grants")
            .into_iter()
            .find(|g| g.key() == key)
            .map(|g| g.expires_at_ns)
    };
    let service = |name: &str| w.store.numeric_id(IdKind::Service, name).expect("id");
    let identity_id = w
        .store
        .numeric_id(IdKind::Identity, "spiffe://t.test/ci")
        .expect("id");

    // Identity key: a 10-minute grant and a 5-minute one.
    let id_key = grant_key(GrantScope::Identity, identity_id, service("db"));
    let long = request_for(&w, "db", "10.1.0.5", "10m");
    let long_expiry = expiry(id_key).expect("enforced");
    let short = request_for(&w, "db", "10.1.0.5", "5m");
    assert_eq!(expiry(id_key), Some(long_expiry), "the longer one stays");
    revoke(&long);
    let left = expiry(id_key).expect("the other grant still holds the key");
    assert!(left < long_expiry, "the kernel now holds the shorter grant");
    assert!(w.gate.passes(&db_frame("10.1.0.5")));
    revoke(&short);
    assert_eq!(expiry(id_key), None);
    assert!(!w.gate.passes(&db_frame("10.1.0.5")));

    // Host keys: two grants bound to 10.7.0.1, one to 10.7.0.2.
    let host_key = |a: &str| grant_key(GrantScope::Host(ip(a)), identity_id, service("web"));
    let a1 = request_for(&w, "web", "10.7.0.1", "10m");
    let a2 = request_for(&w, "web", "10.7.0.1", "5m");
    let other = request_for(&w, "web", "10.7.0.2", "5m");
    let other_expiry = expiry(host_key("10.7.0.2")).expect("enforced");
    revoke(&a2);
    assert!(expiry(host_key("10.7.0.1")).is_some(), "a1 still holds it");
    assert!(w.gate.passes(&web_frame("10.7.0.1")));
    revoke(&a1);
    assert_eq!(expiry(host_key("10.7.0.1")), None);
    assert!(!w.gate.passes(&web_frame("10.7.0.1")));
    assert_eq!(expiry(host_key("10.7.0.2")), Some(other_expiry));
    assert!(w.gate.passes(&web_frame("10.7.0.2")));
    revoke(&other);
    assert!(!w.gate.passes(&web_frame("10.7.0.2")));
    assert!(
        w.sync.resync().expect("resync").total() == 0,
        "nothing left to repair"
    );
}

/// Problem 6 of datapath v2.
#[test]
#[ignore = "needs root"]
fn the_kernel_can_never_lag_a_revoke() {
    if !require_root() {
        return;
    }
    let w = world();
    let service_id = w.store.numeric_id(IdKind::Service, "db").expect("id");
    let identity_id = w
        .store
        .numeric_id(IdKind::Identity, "spiffe://t.test/ci")
        .expect("id");
    let key = grant_key(GrantScope::Identity, identity_id, service_id);
    let mut maps = GateMaps::open(w.gate.pin_dir()).expect("maps");
    let in_kernel = |maps: &GateMaps| {
        maps.grants()
            .expect("grants")
            .iter()
            .any(|g| g.key() == key)
    };

    // Revoke returns only after the kernel entry is gone; a late sync of the same grant (an
    // enforce or a change-stream apply racing the revoke) never writes it back.
    for round in 0..20 {
        let grant_id = request(&w, "db", "10.1.0.5");
        assert!(in_kernel(&maps), "round {round}: granted means enforced");
        assert!(w.gate.passes(&db_frame("10.1.0.5")));
        let grant = stored_grant(&w, &grant_id);
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                w.node
                    .revoke(&ci(), &RevokeTarget::Grant(grant_id.clone()), "done")
                    .expect("revoke");
            });
            s.spawn(|| {
                barrier.wait();
                for _ in 0..3 {
                    w.sync.sync_grant(&grant).expect("sync");
                }
            });
        });
        assert!(
            !in_kernel(&maps),
            "round {round}: a revoked grant came back"
        );
        assert!(!w.gate.passes(&db_frame("10.1.0.5")));
    }

    // A reconciliation reads the store and the kernel without the map lock, then writes what
    // differs: racing a revoke, it never writes the revoked grant back. (Its entry is deleted
    // behind the agent's back first, so the reconciliation has something to write.)
    for round in 0..40u64 {
        let grant_id = request(&w, "db", "10.1.0.5");
        assert!(
            maps.delete_grant(&key)
                .expect("delete behind the agent's back")
        );
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                w.node
                    .revoke(&ci(), &RevokeTarget::Grant(grant_id.clone()), "done")
                    .expect("revoke");
            });
            s.spawn(|| {
                barrier.wait();
                // Later each round (0 to 4 ms, in steps of 0.1 ms): in some round the revoke's commit lands between
                // the reconciliation's reads and its writes.
                std::thread::sleep(std::time::Duration::from_micros(round * 100));
                w.sync.reconcile().expect("reconcile");
            });
        });
        assert!(
            !in_kernel(&maps),
            "round {round}: a reconciliation wrote a revoked grant back"
        );
    }

    // Reconciliation compares the kernel with the store and repairs both ways, counted.
    let grant_id = request(&w, "db", "10.1.0.5");
    assert!(
        maps.delete_grant(&key)
            .expect("delete behind the agent's back")
    );
    let now = boottime_ns().expect("clock");
    maps.put_grant(fixtures::grant_between(
        GrantScope::Host(ip("10.5.0.200")),
        identity_id,
        service_id,
        4242,
        now,
        now + 600_000_000_000,
    ))
    .expect("a grant nobody approved");
    assert!(!w.gate.passes(&db_frame("10.1.0.5")));
    assert!(w.gate.passes(&db_frame("10.5.0.200")));
    let before = w.sync.stats().repairs;
    let repairs = w.sync.reconcile().expect("reconcile");
    assert_eq!((repairs.written, repairs.deleted), (1, 1), "{repairs:?}");
    assert_eq!(w.sync.stats().repairs, before + 2);
    assert!(
        w.gate.passes(&db_frame("10.1.0.5")),
        "the live grant is back"
    );
    assert!(
        !w.gate.passes(&db_frame("10.5.0.200")),
        "the stray entry is gone"
    );
    assert_eq!(
        w.sync.reconcile().expect("reconcile").total(),
        0,
        "nothing left to repair"
    );

    // A kernel delete that fails is an error to the revoker; the grant stays revoked in the
    // store and the failure is counted (reconciliation keeps retrying it).
    freeze(&w);
    let failures = w.sync.stats().failures;
    let err = w
        .node
        .revoke(&ci(), &RevokeTarget::Grant(grant_id.clone()), "frozen")
        .expect_err("the delete cannot succeed on a frozen map");
    assert!(
        matches!(err, NodeError::KernelDeletePending { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&grant_id), "{err}");
    let g = stored_grant(&w, &grant_id);
    assert_eq!(g.state, GrantState::Revoked);
    assert!(w.sync.stats().failures > failures);
    drop(maps);
}

/// `BPF_MAP_FREEZE` on the pinned grants map: every later write from user space fails.
fn freeze(w: &World) {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let map = aya::maps::MapData::from_pin(maps_dir(w.gate.pin_dir()).join("JIT_GRANTS"))
        .expect("grants map");
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).expect("fd");
    const BPF_MAP_FREEZE: libc::c_long = 22;
    // SAFETY: a bpf_attr prefix holding only map_fd, alive during the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, &raw const fd, 4usize) };
    assert_eq!(rc, 0, "freeze: {}", std::io::Error::last_os_error());
}

/// One store record that cannot be decoded is reported and skipped; every other grant still
/// reaches the kernel.
#[test]
#[ignore = "needs root"]
fn an_undecodable_record_stops_no_other_grant() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-ks-");
    let damaged;
    {
        let w = world_in(TempDir(dir.path().to_path_buf()));
        let _ = request(&w, "db", "10.1.0.5");
        let _ = request(&w, "web", "10.7.0.9");
        damaged = request(&w, "web", "10.7.0.9");
        std::mem::forget(w._dir);
    }
    // Damage one live grant's record with the store closed, as a disk or a bad migration would.
    {
        let db = redb::Database::create(dir.path().join("s.redb")).expect("open");
        let tx = db.begin_write().expect("tx");
        {
            let mut t = tx
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("grants"))
                .expect("grants table");
            t.insert(damaged.as_str(), b"{not json".as_slice())
                .expect("insert");
        }
        tx.commit().expect("commit");
    }
    let w = world_in(TempDir(dir.path().to_path_buf()));
    std::mem::forget(dir);
    assert!(w.gate.passes(&db_frame("10.1.0.5")), "the identity grant");
    assert!(
        w.gate
            .passes(&Packet::tcp(ip("10.7.0.9"), ip("10.99.0.1"), 443).build()),
        "the host grant"
    );
    assert_eq!(w.store.corrupt_records(), vec![format!("grants/{damaged}")]);
}

/// Something that happens right after the next listing of open grants (a reconciliation's
/// read of the store).
type Hook = Box<dyn FnOnce(&RedbStore) + Send>;

/// A live, issued grant of `ci` for `web`, bound to `source`, for ten minutes from now.
fn web_grant(id: &str, source: &str) -> Grant {
    let now = jit_agent::model::now_ms();
    Grant {
        id: id.into(),
        request_id: format!("req-{id}"),
        identity: "spiffe://t.test/ci".into(),
        service: "web".into(),
        not_before_ms: now - 1_000,
        expires_ms: now + 600_000,
        state: GrantState::Active,
        revoked_by: String::new(),
        revoke_reason: String::new(),
        ended_ms: 0,
        extra_sources: vec![source.into()],
        break_glass: false,
        issued: true,
        usage: None,
    }
}

/// A store that runs a hook right after the next listing of open grants: what a revoke, or a
/// grant's own sync, landing between a reconciliation's reads and its writes looks like, every
/// time.
struct AfterListing {
    inner: RedbStore,
    hook: std::sync::Mutex<Option<Hook>>,
}

impl AfterListing {
    fn after_next_listing(&self, hook: impl FnOnce(&RedbStore) + Send + 'static) {
        *self.hook.lock().expect("lock") = Some(Box::new(hook));
    }
}

impl Store for AfterListing {
    fn request(&self, id: &str) -> Result<Option<Versioned<Request>>, StoreError> {
        self.inner.request(id)
    }
    fn requests(&self) -> Result<Vec<Versioned<Request>>, StoreError> {
        self.inner.requests()
    }
    fn grant(&self, id: &str) -> Result<Option<Versioned<Grant>>, StoreError> {
        self.inner.grant(id)
    }
    fn grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError> {
        self.inner.grants()
    }
    fn open_requests(&self) -> Result<Vec<Versioned<Request>>, StoreError> {
        self.inner.open_requests()
    }
    fn open_grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError> {
        let listed = self.inner.open_grants()?;
        let hook = self.hook.lock().expect("lock").take();
        if let Some(hook) = hook {
            hook(&self.inner);
        }
        Ok(listed)
    }
    fn open_grants_by(&self, lookup: &GrantLookup) -> Result<Vec<Versioned<Grant>>, StoreError> {
        self.inner.open_grants_by(lookup)
    }
    fn commit(&self, txn: Txn) -> Result<u64, StoreError> {
        self.inner.commit(txn)
    }
    fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        self.inner.prune(before_ms, limit)
    }
    fn corrupt_records(&self) -> Vec<String> {
        self.inner.corrupt_records()
    }
    fn numeric_id(&self, kind: IdKind, name: &str) -> Result<u32, StoreError> {
        self.inner.numeric_id(kind, name)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.subscribe()
    }
}

/// A reconciliation while the node serves reads the store and the kernel without the map lock;
/// a grant revoked after those reads (its entry already gone from the kernel) is never written
/// back by it, while a grant still in force that it found missing is.
#[test]
#[ignore = "needs root"]
fn a_reconciliation_never_writes_back_a_grant_revoked_after_its_reads() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-ks-");
    let gate = TestGate::load();
    let cfg = fixtures::config_in(dir.path(), CONFIG);
    let store = Arc::new(AfterListing {
        inner: RedbStore::open(&dir.path().join("s.redb")).expect("store"),
        hook: std::sync::Mutex::new(None),
    });
    let maps = GateMaps::open(gate.pin_dir()).expect("maps");
    let sync = KernelSync::new(Arc::clone(&store), Arc::clone(&cfg), maps);
    sync.resync().expect("services and bindings");
    // Stored while nothing follows the store: the kernel does not have them yet.
    for g in [
        web_grant("grant-00000000000a", "10.7.1.1/32"),
        web_grant("grant-00000000000b", "10.7.1.2/32"),
    ] {
        store.commit(Txn::put(Record::Grant(g), 0)).expect("commit");
    }
    store.after_next_listing(|s| {
        let v = s
            .grant("grant-00000000000a")
            .expect("read")
            .expect("the grant exists");
        let mut g = v.value;
        g.state = GrantState::Revoked;
        g.ended_ms = jit_agent::model::now_ms();
        s.commit(Txn::put(Record::Grant(g), v.revision))
            .expect("revoke");
    });
    let repairs = sync.reconcile().expect("reconcile");
    assert_eq!(repairs.written, 1, "{repairs:?}");
    let web = |src: &str| Packet::tcp(ip(src), ip("10.99.0.1"), 443).build();
    assert!(
        !gate.passes(&web("10.7.1.1")),
        "a grant revoked after the reads was written back"
    );
    assert!(
        gate.passes(&web("10.7.1.2")),
        "the grant in force was not written"
    );
    assert_eq!(
        store
            .grant("grant-00000000000a")
            .expect("read")
            .expect("grant")
            .value
            .state,
        GrantState::Revoked
    );
}

/// A grant stored and enforced by its own sync while a reconciliation reads (after its read of
/// the kernel, or around its read of the store) keeps its kernel entry: the reconciliation never
/// takes an entry written by a sync newer than its reads.
#[test]
#[ignore = "needs root"]
fn a_reconciliation_never_takes_a_grant_enforced_during_its_reads() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("jit-ks-");
    let gate = TestGate::load();
    let cfg = fixtures::config_in(dir.path(), CONFIG);
    let store = Arc::new(AfterListing {
        inner: RedbStore::open(&dir.path().join("s.redb")).expect("store"),
        hook: std::sync::Mutex::new(None),
    });
    let maps = GateMaps::open(gate.pin_dir()).expect("maps");
    let sync = KernelSync::new(Arc::clone(&store), Arc::clone(&cfg), maps);
    sync.resync().expect("services and bindings");
    let service_id = store.numeric_id(IdKind::Service, "web").expect("id");
    let identity_id = store
        .numeric_id(IdKind::Identity, "spiffe://t.test/ci")
        .expect("id");
    let pin_dir = gate.pin_dir().to_path_buf();
    // Right after the reconciliation lists the store: a grant is stored, issued, and its own
    // sync writes its entry (what `Node::enforce` does).
    store.after_next_listing(move |s| {
        let g = web_grant("grant-00000000000c", "10.7.2.1/32");
        s.commit(Txn::put(Record::Grant(g), 0)).expect("commit");
        let boot = boottime_ns().expect("clock");
        let mut maps = GateMaps::open(&pin_dir).expect("maps");
        maps.put_grant(fixtures::grant_between(
            GrantScope::Host(ip("10.7.2.1")),
            identity_id,
            service_id,
            0xc,
            boot - 1_000_000_000,
            boot + 600_000_000_000,
        ))
        .expect("the grant's own sync");
    });
    sync.reconcile().expect("reconcile");
    let web = Packet::tcp(ip("10.7.2.1"), ip("10.99.0.1"), 443).build();
    assert!(
        gate.passes(&web),
        "a reconciliation took a grant enforced during its reads"
    );
    // And the next one agrees with the kernel.
    assert_eq!(sync.reconcile().expect("reconcile").total(), 0);
    assert!(gate.passes(&web));
}
