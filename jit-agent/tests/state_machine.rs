//! The request and grant state machine over the real embedded store, with a controlled clock:
//! property tests of its invariants, races between approvals and revokes, and the server-side
//! answers to bad input.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use jit_agent::{
    engine::{Engine, EngineError, ListQuery, RequestOptions, RevokeTarget},
    identity::Caller,
    model::{GrantState, RequestState},
    store::{RedbStore, Store},
};

fn opts(reason: &str) -> RequestOptions<'_> {
    RequestOptions {
        reason,
        ..RequestOptions::default()
    }
}
use proptest::prelude::*;

const CONFIG: &str = r#"
[[groups]]
name = "users"
members = ["spiffe://t.test/u*"]
[[groups]]
name = "sre"
members = ["spiffe://t.test/sre/*"]
[[services]]
name = "two"
destinations = ["10.0.0.1:1/tcp"]
max_duration = "10m"
approvals_required = 2
break_glass_max = "2m"
[[services]]
name = "auto"
destinations = ["10.0.0.1:2/tcp"]
max_duration = "5m"
require_reason = false
[[identities]]
spiffe_id = "spiffe://t.test/u1"
sources = ["10.1.0.1/32"]
[[identities]]
spiffe_id = "spiffe://t.test/u2"
sources = ["10.1.0.2/32"]
[[identities]]
spiffe_id = "spiffe://t.test/sre/x"
sources = ["10.1.0.3/32"]
[[identities]]
spiffe_id = "spiffe://t.test/sre/y"
sources = ["10.1.0.4/32"]
"#;

const POLICIES: &str = r#"
permit (principal, action == Jit::Action::"request", resource);
permit (principal in Jit::Group::"users", action == Jit::Action::"auto_approve", resource == Jit::Service::"auto");
permit (principal in Jit::Group::"sre", action in [Jit::Action::"approve", Jit::Action::"deny", Jit::Action::"revoke"], resource);
permit (principal == Jit::Identity::"spiffe://t.test/admin", action == Jit::Action::"revoke", resource);
permit (principal in Jit::Group::"sre", action == Jit::Action::"break_glass", resource) when { context.reason != "" };
"#;

const USERS: [&str; 5] = [
    "spiffe://t.test/u1",
    "spiffe://t.test/u2",
    "spiffe://t.test/sre/x",
    "spiffe://t.test/sre/y",
    "spiffe://t.test/admin",
];

struct Fixture {
    engine: Engine<RedbStore>,
    clock: Arc<AtomicI64>,
    _dir: jit_tests::TempDir,
}

fn fixture() -> Fixture {
    fixture_with(POLICIES)
}

fn fixture_with(policies: &str) -> Fixture {
    fixture_from(CONFIG, policies)
}

fn fixture_from(config: &str, policies: &str) -> Fixture {
    let dir = jit_tests::TempDir::new("jit-sm-");
    let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let c = Arc::clone(&clock);
    let engine = Engine::new(
        store,
        jit_tests::fixtures::config(config),
        jit_tests::fixtures::policies(policies),
        Arc::new(move || c.load(Ordering::SeqCst)),
    );
    Fixture {
        engine,
        clock,
        _dir: dir,
    }
}

fn who(i: usize) -> Caller {
    Caller::Spiffe(USERS[i % USERS.len()].to_string())
}

#[derive(Clone, Debug)]
enum Op {
    Request {
        user: usize,
        auto: bool,
        secs: u64,
    },
    BreakGlass {
        user: usize,
        secs: u64,
        reason: bool,
    },
    Approve {
        user: usize,
        req: usize,
    },
    Deny {
        user: usize,
        req: usize,
    },
    RevokeGrant {
        user: usize,
        grant: usize,
    },
    RevokeIdentity {
        user: usize,
        target: usize,
    },
    Advance {
        secs: i64,
    },
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..5usize, any::<bool>(), 1..3600u64).prop_map(|(user, auto, secs)| Op::Request { user, auto, secs }),
        1 => (0..5usize, 1..3600u64, any::<bool>()).prop_map(|(user, secs, reason)| Op::BreakGlass { user, secs, reason }),
        4 => (0..5usize, 0..8usize).prop_map(|(user, req)| Op::Approve { user, req }),
        1 => (0..5usize, 0..8usize).prop_map(|(user, req)| Op::Deny { user, req }),
        1 => (0..5usize, 0..8usize).prop_map(|(user, grant)| Op::RevokeGrant { user, grant }),
        1 => (0..5usize, 0..5usize).prop_map(|(user, target)| Op::RevokeIdentity { user, target }),
        2 => (1..900i64).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Sweep),
    ]
}

/// Checks every invariant over the whole store; `ended` remembers grants seen ended.
fn check(f: &Fixture, ended: &mut HashMap<String, GrantState>) {
    let store = f.engine.store();
    let requests: HashMap<String, _> = store
        .requests()
        .expect("requests")
        .into_iter()
        .map(|r| (r.value.id.clone(), r.value))
        .collect();
    let cfg = f.engine.config();
    let mut grants_per_request: HashMap<String, usize> = HashMap::new();
    for g in store.grants().expect("grants") {
        let g = g.value;
        let r = &requests[&g.request_id];
        *grants_per_request.entry(r.id.clone()).or_default() += 1;
        let svc = &cfg.services[&g.service];
        // No grant without the approvals required, never from the requester, each counted once.
        assert_eq!(
            r.state,
            RequestState::Granted,
            "grant {} for a {:?} request",
            g.id,
            r.state
        );
        assert_eq!(r.grant_id, g.id);
        let mut approvers: Vec<&str> = r.approvals.iter().map(|a| a.approver.as_str()).collect();
        approvers.sort_unstable();
        approvers.dedup();
        assert_eq!(
            approvers.len(),
            r.approvals.len(),
            "an approver counted twice"
        );
        assert!(!approvers.contains(&r.requester.as_str()), "self-approval");
        let got = u32::try_from(approvers.len()).unwrap_or(0);
        assert!(
            got >= r.approvals_required,
            "grant {} with {got} of {} approvals",
            g.id,
            r.approvals_required
        );
        if r.approvals_required == 0 {
            // Granted without a human: only where a policy says so.
            assert!(
                r.break_glass
                    || (r.service == "auto" && r.requester.starts_with("spiffe://t.test/u")),
                "grant {} without approvals: {r:?}",
                g.id
            );
        } else {
            assert!(r.approvals_required >= svc.approvals_required, "{r:?}");
        }
        // No grant outlives its clamp.
        let cap = if r.break_glass {
            svc.max_duration.min(svc.break_glass_max)
        } else {
            svc.max_duration
        };
        let max_ms = i64::try_from(cap.as_millis()).unwrap_or(i64::MAX);
        assert!(
            g.expires_ms - g.not_before_ms <= max_ms,
            "grant {} exceeds the clamp",
            g.id
        );
        // Nothing revoked or expired comes back.
        if let Some(prev) = ended.get(&g.id) {
            assert_eq!(g.state, *prev, "grant {} came back from {prev:?}", g.id);
        }
        if g.state != GrantState::Active {
            ended.insert(g.id.clone(), g.state);
        }
    }
    assert!(
        grants_per_request.values().all(|n| *n == 1),
        "a request with two grants"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..40)) {
        let f = fixture();
        let mut ended = HashMap::new();
        let mut req_ids: Vec<String> = Vec::new();
        let mut grant_ids: Vec<String> = Vec::new();
        for op in ops {
            match op {
                Op::Request { user, auto, secs } => {
                    let svc = if auto { "auto" } else { "two" };
                    if let Ok(r) = f.engine.request_access(&who(user), svc, &format!("{secs}s"), &opts("why")) {
                        if !r.grant_id.is_empty() { grant_ids.push(r.grant_id.clone()); }
                        req_ids.push(r.id);
                    }
                }
                Op::BreakGlass { user, secs, reason } => {
                    let o = RequestOptions { reason: if reason { "pager" } else { "" }, break_glass: true, ..RequestOptions::default() };
                    if let Ok(r) = f.engine.request_access(&who(user), "two", &format!("{secs}s"), &o) {
                        assert!(reason, "break-glass without a reason was granted");
                        assert!(USERS[user % USERS.len()].contains("/sre/"), "break-glass for a non-SRE");
                        grant_ids.push(r.grant_id.clone());
                        req_ids.push(r.id);
                    }
                }
                Op::Approve { user, req } => {
                    if let Some(id) = req_ids.get(req)
                        && let Ok(r) = f.engine.approve(&who(user), id, "")
                        && !r.grant_id.is_empty()
                        && !grant_ids.contains(&r.grant_id)
                    {
                        grant_ids.push(r.grant_id);
                    }
                }
                Op::Deny { user, req } => {
                    if let Some(id) = req_ids.get(req) {
                        let _ = f.engine.deny(&who(user), id, "no");
                    }
                }
                Op::RevokeGrant { user, grant } => {
                    if let Some(id) = grant_ids.get(grant) {
                        let _ = f.engine.revoke(&who(user), &RevokeTarget::Grant(id.clone()), "r");
                    }
                }
                Op::RevokeIdentity { user, target } => {
                    let _ = f.engine.revoke(&who(user), &RevokeTarget::Identity(USERS[target].into()), "r");
                }
                Op::Advance { secs } => {
                    f.clock.fetch_add(secs * 1000, Ordering::SeqCst);
                }
                Op::Sweep => {
                    f.engine.sweep().expect("sweep");
                }
            }
            check(&f, &mut ended);
        }
    }
}

#[test]
fn bad_input_gets_precise_errors_from_the_server_side() {
    let f = fixture();
    let u1 = who(0);
    let cases: [(&str, &str, &str, &str); 6] = [
        ("", "5m", "r", "service"),
        ("two", "0s", "r", "duration"),
        ("two", "-5m", "r", "duration"),
        ("two", "soon", "r", "duration"),
        ("two", "", "r", "duration"),
        ("two", "5m", " ", "reason"),
    ];
    for (svc, dur, reason, field) in cases {
        match f.engine.request_access(&u1, svc, dur, &opts(reason)) {
            Err(EngineError::InvalidArgument { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{svc} {dur} {reason:?}: {other:?}"),
        }
    }
    assert!(matches!(
        f.engine.request_access(&u1, "nope", "5m", &opts("r")),
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        f.engine
            .request_access(&Caller::Local { uid: 0 }, "two", "5m", &opts("r")),
        Err(EngineError::PermissionDenied(_))
    ));
    assert!(matches!(
        f.engine.approve(&who(2), "req-000000000000", ""),
        Err(EngineError::NotFound(_))
    ));
    let long = "x".repeat(2000);
    match f.engine.request_access(&u1, "two", "5m", &opts(&long)) {
        Err(EngineError::InvalidArgument { field, .. }) => assert_eq!(field, "reason"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        f.engine.approve(&who(2), "req-000000000000", &long),
        Err(EngineError::InvalidArgument {
            field: "comment",
            ..
        })
    ));
    assert!(
        f.engine.store().requests().expect("requests").is_empty(),
        "nothing was recorded"
    );
}

#[test]
fn approvals_self_duplicates_expiry_and_clamp() {
    let f = fixture();
    let r = f
        .engine
        .request_access(&who(0), "two", "1h", &opts("r"))
        .expect("request");
    assert!(r.clamped && r.duration_s == 600, "{r:?}");
    assert!(matches!(
        f.engine.approve(&who(0), &r.id, ""),
        Err(EngineError::PermissionDenied(_))
    ));
    assert!(
        matches!(
            f.engine.approve(&who(1), &r.id, ""),
            Err(EngineError::PermissionDenied(_))
        ),
        "not an approver"
    );
    let r1 = f
        .engine
        .approve(&who(2), &r.id, "")
        .expect("first approval");
    assert_eq!(r1.state, RequestState::Pending);
    assert!(matches!(
        f.engine.approve(&who(2), &r.id, ""),
        Err(EngineError::AlreadyExists(_))
    ));
    let r2 = f
        .engine
        .approve(&who(3), &r.id, "")
        .expect("second approval");
    assert_eq!(r2.state, RequestState::Granted);
    assert!(matches!(
        f.engine.approve(&who(3), &r.id, ""),
        Err(EngineError::FailedPrecondition(_))
    ));

    // A request left pending past its TTL (1h by default) can no longer be approved.
    let late = f
        .engine
        .request_access(&who(1), "two", "5m", &opts("r"))
        .expect("request");
    f.clock.fetch_add(3_600_001, Ordering::SeqCst);
    match f.engine.approve(&who(2), &late.id, "") {
        Err(EngineError::FailedPrecondition(m)) => assert!(m.contains("expired"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.engine
            .store()
            .request(&late.id)
            .expect("get")
            .expect("some")
            .value
            .state,
        RequestState::Expired
    );
}

/// An approval racing a revoke of the identity never leaves access open: either the request is
/// denied before it is granted, or its grant is revoked.
#[test]
fn revoke_racing_approve_ends_revoked() {
    for _ in 0..20 {
        let f = Arc::new(fixture());
        let r = f
            .engine
            .request_access(&who(0), "two", "5m", &opts("r"))
            .expect("request");
        f.engine
            .approve(&who(2), &r.id, "")
            .expect("first approval");
        let (fa, fb) = (Arc::clone(&f), Arc::clone(&f));
        let id = r.id.clone();
        let a = std::thread::spawn(move || fa.engine.approve(&who(3), &id, ""));
        let b = std::thread::spawn(move || {
            fb.engine.revoke(
                &who(4),
                &RevokeTarget::Identity(USERS[0].into()),
                "incident",
            )
        });
        let _ = a.join().expect("approve thread");
        b.join().expect("revoke thread").expect("revoke");
        let now = f.clock.load(Ordering::SeqCst);
        let live = f
            .engine
            .store()
            .grants()
            .expect("grants")
            .into_iter()
            .filter(|g| g.value.is_live(now))
            .count();
        assert_eq!(live, 0, "access survived the revoke");
    }
}

#[test]
fn break_glass_is_capped_marked_and_needs_a_reason_and_a_policy() {
    let f = fixture();
    let bg = |who: Caller, reason: &'static str| {
        f.engine.request_access(
            &who,
            "two",
            "1h",
            &RequestOptions {
                reason,
                break_glass: true,
                ..RequestOptions::default()
            },
        )
    };
    match bg(who(2), "") {
        Err(EngineError::InvalidArgument { field, .. }) => assert_eq!(field, "reason"),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(bg(who(0), "outage"), Err(EngineError::PermissionDenied(_))),
        "no policy for users"
    );
    let r = bg(who(2), "db down, pager 123").expect("break-glass");
    assert_eq!(r.state, RequestState::Granted);
    assert!(r.break_glass && r.clamped);
    assert_eq!(r.duration_s, 120, "capped at break_glass_max = 2m");
    let g = f
        .engine
        .store()
        .grant(&r.grant_id)
        .expect("get")
        .expect("grant")
        .value;
    assert!(g.break_glass);
    assert_eq!(g.expires_ms - g.not_before_ms, 120_000);
}

/// A permitting `request` policy can raise the approvals a service needs with @approvals("N").
#[test]
fn approvals_annotation_raises_the_count() {
    let f = fixture_with(&format!(
        "{POLICIES}\n@approvals(\"3\")\npermit (principal, action == Jit::Action::\"request\", resource == Jit::Service::\"two\") when {{ context.duration_seconds > 300 }};\n"
    ));
    let long = f
        .engine
        .request_access(&who(0), "two", "10m", &opts("r"))
        .expect("request");
    assert_eq!(long.approvals_required, 3, "{long:?}");
    let short = f
        .engine
        .request_access(&who(1), "two", "1m", &opts("r"))
        .expect("request");
    assert_eq!(short.approvals_required, 2, "the service's own count");
    f.engine.approve(&who(2), &long.id, "").expect("1");
    let r = f.engine.approve(&who(3), &long.id, "").expect("2");
    assert_eq!(r.state, RequestState::Pending, "two of three");
}

const BOUND_CONFIG: &str = r#"
[[groups]]
name = "users"
members = ["spiffe://t.test/u*"]
[[groups]]
name = "sre"
members = ["spiffe://t.test/sre/*"]
[[services]]
name = "bound"
destinations = ["10.0.0.1:3/tcp"]
bind_requester_address = true
require_reason = false
[[services]]
name = "boundauto"
destinations = ["10.0.0.1:4/tcp"]
bind_requester_address = true
require_reason = false
[[identities]]
spiffe_id = "spiffe://t.test/u1"
sources = ["10.1.0.0/24"]
"#;

const BOUND_POLICIES: &str = r#"
permit (principal, action == Jit::Action::"request", resource);
permit (principal in Jit::Group::"users", action == Jit::Action::"auto_approve", resource == Jit::Service::"boundauto");
permit (principal in Jit::Group::"sre", action in [Jit::Action::"approve", Jit::Action::"revoke"], resource);
"#;

/// Problem 1 of datapath v2, in the state machine: an address inside another identity's static
/// prefix is never bound to a requester (containment, not exact match), and the check is made
/// again when an approval grants a request that waited.
#[test]
fn an_address_carries_only_the_grant_it_was_bound_for() {
    let f = fixture_from(BOUND_CONFIG, BOUND_POLICIES);
    let e = &f.engine;
    let at = |peer: &str| RequestOptions {
        peer: Some(peer.parse().expect("address")),
        ..RequestOptions::default()
    };
    let u = |n: &str| Caller::Spiffe(format!("spiffe://t.test/{n}"));

    // 10.1.0.77 lies in u1's static 10.1.0.0/24: nobody else may bind it.
    let err = e
        .request_access(&u("u2"), "boundauto", "5m", &at("10.1.0.77"))
        .expect_err("inside another identity's prefix");
    let msg = err.to_string();
    assert!(
        matches!(err, EngineError::FailedPrecondition(_))
            && msg.contains("10.1.0.0/24")
            && msg.contains("spiffe://t.test/u1"),
        "{msg}"
    );
    // Also spelled as an IPv4-mapped IPv6 address.
    assert!(
        e.request_access(&u("u2"), "boundauto", "5m", &at("::ffff:10.1.0.77"))
            .is_err()
    );
    // Its owner may.
    let own = e
        .request_access(&u("u1"), "boundauto", "5m", &at("10.1.0.77"))
        .expect("own prefix");
    assert_eq!(own.state, RequestState::Granted);

    // u2 asks for "bound" from 10.9.0.5 and waits; meanwhile u3 is granted that address.
    let waiting = e
        .request_access(&u("u2"), "bound", "5m", &at("10.9.0.5"))
        .expect("pending");
    assert_eq!(waiting.state, RequestState::Pending);
    let taken = e
        .request_access(&u("u3"), "boundauto", "5m", &at("10.9.0.5"))
        .expect("free when asked");
    assert_eq!(taken.state, RequestState::Granted);
    // Approving u2's request now would bind u3's address to u2: refused, request still pending.
    let err = e
        .approve(&u("sre/x"), &waiting.id, "ok")
        .expect_err("the address changed hands");
    assert!(
        matches!(err, EngineError::FailedPrecondition(_))
            && err.to_string().contains("spiffe://t.test/u3"),
        "{err}"
    );
    let still = e
        .store()
        .request(&waiting.id)
        .expect("store")
        .expect("request");
    assert_eq!(still.value.state, RequestState::Pending);
    // Once u3's grant ends, the approval goes through and binds the address to u2 alone.
    e.revoke(
        &u("sre/x"),
        &RevokeTarget::Grant(taken.grant_id.clone()),
        "done",
    )
    .expect("revoke");
    let granted = e.approve(&u("sre/x"), &waiting.id, "ok").expect("approve");
    assert_eq!(granted.state, RequestState::Granted);
    let grant = e
        .store()
        .grant(&granted.grant_id)
        .expect("store")
        .expect("grant");
    assert_eq!(grant.value.extra_sources, vec!["10.9.0.5/32".to_string()]);
}

/// One identity cannot fill the store or the approvers' queue with waiting requests (the 21st is
/// refused; others, and requests granted at once, are not held back), and listings page through
/// everything exactly once, with server-side filters.
#[test]
fn waiting_requests_are_limited_per_identity_and_listings_page() {
    let f = fixture();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            f.engine
                .request_access(&who(0), "two", "5m", &opts("r"))
                .expect("waiting")
                .id,
        );
    }
    let err = f
        .engine
        .request_access(&who(0), "two", "5m", &opts("r"))
        .expect_err("the 21st waiting request");
    assert!(
        matches!(&err, EngineError::LimitReached(m) if m.contains("max_pending_per_identity")),
        "{err}"
    );
    f.engine
        .request_access(&who(1), "two", "5m", &opts("r"))
        .expect("another identity");
    f.engine
        .request_access(&who(0), "auto", "1m", &opts(""))
        .expect("granted at once: not waiting");
    // Once they expire, there is room again.
    f.clock.fetch_add(2 * 3_600_000, Ordering::SeqCst);
    f.engine
        .request_access(&who(0), "two", "5m", &opts("r"))
        .expect("room again");

    // Every one of u1's requests for "two", 7 a page, each once, newest first.
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let q = ListQuery::new(false, "two", USERS[0], 7, &token).expect("query");
        let page = f.engine.list_requests(&who(0), &q).expect("page");
        assert!(page.items.len() <= 7);
        assert!(
            page.items
                .iter()
                .all(|r| r.service == "two" && r.requester == USERS[0])
        );
        seen.extend(page.items.into_iter().map(|r| r.id));
        match page.next {
            Some(t) => token = t,
            None => break,
        }
    }
    assert_eq!(seen.len(), 21, "{seen:?}");
    let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), 21);
    assert!(ids.iter().all(|id| seen.contains(id)));
    assert!(matches!(
        ListQuery::new(false, "", "", 7, "not-a-token"),
        Err(EngineError::InvalidArgument {
            field: "page_token",
            ..
        })
    ));
    // A grant listing filters on the server too.
    let q = ListQuery::new(true, "auto", USERS[0], 0, "").expect("query");
    assert!(
        f.engine
            .list_grants(&who(0), &q)
            .expect("page")
            .items
            .is_empty()
    );
}

/// A store that counts full listings (every record ever kept, every open grant) and hands
/// everything else to redb.
struct ScanCounting {
    inner: RedbStore,
    full_scans: std::sync::atomic::AtomicUsize,
    /// Listings of every open grant.
    open_scans: std::sync::atomic::AtomicUsize,
}

impl Store for ScanCounting {
    fn request(
        &self,
        id: &str,
    ) -> Result<
        Option<jit_agent::store::Versioned<jit_agent::model::Request>>,
        jit_agent::store::StoreError,
    > {
        self.inner.request(id)
    }
    fn requests(
        &self,
    ) -> Result<
        Vec<jit_agent::store::Versioned<jit_agent::model::Request>>,
        jit_agent::store::StoreError,
    > {
        self.full_scans.fetch_add(1, Ordering::SeqCst);
        self.inner.requests()
    }
    fn grant(
        &self,
        id: &str,
    ) -> Result<
        Option<jit_agent::store::Versioned<jit_agent::model::Grant>>,
        jit_agent::store::StoreError,
    > {
        self.inner.grant(id)
    }
    fn grants(
        &self,
    ) -> Result<
        Vec<jit_agent::store::Versioned<jit_agent::model::Grant>>,
        jit_agent::store::StoreError,
    > {
        self.full_scans.fetch_add(1, Ordering::SeqCst);
        self.inner.grants()
    }
    fn open_requests(
        &self,
    ) -> Result<
        Vec<jit_agent::store::Versioned<jit_agent::model::Request>>,
        jit_agent::store::StoreError,
    > {
        self.inner.open_requests()
    }
    fn open_grants(
        &self,
    ) -> Result<
        Vec<jit_agent::store::Versioned<jit_agent::model::Grant>>,
        jit_agent::store::StoreError,
    > {
        self.open_scans.fetch_add(1, Ordering::SeqCst);
        self.inner.open_grants()
    }
    fn open_grants_by(
        &self,
        lookup: &jit_agent::store::GrantLookup,
    ) -> Result<
        Vec<jit_agent::store::Versioned<jit_agent::model::Grant>>,
        jit_agent::store::StoreError,
    > {
        self.inner.open_grants_by(lookup)
    }
    fn commit(&self, txn: jit_agent::store::Txn) -> Result<u64, jit_agent::store::StoreError> {
        self.inner.commit(txn)
    }
    fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, jit_agent::store::StoreError> {
        self.inner.prune(before_ms, limit)
    }
    fn corrupt_records(&self) -> Vec<String> {
        self.inner.corrupt_records()
    }
    fn numeric_id(
        &self,
        kind: jit_agent::store::IdKind,
        name: &str,
    ) -> Result<u32, jit_agent::store::StoreError> {
        self.inner.numeric_id(kind, name)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<jit_agent::store::Change> {
        self.inner.subscribe()
    }
}

/// What the agent does on every request, approval, revoke and sweep reads the index of open
/// records, never every record ever kept: with a thousand ended grants in the store, none of
/// these makes a full listing (only a listing of history does, and it is paged to the caller).
#[test]
fn requests_and_sweeps_never_read_the_history() {
    let dir = jit_tests::TempDir::new("jit-sm-");
    let store = Arc::new(ScanCounting {
        inner: RedbStore::open(&dir.path().join("s.redb")).expect("store"),
        full_scans: std::sync::atomic::AtomicUsize::new(0),
        open_scans: std::sync::atomic::AtomicUsize::new(0),
    });
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let c = Arc::clone(&clock);
    let engine = Engine::new(
        Arc::clone(&store),
        jit_tests::fixtures::config(CONFIG),
        jit_tests::fixtures::policies(POLICIES),
        Arc::new(move || c.load(Ordering::SeqCst)),
    );
    // History: a thousand grants granted at once and ended.
    for _ in 0..1000 {
        let r = engine
            .request_access(&who(0), "auto", "1m", &opts(""))
            .expect("granted at once");
        engine
            .revoke(&who(2), &RevokeTarget::Grant(r.grant_id), "done")
            .expect("revoke");
    }
    assert_eq!(store.inner.open_grants().expect("open").len(), 0);
    store.full_scans.store(0, Ordering::SeqCst);

    let pending = engine
        .request_access(&who(1), "two", "5m", &opts("r"))
        .expect("pending");
    engine
        .approve(&who(2), &pending.id, "")
        .expect("first approval");
    let granted = engine.approve(&who(3), &pending.id, "").expect("second");
    assert_eq!(granted.state, RequestState::Granted);
    let waiting = engine
        .request_access(&who(0), "two", "5m", &opts("r"))
        .expect("pending");
    engine
        .request_access(&who(0), "auto", "1m", &opts(""))
        .expect("granted at once");
    engine.sweep().expect("sweep");
    let (w, live) = engine.counts().expect("counts");
    assert_eq!((w.len(), live.len()), (1, 2));
    let current = ListQuery::new(true, "", "", 100, "").expect("query");
    assert_eq!(
        engine
            .list_grants(&who(2), &current)
            .expect("list")
            .items
            .len(),
        2
    );
    assert_eq!(
        engine
            .list_requests(&who(2), &current)
            .expect("list")
            .items
            .len(),
        1
    );
    engine
        .revoke(&who(2), &RevokeTarget::Identity(USERS[0].into()), "r")
        .expect("revoke by identity");
    engine
        .revoke(&who(2), &RevokeTarget::Service("two".into()), "r")
        .expect("revoke by service");
    clock.fetch_add(3_600_000, Ordering::SeqCst);
    engine.sweep().expect("sweep");
    assert_eq!(
        engine
            .get_request(&who(2), &waiting.id)
            .expect("request")
            .state,
        RequestState::Denied
    );
    assert_eq!(
        store.full_scans.load(Ordering::SeqCst),
        0,
        "a request, approval, revoke, sweep or count read every record"
    );
    // The counter counts: a listing of the history is a full read.
    let all = ListQuery::new(false, "", "", 10, "").expect("query");
    engine.list_grants(&who(2), &all).expect("list");
    assert!(store.full_scans.load(Ordering::SeqCst) > 0);
}

/// With many live grants, what the agent does per request, approval and sweep finds the grants
/// it needs through the index of open grants, never by listing every open grant: binding an
/// address checks the grants bound to it, a sweep reads the grants due. And it still decides
/// as before: a taken address is refused, a due grant expires, the others stay.
#[test]
fn requests_and_sweeps_never_list_every_open_grant() {
    let dir = jit_tests::TempDir::new("jit-sm-");
    let store = Arc::new(ScanCounting {
        inner: RedbStore::open(&dir.path().join("s.redb")).expect("store"),
        full_scans: std::sync::atomic::AtomicUsize::new(0),
        open_scans: std::sync::atomic::AtomicUsize::new(0),
    });
    let clock = Arc::new(AtomicI64::new(1_700_000_000_000));
    let c = Arc::clone(&clock);
    let engine = Engine::new(
        Arc::clone(&store),
        jit_tests::fixtures::config(BOUND_CONFIG),
        jit_tests::fixtures::policies(BOUND_POLICIES),
        Arc::new(move || c.load(Ordering::SeqCst)),
    );
    let u = |n: &str| Caller::Spiffe(format!("spiffe://t.test/{n}"));
    let at = |peer: String| RequestOptions {
        peer: Some(peer.parse().expect("address")),
        ..RequestOptions::default()
    };
    // 300 live grants, each bound to its own host; the first 100 for one minute, the rest for
    // five.
    for i in 0..300u32 {
        let duration = if i < 100 { "1m" } else { "5m" };
        let r = engine
            .request_access(
                &u("u3"),
                "boundauto",
                duration,
                &at(format!("10.9.{}.{}", i / 250, i % 250 + 1)),
            )
            .expect("granted at once");
        assert_eq!(r.state, RequestState::Granted);
    }
    store.open_scans.store(0, Ordering::SeqCst);

    // A taken address is refused to anyone else, through the index.
    let err = engine
        .request_access(&u("u2"), "boundauto", "5m", &at("10.9.0.7".into()))
        .expect_err("taken");
    assert!(err.to_string().contains("spiffe://t.test/u3"), "{err}");
    // Through another service too: an address carries one identity's grants, whatever the
    // service.
    let err = engine
        .request_access(&u("u2"), "bound", "5m", &at("10.9.0.8".into()))
        .expect_err("taken through another service");
    assert!(err.to_string().contains("spiffe://t.test/u3"), "{err}");
    // A free one is granted; one waiting for approval is checked again when approved.
    engine
        .request_access(&u("u2"), "boundauto", "5m", &at("10.9.5.1".into()))
        .expect("free");
    let waiting = engine
        .request_access(&u("u2"), "bound", "5m", &at("10.9.5.2".into()))
        .expect("pending");
    let granted = engine
        .approve(&u("sre/x"), &waiting.id, "ok")
        .expect("approve");
    assert_eq!(granted.state, RequestState::Granted);
    assert_eq!(engine.sweep().expect("sweep").0.len(), 0);
    // Past the first minute: the 100 short grants and nothing else expire.
    clock.fetch_add(61_000, Ordering::SeqCst);
    let (expired, _) = engine.sweep().expect("sweep");
    assert_eq!(expired.len(), 100);
    assert!(expired.iter().all(|g| g.state == GrantState::Expired));
    assert_eq!(engine.sweep().expect("sweep").0.len(), 0);
    // An address freed by expiry may be bound by someone else.
    engine
        .request_access(&u("u2"), "boundauto", "5m", &at("10.9.0.7".into()))
        .expect("freed by expiry");
    assert_eq!(
        store.open_scans.load(Ordering::SeqCst),
        0,
        "a request, an approval or a sweep listed every open grant"
    );
    assert_eq!(store.full_scans.load(Ordering::SeqCst), 0);
    let live = store
        .inner
        .open_grants()
        .expect("open")
        .into_iter()
        .filter(|g| g.value.state == GrantState::Active)
        .count();
    assert_eq!(live, 300 - 100 + 3);
}
