//! The gRPC API (`jit.v1.JitGate`): authentication, status codes and conversions. The decisions
//! are the node's; this layer only says who is asking and turns answers into messages.

pub mod accept;
pub mod tls;

use std::{pin::Pin, sync::Arc};

use jit_api::pb::{self, jit_gate_server::JitGate};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request as GrpcRequest, Response, Status};

use self::tls::ReloadingConfig;
use crate::{
    engine::{EngineError, ListQuery, RequestOptions, RevokeTarget},
    identity::{Caller, spiffe_id_from_der},
    messages::request_msg,
    node::{Node, NodeError},
    store::{Record, Store},
};

/// The API service over a node.
pub struct Api<S: Store> {
    node: Arc<Node<S>>,
    /// The TLS trust in force, which a connection made before a reload is held to.
    trust: Option<Arc<ReloadingConfig>>,
}

impl<S: Store> Api<S> {
    /// Serves `node`.
    pub fn new(node: Arc<Node<S>>) -> Self {
        Self { node, trust: None }
    }

    /// Holds every call and stream to `trust` as it is reloaded, not only as it was at the
    /// handshake.
    #[must_use]
    pub fn with_trust(mut self, trust: Arc<ReloadingConfig>) -> Self {
        self.trust = Some(trust);
        self
    }

    /// Who is calling (see [`caller`]), refused when the client chain no longer verifies
    /// against the trust reloaded since its handshake.
    fn caller<T>(&self, req: &GrpcRequest<T>) -> Result<Caller, Status> {
        let who = caller(req)?;
        if let (Some(trust), Some(chain)) = (&self.trust, req.peer_certs())
            && trust.reloaded()
        {
            trust.trusts(&chain).map_err(|e| untrusted(&e))?;
        }
        Ok(who)
    }

    /// What ends a stream the caller of `req` opens: its certificate's expiry, or a reload of
    /// the trust that no longer verifies its chain.
    fn credential<T>(&self, req: &GrpcRequest<T>) -> Credential {
        let chain = req.peer_certs();
        Credential {
            expires: credential_expiry(req),
            reloads: match (&self.trust, &chain) {
                (Some(t), Some(_)) => Some((Arc::clone(t), t.reloads())),
                _ => None,
            },
            chain,
        }
    }
}

/// What a stream's caller gets when its certificate is no longer trusted.
fn untrusted(why: &str) -> Status {
    Status::unauthenticated(format!(
        "your client certificate is no longer trusted by the agent ({why}): its CA was removed \
         or may no longer issue its trust domain; reconnect with a trusted one"
    ))
}

/// The credential a stream was opened with, and what ends it.
struct Credential {
    expires: Option<tokio::time::Instant>,
    chain: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    reloads: Option<(Arc<ReloadingConfig>, tokio::sync::watch::Receiver<u64>)>,
}

impl Credential {
    /// Resolves with the status that ends the stream: at the certificate's expiry, or at the
    /// first reload after which its chain does not verify. Cancel-safe (a reload seen is
    /// checked before this returns).
    async fn ended(&mut self) -> Status {
        let untrusted_after_reload = async {
            let (Some((trust, reloads)), Some(chain)) = (&mut self.reloads, &self.chain) else {
                return std::future::pending().await;
            };
            loop {
                if reloads.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if let Err(e) = trust.trusts(chain) {
                    return untrusted(&e);
                }
            }
        };
        tokio::select! {
            () = expiry(self.expires) => ended_by_expiry(),
            st = untrusted_after_reload => st,
        }
    }

    /// Whether the credential still holds now: not expired, and its chain verified against a
    /// trust reloaded since the last look.
    fn still_valid(&mut self) -> Result<(), Status> {
        if self
            .expires
            .is_some_and(|t| t <= tokio::time::Instant::now())
        {
            return Err(ended_by_expiry());
        }
        if let (Some((trust, reloads)), Some(chain)) = (&mut self.reloads, &self.chain)
            && reloads.has_changed().unwrap_or(false)
        {
            reloads.borrow_and_update();
            trust.trusts(chain).map_err(|e| untrusted(&e))?;
        }
        Ok(())
    }
}

/// When the caller's client certificate stops being valid: a stream it opened ends then
/// ([`ended_by_expiry`]). `None` for the local socket. A certificate the TLS layer accepted but
/// that does not parse here ends its streams at once (fail closed).
fn credential_expiry<T>(req: &GrpcRequest<T>) -> Option<tokio::time::Instant> {
    let certs = req.peer_certs()?;
    let now = tokio::time::Instant::now();
    if certs.is_empty() {
        return Some(now);
    }
    // The chain is as good as its first certificate to expire (an intermediate may go first).
    let mut not_after = i64::MAX;
    for der in certs.iter() {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Some(now);
        };
        not_after = not_after.min(cert.validity().not_after.timestamp());
    }
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let left = u64::try_from(not_after.saturating_sub(unix_now)).unwrap_or(0);
    Some(now + std::time::Duration::from_secs(left))
}

/// Resolves when `at` comes (never for `None`).
async fn expiry(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What a stream's caller gets when its certificate expires.
fn ended_by_expiry() -> Status {
    Status::unauthenticated(
        "your client certificate (or a certificate in its chain) has expired: reconnect with a \
         valid one",
    )
}

/// Who is calling: the SPIFFE ID of the mTLS client certificate, or the user of the Unix socket
/// peer (root only).
fn caller<T>(req: &GrpcRequest<T>) -> Result<Caller, Status> {
    // The handshake checked the certificate once; a connection kept open past its expiry is
    // refused call by call.
    if credential_expiry(req).is_some_and(|t| t <= tokio::time::Instant::now()) {
        return Err(ended_by_expiry());
    }
    if let Some(certs) = req.peer_certs() {
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        return spiffe_id_from_der(leaf)
            .map(Caller::Spiffe)
            .map_err(Status::unauthenticated);
    }
    if let Some(info) = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
    {
        return match info.peer_cred {
            Some(cred) if cred.uid() == 0 => Ok(Caller::Local { uid: 0 }),
            Some(cred) => Err(Status::unauthenticated(format!(
                "the local socket is for root; uid {} is not allowed",
                cred.uid()
            ))),
            None => Err(Status::unauthenticated("unknown local peer")),
        };
    }
    Err(Status::unauthenticated(
        "no client certificate: connect with mTLS and a certificate carrying a SPIFFE ID",
    ))
}

fn status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument { field, message } => {
            Status::invalid_argument(format!("{field}: {message}"))
        }
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::PermissionDenied(m) => Status::permission_denied(m),
        EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
        EngineError::AlreadyExists(m) => Status::already_exists(m),
        EngineError::Aborted(m) => Status::aborted(m),
        EngineError::LimitReached(m) => Status::resource_exhausted(m),
        EngineError::Store(e) => {
            tracing::error!("store failure: {e}");
            Status::unavailable("the agent's store failed; see the agent log")
        }
    }
}

fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::Engine(e) => status(e),
        NodeError::KernelFull(m) => Status::resource_exhausted(m),
        NodeError::Kernel(m) => {
            tracing::error!("kernel write failed: {m}");
            Status::unavailable(m)
        }
        // The revoke is durable; only the kernel lags, and the agent keeps retrying.
        e @ NodeError::KernelDeletePending { .. } => Status::internal(e.to_string()),
        e @ NodeError::AuditUnavailable(_) => {
            tracing::error!("{e}");
            Status::unavailable(
                "the audit log cannot be written: no grant is issued until it can (see the agent log)",
            )
        }
        // The details (paths, OS errors) go to the agent log, not to callers.
        e @ NodeError::KernelRead(_) => {
            tracing::error!("{e}");
            Status::unavailable("reading the kernel gate failed; see the agent log")
        }
    }
}

impl<S: Store> Api<S> {
    /// Runs blocking store work off the async executor.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node<S>) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("worker failed: {e}")))?
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> JitGate for Api<S> {
    async fn request_access(
        &self,
        req: GrpcRequest<pb::RequestAccessRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let who = self.caller(&req)?;
        let peer = req.remote_addr().map(|a| a.ip().to_canonical());
        let m = req.into_inner();
        let r = self
            .blocking(move |n| {
                n.request_access(
                    &who,
                    &m.service,
                    &m.duration,
                    &RequestOptions {
                        reason: &m.reason,
                        ticket: &m.ticket,
                        break_glass: m.break_glass,
                        peer,
                    },
                )
                .map_err(node_status)
            })
            .await?;
        Ok(Response::new(request_msg(&r)))
    }

    async fn approve(
        &self,
        req: GrpcRequest<pb::DecideRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let who = self.caller(&req)?;
        let m = req.into_inner();
        let r = self
            .blocking(move |n| {
                n.approve(&who, &m.request_id, &m.comment)
                    .map_err(node_status)
            })
            .await?;
        Ok(Response::new(request_msg(&r)))
    }

    async fn deny(
        &self,
        req: GrpcRequest<pb::DecideRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let who = self.caller(&req)?;
        let m = req.into_inner();
        let r = self
            .blocking(move |n| n.deny(&who, &m.request_id, &m.comment).map_err(node_status))
            .await?;
        Ok(Response::new(request_msg(&r)))
    }

    async fn revoke(
        &self,
        req: GrpcRequest<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let who = self.caller(&req)?;
        let m = req.into_inner();
        let target = match m.target {
            Some(pb::revoke_request::Target::GrantId(id)) => RevokeTarget::Grant(id),
            Some(pb::revoke_request::Target::Identity(id)) => RevokeTarget::Identity(id),
            Some(pb::revoke_request::Target::Service(s)) => RevokeTarget::Service(s),
            None => {
                return Err(Status::invalid_argument(
                    "target: give a grant_id, an identity or a service",
                ));
            }
        };
        let revoked = self
            .blocking(move |n| n.revoke(&who, &target, &m.reason).map_err(node_status))
            .await?;
        Ok(Response::new(pb::RevokeResponse {
            revoked: revoked.iter().map(|g| self.node.grant_message(g)).collect(),
        }))
    }

    async fn get_request(
        &self,
        req: GrpcRequest<pb::GetRequestRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let who = self.caller(&req)?;
        let id = req.into_inner().id;
        let r = self
            .blocking(move |n| n.get_request(&who, &id).map_err(node_status))
            .await?;
        Ok(Response::new(request_msg(&r)))
    }

    async fn list_requests(
        &self,
        req: GrpcRequest<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let who = self.caller(&req)?;
        let m = req.into_inner();
        let q = ListQuery::new(
            m.pending_only,
            &m.service,
            &m.identity,
            m.page_size,
            &m.page_token,
        )
        .map_err(status)?;
        let page = self
            .blocking(move |n| n.list_requests(&who, &q).map_err(node_status))
            .await?;
        Ok(Response::new(pb::ListRequestsResponse {
            requests: page.items.iter().map(request_msg).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn get_grant(
        &self,
        req: GrpcRequest<pb::GetGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let who = self.caller(&req)?;
        let id = req.into_inner().id;
        let g = self
            .blocking(move |n| {
                n.get_grant(&who, &id)
                    .map(|g| n.grant_view(&g))
                    .map_err(node_status)
            })
            .await?;
        Ok(Response::new(g))
    }

    async fn list_grants(
        &self,
        req: GrpcRequest<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let who = self.caller(&req)?;
        let m = req.into_inner();
        let q = ListQuery::new(
            m.active_only,
            &m.service,
            &m.identity,
            m.page_size,
            &m.page_token,
        )
        .map_err(status)?;
        let page = self
            .blocking(move |n| {
                n.list_grants(&who, &q)
                    .map(|p| {
                        let grants = p.items.iter().map(|g| n.grant_view(g)).collect();
                        (grants, p.next)
                    })
                    .map_err(node_status)
            })
            .await?;
        Ok(Response::new(pb::ListGrantsResponse {
            grants: page.0,
            next_page_token: page.1.unwrap_or_default(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: GrpcRequest<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Subscribed to reloads before the chain is checked: none falls in between.
        let mut cred = self.credential(&req);
        let who = self.caller(&req)?;
        let only = req.into_inner().request_id;
        let node = Arc::clone(&self.node);
        // Subscribe before the snapshot so nothing falls between them.
        let mut changes = node.subscribe();
        let snapshot = {
            let (who, only) = (who.clone(), only.clone());
            self.blocking(move |n| {
                if only.is_empty() {
                    // Every request the caller may see, in one piece.
                    let all = ListQuery {
                        page_size: usize::MAX,
                        ..ListQuery::default()
                    };
                    n.list_requests(&who, &all)
                        .map(|p| p.items)
                        .map_err(node_status)
                } else {
                    n.get_request(&who, &only)
                        .map(|r| vec![r])
                        .map_err(node_status)
                }
            })
            .await?
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for r in snapshot.iter().rev() {
                if let Err(st) = cred.still_valid() {
                    let _ = tx.send(Err(st)).await;
                    return;
                }
                let ev = pb::WatchEvent {
                    request: Some(request_msg(r)),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let received = tokio::select! {
                    biased;
                    st = cred.ended() => {
                        let _ = tx.send(Err(st)).await;
                        return;
                    }
                    c = changes.recv() => c,
                };
                let change = match received {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(
                                "the watch fell behind; list and watch again",
                            )))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                let Record::Request(r) = change.record else {
                    continue;
                };
                if (!only.is_empty() && r.id != only) || !node.may_see_request(&who, &r) {
                    continue;
                }
                let ev = pb::WatchEvent {
                    request: Some(request_msg(&r)),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchAuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditLine, Status>> + Send>>;

    async fn watch_audit(
        &self,
        req: GrpcRequest<pb::WatchAuditRequest>,
    ) -> Result<Response<Self::WatchAuditStream>, Status> {
        // Subscribed to reloads before the chain is checked: none falls in between.
        let mut cred = self.credential(&req);
        let who = self.caller(&req)?;
        if !self.node.may_read_audit(&who) {
            return Err(Status::permission_denied(format!(
                "{} may not read the audit log (root on the local socket, or audit.readers)",
                who.name()
            )));
        }

        let from = req.into_inner().from_seq;
        let audit = Arc::clone(self.node.audit());
        // Subscribed before the files are read: a line is either in the files or in the channel.
        let mut lines = audit.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut next = from;
            let history = |from: u64| {
                let audit = Arc::clone(&audit);
                async move {
                    tokio::task::spawn_blocking(move || audit.history(from))
                        .await
                        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
                        .map_err(|e| {
                            tracing::error!("reading the audit log for a watch: {e}");
                            Status::unavailable("reading the audit log failed; see the agent log")
                        })
                }
            };
            let send = |l: &crate::audit::AuditLine| pb::AuditLine {
                seq: l.seq,
                line: l.line.to_string(),
            };
            let mut backlog = match history(next).await {
                Ok(h) => h,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            loop {
                for l in backlog.drain(..) {
                    if l.seq < next {
                        continue;
                    }
                    // A long backlog is no way around an expired or untrusted certificate.
                    if let Err(st) = cred.still_valid() {
                        let _ = tx.send(Err(st)).await;
                        return;
                    }
                    next = l.seq + 1;
                    if tx.send(Ok(send(&l))).await.is_err() {
                        return;
                    }
                }
                let received = tokio::select! {
                    biased;
                    st = cred.ended() => {
                        let _ = tx.send(Err(st)).await;
                        return;
                    }
                    l = lines.recv() => l,
                };
                match received {
                    Ok(l) if l.seq < next => {}
                    Ok(l) if l.seq == next => backlog.push(l),
                    // Fell behind the channel, or a line is missing from it: the files have it.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        match history(next).await {
                            Ok(h) => backlog = h,
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn who_am_i(
        &self,
        req: GrpcRequest<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = self.caller(&req)?;
        let out = self.blocking(move |n| Ok(n.who_am_i(&who))).await?;
        Ok(Response::new(out))
    }

    async fn status(
        &self,
        req: GrpcRequest<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.caller(&req)?;
        let out = self.blocking(|n| n.status().map_err(node_status)).await?;
        Ok(Response::new(out))
    }
}
