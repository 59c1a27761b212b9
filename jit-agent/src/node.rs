//! The node: the state machine plus the kernel sync, joined at the one place where a decision
//! becomes enforcement: "make it durable, then enforce". A grant reaches the kernel only after the
//! store has committed it; if the kernel refuses it (its grants map is full), the grant is revoked
//! again and the caller learns why. Revocation and expiry never depend on this path: the kernel
//! sync applies them from the change stream, and the kernel expires grants by itself.
//!
//! Every decision is on the audit log (`audit.rs`). A grant's `grant.issued` record is durable
//! before the grant reaches the kernel; while the log cannot be written, no grant is issued
//! (unless `audit.on_failure = "continue"`), and revocations and expiries still take effect, their
//! records held until the log is writable again.

use std::{sync::Arc, time::Instant};

use jit_api::{Event, audit::Event as Audited, pb};
use tokio::sync::broadcast;

use crate::{
    audit::AuditLog,
    config::AuditFailure,
    datapath::DatapathError,
    engine::{Engine, EngineError, ListQuery, Page, RequestOptions, RevokeTarget},
    identity::Caller,
    kernel_sync::{EndedEntry, KernelSync, SyncError},
    messages,
    metrics::{NodeMetrics, Snapshot},
    model::{Grant, Request, RequestState},
    notify::{Notice, Notifier},
    store::{Change, GrantLookup, Store},
};

/// Errors of node operations.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Refused by the state machine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The kernel's grants map is full: the grant was recorded, then revoked.
    #[error("the kernel cannot hold more grants ({0}); the grant was revoked again")]
    KernelFull(String),
    /// The kernel write failed otherwise (the grant was revoked again).
    #[error("writing the grant to the kernel failed ({0}); the grant was revoked again")]
    Kernel(String),
    /// Revoked in the store, but deleting the kernel entry failed; reconciliation retries it.
    #[error(
        "grant(s) {grants} are revoked, but deleting the kernel entry failed ({error}); the agent \
         retries the delete until it succeeds"
    )]
    KernelDeletePending {
        /// The revoked grants whose entries are still in the kernel.
        grants: String,
        /// Why the delete failed.
        error: String,
    },
    /// Reading the kernel's state (for status) failed.
    #[error("reading the kernel gate failed: {0}")]
    KernelRead(String),
    /// The audit log cannot be written: no grant is issued until it can (fail closed).
    #[error("the audit log cannot be written ({0}); no grant is issued until it can")]
    AuditUnavailable(String),
}

/// Records one prune transaction may delete.
const PRUNE_BATCH: usize = 500;
/// Prune batches per [`Node::prune`] call; the rest waits for the next call.
const PRUNE_BATCHES: usize = 20;

/// Engine and kernel sync of one node: the one door the API goes through. The API never reads
/// the store, the kernel sync or the datapath itself.
pub struct Node<S: Store> {
    engine: Engine<S>,
    sync: Arc<KernelSync<S>>,
    notifier: Notifier,
    audit: Arc<AuditLog>,
    on_audit_failure: AuditFailure,
    metrics: Arc<NodeMetrics>,
}

impl<S: Store> Node<S> {
    /// A node deciding with `engine`, enforcing through `sync`, recording on `audit`, telling
    /// `notifier`.
    pub fn new(
        engine: Engine<S>,
        sync: Arc<KernelSync<S>>,
        notifier: Notifier,
        audit: Arc<AuditLog>,
    ) -> Self {
        let on_audit_failure = engine.config().audit.on_failure;
        Self {
            engine,
            sync,
            notifier,
            audit,
            on_audit_failure,
            metrics: Arc::new(NodeMetrics::default()),
        }
    }

    /// The latencies the node observes (for the metrics registry).
    #[must_use]
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// What a metrics scrape reads from the node: the store's counts (`None` when it cannot be
    /// read), the kernel sync's and the audit log's records.
    pub fn snapshot(&self) -> Snapshot {
        let counts = self.engine.counts();
        if let Err(e) = &counts {
            tracing::warn!("metrics: reading the store: {e}");
        }
        let (pending, active) = match counts {
            Ok((w, l)) => (Some(w.len() as u64), Some(l.len() as u64)),
            Err(_) => (None, None),
        };
        Snapshot {
            grants_active: active,
            requests_pending: pending,
            sync: self.sync.stats(),
            audit: self.audit.stats(),
            corrupt_records: self.engine.store().corrupt_records().len() as u64,
            service_names: self.sync.service_names(),
        }
    }

    /// Whether the node can do its job, check by check: the gate attached to every configured
    /// interface, the store readable, the audit log writable (the last one writes lines held
    /// from an outage, if any).
    pub fn readiness(&self) -> Vec<(&'static str, Result<(), String>)> {
        let cfg = self.engine.config();
        let gate = crate::datapath::attachments(&cfg.pin_dir)
            .map_err(|e| format!("listing the attachments: {e}"))
            .and_then(|attached| {
                let missing: Vec<&str> = cfg
                    .interfaces
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .filter(|name| {
                        !attached
                            .iter()
                            .any(|a| a.interface == *name && a.link_id.is_some())
                    })
                    .collect();
                if cfg.interfaces.is_empty() {
                    Err("no interface is configured".into())
                } else if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not attached to {}", missing.join(", ")))
                }
            });
        // Unauthenticated clients read these: the details (paths, OS errors) go to the log.
        let store = self
            .engine
            .store()
            .grant("readiness-probe")
            .map(|_| ())
            .map_err(|e| {
                tracing::warn!("readiness: reading the store: {e}");
                "cannot be read (the agent's log says why)".to_string()
            });
        let audit = self.audit.writable().map_err(|e| {
            tracing::warn!("readiness: {e}");
            "cannot be written (the agent's log says why)".to_string()
        });
        vec![("gate", gate), ("store", store), ("audit", audit)]
    }

    /// Records how long a decision took and how it ended.
    fn observe_decision(&self, started: Instant, result: &Result<Request, NodeError>) {
        let outcome = match result {
            Ok(r) => r.state.word(),
            Err(_) => "error",
        };
        self.metrics.observe_decision(outcome, started.elapsed());
    }

    /// Records `event`; a failure is logged (the record is held and written when it can be).
    fn record(&self, event: Audited) {
        if let Err(e) = self.audit.record(event) {
            tracing::error!("audit: {e}");
        }
    }

    /// Refuses to start something that may issue a grant while the log cannot be written.
    fn check_audit(&self) -> Result<(), NodeError> {
        match (self.audit.writable(), self.on_audit_failure) {
            (Err(e), AuditFailure::Refuse) => Err(NodeError::AuditUnavailable(e.to_string())),
            _ => Ok(()),
        }
    }

    /// Asks for access; enforces at once when granted, and tells the webhooks.
    pub fn request_access(
        &self,
        caller: &Caller,
        service: &str,
        duration: &str,
        opts: &RequestOptions<'_>,
    ) -> Result<Request, NodeError> {
        let started = Instant::now();
        let result = self.request_access_now(caller, service, duration, opts);
        self.observe_decision(started, &result);
        result
    }

    fn request_access_now(
        &self,
        caller: &Caller,
        service: &str,
        duration: &str,
        opts: &RequestOptions<'_>,
    ) -> Result<Request, NodeError> {
        self.check_audit()?;
        let req = self
            .engine
            .request_access(caller, service, duration, opts)?;
        self.record(Audited::RequestCreated {
            actor: caller.name(),
            request: messages::request_msg(&req),
        });
        let req = self.enforce(req, caller)?;
        tracing::info!(
            request_id = %req.id,
            grant_id = %req.grant_id,
            requester = %req.requester,
            service = %req.service,
            state = req.state.word(),
            break_glass = req.break_glass,
            "request decided"
        );
        let event = match (req.state, req.break_glass) {
            (RequestState::Pending, _) => Event::RequestPending,
            (RequestState::Granted, true) => Event::GrantBreakGlass,
            _ => Event::RequestGranted,
        };
        self.notify(event, caller, &req);
        Ok(req)
    }

    /// Approves; enforces at once when this approval completes the request.
    pub fn approve(&self, caller: &Caller, id: &str, comment: &str) -> Result<Request, NodeError> {
        self.check_audit()?;
        let req = self.engine.approve(caller, id, comment)?;
        self.record(Audited::RequestApproved {
            actor: caller.name(),
            comment: comment.to_string(),
            request: messages::request_msg(&req),
        });
        let req = self.enforce(req, caller)?;
        tracing::info!(
            request_id = %req.id,
            grant_id = %req.grant_id,
            approver = %caller.name(),
            state = req.state.word(),
            "request approved"
        );
        if req.state == RequestState::Granted {
            let waited = self.engine.now().saturating_sub(req.created_ms);
            self.metrics
                .observe_approval(std::time::Duration::from_millis(
                    u64::try_from(waited).unwrap_or(0),
                ));
            self.notify(Event::RequestGranted, caller, &req);
        }
        Ok(req)
    }

    /// Denies a pending request.
    pub fn deny(&self, caller: &Caller, id: &str, comment: &str) -> Result<Request, NodeError> {
        let req = self.engine.deny(caller, id, comment)?;
        tracing::info!(request_id = %req.id, actor = %caller.name(), "request denied");
        self.record(Audited::RequestDenied {
            actor: caller.name(),
            comment: comment.to_string(),
            request: messages::request_msg(&req),
        });
        self.notify(Event::RequestDenied, caller, &req);
        Ok(req)
    }

    fn notify(&self, event: Event, caller: &Caller, req: &Request) {
        if !self.notifier.is_enabled() {
            return;
        }
        let grant = if req.grant_id.is_empty() {
            None
        } else {
            self.stored_grant(&req.grant_id)
        };
        self.notifier.send(Notice {
            event,
            actor: caller.name(),
            request: Some(messages::request_msg(req)),
            grant: grant.map(|g| self.grant_message(&g)),
        });
    }

    /// A stored grant for a notification; a read failure is logged and leaves the grant out.
    fn stored_grant(&self, id: &str) -> Option<Grant> {
        match self.engine.store().grant(id) {
            Ok(g) => g.map(|g| g.value),
            Err(e) => {
                tracing::error!("reading grant {id} for a notification: {e}");
                None
            }
        }
    }

    /// A stored request for a notification; a read failure is logged and leaves it out.
    fn stored_request(&self, id: &str) -> Option<Request> {
        match self.engine.store().request(id) {
            Ok(r) => r.map(|r| r.value),
            Err(e) => {
                tracing::error!("reading request {id} for a notification: {e}");
                None
            }
        }
    }

    /// A grant as the API shows it: its sources are the identity's static prefixes (identity
    /// grants) and the addresses it binds (host grants).
    #[must_use]
    pub fn grant_message(&self, g: &Grant) -> pb::Grant {
        let statics: Vec<String> = self
            .engine
            .config()
            .identities
            .get(&g.identity)
            .map(|v| v.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        messages::grant_msg(g, &statics)
    }

    /// A grant as the API shows it, with what the kernel has counted under it so far (live
    /// while it is active here). A failed kernel read leaves the usage out (logged).
    pub fn grant_view(&self, g: &Grant) -> pb::Grant {
        let mut msg = self.grant_message(g);
        let live = g.state == crate::model::GrantState::Active && g.issued;
        match self.sync.usage(g) {
            Ok(usage) => msg.usage = usage.map(|u| messages::usage_msg(&u, live)),
            Err(e) => tracing::error!(grant_id = %g.id, "reading the kernel's usage: {e}"),
        }
        msg
    }

    /// Records what the kernel counted under an entry of a grant that left the kernel: on the
    /// audit log (`grant.usage`) and in the grant's stored usage.
    pub fn record_usage(&self, e: &EndedEntry) {
        tracing::info!(
            grant_id = %e.grant_id,
            source = %e.source,
            packets = e.usage.packets,
            "grant entry left the kernel"
        );
        self.record(Audited::GrantUsage {
            grant_id: e.grant_id.clone(),
            source: e.source.clone(),
            packets: e.usage.packets,
            first_seen_unix_ms: e.usage.first_seen_ms,
            last_seen_unix_ms: e.usage.last_seen_ms,
        });
        match self.engine.add_usage(&e.grant_id, e.usage) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(grant_id = %e.grant_id, "usage of a grant not in the store")
            }
            Err(err) => tracing::error!(grant_id = %e.grant_id, "storing a grant's usage: {err}"),
        }
    }

    /// Revokes grants and deletes their kernel entries before returning: `Ok` means the kernel
    /// no longer holds them. When a delete fails the grants stay revoked in the store, the caller
    /// gets [`NodeError::KernelDeletePending`], and reconciliation retries the delete.
    pub fn revoke(
        &self,
        caller: &Caller,
        target: &RevokeTarget,
        reason: &str,
    ) -> Result<Vec<Grant>, NodeError> {
        // What a failure part way had already ended is recorded and enforced like the rest;
        // the failure is returned after.
        let mut ended = self.engine.revoke_all(caller, target, reason)?;
        let failed = ended.failed.take();
        // Pending requests a revoke by identity or service ended: denied, on the record, told.
        for r in &ended.denied {
            tracing::info!(request_id = %r.id, actor = %caller.name(), "request denied by a revoke");
            self.record(Audited::RequestDenied {
                actor: caller.name(),
                comment: r.denial_reason.clone(),
                request: messages::request_msg(r),
            });
            self.notify(Event::RequestDenied, caller, r);
        }
        let revoked = ended.grants;
        // The kernel first: the durable commit is done, and the audit record and the notices
        // must not hold up the first dropped packet.
        let mut pending = Vec::new();
        let mut last_error = String::new();
        for g in &revoked {
            if let Err(e) = self.sync.sync_grant(g) {
                tracing::error!(grant_id = %g.id, "deleting the kernel entry of a revoked grant: {e}");
                pending.push(g.id.clone());
                last_error = e.to_string();
            }
        }
        for g in &revoked {
            tracing::info!(
                grant_id = %g.id,
                request_id = %g.request_id,
                actor = %caller.name(),
                reason,
                "grant revoked"
            );
            self.record(Audited::GrantRevoked {
                actor: caller.name(),
                reason: reason.to_string(),
                grant: self.grant_message(g),
            });
        }
        if self.notifier.is_enabled() {
            for g in &revoked {
                self.notifier.send(Notice {
                    event: Event::GrantRevoked,
                    actor: caller.name(),
                    request: self
                        .stored_request(&g.request_id)
                        .map(|r| messages::request_msg(&r)),
                    grant: Some(self.grant_message(g)),
                });
            }
        }
        if let Some(e) = failed {
            if !pending.is_empty() {
                self.sync.request_reconcile();
            }
            return Err(NodeError::Engine(e));
        }
        if !pending.is_empty() {
            self.sync.request_reconcile();
            return Err(NodeError::KernelDeletePending {
                grants: pending.join(", "),
                error: last_error,
            });
        }
        Ok(revoked)
    }

    /// One request the caller may see.
    pub fn get_request(&self, caller: &Caller, id: &str) -> Result<Request, NodeError> {
        Ok(self.engine.get_request(caller, id)?)
    }

    /// Requests the caller may see, newest first.
    pub fn list_requests(
        &self,
        caller: &Caller,
        q: &ListQuery,
    ) -> Result<Page<Request>, NodeError> {
        Ok(self.engine.list_requests(caller, q)?)
    }

    /// One grant the caller may see.
    pub fn get_grant(&self, caller: &Caller, id: &str) -> Result<Grant, NodeError> {
        Ok(self.engine.get_grant(caller, id)?)
    }

    /// Grants the caller may see, newest first.
    pub fn list_grants(&self, caller: &Caller, q: &ListQuery) -> Result<Page<Grant>, NodeError> {
        Ok(self.engine.list_grants(caller, q)?)
    }

    /// Whether `caller` may see `req` (for the watch stream).
    pub fn may_see_request(&self, caller: &Caller, req: &Request) -> bool {
        self.engine.may_see_request(caller, req)
    }

    /// Every committed change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.engine.store().subscribe()
    }

    /// Ends what time has ended (see [`Engine::sweep`]) and records it; returns how many grants
    /// and requests it ended.
    pub fn sweep(&self) -> Result<(usize, usize), NodeError> {
        let (grants, requests) = self.engine.sweep()?;
        for g in &grants {
            tracing::info!(grant_id = %g.id, request_id = %g.request_id, "grant expired");
            self.record(Audited::GrantExpired {
                grant: self.grant_message(g),
            });
        }
        for r in &requests {
            self.record(Audited::RequestExpired {
                request: messages::request_msg(r),
            });
        }
        Ok((grants.len(), requests.len()))
    }

    /// Prunes closed records older than `retention` (the audit log keeps their history), in
    /// batches of [`PRUNE_BATCH`], at most [`PRUNE_BATCHES`] per call. Returns how many went.
    pub fn prune(&self, retention: std::time::Duration) -> Result<usize, NodeError> {
        let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let before = self.engine.now().saturating_sub(retention);
        let mut pruned = 0;
        for _ in 0..PRUNE_BATCHES {
            let n = self
                .engine
                .store()
                .prune(before, PRUNE_BATCH)
                .map_err(EngineError::from)?;
            pruned += n;
            if n < PRUNE_BATCH {
                break;
            }
        }
        Ok(pruned)
    }

    /// Revokes live grants whose audit record never became durable (an agent stopped between
    /// storing a grant and recording it): they were never enforced and never will be. Only
    /// grants unissued for `older_than` or more: with agents sharing a store, a grant another
    /// agent created a moment ago is about to be issued. Run at start and periodically. Returns
    /// how many.
    pub fn revoke_unissued(&self, older_than: std::time::Duration) -> Result<usize, NodeError> {
        let system = Caller::Local { uid: 0 };
        let now = self.engine.now();
        let older_than = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let unissued: Vec<String> = self
            .engine
            .store()
            .open_grants_by(&GrantLookup::Unissued)
            .map_err(EngineError::from)?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| {
                g.is_live(now) && !g.issued && now.saturating_sub(g.not_before_ms) >= older_than
            })
            .map(|g| g.id)
            .collect();
        let reason =
            "never issued: its audit record was never written (an agent stopped in between)";
        for id in &unissued {
            for g in self
                .engine
                .revoke(&system, &RevokeTarget::Grant(id.clone()), reason)?
            {
                self.record(Audited::GrantRevoked {
                    actor: system.name(),
                    reason: reason.into(),
                    grant: self.grant_message(&g),
                });
            }
        }
        Ok(unissued.len())
    }

    /// Whether `caller` may follow the audit log: root on the local socket, or a configured
    /// reader.
    pub fn may_read_audit(&self, caller: &Caller) -> bool {
        match caller {
            Caller::Local { .. } => self.engine.is_admin(caller),
            Caller::Spiffe(id) => {
                crate::config::matches_any(&self.engine.config().audit.readers, id)
            }
        }
    }

    /// The audit log (for the daemon's start, stop, reload and flush records).
    #[must_use]
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// What `caller` is and may do.
    pub fn who_am_i(&self, caller: &Caller) -> pb::WhoAmIResponse {
        let engine = &self.engine;
        let services = &engine.config().services;
        let names = |allowed: &dyn Fn(&crate::config::Service) -> bool| -> Vec<String> {
            services
                .values()
                .filter(|s| allowed(s))
                .map(|s| s.name.clone())
                .collect()
        };
        pb::WhoAmIResponse {
            identity: caller.name(),
            may_request: names(&|s| engine.may_request(caller, s)),
            may_approve: names(&|s| engine.may_approve(caller, s)),
            may_revoke_any: engine.is_admin(caller)
                || services
                    .values()
                    .all(|s| engine.may_revoke_service(caller, s)),
            may_break_glass: names(&|s| engine.may_break_glass(caller, s)),
            groups: match caller {
                Caller::Spiffe(id) => engine.config().groups_of(id),
                Caller::Local { .. } => Vec::new(),
            },
        }
    }

    /// The node's state: services, counts, the gate's attachments and the kernel sync's record.
    /// A failed read of the kernel is an error, never a zero.
    pub fn status(&self) -> Result<pb::StatusResponse, NodeError> {
        let cfg = self.engine.config();
        let (waiting, live) = self.engine.counts()?;
        let attachments = crate::datapath::attachments(&cfg.pin_dir)
            .map_err(|e| NodeError::KernelRead(format!("listing the attachments: {e}")))?
            .iter()
            .map(|a| format!("{}/{}", a.interface, a.hook))
            .collect();
        let kernel_grants = self
            .sync
            .kernel_grants()
            .map_err(|e| NodeError::KernelRead(format!("reading the grants map: {e}")))?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let stats = self.sync.stats();
        Ok(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            attachments,
            services: cfg
                .services
                .values()
                .map(|s| pb::ServiceStatus {
                    name: s.name.clone(),
                    mode: s.mode.word().into(),
                    destinations: s.destinations.iter().map(ToString::to_string).collect(),
                    max_duration_seconds: s.max_duration.as_secs(),
                    approvals_required: s.approvals_required,
                    active_grants: count(live.iter().filter(|g| g.service == s.name).count()),
                })
                .collect(),
            pending_requests: count(waiting.len()),
            active_grants: count(live.len()),
            kernel_grants: count(kernel_grants),
            kernel_repairs: stats.repairs,
            kernel_sync_failures: stats.failures,
            corrupt_records: self.engine.store().corrupt_records(),
        })
    }

    /// The durable-then-enforce step for a request the store now holds.
    fn enforce(&self, req: Request, caller: &Caller) -> Result<Request, NodeError> {
        if req.state != RequestState::Granted {
            return Ok(req);
        }
        let system = Caller::Local { uid: 0 };
        let grant = match self.engine.store().grant(&req.grant_id) {
            Ok(Some(g)) => g.value,
            Ok(None) => return Ok(req),
            Err(e) => return self.refuse_grant(&req, &system, NodeError::Kernel(e.to_string())),
        };
        // Durable on the audit log before the kernel sees it.
        let issued = Audited::GrantIssued {
            actor: caller.name(),
            grant: self.grant_message(&grant),
            approved_by: req.approvals.iter().map(|a| a.approver.clone()).collect(),
        };
        if let Err(e) = self.audit.record(issued) {
            tracing::error!("audit: {e}");
            if self.on_audit_failure == AuditFailure::Refuse {
                return self.refuse_grant(
                    &req,
                    &system,
                    NodeError::AuditUnavailable(e.to_string()),
                );
            }
        }
        // Only now may the kernel hold it (the kernel sync skips grants not marked issued).
        let grant = match self.engine.mark_issued(&grant.id) {
            Ok(Some(g)) => g,
            // Revoked meanwhile: nothing to enforce.
            Ok(None) => return Ok(req),
            Err(e) => return self.refuse_grant(&req, &system, NodeError::Engine(e)),
        };
        match self.sync.sync_grant(&grant) {
            Ok(()) => {
                tracing::info!(grant_id = %grant.id, request_id = %req.id, "grant enforced");
                self.record(Audited::GrantEnforced {
                    grant_id: grant.id.clone(),
                    result: "written".into(),
                });
                Ok(req)
            }
            Err(e) => {
                self.record(Audited::GrantEnforced {
                    grant_id: grant.id.clone(),
                    result: format!("failed: {e}"),
                });
                let err = if matches!(e, SyncError::Datapath(DatapathError::MapFull { .. })) {
                    NodeError::KernelFull(e.to_string())
                } else {
                    NodeError::Kernel(e.to_string())
                };
                self.refuse_grant(&req, &system, err)
            }
        }
    }

    /// Revokes the grant of `req` again (its issue failed), removes whatever part reached the
    /// kernel, records it, and returns `err`.
    fn refuse_grant(
        &self,
        req: &Request,
        system: &Caller,
        err: NodeError,
    ) -> Result<Request, NodeError> {
        let reason = format!("the grant could not be issued: {err}");
        match self
            .engine
            .revoke(system, &RevokeTarget::Grant(req.grant_id.clone()), &reason)
        {
            Ok(revoked) => {
                for g in &revoked {
                    self.record(Audited::GrantRevoked {
                        actor: system.name(),
                        reason: reason.clone(),
                        grant: self.grant_message(g),
                    });
                    if let Err(de) = self.sync.sync_grant(g) {
                        tracing::error!(grant_id = %g.id, "deleting a partial kernel entry: {de}");
                        self.sync.request_reconcile();
                    }
                }
            }
            Err(re) => tracing::error!(
                grant_id = %req.grant_id,
                request_id = %req.id,
                "revoking a grant after a failure: {re}"
            ),
        }
        Err(err)
    }
}
