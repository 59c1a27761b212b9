//! The operations listener, plain HTTP on its own address (`agent.metrics_listen`, default
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
//! grant. It is unauthenticated, so it listens on loopback unless configured otherwise.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;

/// The readiness checks: name and result of each.
pub type ReadinessFn = Box<dyn Fn() -> Vec<(&'static str, Result<(), String>)> + Send + Sync>;

#[derive(Clone)]
struct Ops {
    registry: Arc<Registry>,
    ready: Arc<ReadinessFn>,
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
    // Reading kernel maps and the store blocks: off the async workers.
    let encoded = tokio::task::spawn_blocking(move || crate::metrics::encode(&ops.registry)).await;
    match encoded {
        Ok(Ok(text)) if openmetrics => {
            (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text)
        }
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, CLASSIC)],
            crate::metrics::to_classic_text(&text),
        ),
        _ => (
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
    let checks = tokio::task::spawn_blocking(move || (ops.ready)()).await;
    let Ok(checks) = checks else {
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

/// A bound operations listener, not serving yet.
pub struct OpsListener {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl OpsListener {
    /// Binds `addr` (a failure names the setting).
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        ready: ReadinessFn,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("listening for metrics and health on {addr} (agent.metrics_listen)")
        })?;
        let router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Ops {
                registry: Arc::new(registry),
                ready: Arc::new(ready),
            });
        Ok(Self { listener, router })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` resolves.
    pub async fn serve(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(stop)
            .await
    }
}
