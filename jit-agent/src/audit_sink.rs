//! The audit log's HTTP sink: POSTs the log's lines to a collector in batches, in order, at least
//! once. A batch is retried with backoff until the collector accepts it (2xx); only then does the
//! sink move on and record its position (`<state_dir>/audit-sink.position`), so after a restart
//! it resumes where the collector last acknowledged. A batch may arrive twice (the agent stopped
//! between the answer and the position); each line carries its `seq`, so collectors deduplicate.
//!
//! Body (`application/json`): `{"schema": "jit.v1.audit.batch", "lines": [{"seq": N, "line":
//! "<the line exactly as written>"}, ...]}`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};
use tokio::sync::broadcast::error::TryRecvError;

use crate::audit::{AuditLine, AuditLog};

/// Where the sink posts, how much at once, and where it keeps its position.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Collector URL.
    pub url: String,
    /// Lines per request at most.
    pub batch_max: usize,
    /// The last seq the collector acknowledged.
    pub position_file: PathBuf,
}

/// Why a delivery failed (retried).
#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

fn load_position(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn save_position(path: &std::path::Path, seq: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{seq}\n"))?;
    std::fs::rename(&tmp, path)
}

/// The retry schedule: from 250 ms, doubling, at most 30 s between attempts, forever.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
}

/// Runs the sink for the life of the process.
pub async fn run(audit: Arc<AuditLog>, opts: SinkOptions) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("audit sink disabled: building the HTTP client failed: {e}");
            return;
        }
    };
    let mut next = load_position(&opts.position_file).map_or(0, |p| p + 1);
    // Subscribed before the files are read: a line is in one or the other.
    let mut live = audit.subscribe();
    let history = |from: u64| {
        let audit = Arc::clone(&audit);
        async move {
            match tokio::task::spawn_blocking(move || audit.history(from)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::error!("audit sink: reading the log: {e}");
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!("audit sink: {e}");
                    Vec::new()
                }
            }
        }
    };
    let mut pending: Vec<AuditLine> = history(next).await;
    loop {
        // Take what was written meanwhile, keeping `pending` contiguous from `next`.
        loop {
            let expected = next + pending.len() as u64;
            match live.try_recv() {
                Ok(l) if l.seq < expected => {}
                Ok(l) if l.seq == expected => pending.push(l),
                Ok(_) | Err(TryRecvError::Lagged(_)) => {
                    pending = history(next).await;
                    break;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        if pending.is_empty() {
            match tokio::time::timeout(Duration::from_secs(1), live.recv()).await {
                Ok(Ok(l)) if l.seq == next => pending.push(l),
                Ok(Ok(l)) if l.seq < next => {}
                Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    pending = history(next).await;
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
                Err(_) => {}
            }
            continue;
        }
        let n = pending.len().min(opts.batch_max);
        let body = serde_json::json!({
            "schema": "jit.v1.audit.batch",
            "lines": pending[..n]
                .iter()
                .map(|l| serde_json::json!({"seq": l.seq, "line": &*l.line}))
                .collect::<Vec<_>>(),
        });
        let attempt = || async {
            let r = client.post(&opts.url).json(&body).send().await?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(SinkError::Status(r.status()))
            }
        };
        // Until the collector takes it: nothing after it is sent first.
        let _ = attempt
            .retry(backoff())
            .notify(|e, after| {
                tracing::warn!(
                    "audit sink {}: {e}; retrying in {after:?} (lines {}..)",
                    opts.url,
                    next
                );
            })
            .await;
        next = pending[n - 1].seq + 1;
        pending.drain(..n);
        if let Err(e) = save_position(&opts.position_file, next - 1) {
            tracing::warn!("audit sink: recording its position: {e}");
        }
    }
}
