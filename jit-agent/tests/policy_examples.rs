//! The shipped example policies (examples/policies) under the example configuration
//! (examples/agent.toml): decision tables, and the approval workflow they produce.

use std::{
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use jit_agent::{
    config::{Config, Overrides},
    engine::{Engine, EngineError, RequestOptions},
    identity::Caller,
    model::RequestState,
    policy::{Action, Facts, Policies},
    store::RedbStore,
};

fn example() -> (Config, Policies) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
    let cfg = Config::load(&path, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
    let p = Policies::load(&cfg.policy_file, cfg.policy_schema.as_deref())
        .unwrap_or_else(|e| panic!("{e}"));
    (cfg, p)
}

/// 2026-11-30 is a Monday.
fn at(s: &str) -> i64 {
    let t = humantime::parse_rfc3339(s).expect("time");
    i64::try_from(
        t.duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

const MON_10: &str = "2026-11-30T10:00:00Z";
const MON_20: &str = "2026-11-30T20:00:00Z";
const SAT_10: &str = "2026-12-05T10:00:00Z";

struct Row {
    who: &'static str,
    action: Action,
    service: &'static str,
    minutes: u64,
    reason: &'static str,
    source: Option<&'static str>,
    time: &'static str,
    requester: Option<&'static str>,
    allow: bool,
}

const ALICE: &str = "spiffe://example.org/eng/alice";
const CAROL: &str = "spiffe://example.org/eng/carol";
const BOB: &str = "spiffe://example.org/sre/bob";
const ONCALL: &str = "spiffe://example.org/sre/oncall";
const CI: &str = "spiffe://example.org/ci/deployer";

fn row(who: &'static str, action: Action, service: &'static str, allow: bool) -> Row {
    Row {
        who,
        action,
        service,
        minutes: 10,
        reason: "INC-1",
        source: None,
        time: MON_10,
        requester: None,
        allow,
    }
}

#[test]
fn decision_table() {
    let (cfg, p) = example();
    let rows = [
        // Who may ask.
        row(ALICE, Action::Request, "payments-db", true),
        Row {
            reason: "",
            ..row(ALICE, Action::Request, "payments-db", false)
        },
        Row {
            minutes: 120,
            ..row(ALICE, Action::Request, "staging-api", false)
        },
        row(BOB, Action::Request, "payments-db", true),
        row(CI, Action::Request, "payments-db", false),
        Row {
            source: Some("10.20.0.5"),
            ..row(CI, Action::Request, "deploy-api", true)
        },
        Row {
            source: Some("10.99.0.5"),
            ..row(CI, Action::Request, "deploy-api", false)
        },
        row(CI, Action::Request, "deploy-api", false),
        // What is granted at once.
        row(ALICE, Action::AutoApprove, "payments-db", false),
        row(ALICE, Action::AutoApprove, "staging-api", true),
        Row {
            minutes: 30,
            ..row(ALICE, Action::AutoApprove, "staging-api", false)
        },
        Row {
            time: MON_20,
            ..row(ALICE, Action::AutoApprove, "staging-api", false)
        },
        Row {
            time: SAT_10,
            ..row(ALICE, Action::AutoApprove, "staging-api", false)
        },
        Row {
            source: Some("10.20.0.5"),
            ..row(CI, Action::AutoApprove, "deploy-api", true)
        },
        Row {
            source: Some("10.20.0.5"),
            minutes: 15,
            ..row(CI, Action::AutoApprove, "deploy-api", false)
        },
        // Who decides.
        Row {
            requester: Some(ALICE),
            ..row(BOB, Action::Approve, "payments-db", true)
        },
        Row {
            requester: Some(ALICE),
            ..row(CAROL, Action::Approve, "payments-db", false)
        },
        Row {
            requester: Some("spiffe://partner.example/x"),
            ..row(BOB, Action::Approve, "payments-db", false)
        },
        Row {
            requester: Some(ALICE),
            ..row(BOB, Action::Deny, "payments-db", true)
        },
        Row {
            requester: Some(ALICE),
            ..row(BOB, Action::Revoke, "deploy-api", true)
        },
        Row {
            requester: Some(CI),
            ..row(ALICE, Action::Revoke, "deploy-api", false)
        },
        // Break-glass.
        row(ONCALL, Action::BreakGlass, "payments-db", true),
        Row {
            reason: "",
            ..row(ONCALL, Action::BreakGlass, "payments-db", false)
        },
        row(BOB, Action::BreakGlass, "payments-db", false),
        row(ALICE, Action::BreakGlass, "payments-db", false),
    ];
    for (i, r) in rows.iter().enumerate() {
        let svc = &cfg.services[r.service];
        let requester = r.requester.unwrap_or(r.who);
        let v = p.decide(
            r.action,
            &Facts {
                principal: r.who,
                principal_groups: cfg.groups_of(r.who),
                service: r.service,
                environment: &svc.environment,
                max_duration_seconds: svc.max_duration.as_secs(),
                duration_seconds: r.minutes * 60,
                reason: r.reason,
                ticket: "",
                source_ip: r.source.map(|s| s.parse::<IpAddr>().expect("ip")),
                now_ms: at(r.time),
                requester,
                requester_groups: cfg.groups_of(requester),
                approvals: 0,
            },
        );
        assert_eq!(
            v.allowed,
            r.allow,
            "row {i}: {} {} {} → {} ({:?})",
            r.who,
            r.action.name(),
            r.service,
            v.why(),
            v.errors
        );
        assert!(v.errors.is_empty(), "row {i}: {:?}", v.errors);
    }
}

#[test]
fn production_needs_two_distinct_sre_approvals_and_never_self_approval() {
    let (cfg, p) = example();
    let dir = jit_tests::TempDir::new("jit-pol-");
    let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
    let clock = Arc::new(AtomicI64::new(at(MON_10)));
    let c = Arc::clone(&clock);
    let e = Engine::new(
        store,
        Arc::new(cfg),
        Arc::new(p),
        Arc::new(move || c.load(Ordering::SeqCst)),
    );
    let id = |s: &str| Caller::Spiffe(s.to_string());
    let from = |ip: &str| RequestOptions {
        reason: "INC-2",
        peer: Some(ip.parse().expect("ip")),
        ..RequestOptions::default()
    };
    let o = from("10.0.9.1");

    let r = e
        .request_access(&id(ALICE), "payments-db", "20m", &o)
        .expect("request");
    assert_eq!((r.state, r.approvals_required), (RequestState::Pending, 2));
    assert!(
        r.policies.iter().any(|p| p.starts_with("eng-may-request")),
        "{:?}",
        r.policies
    );
    assert!(matches!(
        e.approve(&id(CAROL), &r.id, ""),
        Err(EngineError::PermissionDenied(_))
    ));
    let r1 = e.approve(&id(BOB), &r.id, "").expect("first");
    assert_eq!(r1.state, RequestState::Pending);
    assert!(
        matches!(
            e.approve(&id(BOB), &r.id, ""),
            Err(EngineError::AlreadyExists(_))
        ),
        "counted once"
    );
    let r2 = e.approve(&id(ONCALL), &r.id, "").expect("second");
    assert_eq!(r2.state, RequestState::Granted);

    // An SRE asking for itself cannot approve its own request, whatever the policies say.
    let mine = e
        .request_access(&id(BOB), "payments-db", "10m", &from("10.0.9.2"))
        .expect("request");
    assert!(matches!(
        e.approve(&id(BOB), &mine.id, ""),
        Err(EngineError::PermissionDenied(_))
    ));

    // Staging during working hours: granted at once, no human.
    let s = e
        .request_access(&id(ALICE), "staging-api", "10m", &o)
        .expect("request");
    assert_eq!(s.state, RequestState::Granted);
    assert!(
        s.policies
            .iter()
            .any(|p| p.starts_with("staging-auto-short-working-hours"))
    );
    // Outside working hours: pending.
    clock.store(at(SAT_10), Ordering::SeqCst);
    let s = e
        .request_access(&id(ALICE), "staging-api", "10m", &o)
        .expect("request");
    assert_eq!(s.state, RequestState::Pending);

    // On-call break-glass: granted at once, capped, marked.
    let bg = e
        .request_access(
            &id(ONCALL),
            "payments-db",
            "1h",
            &RequestOptions {
                reason: "outage",
                break_glass: true,
                peer: Some("10.0.9.3".parse().expect("ip")),
                ..RequestOptions::default()
            },
        )
        .expect("break-glass");
    assert!(bg.break_glass && bg.state == RequestState::Granted);
    assert_eq!(bg.duration_s, 900, "payments-db break_glass_max is 15m");
}
