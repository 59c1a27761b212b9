//! The store contract, run against both backends: the embedded redb file and a real etcd
//! cluster started by the test (Debian's `etcd-server`). Compare-then-write semantics, atomic
//! multi-record commits, exactly one winner among concurrent writers, no lost update, stable
//! cluster-wide numeric ids, and the change stream. The etcd runs add what only a shared store
//! has: two agents on one cluster see each other's commits (reads and change streams) and never
//! hand out one id twice, a store call answers within its bound while the cluster is down, and an
//! undecodable record is reported and skipped.

use std::{
    collections::BTreeSet,
    sync::{Arc, Barrier},
    time::Duration,
};

use jit_agent::{
    model::{Grant, GrantState, Request, RequestState},
    store::{
        Change, EtcdOptions, EtcdStore, GrantLookup, IdKind, Record, RecordKey, RedbStore, Store,
        StoreError, Txn,
    },
};
use jit_tests::{TempDir, etcd::Cluster};

fn request(id: &str, reason: &str) -> Request {
    Request {
        id: id.into(),
        requester: "spiffe://t.test/u1".into(),
        service: "db".into(),
        duration_s: 60,
        clamped: false,
        reason: reason.into(),
        state: RequestState::Pending,
        created_ms: 1,
        pending_until_ms: 2,
        approvals: Vec::new(),
        approvals_required: 1,
        denied_by: String::new(),
        denial_reason: String::new(),
        grant_id: String::new(),
        peer_address: String::new(),
        ticket: String::new(),
        break_glass: false,
        policies: Vec::new(),
    }
}

fn grant(id: &str) -> Grant {
    Grant {
        id: id.into(),
        request_id: "req-1".into(),
        identity: "spiffe://t.test/u1".into(),
        service: "db".into(),
        not_before_ms: 1,
        expires_ms: 2,
        state: GrantState::Active,
        revoked_by: String::new(),
        revoke_reason: String::new(),
        ended_ms: 0,
        extra_sources: Vec::new(),
        break_glass: false,
        issued: true,
        usage: None,
    }
}

/// A fresh store of one backend; the guard keeps what it needs alive.
trait Backend {
    type S: Store;
    fn open(&self) -> Self::S;
}

struct Redb(TempDir);

impl Backend for Redb {
    type S = RedbStore;
    fn open(&self) -> RedbStore {
        RedbStore::open(&self.0.path().join("s.redb")).expect("redb")
    }
}

/// An etcd cluster; every store opened on it shares one prefix (one deployment).
struct Etcd {
    cluster: Cluster,
    prefix: String,
}

impl Etcd {
    fn start() -> Self {
        Self {
            cluster: Cluster::start(1),
            prefix: format!("/{}/", jit_tests::unique("jit-test-")),
        }
    }

    fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.cluster.endpoints(),
            prefix: self.prefix.clone(),
            timeout: Duration::from_secs(3),
            ca: None,
            identity: None,
        }
    }
}

impl Backend for Etcd {
    type S = EtcdStore;
    fn open(&self) -> EtcdStore {
        EtcdStore::connect(self.options()).expect("etcd")
    }
}

// ---------- the contract ----------

fn compare_then_write<B: Backend>(b: &B) {
    let s = b.open();
    let r1 = s
        .commit(Txn::put(Record::Request(request("req-1", "a")), 0))
        .expect("create");
    assert!(r1 > 0);
    let got = s.request("req-1").expect("read").expect("there");
    assert_eq!(got.value.reason, "a");
    assert_eq!(got.revision, r1, "a record's revision is its last write's");
    // Creating it again, or writing over a revision that is not the record's, changes nothing.
    assert!(matches!(
        s.commit(Txn::put(Record::Request(request("req-1", "b")), 0)),
        Err(StoreError::Conflict(RecordKey::Request(_)))
    ));
    assert!(matches!(
        s.commit(Txn::put(Record::Request(request("req-1", "b")), r1 + 1000)),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.request("req-1")
            .expect("read")
            .expect("there")
            .value
            .reason,
        "a"
    );
    let r2 = s
        .commit(Txn::put(Record::Request(request("req-1", "b")), r1))
        .expect("update");
    assert!(r2 > r1, "revisions only grow");
    assert!(matches!(
        s.commit(Txn::put(Record::Request(request("req-1", "c")), r1)),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.requests().expect("list").len(), 1);
    assert!(s.request("req-none").expect("read").is_none());
    assert!(s.grant("req-1").expect("read").is_none(), "kinds are apart");
}

fn commits_are_all_or_nothing<B: Backend>(b: &B) {
    let s = b.open();
    let rev = s
        .commit(Txn::put(Record::Request(request("req-2", "a")), 0))
        .expect("create");
    // The second compare fails: neither record is written.
    let txn = Txn::put(Record::Grant(grant("grant-1")), 0)
        .and_put(Record::Request(request("req-2", "granted")), rev + 1000);
    assert!(matches!(s.commit(txn), Err(StoreError::Conflict(_))));
    assert!(s.grant("grant-1").expect("read").is_none());
    assert_eq!(
        s.request("req-2")
            .expect("read")
            .expect("there")
            .value
            .reason,
        "a"
    );
    // Both compares hold: both are written, at one revision.
    let txn = Txn::put(Record::Grant(grant("grant-1")), 0)
        .and_put(Record::Request(request("req-2", "granted")), rev);
    let at = s.commit(txn).expect("both");
    assert_eq!(
        s.grant("grant-1").expect("read").expect("there").revision,
        at
    );
    assert_eq!(
        s.request("req-2").expect("read").expect("there").revision,
        at
    );
    assert_eq!(s.grants().expect("list").len(), 1);
}

fn one_winner_and_no_lost_update<B: Backend>(b: &B)
where
    B::S: 'static,
{
    let s = Arc::new(b.open());
    const N: usize = 8;
    // N writers create one record at once: exactly one wins.
    let gate = Arc::new(Barrier::new(N));
    let wins: usize = std::thread::scope(|scope| {
        (0..N)
            .map(|i| {
                let (s, gate) = (Arc::clone(&s), Arc::clone(&gate));
                scope.spawn(move || {
                    gate.wait();
                    s.commit(Txn::put(
                        Record::Request(request("req-race", &format!("w{i}"))),
                        0,
                    ))
                    .is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().expect("writer")))
            .sum()
    });
    assert_eq!(wins, 1);
    // N writers each append their mark with read, compare, retry: none is lost.
    std::thread::scope(|scope| {
        for i in 0..N {
            let (s, gate) = (Arc::clone(&s), Arc::clone(&gate));
            scope.spawn(move || {
                gate.wait();
                for _ in 0..200 {
                    let cur = s.request("req-race").expect("read").expect("there");
                    let mut next = cur.value.clone();
                    next.policies.push(format!("m{i}"));
                    match s.commit(Txn::put(Record::Request(next), cur.revision)) {
                        Ok(_) => return,
                        Err(StoreError::Conflict(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                panic!("writer {i} never won");
            });
        }
    });
    let marks: BTreeSet<String> = s
        .request("req-race")
        .expect("read")
        .expect("there")
        .value
        .policies
        .into_iter()
        .collect();
    assert_eq!(marks.len(), N, "{marks:?}");
}

fn numeric_ids<B: Backend>(b: &B)
where
    B::S: 'static,
{
    let s = Arc::new(b.open());
    assert_eq!(s.numeric_id(IdKind::Service, "db").expect("id"), 0);
    assert_eq!(s.numeric_id(IdKind::Service, "cache").expect("id"), 1);
    assert_eq!(
        s.numeric_id(IdKind::Service, "db").expect("id"),
        0,
        "stable"
    );
    assert_eq!(s.numeric_id(IdKind::Identity, "a").expect("id"), 1);
    // Many at once: all distinct.
    let ids: Vec<u32> = std::thread::scope(|scope| {
        (0..8)
            .map(|i| {
                let s = Arc::clone(&s);
                scope.spawn(move || {
                    (0..5)
                        .map(|j| {
                            s.numeric_id(IdKind::Identity, &format!("t{i}-{j}"))
                                .expect("id")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().expect("allocator"))
            .collect()
    });
    let distinct: BTreeSet<u32> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    assert!(!distinct.contains(&1), "a's id is a's alone");
    // A store opened again (an agent restarted) knows the same ids.
    drop(s);
    let again = b.open();
    assert_eq!(again.numeric_id(IdKind::Service, "cache").expect("id"), 1);
}

fn change_stream<B: Backend>(b: &B) {
    let s = b.open();
    let mut rx = s.subscribe();
    let rev = s
        .commit(Txn::put(Record::Grant(grant("grant-s")), 0))
        .expect("commit");
    let change = next_change(&mut rx, |c| c.revision == rev);
    match change.record {
        Record::Grant(g) => assert_eq!(g.id, "grant-s"),
        Record::Request(r) => panic!("unexpected {r:?}"),
    }
}

/// The first change matching `want` within 10 s.
fn next_change(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    want: impl Fn(&Change) -> bool,
) -> Change {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rx.try_recv() {
            Ok(c) if want(&c) => return c,
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no such change within 10 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("change stream: {e}"),
        }
    }
}

fn listings_read_past_one_page<B: Backend>(b: &B) {
    let s = b.open();
    // More than one etcd read page (500).
    for i in 0..620 {
        s.commit(Txn::put(Record::Grant(grant(&format!("grant-{i:04}"))), 0))
            .expect("commit");
    }
    let all = s.grants().expect("list");
    assert_eq!(all.len(), 620);
    let ids: BTreeSet<String> = all.into_iter().map(|g| g.value.id).collect();
    assert_eq!(ids.len(), 620, "each once");
}

/// The index of open records follows each record's state: a pending request and an active
/// grant are listed, a decided request and an ended grant are not; what it lists carries the
/// record's revision, so a transition committed on it holds.
fn open_records_are_indexed<B: Backend>(b: &B) {
    let s = b.open();
    assert!(s.open_requests().expect("a new store").is_empty());
    assert!(s.open_grants().expect("a new store").is_empty());
    s.commit(Txn::put(Record::Request(request("req-open", "x")), 0))
        .expect("commit");
    s.commit(Txn::put(Record::Grant(grant("grant-open")), 0))
        .expect("commit");
    let mut closed = grant("grant-closed");
    closed.state = GrantState::Revoked;
    closed.ended_ms = 5;
    s.commit(Txn::put(Record::Grant(closed), 0))
        .expect("commit");
    let mut decided = request("req-decided", "x");
    decided.state = RequestState::Denied;
    s.commit(Txn::put(Record::Request(decided), 0))
        .expect("commit");

    let open_r = s.open_requests().expect("open requests");
    let open_g = s.open_grants().expect("open grants");
    let ids = |v: Vec<String>| v;
    assert_eq!(
        ids(open_r.iter().map(|r| r.value.id.clone()).collect()),
        ["req-open"]
    );
    assert_eq!(
        ids(open_g.iter().map(|g| g.value.id.clone()).collect()),
        ["grant-open"]
    );
    let stored = s.grant("grant-open").expect("read").expect("grant");
    assert_eq!(
        open_g[0], stored,
        "the index gives the record and its revision"
    );

    let mut r = open_r[0].value.clone();
    r.state = RequestState::Denied;
    s.commit(Txn::put(Record::Request(r), open_r[0].revision))
        .expect("deciding through the index's revision");
    let mut g = open_g[0].value.clone();
    g.state = GrantState::Expired;
    g.ended_ms = 7;
    s.commit(Txn::put(Record::Grant(g.clone()), open_g[0].revision))
        .expect("ending through the index's revision");
    assert!(s.open_requests().expect("open").is_empty());
    assert!(s.open_grants().expect("open").is_empty());
    // History stays until pruned.
    assert_eq!(s.grants().expect("all").len(), 2);
    assert_eq!(s.requests().expect("all").len(), 2);
    // A closed record written again (its usage recorded later) stays closed.
    let rev = s
        .grant("grant-open")
        .expect("read")
        .expect("grant")
        .revision;
    s.commit(Txn::put(Record::Grant(g), rev)).expect("rewrite");
    assert!(s.open_grants().expect("open").is_empty());
}

/// The index of open grants finds exactly the open grants that answer a lookup: by service and
/// identity, by bound host (an IPv4-mapped IPv6 address is its IPv4 one), by expiry, unissued;
/// a grant leaves it when it closes or is issued; names with '/' or '%' never mix.
fn open_grants_are_indexed_by_what_they_open<B: Backend>(b: &B) {
    let s = b.open();
    let host = |a: &str| a.parse::<std::net::IpAddr>().expect("address");
    let ids = |v: Vec<jit_agent::store::Versioned<Grant>>| {
        let mut ids: Vec<String> = v.into_iter().map(|g| g.value.id).collect();
        ids.sort();
        ids
    };
    let by = |l: GrantLookup| ids(s.open_grants_by(&l).expect("lookup"));
    let identity = |service: &str, identity: &str| GrantLookup::Identity {
        service: service.into(),
        identity: identity.into(),
    };
    let mut g_id = grant("g-id");
    g_id.expires_ms = 100;
    let mut g_host = grant("g-host");
    g_host.extra_sources = vec!["10.0.0.1/32".into()];
    g_host.expires_ms = 200;
    g_host.issued = false;
    let mut g_mapped = grant("g-mapped");
    g_mapped.service = "web".into();
    g_mapped.identity = "spiffe://t.test/u2".into();
    g_mapped.extra_sources = vec!["::ffff:10.0.0.1/128".into()];
    g_mapped.expires_ms = 300;
    let mut g_slash = grant("g-slash");
    g_slash.service = "a".into();
    g_slash.identity = "b/c".into();
    let mut g_slash2 = grant("g-slash2");
    g_slash2.service = "a/b".into();
    g_slash2.identity = "c".into();
    let mut g_pct = grant("g-pct");
    g_pct.service = "a%2Fb".into();
    g_pct.identity = "c".into();
    let mut g_wide = grant("g-wide");
    g_wide.extra_sources = vec!["10.0.0.0/24".into()];
    let mut g_closed = grant("g-closed");
    g_closed.state = GrantState::Revoked;
    g_closed.ended_ms = 5;
    for g in [
        &g_id, &g_host, &g_mapped, &g_slash, &g_slash2, &g_pct, &g_wide, &g_closed,
    ] {
        s.commit(Txn::put(Record::Grant(g.clone()), 0))
            .expect("commit");
    }
    assert_eq!(by(identity("db", "spiffe://t.test/u1")), ["g-id"]);
    assert_eq!(
        by(identity("db", "spiffe://t.test/u2")),
        Vec::<String>::new()
    );
    assert_eq!(by(identity("a", "b/c")), ["g-slash"]);
    assert_eq!(by(identity("a/b", "c")), ["g-slash2"]);
    assert_eq!(by(identity("a%2Fb", "c")), ["g-pct"]);
    assert_eq!(
        by(GrantLookup::Host {
            addr: host("10.0.0.1"),
            service: Some("db".into())
        }),
        ["g-host"]
    );
    assert_eq!(
        by(GrantLookup::Host {
            addr: host("::ffff:10.0.0.1"),
            service: None
        }),
        ["g-host", "g-mapped"]
    );
    assert_eq!(
        by(GrantLookup::Host {
            addr: host("10.0.0.1"),
            service: Some("web".into())
        }),
        ["g-mapped"]
    );
    // A bound source that is not one host holds no address.
    assert_eq!(
        by(GrantLookup::Host {
            addr: host("10.0.0.0"),
            service: None
        }),
        Vec::<String>::new()
    );
    // Due: expiry at or before the time asked, inclusive.
    assert_eq!(by(GrantLookup::DueBy(1)), Vec::<String>::new());
    assert_eq!(
        by(GrantLookup::DueBy(2)),
        ["g-pct", "g-slash", "g-slash2", "g-wide"]
    );
    assert_eq!(
        by(GrantLookup::DueBy(100)),
        ["g-id", "g-pct", "g-slash", "g-slash2", "g-wide"]
    );
    assert_eq!(by(GrantLookup::DueBy(199)).len(), 5);
    assert_eq!(by(GrantLookup::DueBy(200)).len(), 6);
    assert_eq!(by(GrantLookup::DueBy(i64::MAX)).len(), 7);
    assert_eq!(by(GrantLookup::Unissued), ["g-host"]);
    let found = s
        .open_grants_by(&GrantLookup::Unissued)
        .expect("lookup")
        .remove(0);
    assert_eq!(
        found,
        s.grant("g-host").expect("read").expect("grant"),
        "the index gives the record and its revision"
    );

    // Issued: out of the unissued entries, still bound.
    let mut issued = found.value.clone();
    issued.issued = true;
    s.commit(Txn::put(Record::Grant(issued), found.revision))
        .expect("issue");
    assert_eq!(by(GrantLookup::Unissued), Vec::<String>::new());
    assert_eq!(
        by(GrantLookup::Host {
            addr: host("10.0.0.1"),
            service: Some("db".into())
        }),
        ["g-host"]
    );
    // Closed: out of every lookup.
    for id in ["g-id", "g-host", "g-mapped"] {
        let v = s.grant(id).expect("read").expect("grant");
        let mut g = v.value;
        g.state = GrantState::Expired;
        g.ended_ms = 400;
        s.commit(Txn::put(Record::Grant(g), v.revision))
            .expect("close");
    }
    assert_eq!(
        by(identity("db", "spiffe://t.test/u1")),
        Vec::<String>::new()
    );
    assert_eq!(
        by(GrantLookup::Host {
            addr: host("10.0.0.1"),
            service: None
        }),
        Vec::<String>::new()
    );
    assert_eq!(by(GrantLookup::DueBy(i64::MAX)).len(), 4);
    // A closed grant written again stays out.
    let v = s.grant("g-id").expect("read").expect("grant");
    s.commit(Txn::put(Record::Grant(v.value), v.revision))
        .expect("rewrite");
    assert_eq!(
        by(identity("db", "spiffe://t.test/u1")),
        Vec::<String>::new()
    );
}

/// Pruning deletes closed records past the retention, oldest first and at most the limit asked;
/// a grant goes with its request; never an open record or a recent one.
fn pruning_keeps_what_is_open_or_recent<B: Backend>(b: &B) {
    const DAY: i64 = 86_400_000;
    let s = b.open();
    let now = 100 * DAY;
    let put_pair = |r: Request, g: Grant| {
        s.commit(Txn::put(Record::Request(r), 0).and_put(Record::Grant(g), 0))
            .expect("commit");
    };
    let pair = |name: &str, created: i64, grant_state: GrantState, ended: i64| {
        let mut r = request(&format!("req-{name}"), "x");
        r.state = RequestState::Granted;
        r.created_ms = created;
        r.grant_id = format!("grant-{name}");
        let mut g = grant(&format!("grant-{name}"));
        g.request_id = r.id.clone();
        g.not_before_ms = created;
        g.expires_ms = created + DAY;
        g.state = grant_state;
        g.ended_ms = ended;
        (r, g)
    };
    // A request denied 45 days ago; five old pairs, ended 44, 43, ... 40 days ago.
    let mut denied = request("req-denied", "x");
    denied.state = RequestState::Denied;
    denied.created_ms = now - 45 * DAY;
    s.commit(Txn::put(Record::Request(denied), 0))
        .expect("commit");
    for i in 0..5 {
        let t = now - (44 - i) * DAY;
        let (r, g) = pair(&format!("old-{i}"), t, GrantState::Expired, t + 1_000);
        put_pair(r, g);
    }
    // An old request whose grant ended yesterday; an old grant still active; an old request
    // still pending; a grant that ended two days ago.
    let (r, g) = pair("long", now - 40 * DAY, GrantState::Revoked, now - DAY);
    put_pair(r, g);
    let (r, mut g) = pair("active", now - 50 * DAY, GrantState::Active, 0);
    g.expires_ms = now + DAY;
    put_pair(r, g);
    let mut pending = request("req-pending", "x");
    pending.created_ms = now - 50 * DAY;
    s.commit(Txn::put(Record::Request(pending), 0))
        .expect("commit");
    let (r, g) = pair("recent", now - 3 * DAY, GrantState::Expired, now - 2 * DAY);
    put_pair(r, g);

    let kept = |id: &str| {
        if id.starts_with("req-") {
            s.request(id).expect("read").is_some()
        } else {
            s.grant(id).expect("read").is_some()
        }
    };
    let retention = now - 30 * DAY;
    // At most the limit, oldest first; a grant and its request together.
    assert_eq!(s.prune(retention, 3).expect("prune"), 3);
    for id in [
        "req-denied",
        "req-old-0",
        "grant-old-0",
        "req-old-1",
        "grant-old-1",
    ] {
        assert!(!kept(id), "{id} was not pruned first");
    }
    assert!(kept("grant-old-2") && kept("req-old-2"));
    assert_eq!(s.prune(retention, 100).expect("prune"), 3);
    assert_eq!(
        s.prune(retention, 100).expect("prune"),
        0,
        "nothing left to prune"
    );
    for i in 0..5 {
        assert!(!kept(&format!("req-old-{i}")) && !kept(&format!("grant-old-{i}")));
    }
    for id in [
        "req-long",
        "grant-long",
        "req-active",
        "grant-active",
        "req-pending",
        "req-recent",
        "grant-recent",
    ] {
        assert!(kept(id), "{id} was pruned");
    }
    // With a retention of a day, the long and the recent grants are past it, their requests go
    // with them; the open records stay whatever their age.
    assert_eq!(s.prune(now - DAY + 1, 100).expect("prune"), 2);
    assert!(!kept("req-long") && !kept("grant-long"));
    assert!(!kept("grant-recent") && !kept("req-recent"));
    assert_eq!(s.prune(i64::MAX / 2, 100).expect("prune"), 0);
    assert!(kept("grant-active") && kept("req-active") && kept("req-pending"));
    assert_eq!(s.open_grants().expect("open").len(), 1);
    assert_eq!(s.open_requests().expect("open").len(), 1);
}

macro_rules! contract {
    ($backend:ident, $make:expr, $($ignore:tt)*) => {
        mod $backend {
            use super::*;

            #[test]
            $($ignore)*
            fn compare_then_write() {
                super::compare_then_write(&$make);
            }

            #[test]
            $($ignore)*
            fn commits_are_all_or_nothing() {
                super::commits_are_all_or_nothing(&$make);
            }

            #[test]
            $($ignore)*
            fn one_winner_and_no_lost_update() {
                super::one_winner_and_no_lost_update(&$make);
            }

            #[test]
            $($ignore)*
            fn numeric_ids() {
                super::numeric_ids(&$make);
            }

            #[test]
            $($ignore)*
            fn change_stream() {
                super::change_stream(&$make);
            }

            #[test]
            $($ignore)*
            fn listings_read_past_one_page() {
                super::listings_read_past_one_page(&$make);
            }

            #[test]
            $($ignore)*
            fn open_records_are_indexed() {
                super::open_records_are_indexed(&$make);
            }

            #[test]
            $($ignore)*
            fn open_grants_are_indexed_by_what_they_open() {
                super::open_grants_are_indexed_by_what_they_open(&$make);
            }

            #[test]
            $($ignore)*
            fn pruning_keeps_what_is_open_or_recent() {
                super::pruning_keeps_what_is_open_or_recent(&$make);
            }
        }
    };
}

contract!(redb, Redb(TempDir::new("jit-store-")),);
contract!(etcd, Etcd::start(), #[ignore = "needs etcd (cargo xtask setup installs it)"]);

// ---------- what only a shared store has ----------

/// Two agents on one cluster: a commit through one is read, and streamed, by the other; ids
/// they allocate never collide, and one name has one id for both.
#[test]
#[ignore = "needs etcd (cargo xtask setup installs it)"]
fn two_agents_share_records_streams_and_ids() {
    let e = Etcd::start();
    let (a, b) = (e.open(), e.open());
    let mut b_changes = b.subscribe();
    let rev = a
        .commit(Txn::put(Record::Grant(grant("grant-ab")), 0))
        .expect("commit through a");
    assert_eq!(
        b.grant("grant-ab").expect("read").expect("there").revision,
        rev
    );
    next_change(&mut b_changes, |c| c.revision == rev);
    // b's write over a's revision wins; a's stale write then conflicts.
    let mut g = grant("grant-ab");
    g.state = GrantState::Revoked;
    b.commit(Txn::put(Record::Grant(g.clone()), rev))
        .expect("revoke through b");
    g.state = GrantState::Active;
    assert!(matches!(
        a.commit(Txn::put(Record::Grant(g), rev)),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        a.grant("grant-ab")
            .expect("read")
            .expect("there")
            .value
            .state,
        GrantState::Revoked
    );
    let from_a: Vec<u32> = (0..10)
        .map(|i| {
            a.numeric_id(IdKind::Identity, &format!("x{i}"))
                .expect("id")
        })
        .collect();
    let from_b: Vec<u32> = (0..10)
        .map(|i| {
            b.numeric_id(IdKind::Identity, &format!("y{i}"))
                .expect("id")
        })
        .collect();
    let all: BTreeSet<u32> = from_a.iter().chain(&from_b).copied().collect();
    assert_eq!(all.len(), 20, "{from_a:?} {from_b:?}");
    assert_eq!(
        b.numeric_id(IdKind::Identity, "x3").expect("id"),
        from_a[3],
        "one name, one id, whichever agent asks"
    );
}

/// With the cluster down, a call fails within its bound (no hang) with a backend error; once the
/// cluster is back, the same store works again and its change stream resumes.
#[test]
#[ignore = "needs etcd (cargo xtask setup installs it)"]
fn a_cluster_that_is_down_is_an_error_in_bounded_time_then_recovers() {
    let mut e = Etcd::start();
    let s = e.open();
    let mut rx = s.subscribe();
    s.commit(Txn::put(Record::Request(request("req-d", "a")), 0))
        .expect("commit");
    e.cluster.kill(0);
    let started = std::time::Instant::now();
    let err = s.requests().expect_err("no cluster, no answer");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "bounded by the store's timeout: {:?}",
        started.elapsed()
    );
    assert!(matches!(
        s.commit(Txn::put(Record::Request(request("req-e", "a")), 0)),
        Err(StoreError::Unavailable(_))
    ));
    e.cluster.restart(0);
    e.cluster.wait_healthy(Duration::from_secs(30));
    let mut rev = None;
    for _ in 0..100 {
        match s.commit(Txn::put(Record::Request(request("req-e", "b")), 0)) {
            Ok(r) => {
                rev = Some(r);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let rev = rev.expect("the store works again once the cluster is back");
    next_change(&mut rx, |c| c.revision == rev);
    assert_eq!(s.requests().expect("list").len(), 2);
}

/// A record that does not decode (written by something else) is named and skipped: the others
/// are still listed.
#[test]
#[ignore = "needs etcd (cargo xtask setup installs it)"]
fn an_undecodable_record_is_reported_and_skipped() {
    let e = Etcd::start();
    let s = e.open();
    s.commit(Txn::put(Record::Grant(grant("grant-ok")), 0))
        .expect("commit");
    put_raw(
        &e.cluster.endpoints()[0],
        &format!("{}grants/grant-bad", e.prefix),
        "{not json",
    );
    let listed = s.grants().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].value.id, "grant-ok");
    let corrupt = s.corrupt_records();
    assert!(
        corrupt.iter().any(|k| k.ends_with("grants/grant-bad")),
        "{corrupt:?}"
    );
}

/// Writes a pending request into the redb file at `path` as a binary that keeps no indexes
/// does: the record and the store's revision, nothing else.
fn write_without_indexes(path: &std::path::Path, id: &str, revision: u64) {
    let db = ::redb::Database::create(path).expect("redb");
    let tx = db.begin_write().expect("write");
    {
        let mut t = tx
            .open_table(::redb::TableDefinition::<&str, &[u8]>::new("requests"))
            .expect("requests");
        let body = serde_json::json!({ "value": request(id, "x"), "revision": revision });
        t.insert(id, body.to_string().as_bytes()).expect("insert");
        let mut meta = tx
            .open_table(::redb::TableDefinition::<&str, u64>::new("meta"))
            .expect("meta");
        meta.insert("revision", revision).expect("revision");
    }
    tx.commit().expect("commit");
}

/// Records written before the indexes existed (a redb file of the earlier layout), or by a
/// binary that does not keep them (a downgrade), are indexed when the store opens: an open one
/// is listed, with its revision.
#[test]
fn a_redb_file_from_before_the_indexes_is_indexed_on_open() {
    let dir = TempDir::new("jit-store-");
    let path = dir.path().join("s.redb");
    write_without_indexes(&path, "req-legacy", 4);
    let s = RedbStore::open(&path).expect("open");
    let open = s.open_requests().expect("open requests");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].value.id, "req-legacy");
    assert_eq!(open[0].revision, 4);
    let mut r = open[0].value.clone();
    r.state = RequestState::Expired;
    s.commit(Txn::put(Record::Request(r), 4)).expect("commit");
    assert!(s.open_requests().expect("open").is_empty());
    drop(s);

    // A binary that does not keep the indexes (a downgrade) writes a record and moves the
    // revision: the next open sees the indexes are behind and rebuilds them.
    write_without_indexes(&path, "req-downgrade", 6);
    let s = RedbStore::open(&path).expect("open");
    let open = s.open_requests().expect("open requests");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].value.id, "req-downgrade");
}

/// Commits an open grant into the redb file at `path` as the binary before the index of open
/// grants does: the record, its open entry, `revision` and `indexed_revision`, nothing else.
fn write_as_before_the_grant_index(path: &std::path::Path, id: &str, revision: u64) {
    let db = ::redb::Database::create(path).expect("redb");
    let tx = db.begin_write().expect("write");
    {
        let mut t = tx
            .open_table(::redb::TableDefinition::<&str, &[u8]>::new("grants"))
            .expect("grants");
        let mut g = grant(id);
        g.expires_ms = i64::MAX / 2;
        let body = serde_json::json!({ "value": g, "revision": revision });
        t.insert(id, body.to_string().as_bytes()).expect("insert");
        let mut open = tx
            .open_table(::redb::TableDefinition::<&str, ()>::new("open_grants"))
            .expect("open index");
        open.insert(id, ()).expect("insert");
        let mut meta = tx
            .open_table(::redb::TableDefinition::<&str, u64>::new("meta"))
            .expect("meta");
        meta.insert("revision", revision).expect("revision");
        meta.insert("indexed_revision", revision).expect("indexed");
    }
    tx.commit().expect("commit");
}

/// A redb file of the previous layout (open and closed records indexed, up to date, but no
/// index of open grants) gets that index when it opens: its grants are found by lookup; and
/// again after a rollback to that layout's binary wrote to it.
#[test]
fn a_redb_file_from_before_the_grant_index_is_indexed_on_open() {
    let dir = TempDir::new("jit-store-");
    let path = dir.path().join("s.redb");
    write_as_before_the_grant_index(&path, "grant-v1", 3);
    let s = RedbStore::open(&path).expect("open");
    let found = s
        .open_grants_by(&GrantLookup::Identity {
            service: "db".into(),
            identity: "spiffe://t.test/u1".into(),
        })
        .expect("lookup");
    assert_eq!(found.len(), 1, "a grant of the earlier layout is not found");
    assert_eq!(found[0].revision, 3);
    assert_eq!(s.open_grants().expect("open").len(), 1);
    drop(s);

    // A rollback to that earlier binary commits a grant (its record, its open entry, the
    // revisions: nothing of the grant index), then this version opens the file again.
    write_as_before_the_grant_index(&path, "grant-rollback", 9);
    let s = RedbStore::open(&path).expect("open");
    let found = s
        .open_grants_by(&GrantLookup::Identity {
            service: "db".into(),
            identity: "spiffe://t.test/u1".into(),
        })
        .expect("lookup");
    assert_eq!(
        found.len(),
        2,
        "a grant written after a rollback is not found: {found:?}"
    );
}

/// The same for etcd: records written under the prefix before the indexes are indexed when an
/// agent connects, with the revision a transition compares.
#[test]
#[ignore = "needs etcd (cargo xtask setup installs it)"]
fn etcd_records_from_before_the_indexes_are_indexed_on_connect() {
    let e = Etcd::start();
    let legacy = serde_json::to_string(&grant("grant-legacy")).expect("json");
    put_raw(
        &e.cluster.endpoints()[0],
        &format!("{}grants/grant-legacy", e.prefix),
        &legacy,
    );
    let s = e.open();
    // Checked in the background when an agent connects.
    let mut open = Vec::new();
    for _ in 0..100 {
        open = s.open_grants().expect("open grants");
        if !open.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open.len(), 1, "never indexed");
    assert_eq!(open[0].value.id, "grant-legacy");
    let lookup = GrantLookup::Identity {
        service: "db".into(),
        identity: "spiffe://t.test/u1".into(),
    };
    let mut found = Vec::new();
    for _ in 0..100 {
        found = s.open_grants_by(&lookup).expect("lookup");
        if !found.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(found.len(), 1, "never indexed by what it opens");
    let stored = s.grant("grant-legacy").expect("read").expect("grant");
    assert_eq!(open[0].revision, stored.revision);
    let mut g = stored.value;
    g.state = GrantState::Revoked;
    g.ended_ms = 3;
    s.commit(Txn::put(Record::Grant(g), stored.revision))
        .expect("commit");
    assert!(s.open_grants().expect("open").is_empty());
    // A second agent connecting later finds the indexes done and agrees.
    assert!(e.open().open_grants().expect("open").is_empty());

    // An agent of that earlier version, still running beside this one (a rolling upgrade),
    // writes records without index entries: a new open grant is indexed from the change stream
    // within moments; closing an indexed grant behind the index's back never leaves it open
    // (the record decides).
    let mut old = grant("grant-old-agent");
    put_raw(
        &e.cluster.endpoints()[0],
        &format!("{}grants/grant-old-agent", e.prefix),
        &serde_json::to_string(&old).expect("json"),
    );
    let mut seen = false;
    for _ in 0..100 {
        if s.open_grants().expect("open").len() == 1 {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen,
        "a grant written without its index entry was never indexed"
    );
    let mut found = false;
    for _ in 0..100 {
        if s.open_grants_by(&lookup).expect("lookup").len() == 1 {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        found,
        "a grant written without its index entries is never found by lookup"
    );
    old.state = GrantState::Revoked;
    old.ended_ms = 9;
    put_raw(
        &e.cluster.endpoints()[0],
        &format!("{}grants/grant-old-agent", e.prefix),
        &serde_json::to_string(&old).expect("json"),
    );
    assert!(
        s.open_grants().expect("open").is_empty(),
        "a grant revoked by an earlier version still counted as open"
    );
}

/// Writes a raw value through etcd's JSON gateway (`/v3/kv/put`, base64 key and value).
fn put_raw(endpoint: &str, key: &str, value: &str) {
    use std::io::{Read as _, Write as _};
    let b64 = |s: &str| {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    };
    let body = format!(r#"{{"key":"{}","value":"{}"}}"#, b64(key), b64(value));
    let addr = endpoint.strip_prefix("http://").expect("http endpoint");
    let mut s = std::net::TcpStream::connect(addr).expect("etcd gateway");
    write!(
        s,
        "POST /v3/kv/put HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
}
