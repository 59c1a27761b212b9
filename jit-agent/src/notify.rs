//! Webhook notifications: a new pending request, a decision, a break-glass grant, a revocation.
//! Sent in the background, retried with backoff, never blocking a decision: a notification that
//! cannot be queued (the queue is full) or delivered (all retries failed) is logged and dropped.
//!
//! JSON body (`format = "json"`): the `jit.v1.Notification` message of proto/jit/v1/jit.proto in
//! JSON, whose `request` and `grant` are the API's own `AccessRequest` and `Grant` messages (the
//! same JSON `jitctl ls --json` prints). Event names are [`jit_api::Event`]. Slack format
//! (`format = "slack"`): `{"text": "<one line>"}`.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use jit_api::{Event, NOTIFICATION_SCHEMA, duration::format_duration, pb};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{config::Webhook, model::now_ms};

/// Delivery attempts per notification and webhook.
const ATTEMPTS: usize = 5;
/// First retry delay; doubled each attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Per-attempt timeout.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Notifications waiting for delivery before new ones are dropped.
const QUEUE: usize = 1024;

/// A notification: what happened, who caused it, and the request and grant as the API shows
/// them.
#[derive(Clone, Debug)]
pub struct Notice {
    /// What happened.
    pub event: Event,
    /// Who caused it.
    pub actor: String,
    /// The request.
    pub request: Option<pb::AccessRequest>,
    /// The grant.
    pub grant: Option<pb::Grant>,
}

impl Notice {
    fn service(&self) -> &str {
        self.request
            .as_ref()
            .map(|r| r.service.as_str())
            .or(self.grant.as_ref().map(|g| g.service.as_str()))
            .unwrap_or("")
    }

    /// The `jit.v1.Notification` message.
    #[must_use]
    pub fn message(&self) -> pb::Notification {
        pb::Notification {
            schema: NOTIFICATION_SCHEMA.into(),
            event: self.event.name().into(),
            at_unix_ms: now_ms(),
            actor: self.actor.clone(),
            service: self.service().into(),
            request: self.request.clone(),
            grant: self.grant.clone(),
        }
    }

    /// The JSON body.
    #[must_use]
    pub fn json(&self) -> Value {
        serde_json::to_value(self.message()).unwrap_or(Value::Null)
    }

    /// A Slack-compatible body.
    #[must_use]
    pub fn slack(&self) -> Value {
        let duration =
            |r: &pb::AccessRequest| format_duration(Duration::from_secs(r.duration_seconds));
        let text = match (self.event, &self.request, &self.grant) {
            (Event::RequestPending, Some(r), _) => format!(
                ":hourglass: {} asks for {} on *{}* ({}). `jitctl approve {}`",
                r.requester,
                duration(r),
                r.service,
                if r.reason.is_empty() {
                    "no reason"
                } else {
                    &r.reason
                },
                r.id
            ),
            (Event::GrantBreakGlass, Some(r), _) => format!(
                ":rotating_light: BREAK-GLASS: {} granted itself {} on *{}*: {}",
                r.requester,
                duration(r),
                r.service,
                r.reason
            ),
            (Event::RequestGranted, Some(r), _) => {
                format!(
                    ":white_check_mark: {} was granted *{}* ({})",
                    r.requester, r.service, r.id
                )
            }
            (Event::RequestDenied, Some(r), _) => format!(
                ":no_entry: {}'s request for *{}* was denied by {}",
                r.requester,
                r.service,
                if r.denied_by.is_empty() {
                    "policy"
                } else {
                    &r.denied_by
                }
            ),
            (Event::GrantRevoked, _, Some(g)) => format!(
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

    /// Whether any webhook listens (building a notice is skipped when none does).
    #[must_use]
    pub const fn is_enabled(&self) -> bool {
        self.tx.is_some()
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
                tracing::error!("webhooks disabled: building the HTTP client failed: {e}");
                return Self::disabled();
            }
        };
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                for hook in &hooks {
                    let wants_event = hook.events.is_empty() || hook.events.contains(&n.event);
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
            tracing::warn!("notification dropped: {e}");
        }
    }
}

/// The retry schedule of one delivery: [`ATTEMPTS`] attempts, [`FIRST_BACKOFF`] doubling.
pub(crate) fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_factor(2.0)
        .with_max_times(ATTEMPTS - 1)
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

async fn deliver(client: &reqwest::Client, url: &str, event: Event, body: &Value) {
    let attempt = || async {
        let r = client.post(url).json(body).send().await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(r.status()))
        }
    };
    if let Err(e) = attempt
        .retry(backoff())
        .notify(|e, after| {
            tracing::warn!("webhook {url} failed for {event}: {e}; retrying in {after:?}")
        })
        .await
    {
        tracing::error!("webhook {url}: giving up on {event} after {ATTEMPTS} attempts: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Request, RequestState};

    fn request() -> pb::AccessRequest {
        crate::messages::request_msg(&Request {
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
        })
    }

    #[test]
    fn json_body_follows_the_documented_schema() {
        let n = Notice {
            event: Event::RequestPending,
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
        assert_eq!(v["request"]["state"], "pending");
        assert_eq!(v["request"]["approvals"], json!([]));
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
    fn deliveries_back_off_from_a_quarter_second_doubling() {
        use backon::BackoffBuilder as _;
        let delays: Vec<Duration> = backoff().build().collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000].map(Duration::from_millis),
            "{ATTEMPTS} attempts: the first and four retries"
        );
    }

    #[test]
    fn slack_body_is_one_line_of_text() {
        let mut r = request();
        r.break_glass = true;
        let n = Notice {
            event: Event::GrantBreakGlass,
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
