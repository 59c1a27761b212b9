//! The gRPC API (`jit.v1.JitGate`): authentication, status codes and conversions. The decisions
//! are the node's; this layer only says who is asking and turns answers into messages.

pub mod tls;

use std::{pin::Pin, sync::Arc};

use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request as GrpcRequest, Response, Status};

use crate::{
    engine::{EngineError, RevokeTarget},
    identity::{Caller, spiffe_id_from_der},
    model::{self, GrantState, RequestState},
    node::{Node, NodeError},
    proto::{self as pb, jit_gate_server::JitGate},
    store::{Record, Store},
};

/// The API service over a node.
pub struct Api<S: Store> {
    node: Arc<Node<S>>,
}

impl<S: Store> Api<S> {
    /// Serves `node`.
    pub fn new(node: Arc<Node<S>>) -> Self {
        Self { node }
    }
}

/// Who is calling: the SPIFFE ID of the mTLS client certificate, or the user of the Unix socket
/// peer (root only).
fn caller<T>(req: &GrpcRequest<T>) -> Result<Caller, Status> {
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
        EngineError::Store(e) => {
            log::error!("store failure: {e}");
            Status::unavailable("the agent's store failed; see the agent log")
        }
    }
}

fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::Engine(e) => status(e),
        NodeError::KernelFull(m) => Status::resource_exhausted(m),
        NodeError::Kernel(m) => {
            log::error!("kernel write failed: {m}");
            Status::unavailable(m)
        }
        // The revoke is durable; only the kernel lags, and the agent keeps retrying.
        e @ NodeError::KernelDeletePending { .. } => Status::internal(e.to_string()),
    }
}

/// Converts a request record to its message.
#[must_use]
pub fn request_msg(r: &model::Request) -> pb::AccessRequest {
    pb::AccessRequest {
        id: r.id.clone(),
        requester: r.requester.clone(),
        service: r.service.clone(),
        duration_seconds: r.duration_s,
        reason: r.reason.clone(),
        state: match r.state {
            RequestState::Pending => pb::RequestState::Pending,
            RequestState::Granted => pb::RequestState::Granted,
            RequestState::Denied => pb::RequestState::Denied,
            RequestState::Expired => pb::RequestState::Expired,
        } as i32,
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
        state: match g.state {
            GrantState::Active => pb::GrantState::Active,
            GrantState::Revoked => pb::GrantState::Revoked,
            GrantState::Expired => pb::GrantState::Expired,
        } as i32,
        revoked_by: g.revoked_by.clone(),
        ended_unix_ms: g.ended_ms,
        sources: static_sources
            .iter()
            .cloned()
            .chain(g.extra_sources.iter().cloned())
            .collect(),
        break_glass: g.break_glass,
    }
}

impl<S: Store> Api<S> {
    fn grant_out(&self, g: &model::Grant) -> pb::Grant {
        let statics: Vec<String> = self
            .node
            .engine
            .config()
            .identities
            .get(&g.identity)
            .map(|v| v.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        grant_msg(g, &statics)
    }

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
        let who = caller(&req)?;
        let peer = req.remote_addr().map(|a| a.ip().to_canonical());
        let m = req.into_inner();
        let r = self
            .blocking(move |n| {
                n.request_access(
                    &who,
                    &m.service,
                    &m.duration,
                    &crate::engine::RequestOptions {
                        reason: &m.reason,
                        ticket: &m.ticket,
                        break_glass: m.break_glass,
                        peer,
                    },
                )
                .map_err(node_status)
            })
            .await?;
        log::info!(
            "request {} by {} for {}: {:?}",
            r.id,
            r.requester,
            r.service,
            r.state
        );
        Ok(Response::new(request_msg(&r)))
    }

    async fn approve(
        &self,
        req: GrpcRequest<pb::DecideRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let who = caller(&req)?;
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
        let who = caller(&req)?;
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
        let who = caller(&req)?;
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
            revoked: revoked.iter().map(|g| self.grant_out(g)).collect(),
        }))
    }

    async fn get_request(
        &self,
        req: GrpcRequest<pb::GetRequestRequest>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().id;
        let r = self
            .blocking(move |n| n.engine.get_request(&who, &id).map_err(status))
            .await?;
        Ok(Response::new(request_msg(&r)))
    }

    async fn list_requests(
        &self,
        req: GrpcRequest<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let who = caller(&req)?;
        let pending = req.into_inner().pending_only;
        let rs = self
            .blocking(move |n| n.engine.list_requests(&who, pending).map_err(status))
            .await?;
        Ok(Response::new(pb::ListRequestsResponse {
            requests: rs.iter().map(request_msg).collect(),
        }))
    }

    async fn get_grant(
        &self,
        req: GrpcRequest<pb::GetGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().id;
        let g = self
            .blocking(move |n| n.engine.get_grant(&who, &id).map_err(status))
            .await?;
        Ok(Response::new(self.grant_out(&g)))
    }

    async fn list_grants(
        &self,
        req: GrpcRequest<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let who = caller(&req)?;
        let active = req.into_inner().active_only;
        let gs = self
            .blocking(move |n| n.engine.list_grants(&who, active).map_err(status))
            .await?;
        Ok(Response::new(pb::ListGrantsResponse {
            grants: gs.iter().map(|g| self.grant_out(g)).collect(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: GrpcRequest<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&req)?;
        let only = req.into_inner().request_id;
        let node = Arc::clone(&self.node);
        // Subscribe before the snapshot so nothing falls between them.
        let mut changes = node.engine.store().subscribe();
        let snapshot = {
            let (who, only) = (who.clone(), only.clone());
            self.blocking(move |n| {
                if only.is_empty() {
                    n.engine.list_requests(&who, false).map_err(status)
                } else {
                    n.engine
                        .get_request(&who, &only)
                        .map(|r| vec![r])
                        .map_err(status)
                }
            })
            .await?
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for r in snapshot.iter().rev() {
                let ev = pb::WatchEvent {
                    request: Some(request_msg(r)),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let change = match changes.recv().await {
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
                if (!only.is_empty() && r.id != only) || !node.engine.may_see_request(&who, &r) {
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

    async fn who_am_i(
        &self,
        req: GrpcRequest<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = caller(&req)?;
        let engine = &self.node.engine;
        let services = &engine.config().services;
        Ok(Response::new(pb::WhoAmIResponse {
            identity: who.name(),
            may_request: services
                .values()
                .filter(|s| engine.may_request(&who, s))
                .map(|s| s.name.clone())
                .collect(),
            may_approve: services
                .values()
                .filter(|s| engine.may_approve(&who, s))
                .map(|s| s.name.clone())
                .collect(),
            may_revoke_any: engine.is_admin(&who)
                || services
                    .values()
                    .all(|s| engine.may_revoke_service(&who, s)),
            may_break_glass: services
                .values()
                .filter(|s| engine.may_break_glass(&who, s))
                .map(|s| s.name.clone())
                .collect(),
            groups: match &who {
                Caller::Spiffe(id) => engine.config().groups_of(id),
                Caller::Local { .. } => Vec::new(),
            },
        }))
    }

    async fn status(
        &self,
        req: GrpcRequest<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        caller(&req)?;
        let out = self
            .blocking(|n| {
                let cfg = n.engine.config();
                let now = model::now_ms();
                let grants = n.engine.store().grants().map_err(|e| status(e.into()))?;
                let requests = n.engine.store().requests().map_err(|e| status(e.into()))?;
                let live: Vec<&model::Grant> = grants
                    .iter()
                    .map(|g| &g.value)
                    .filter(|g| g.is_live(now))
                    .collect();
                let attachments = crate::datapath::attachments(&cfg.pin_dir)
                    .map(|a| {
                        a.iter()
                            .map(|a| format!("{}/{}", a.interface, a.hook))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(pb::StatusResponse {
                    version: env!("CARGO_PKG_VERSION").into(),
                    attachments,
                    services: cfg
                        .services
                        .values()
                        .map(|s| pb::ServiceStatus {
                            name: s.name.clone(),
                            mode: match s.mode {
                                crate::datapath::Mode::Enforce => "enforce".into(),
                                crate::datapath::Mode::Audit => "audit".into(),
                            },
                            destinations: s
                                .destinations
                                .iter()
                                .map(|d| {
                                    format!(
                                        "{}/{}",
                                        std::net::SocketAddr::new(d.addr, d.port),
                                        d.proto
                                    )
                                })
                                .collect(),
                            max_duration_seconds: s.max_duration.as_secs(),
                            approvals_required: s.approvals_required,
                            active_grants: u32::try_from(
                                live.iter().filter(|g| g.service == s.name).count(),
                            )
                            .unwrap_or(u32::MAX),
                        })
                        .collect(),
                    pending_requests: u32::try_from(
                        requests
                            .iter()
                            .filter(|r| {
                                r.value.state == RequestState::Pending
                                    && now < r.value.pending_until_ms
                            })
                            .count(),
                    )
                    .unwrap_or(u32::MAX),
                    active_grants: u32::try_from(live.len()).unwrap_or(u32::MAX),
                    kernel_grants: u32::try_from(n.sync.kernel_grants().map_err(|e| {
                        log::error!("reading the kernel grants: {e}");
                        Status::unavailable(
                            "reading the kernel's grants map failed; see the agent log",
                        )
                    })?)
                    .unwrap_or(u32::MAX),
                    kernel_repairs: n.sync.stats().repairs,
                    kernel_sync_failures: n.sync.stats().failures,
                    corrupt_records: n.engine.store().corrupt_records(),
                })
            })
            .await?;
        Ok(Response::new(out))
    }
}
