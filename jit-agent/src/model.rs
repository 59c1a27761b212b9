//! The records the agent keeps: requests, grants and their states. Times are Unix milliseconds.

use serde::{Deserialize, Serialize};

/// Where a request or a grant stands: the API's own state types, so every name of a state
/// (stored records, JSON, tables, notifications) comes from one place (jit-api's `states`).
pub use jit_api::{GrantState, RequestState};

/// One approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub approver: String,
    /// Their comment.
    pub comment: String,
    /// When.
    pub at_ms: i64,
}

/// A request for access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Id.
    pub id: String,
    /// Requester identity (SPIFFE ID).
    pub requester: String,
    /// Service name.
    pub service: String,
    /// Duration after clamping, seconds.
    pub duration_s: u64,
    /// Whether the duration was clamped.
    pub clamped: bool,
    /// Reason given.
    pub reason: String,
    /// State.
    pub state: RequestState,
    /// Created at.
    pub created_ms: i64,
    /// A pending request expires at.
    pub pending_until_ms: i64,
    /// Approvals so far, one per approver.
    pub approvals: Vec<Approval>,
    /// Approvals needed.
    pub approvals_required: u32,
    /// Who denied it, empty for policy.
    pub denied_by: String,
    /// Why it was denied.
    pub denial_reason: String,
    /// The grant, once granted.
    pub grant_id: String,
    /// Requester's address as seen by the agent.
    pub peer_address: String,
    /// Ticket named by the requester.
    #[serde(default)]
    pub ticket: String,
    /// A break-glass request: granted by the requester itself under a break_glass policy.
    #[serde(default)]
    pub break_glass: bool,
    /// The policies that decided the request (for `request`, then `auto_approve` or
    /// `break_glass`).
    #[serde(default)]
    pub policies: Vec<String>,
}

/// A grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Id.
    pub id: String,
    /// Request it came from.
    pub request_id: String,
    /// Identity holding it.
    pub identity: String,
    /// Service it opens.
    pub service: String,
    /// Opens at.
    pub not_before_ms: i64,
    /// Closes at.
    pub expires_ms: i64,
    /// State.
    pub state: GrantState,
    /// Who revoked it.
    pub revoked_by: String,
    /// Why.
    pub revoke_reason: String,
    /// When it ended (0 while active).
    pub ended_ms: i64,
    /// The host addresses this grant is bound to (the requester's own address, as `/32` or
    /// `/128`). A grant with any opens its service to those addresses alone (a host grant); one
    /// without opens it to the identity's static prefixes (an identity grant).
    pub extra_sources: Vec<String>,
    /// Granted through break-glass.
    #[serde(default)]
    pub break_glass: bool,
    /// Its `grant.issued` audit record is durable: only then may the kernel hold it. (Grants
    /// stored before the audit log existed count as issued.)
    #[serde(default = "issued_before_audit")]
    pub issued: bool,
    /// What this node's kernel counted under the grant's entries that are gone (added up when
    /// each entry leaves the kernel); `None` until one has.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Packets the kernel allowed under a grant. Times are Unix milliseconds, 0 for never.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Packets allowed.
    pub packets: u64,
    /// The first one.
    pub first_seen_ms: i64,
    /// The last one.
    pub last_seen_ms: i64,
}

impl Usage {
    /// The usage of two entries (or two spells in the kernel) of one grant together.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        let earliest = |a: i64, b: i64| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        Self {
            packets: self.packets.saturating_add(other.packets),
            first_seen_ms: earliest(self.first_seen_ms, other.first_seen_ms),
            last_seen_ms: self.last_seen_ms.max(other.last_seen_ms),
        }
    }
}

const fn issued_before_audit() -> bool {
    true
}

impl Request {
    /// Whether the request still waits for a decision at `now_ms` (pending, TTL not passed).
    #[must_use]
    pub fn is_waiting(&self, now_ms: i64) -> bool {
        self.state == RequestState::Pending && now_ms < self.pending_until_ms
    }
}

impl Grant {
    /// Whether the grant is in force at `now_ms`.
    #[must_use]
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.state == GrantState::Active && self.not_before_ms <= now_ms && now_ms < self.expires_ms
    }

    /// Whether the grant is live or yet to start at `now_ms`: what a kernel holds (it opens the
    /// grant at its start by itself). A node whose clock is behind the approving node's sees
    /// a fresh grant as yet to start, and must still hold it.
    #[must_use]
    pub fn is_unended(&self, now_ms: i64) -> bool {
        self.state == GrantState::Active && now_ms < self.expires_ms
    }
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
