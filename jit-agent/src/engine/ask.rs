//! What a decision is made on: the duration clamp and the policy facts. Built here only, and used
//! by the engine's decisions and by `jit-agent policy explain` alike, so an explanation can never
//! drift from the decision it explains.

use std::{net::IpAddr, time::Duration};

use crate::{
    config::{Config, Service},
    model::Request,
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
