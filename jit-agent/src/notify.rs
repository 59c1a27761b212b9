//! Webhook notifications: a new pending request, a decision, a break-glass grant, a revocation.
//! Sent in the background, retried with backoff, never blocking a decision: a notification that
//! cannot be queued (the queue is full) or delivered (all retries failed) is logged and dropped.
//!
//! JSON body (`format = "json"`, schema `jit.v1.notification`, stable):
//! ```json
//! {"schema": "jit.v1.notification", "event": "request.pending", "at_unix_ms": 1700000000000,
//!  "actor": "spiffe://example.org/alice", "service": "payments-db",
//!  "request": {"id": "req-…", "requester": "…", "service": "…", "duration_seconds": 900,
//!              "reason": "…", "ticket": "…", "state": "pending", "approvals": 0,
//!              "approvals_required": 2, "break_glass": false, "grant_id": ""},
//!  "grant": null}
//! ```
//! `grant` (for `request.granted`, `grant.break_glass`, `grant.revoked`): `{"id", "identity",
//! "service", "expires_unix_ms", "state", "break_glass", "revoked_by", "revoke_reason"}`.
//! Slack format (`format = "slack"`): `{"text": "<one line>"}`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    config::Webhook,
    engine::{grant_word, state_word},
    model::{Grant, Request, now_ms},
};

/// Delivery attempts per notification and webhook.
const ATTEMPTS: u32 = 5;
/// First retry delay; doubled each attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Per-attempt timeout.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Notifications waiting for delivery before new ones are dropped.
const QUEUE: usize = 1024;

/// A notification event.
#[derive(Clone, Debug)]
pub struct Notice {
    /// One of [`crate::config::EVENTS`].
    pub event: &'static str,
    /// Who caused it.
    pub actor: String,
    /// The request.
    pub request: Option<Request>,
    /// The grant.
    pub grant: Option<Grant>,
}

impl Notice {
    fn service(&self) -> &str {
        self.request
            .as_ref()
            .map(|r| r.service.as_str())
            .or(self.grant.as_ref().map(|g| g.service.as_str()))
            .unwrap_or("")
    }

    /// The documented JSON body.
    #[must_use]
    pub fn json(&self) -> Value {
        json!({
            "schema": "jit.v1.notification",
            "event": self.event,
            "at_unix_ms": now_ms(),
            "actor": self.actor,
            "service": self.service(),
            "request": self.request.as_ref().map(|r| json!({
                "id": r.id, "requester": r.requester, "service": r.service,
                "duration_seconds": r.duration_s, "reason": r.reason, "ticket": r.ticket,
                "state": state_word(r.state), "approvals": r.approvals.len(),
                "approvals_required": r.approvals_required, "break_glass": r.break_glass,
                "grant_id": r.grant_id,
            })),
            "grant": self.grant.as_ref().map(|g| json!({
                "id": g.id, "identity": g.identity, "service": g.service,
                "expires_unix_ms": g.expires_ms, "state": grant_word(g.state),
                "break_glass": g.break_glass, "revoked_by": g.revoked_by,
                "revoke_reason": g.revoke_reason,
            })),
        })
    }

    /// A Slack-compatible body.
    #[must_use]
    pub fn slack(&self) -> Value {
        let text = match (self.event, &self.request, &self.grant) {
            ("request.pending", Some(r), _) => format!(
                ":hourglass: {} asks for {} on *{}* ({}). `jitctl approve {}`",
                r.requester,
                crate::duration::format_duration(Duration::from_secs(r.duration_s)),
                r.service,
                if r.reason.is_empty() {
                    "no reason"
                } else {
                    &r.reason
                },
                r.id
            ),
            ("grant.break_glass", Some(r), _) => format!(
                ":rotating_light: BREAK-GLASS: {} granted itself {} on *{}*: {}",
                r.requester,
                crate::duration::format_duration(Duration::from_secs(r.duration_s)),
                r.service,
                r.reason
            ),
            ("request.granted", Some(r), _) => {
                format!(
                    ":white_check_mark: {} was granted *{}* ({})",
                    r.requester, r.service, r.id
                )
            }
            ("request.denied", Some(r), _) => format!(
                ":no_entry: {}'s request for *{}* was denied by {}",
                r.requester,
                r.service,
                if r.denied_by.is_empty() {
                    "policy"
                } else {
                    &r.denied_by
                }
            ),
            ("grant.revoked", _, Some(g)) => format!(
                ":lock: {}'s access to *{}* was revoked by {}",
                g.identity, g.service, g.revoked_by
            ),
            (e, ..) => format!("{e} on {}", self.service()),
        };
        json!({ "text": text })
    }
}

/// Queues notices for the webhooks that want them.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Notice>>,
}

impl Notifier {
    /// A notifier that sends nothing.
    #[must_use]
    pub const fn disabled() -> Self {
        Self { tx: None }
    }

    /// Starts the delivery task (on the current tokio runtime).
    #[must_use]
    pub fn start(hooks: Vec<Webhook>) -> Self {
        if hooks.is_empty() {
            return Self::disabled();
        }
        let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
        let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => {
                log::error!("webhooks disabled: building the HTTP client failed: {e}");
                return Self::disabled();
            }
        };
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                for hook in &hooks {
                    let wants_event =
                        hook.events.is_empty() || hook.events.iter().any(|e| e == n.event);
                    let wants_service =
                        hook.services.is_empty() || hook.services.iter().any(|s| s == n.service());
                    if !(wants_event && wants_service) {
                        continue;
                    }
                    let body = if hook.slack { n.slack() } else { n.json() };
                    // Each delivery retries on its own task, so one slow hook delays no other.
                    let (client, url) = (client.clone(), hook.url.clone());
                    let event = n.event;
                    tokio::spawn(async move { deliver(&client, &url, event, &body).await });
                }
            }
        });
        Self { tx: Some(tx) }
    }

    /// Queues a notice; never waits.
    pub fn send(&self, notice: Notice) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(notice)
        {
            log::warn!("notification dropped: {e}");
        }
    }
}

async fn deliver(client: &reqwest::Client, url: &str, event: &str, body: &Value) {
    let mut delay = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match client.post(url).json(body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => log::warn!(
                "webhook {url} answered {} to {event} (attempt {attempt})",
                r.status()
            ),
            Err(e) => log::warn!("webhook {url} failed for {event} (attempt {attempt}): {e}"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    log::error!("webhook {url}: giving up on {event} after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RequestState;

    fn request() -> Request {
        Request {
            id: "req-1".into(),
            requester: "spiffe://ex.org/alice".into(),
            service: "db".into(),
            duration_s: 900,
            clamped: false,
            reason: "INC-1".into(),
            state: RequestState::Pending,
            created_ms: 1,
            pending_until_ms: 2,
            approvals: Vec::new(),
            approvals_required: 2,
            denied_by: String::new(),
            denial_reason: String::new(),
            grant_id: String::new(),
            peer_address: String::new(),
            ticket: "OPS-1".into(),
            break_glass: false,
            policies: Vec::new(),
        }
    }

    #[test]
    fn json_body_follows_the_documented_schema() {
        let n = Notice {
            event: "request.pending",
            actor: "spiffe://ex.org/alice".into(),
            request: Some(request()),
            grant: None,
        };
        let v = n.json();
        assert_eq!(v["schema"], "jit.v1.notification");
        assert_eq!(v["event"], "request.pending");
        assert_eq!(v["service"], "db");
        assert_eq!(v["request"]["approvals_required"], 2);
        assert_eq!(v["request"]["ticket"], "OPS-1");
        assert!(v["grant"].is_null());
        let mut keys: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "actor",
                "at_unix_ms",
                "event",
                "grant",
                "request",
                "schema",
                "service"
            ]
        );
    }

    #[test]
    fn slack_body_is_one_line_of_text() {
        let mut r = request();
        r.break_glass = true;
        let n = Notice {
            event: "grant.break_glass",
            actor: r.requester.clone(),
            request: Some(r),
            grant: None,
        };
        let v = n.slack();
        let text = v["text"].as_str().unwrap_or("");
        assert!(text.contains("BREAK-GLASS") && text.contains("db") && !text.contains('\n'));
        assert_eq!(v.as_object().map(serde_json::Map::len), Some(1));
    }
}
