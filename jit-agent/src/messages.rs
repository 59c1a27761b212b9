//! Records as the API's messages: the one conversion from the agent's records (`model`) to
//! `jit.v1` messages, used by the gRPC API and by the webhook notifications alike.

use jit_api::pb;

use crate::model;

/// Converts a request record to its message.
#[must_use]
pub fn request_msg(r: &model::Request) -> pb::AccessRequest {
    pb::AccessRequest {
        id: r.id.clone(),
        requester: r.requester.clone(),
        service: r.service.clone(),
        duration_seconds: r.duration_s,
        reason: r.reason.clone(),
        state: r.state as i32,
        created_unix_ms: r.created_ms,
        pending_until_unix_ms: r.pending_until_ms,
        approvals: r
            .approvals
            .iter()
            .map(|a| pb::Approval {
                approver: a.approver.clone(),
                comment: a.comment.clone(),
                at_unix_ms: a.at_ms,
            })
            .collect(),
        approvals_required: r.approvals_required,
        denied_by: r.denied_by.clone(),
        denial_reason: r.denial_reason.clone(),
        grant_id: r.grant_id.clone(),
        peer_address: r.peer_address.clone(),
        clamped: r.clamped,
        ticket: r.ticket.clone(),
        break_glass: r.break_glass,
        policies: r.policies.clone(),
    }
}

/// Converts a grant record to its message.
#[must_use]
pub fn grant_msg(g: &model::Grant, static_sources: &[String]) -> pb::Grant {
    pb::Grant {
        id: g.id.clone(),
        request_id: g.request_id.clone(),
        identity: g.identity.clone(),
        service: g.service.clone(),
        not_before_unix_ms: g.not_before_ms,
        expires_unix_ms: g.expires_ms,
        state: g.state as i32,
        revoked_by: g.revoked_by.clone(),
        revoke_reason: g.revoke_reason.clone(),
        ended_unix_ms: g.ended_ms,
        sources: static_sources
            .iter()
            .cloned()
            .chain(g.extra_sources.iter().cloned())
            .collect(),
        break_glass: g.break_glass,
        usage: g.usage.map(|u| usage_msg(&u, false)),
    }
}

/// Converts a grant's usage to its message.
#[must_use]
pub fn usage_msg(u: &model::Usage, live: bool) -> pb::GrantUsage {
    pb::GrantUsage {
        packets: u.packets,
        first_seen_unix_ms: u.first_seen_ms,
        last_seen_unix_ms: u.last_seen_ms,
        live,
    }
}
