//! The operations listener, plain HTTP/1 on its own address (`agent.metrics_listen`, default
//! `127.0.0.1:9464`), apart from the mTLS API:
//!
//! - `GET /metrics`: the Prometheus exposition (see `metrics.rs`): OpenMetrics text when the
//!   client's `Accept` names `application/openmetrics-text` (Prometheus does), else the classic
//!   text format 0.0.4;
//! - `GET /healthz`: liveness, `200 ok` while the agent's runtime answers. It checks nothing else
//!   on purpose: a restart cures none of what readiness reports, and the pinned links keep
//!   enforcing whether the agent runs or not;
//! - `GET /readyz`: `200` when the gate is attached to every configured interface, the store can
//!   be read and the audit log written; else `503` naming each check that fails.
//!
//! It serves no request state and takes no input beyond the path: nothing here can change a
//! grant. It is unauthenticated, so it listens on loopback unless configured otherwise, and it is
//! built so that no client can make it cost the agent more than a bounded amount: a scrape and a
//! readiness check run at most once per [`REFRESH`] whatever the number of clients (others get
//! the last result), on one blocking thread each; at most [`MAX_CONNECTIONS`] connections are
//! open, headers must arrive within [`HEADER_TIMEOUT`] and a connection lasts at most
//! [`CONNECTION_TIMEOUT`]. Failing to bind is not fatal: the agent gates and serves its API
//! without it, logs the error, and tries again every [`REBIND_EVERY`].

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, Semaphore};

/// The readiness checks' results: name and result of each.
pub type Checks = Vec<(&'static str, Result<(), String>)>;

/// The readiness checks.
pub type ReadinessFn = Box<dyn Fn() -> Checks + Send + Sync>;

/// A scrape or readiness result is reused for this long.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Open connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon binding is tried again after it failed.
pub const REBIND_EVERY: Duration = Duration::from_secs(5);

/// A result computed at most once per [`REFRESH`].
struct Cached<T> {
    last: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone + Send + 'static> Cached<T> {
    fn new() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }

    /// The last result if it is fresh, else `compute` run once on a blocking thread (callers
    /// arriving meanwhile wait for it, on the async lock, not on threads).
    async fn get(&self, compute: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let mut last = self.last.lock().await;
        if let Some((at, v)) = last.as_ref()
            && at.elapsed() < REFRESH
        {
            return Some(v.clone());
        }
        let v = tokio::task::spawn_blocking(compute).await.ok()?;
        *last = Some((Instant::now(), v.clone()));
        Some(v)
    }
}

#[derive(Clone)]
struct Ops {
    registry: Arc<Registry>,
    ready: Arc<ReadinessFn>,
    scrape: Arc<Cached<Option<String>>>,
    readiness: Arc<Cached<Checks>>,
}

/// The OpenMetrics content type prometheus-client's text encoder writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format.
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics when the client asks for it (Prometheus does), else the classic text format.
async fn metrics(State(ops): State<Ops>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let registry = Arc::clone(&ops.registry);
    let encoded = ops
        .scrape
        .get(move || crate::metrics::encode(&registry).ok())
        .await
        .flatten();
    match encoded {
        Some(text) if openmetrics => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text),
        Some(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, CLASSIC)],
            crate::metrics::to_classic_text(&text),
        ),
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding the metrics failed\n".to_string(),
        ),
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    let ready = Arc::clone(&ops.ready);
    let Some(checks) = ops.readiness.get(move || (ready)()).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready\nreadiness checks failed to run\n".to_string(),
        );
    };
    let mut body = String::new();
    let mut ready = true;
    for (name, result) in &checks {
        match result {
            Ok(()) => body.push_str(&format!("{name}: ok\n")),
            Err(e) => {
                ready = false;
                body.push_str(&format!("{name}: {e}\n"));
            }
        }
    }
    if ready {
        (StatusCode::OK, format!("ready\n{body}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{body}"),
        )
    }
}

/// The router of the three endpoints.
fn router(registry: Registry, ready: ReadinessFn) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Ops {
            registry: Arc::new(registry),
            ready: Arc::new(ready),
            scrape: Arc::new(Cached::new()),
            readiness: Arc::new(Cached::new()),
        })
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Binds `addr` (again every [`REBIND_EVERY`] until it works) and serves the endpoints until
/// `stop` is set.
pub async fn run(
    addr: SocketAddr,
    registry: Registry,
    ready: ReadinessFn,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let router = router(registry, ready);
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(
                    "metrics and health: listening on {addr} (agent.metrics_listen) failed: {e}; \
                     trying again in {REBIND_EVERY:?}"
                );
                tokio::select! {
                    () = tokio::time::sleep(REBIND_EVERY) => {}
                    () = stopped(&mut stop) => return,
                }
            }
        }
    };
    tracing::info!(
        "metrics and health on http://{} (/metrics, /healthz, /readyz)",
        listener.local_addr().unwrap_or(addr)
    );
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (sock, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics and health: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(
                "metrics and health: {MAX_CONNECTIONS} connections open; closing {peer}"
            );
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = http.serve_connection(TokioIo::new(sock), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}
