//! What a decision is made on: the duration clamp and the policy facts. Built here only, and used
//! by the engine's decisions and by `jit-agent policy explain` alike, so an explanation can never
//! drift from the decision it explains.

use std::{net::IpAddr, time::Duration};

use crate::{
    config::{Config, Service},
    model::{Grant, Request},
    policy::{Action, Facts, Policies, Verdict},
};

/// The duration a request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clamped {
    /// Seconds granted: the wanted duration, at most the cap, at least one second.
    pub duration_s: u64,
    /// Whether the wanted duration was longer than the cap.
    pub clamped: bool,
}

/// Clamps `wanted` to the service's maximum, and for break-glass also to `break_glass_max`.
#[must_use]
pub fn clamp(service: &Service, wanted: Duration, break_glass: bool) -> Clamped {
    let cap = if break_glass {
        service.max_duration.min(service.break_glass_max)
    } else {
        service.max_duration
    };
    Clamped {
        duration_s: wanted.min(cap).as_secs().max(1),
        clamped: wanted > cap,
    }
}

/// What a decision about a request is made on, besides who asks and for which service.
#[derive(Clone, Debug)]
pub struct Ask<'a> {
    /// Duration after clamping, seconds.
    pub duration_s: u64,
    /// Reason.
    pub reason: &'a str,
    /// Ticket.
    pub ticket: &'a str,
    /// Requester address.
    pub source_ip: Option<IpAddr>,
    /// Requester.
    pub requester: &'a str,
    /// Approvals so far.
    pub approvals: u32,
}

impl<'a> Ask<'a> {
    /// The ask behind an existing request.
    #[must_use]
    pub fn of_request(r: &'a Request) -> Self {
        Self {
            duration_s: r.duration_s,
            reason: &r.reason,
            ticket: &r.ticket,
            source_ip: r
                .peer_address
                .split('/')
                .next()
                .and_then(|a| a.parse().ok()),
            requester: &r.requester,
            approvals: u32::try_from(r.approvals.len()).unwrap_or(u32::MAX),
        }
    }

    /// The ask of a new request (`request`, `auto_approve`, `break_glass`): the duration after
    /// the clamp, the reason as kept (trimmed), no approvals yet. The requester is the caller.
    #[must_use]
    pub fn at_request(
        duration_s: u64,
        reason: &'a str,
        ticket: &'a str,
        source_ip: Option<IpAddr>,
        requester: &'a str,
    ) -> Self {
        Self {
            duration_s,
            reason: reason.trim(),
            ticket,
            source_ip,
            requester,
            approvals: 0,
        }
    }

    /// The ask a `revoke` of `g` is decided on: the grant's length and its holder, the revoke
    /// reason (empty while it is active), no ticket, no source address, no approvals.
    #[must_use]
    pub fn of_grant(g: &'a Grant) -> Self {
        Self {
            duration_s: u64::try_from((g.expires_ms - g.not_before_ms) / 1000).unwrap_or(0),
            reason: &g.revoke_reason,
            ticket: "",
            source_ip: None,
            requester: &g.identity,
            approvals: 0,
        }
    }

    /// A representative ask for "may X do Y on S at all" questions (whoami).
    #[must_use]
    pub fn probe(service: &Service, requester: &'a str) -> Self {
        Self {
            duration_s: service.max_duration.as_secs().min(60),
            reason: "(probe)",
            ticket: "",
            source_ip: None,
            requester,
            approvals: 0,
        }
    }
}

/// The facts Cedar sees for `principal` doing something on `service` about `ask` at `now_ms`.
#[must_use]
pub fn facts<'a>(
    cfg: &Config,
    principal: &'a str,
    service: &'a Service,
    ask: &Ask<'a>,
    now_ms: i64,
) -> Facts<'a> {
    Facts {
        principal,
        principal_groups: cfg.groups_of(principal),
        service: &service.name,
        environment: &service.environment,
        max_duration_seconds: service.max_duration.as_secs(),
        duration_seconds: ask.duration_s,
        reason: ask.reason,
        ticket: ask.ticket,
        source_ip: ask.source_ip,
        now_ms,
        requester: ask.requester,
        requester_groups: cfg.groups_of(ask.requester),
        approvals: ask.approvals,
    }
}

/// Decides `action` by `principal` on `service` for `ask` at `now_ms`.
#[must_use]
pub fn decide(
    policies: &Policies,
    cfg: &Config,
    action: Action,
    principal: &str,
    service: &Service,
    ask: &Ask<'_>,
    now_ms: i64,
) -> Verdict {
    policies.decide(action, &facts(cfg, principal, service, ask, now_ms))
}

/// What `jit-agent policy explain` is asked about: one request, as the agent would see it.
#[derive(Clone, Debug)]
pub struct Question<'a> {
    /// The duration asked for (before the clamp).
    pub wanted: Duration,
    /// The reason given.
    pub reason: &'a str,
    /// The ticket given.
    pub ticket: &'a str,
    /// The requester's address.
    pub source_ip: Option<IpAddr>,
    /// Who asks for access (the principal of `request`, `auto_approve`, `break_glass`).
    pub requester: &'a str,
    /// Approvals already given (for `approve` and `deny`).
    pub approvals: u32,
}

/// The ask the engine decides `action` on for `q`, as its call sites build it: a new request's
/// actions see [`Ask::at_request`] (break-glass with its own cap); `approve` and `deny` see the
/// stored request ([`Ask::of_request`]) with the approvals given so far; `revoke` sees the grant
/// such a request becomes ([`Ask::of_grant`], while it is active).
#[must_use]
pub fn ask_for<'a>(action: Action, service: &Service, q: &Question<'a>) -> Ask<'a> {
    let source_ip = q.source_ip.map(|ip| ip.to_canonical());
    let duration_s = clamp(service, q.wanted, action == Action::BreakGlass).duration_s;
    match action {
        a if a.is_at_request() => {
            Ask::at_request(duration_s, q.reason, q.ticket, source_ip, q.requester)
        }
        Action::Approve | Action::Deny => Ask {
            approvals: q.approvals,
            ..Ask::at_request(duration_s, q.reason, q.ticket, source_ip, q.requester)
        },
        _ => Ask {
            duration_s,
            reason: "",
            ticket: "",
            source_ip: None,
            requester: q.requester,
            approvals: 0,
        },
    }
}
