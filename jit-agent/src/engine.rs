//! The request and grant state machine. Every transition reads, checks, and commits with a
//! compare on what it read, so concurrent calls (two approvals, an approval racing a revoke, the
//! sweeper racing either) serialise in the store: a revoked grant is never brought back, and no
//! grant exists without the approvals its service requires.
//!
//! Ownership: the engine decides transitions; the store keeps them; the kernel sync turns them
//! into map entries after they are durable.

use std::{net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;

use crate::{
    config::{Config, Service, service_names},
    duration::parse_duration,
    identity::Caller,
    model::{Approval, Grant, GrantState, Request, RequestState},
    policy::{Action, Facts, Policies, Verdict},
    store::{Record, RecordKey, Store, StoreError, Txn, Versioned},
};

/// How often a transition is retried after losing a race.
const RETRIES: usize = 8;

/// Why a call was refused. Each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Bad input; names the field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such request, grant or service.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request or grant is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Already done (e.g. the same approver approving twice).
    #[error("{0}")]
    AlreadyExists(String),
    /// Lost too many races in a row.
    #[error("too much contention on {0}; retry")]
    Aborted(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to revoke.
#[derive(Clone, Debug)]
pub enum RevokeTarget {
    /// One grant.
    Grant(String),
    /// Every live grant of an identity.
    Identity(String),
    /// Every live grant for a service.
    Service(String),
}

/// The clock, injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The state machine.
pub struct Engine<S: Store> {
    store: Arc<S>,
    cfg: Arc<Config>,
    policies: Arc<Policies>,
    clock: Clock,
    /// Held from the check that a requester address is free to its commit, so two grants for two
    /// identities can never bind one address between them. (One agent owns the embedded store; a
    /// shared store needs a binding record compared in the transaction instead.)
    binding: std::sync::Mutex<()>,
}

/// What a decision about a request is made on, besides who asks and for which service.
#[derive(Clone, Debug)]
pub struct Ask<'a> {
    /// Duration after clamping, seconds.
    pub duration_s: u64,
    /// Reason.
    pub reason: &'a str,
    /// Ticket.
    pub ticket: &'a str,
    /// Requester address.
    pub source_ip: Option<IpAddr>,
    /// Requester.
    pub requester: &'a str,
    /// Approvals so far.
    pub approvals: u32,
}

impl<'a> Ask<'a> {
    /// The ask behind an existing request.
    #[must_use]
    pub fn of_request(r: &'a Request) -> Self {
        Self {
            duration_s: r.duration_s,
            reason: &r.reason,
            ticket: &r.ticket,
            source_ip: r
                .peer_address
                .split('/')
                .next()
                .and_then(|a| a.parse().ok()),
            requester: &r.requester,
            approvals: u32::try_from(r.approvals.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Options of a request beyond service and duration.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions<'a> {
    /// Reason.
    pub reason: &'a str,
    /// Ticket.
    pub ticket: &'a str,
    /// Break-glass.
    pub break_glass: bool,
    /// Requester address.
    pub peer: Option<IpAddr>,
}

/// Refuses requester addresses that do not name one host on a routed network: link-local
/// addresses (a grant would match that address arriving on any attached link), loopback,
/// unspecified, multicast and broadcast.
fn check_bindable(net: &IpNet) -> Result<(), EngineError> {
    let addr = net.addr();
    let scoped = match addr {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            v6.is_unicast_link_local()
                || v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
        }
    };
    if scoped {
        return Err(EngineError::FailedPrecondition(format!(
            "the requester's address {addr} is not a routable host address (link-local, loopback, \
             multicast or unspecified), so it cannot be bound: connect to the agent from the \
             address the service will see"
        )));
    }
    Ok(())
}

fn short_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &u[..12])
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<S: Store> Engine<S> {
    /// An engine over `store` with `cfg`'s services, deciding with `policies`.
    pub fn new(store: Arc<S>, cfg: Arc<Config>, policies: Arc<Policies>, clock: Clock) -> Self {
        Self {
            store,
            cfg,
            policies,
            clock,
            binding: std::sync::Mutex::new(()),
        }
    }

    /// The lock that makes "the address is free" and "bind it" one step.
    fn binding_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.binding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The policies in force.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Decides `action` by `principal` on `service` for `ask`.
    pub fn decide(
        &self,
        action: Action,
        principal: &str,
        service: &Service,
        ask: &Ask<'_>,
    ) -> Verdict {
        let v = self.policies.decide(
            action,
            &Facts {
                principal,
                principal_groups: self.cfg.groups_of(principal),
                service: &service.name,
                environment: &service.environment,
                max_duration_seconds: service.max_duration.as_secs(),
                duration_seconds: ask.duration_s,
                reason: ask.reason,
                ticket: ask.ticket,
                source_ip: ask.source_ip,
                now_ms: self.now(),
                requester: ask.requester,
                requester_groups: self.cfg.groups_of(ask.requester),
                approvals: ask.approvals,
            },
        );
        for e in &v.errors {
            log::warn!(
                "policy evaluation error ({} by {principal} on {}): {e}",
                action.name(),
                service.name
            );
        }
        v
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn service(&self, name: &str) -> Result<&Service, EngineError> {
        self.cfg.services.get(name).ok_or_else(|| {
            EngineError::NotFound(format!(
                "service {name:?} is not configured on this agent (known: {})",
                service_names(&self.cfg)
            ))
        })
    }

    /// Whether `caller` is the node's administrator (root on the Unix socket): it may revoke
    /// and see everything, whatever the policies say.
    pub fn is_admin(&self, caller: &Caller) -> bool {
        matches!(caller, Caller::Local { uid: 0 })
    }

    /// A representative ask for "may X do Y on S at all" questions (whoami).
    fn probe<'a>(service: &Service, requester: &'a str) -> Ask<'a> {
        Ask {
            duration_s: service.max_duration.as_secs().min(60),
            reason: "(probe)",
            ticket: "",
            source_ip: None,
            requester,
            approvals: 0,
        }
    }

    /// Whether `caller` may (in general) request `service`.
    pub fn may_request(&self, caller: &Caller, service: &Service) -> bool {
        matches!(caller, Caller::Spiffe(id) if self.decide(Action::Request, id, service, &Self::probe(service, id)).allowed)
    }

    /// Whether `caller` may (in general) approve others' requests for `service`.
    pub fn may_approve(&self, caller: &Caller, service: &Service) -> bool {
        let Caller::Spiffe(id) = caller else {
            return false;
        };
        let domain = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        let other = format!("spiffe://{domain}/(another identity)");
        self.decide(Action::Approve, id, service, &Self::probe(service, &other))
            .allowed
    }

    /// Whether `caller` may (in general) break the glass on `service`.
    pub fn may_break_glass(&self, caller: &Caller, service: &Service) -> bool {
        matches!(caller, Caller::Spiffe(id) if self.decide(Action::BreakGlass, id, service, &Self::probe(service, id)).allowed)
    }

    /// Whether `caller` may revoke every grant of `service`.
    pub fn may_revoke_service(&self, caller: &Caller, service: &Service) -> bool {
        match caller {
            Caller::Local { uid } => *uid == 0,
            Caller::Spiffe(id) => {
                self.decide(Action::Revoke, id, service, &Self::probe(service, id))
                    .allowed
            }
        }
    }

    /// Asks for access: refused, granted at once (an `auto_approve` or `break_glass` policy
    /// permits it), or pending until enough approvers approve.
    pub fn request_access(
        &self,
        caller: &Caller,
        service_name: &str,
        duration: &str,
        opts: &RequestOptions<'_>,
    ) -> Result<Request, EngineError> {
        if service_name.is_empty() {
            return Err(EngineError::InvalidArgument {
                field: "service",
                message: "is empty; name a configured service".into(),
            });
        }
        let wanted = parse_duration(duration).map_err(|e| EngineError::InvalidArgument {
            field: "duration",
            message: e.to_string(),
        })?;
        let service = self.service(service_name)?;
        let Caller::Spiffe(requester) = caller else {
            return Err(EngineError::PermissionDenied(
                "the local socket is for administration; request access with a client certificate"
                    .into(),
            ));
        };
        let reason = opts.reason.trim();
        if opts.break_glass && reason.is_empty() {
            return Err(EngineError::InvalidArgument {
                field: "reason",
                message: "break-glass access needs a reason".into(),
            });
        }
        if service.require_reason && reason.is_empty() {
            return Err(EngineError::InvalidArgument {
                field: "reason",
                message: format!("service {service_name:?} requires a reason"),
            });
        }
        check_text("reason", reason)?;
        check_text("ticket", opts.ticket)?;
        let cap = if opts.break_glass {
            service.max_duration.min(service.break_glass_max)
        } else {
            service.max_duration
        };
        let clamped = wanted > cap;
        let duration_s = wanted.min(cap).as_secs().max(1);
        let ask = Ask {
            duration_s,
            reason,
            ticket: opts.ticket,
            source_ip: opts.peer,
            requester,
            approvals: 0,
        };
        let (granted_now, approvals_required, policies) = if opts.break_glass {
            let v = self.decide(Action::BreakGlass, requester, service, &ask);
            if !v.allowed {
                return Err(EngineError::PermissionDenied(format!(
                    "{requester} may not break the glass on {service_name:?}: {}",
                    v.why()
                )));
            }
            (true, 0, v.policies)
        } else {
            let v = self.decide(Action::Request, requester, service, &ask);
            if !v.allowed {
                return Err(EngineError::PermissionDenied(format!(
                    "{requester} may not request access to {service_name:?}: {}",
                    v.why()
                )));
            }
            let auto = self.decide(Action::AutoApprove, requester, service, &ask);
            let required = service
                .approvals_required
                .max(v.approvals.unwrap_or(0))
                .max(1);
            let mut policies = v.policies;
            if auto.allowed {
                policies.extend(auto.policies);
            }
            (
                auto.allowed,
                if auto.allowed { 0 } else { required },
                policies,
            )
        };
        let _binding = service.bind_requester_address.then(|| self.binding_lock());
        let extra_sources = self.requester_sources(requester, service, opts.peer)?;
        let now = self.now();
        let mut req = Request {
            id: short_id("req"),
            requester: requester.clone(),
            service: service_name.to_string(),
            duration_s,
            clamped,
            reason: reason.to_string(),
            state: RequestState::Pending,
            created_ms: now,
            pending_until_ms: now.saturating_add(ms(self.cfg.request_ttl)),
            approvals: Vec::new(),
            approvals_required,
            denied_by: String::new(),
            denial_reason: String::new(),
            grant_id: String::new(),
            peer_address: opts.peer.map(|p| p.to_string()).unwrap_or_default(),
            ticket: opts.ticket.to_string(),
            break_glass: opts.break_glass,
            policies,
        };
        let mut txn = Txn {
            compares: vec![(RecordKey::Request(req.id.clone()), 0)],
            puts: Vec::new(),
        };
        if granted_now {
            let grant = self.new_grant(&req, now, extra_sources);
            txn.compares.push((RecordKey::Grant(grant.id.clone()), 0));
            req.state = RequestState::Granted;
            req.grant_id.clone_from(&grant.id);
            txn.puts.push(Record::Grant(grant));
        } else if let Some(net) = extra_sources.first() {
            // Remember the address to bind until the request is decided.
            req.peer_address = net.to_string();
        }
        txn.puts.push(Record::Request(req.clone()));
        self.store.commit(txn)?;
        Ok(req)
    }

    /// The source prefixes a grant for `requester` adds (its own address when the service binds
    /// it), refusing when the identity would have no source at all or when the address belongs
    /// to someone else.
    fn requester_sources(
        &self,
        requester: &str,
        service: &Service,
        peer: Option<IpAddr>,
    ) -> Result<Vec<IpNet>, EngineError> {
        let static_sources = self.cfg.identities.get(requester).map_or(0, Vec::len);
        if !service.bind_requester_address {
            if static_sources == 0 {
                return Err(EngineError::FailedPrecondition(format!(
                    "{requester} has no source addresses bound (add it under [[identities]]) and \
                     service {:?} does not bind the requester's address: a grant would let nothing through",
                    service.name
                )));
            }
            return Ok(Vec::new());
        }
        let Some(peer) = peer else {
            return Err(EngineError::FailedPrecondition(
                "the requester's address is unknown, so it cannot be bound".into(),
            ));
        };
        let net = IpNet::from(peer.to_canonical());
        check_bindable(&net)?;
        self.check_address_free(requester, &net)?;
        Ok(vec![net])
    }

    /// Refuses to bind `net` (a single host) to `requester` when it lies inside another
    /// identity's static prefix, or when another identity's live grant is bound to it: an
    /// address carries at most one identity's grants. Checked when the request is made and again
    /// when an approval grants it.
    fn check_address_free(&self, requester: &str, net: &IpNet) -> Result<(), EngineError> {
        if let Some((owner, prefix)) = self.cfg.static_owner_of(net.addr())
            && owner != requester
        {
            return Err(EngineError::FailedPrecondition(format!(
                "{} lies in {prefix}, which is bound to {owner}; refusing to bind it to {requester}",
                net.addr()
            )));
        }
        let now = self.now();
        for g in self.store.grants()? {
            let g = g.value;
            if g.is_live(now)
                && g.identity != requester
                && g.extra_sources.iter().any(|s| {
                    s.parse::<IpNet>()
                        .is_ok_and(|b| b.contains(net) || net.contains(&b))
                })
            {
                return Err(EngineError::FailedPrecondition(format!(
                    "{} is bound to {} by grant {}; refusing to bind it to {requester}",
                    net.addr(),
                    g.identity,
                    g.id
                )));
            }
        }
        Ok(())
    }

    fn new_grant(&self, req: &Request, now: i64, extra_sources: Vec<IpNet>) -> Grant {
        Grant {
            id: short_id("grant"),
            request_id: req.id.clone(),
            identity: req.requester.clone(),
            service: req.service.clone(),
            not_before_ms: now,
            expires_ms: now.saturating_add(
                i64::try_from(req.duration_s)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000),
            ),
            state: GrantState::Active,
            revoked_by: String::new(),
            revoke_reason: String::new(),
            ended_ms: 0,
            extra_sources: extra_sources.iter().map(ToString::to_string).collect(),
            break_glass: req.break_glass,
        }
    }

    fn load_request(&self, id: &str) -> Result<Versioned<Request>, EngineError> {
        if id.is_empty() {
            return Err(EngineError::InvalidArgument {
                field: "request_id",
                message: "is empty".into(),
            });
        }
        self.store
            .request(id)?
            .ok_or_else(|| EngineError::NotFound(format!("no request with id {id:?}")))
    }

    /// Expires `req` (read at `revision`) if its TTL has passed; returns whether it did.
    fn expire_if_due(&self, req: &Versioned<Request>, now: i64) -> Result<bool, EngineError> {
        if req.value.state != RequestState::Pending || now < req.value.pending_until_ms {
            return Ok(false);
        }
        let mut r = req.value.clone();
        r.state = RequestState::Expired;
        match self.store.commit(Txn {
            compares: vec![(RecordKey::Request(r.id.clone()), req.revision)],
            puts: vec![Record::Request(r)],
        }) {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn check_pending(&self, req: &Versioned<Request>) -> Result<(), EngineError> {
        let now = self.now();
        if self.expire_if_due(req, now)? {
            return Err(EngineError::FailedPrecondition(format!(
                "request {} expired undecided",
                req.value.id
            )));
        }
        match req.value.state {
            RequestState::Pending => Ok(()),
            s => Err(EngineError::FailedPrecondition(format!(
                "request {} is already {}",
                req.value.id,
                state_word(s)
            ))),
        }
    }

    /// Approves a pending request; grants it once it has enough approvals.
    pub fn approve(
        &self,
        caller: &Caller,
        id: &str,
        comment: &str,
    ) -> Result<Request, EngineError> {
        check_text("comment", comment)?;
        for _ in 0..RETRIES {
            let req = self.load_request(id)?;
            self.check_pending(&req)?;
            let service = self.service(&req.value.service)?;
            let Caller::Spiffe(approver) = caller else {
                return Err(EngineError::PermissionDenied(
                    "approvals need an approver's client certificate, not the local socket".into(),
                ));
            };
            if *approver == req.value.requester {
                return Err(EngineError::PermissionDenied(
                    "a requester can never approve its own request".into(),
                ));
            }
            let v = self.decide(
                Action::Approve,
                approver,
                service,
                &Ask::of_request(&req.value),
            );
            if !v.allowed {
                return Err(EngineError::PermissionDenied(format!(
                    "{approver} may not approve requests for {:?}: {}",
                    service.name,
                    v.why()
                )));
            }
            if req.value.approvals.iter().any(|a| a.approver == *approver) {
                return Err(EngineError::AlreadyExists(format!(
                    "{approver} has already approved request {id}"
                )));
            }
            let now = self.now();
            let mut r = req.value.clone();
            r.approvals.push(Approval {
                approver: approver.clone(),
                comment: comment.to_string(),
                at_ms: now,
            });
            let mut txn = Txn {
                compares: vec![(RecordKey::Request(r.id.clone()), req.revision)],
                puts: Vec::new(),
            };
            if u32::try_from(r.approvals.len()).unwrap_or(u32::MAX) >= r.approvals_required {
                let _binding = service.bind_requester_address.then(|| self.binding_lock());
                let extra: Vec<IpNet> = if service.bind_requester_address {
                    let net = r.peer_address.parse::<IpNet>().map_err(|_| {
                        EngineError::FailedPrecondition(format!(
                            "request {id} has no valid requester address to bind ({:?}); it \
                             cannot be granted",
                            r.peer_address
                        ))
                    })?;
                    // Ownership may have changed while the request waited.
                    check_bindable(&net)?;
                    self.check_address_free(&r.requester, &net)?;
                    vec![net]
                } else {
                    Vec::new()
                };
                let grant = self.new_grant(&r, now, extra);
                r.state = RequestState::Granted;
                r.grant_id.clone_from(&grant.id);
                txn.compares.push((RecordKey::Grant(grant.id.clone()), 0));
                txn.puts.push(Record::Grant(grant));
            }
            txn.puts.push(Record::Request(r.clone()));
            match self.store.commit(txn) {
                Ok(_) => return Ok(r),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Aborted(format!("request {id}")))
    }

    /// Denies a pending request.
    pub fn deny(&self, caller: &Caller, id: &str, comment: &str) -> Result<Request, EngineError> {
        check_text("comment", comment)?;
        for _ in 0..RETRIES {
            let req = self.load_request(id)?;
            self.check_pending(&req)?;
            let service = self.service(&req.value.service)?;
            let allowed = match caller {
                Caller::Spiffe(id) => {
                    let v = self.decide(Action::Deny, id, service, &Ask::of_request(&req.value));
                    if !v.allowed {
                        return Err(EngineError::PermissionDenied(format!(
                            "{id} may not deny requests for {:?}: {}",
                            service.name,
                            v.why()
                        )));
                    }
                    true
                }
                Caller::Local { uid } => *uid == 0,
            };
            if !allowed {
                return Err(EngineError::PermissionDenied(
                    "only root may use the local socket".into(),
                ));
            }
            let mut r = req.value.clone();
            r.state = RequestState::Denied;
            r.denied_by = caller.name();
            r.denial_reason = comment.to_string();
            match self.store.commit(Txn {
                compares: vec![(RecordKey::Request(r.id.clone()), req.revision)],
                puts: vec![Record::Request(r.clone())],
            }) {
                Ok(_) => return Ok(r),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Aborted(format!("request {id}")))
    }

    /// Whether `caller` may revoke `grant`: root on the local socket, the holder itself
    /// (releasing its own access early), and whoever a `revoke` policy permits.
    fn may_revoke(&self, caller: &Caller, grant: &Grant) -> bool {
        match caller {
            Caller::Local { uid } => *uid == 0,
            Caller::Spiffe(id) if *id == grant.identity => true,
            Caller::Spiffe(id) => self.cfg.services.get(&grant.service).is_some_and(|s| {
                let ask = Ask {
                    duration_s: u64::try_from((grant.expires_ms - grant.not_before_ms) / 1000)
                        .unwrap_or(0),
                    reason: &grant.revoke_reason,
                    ticket: "",
                    source_ip: None,
                    requester: &grant.identity,
                    approvals: 0,
                };
                self.decide(Action::Revoke, id, s, &ask).allowed
            }),
        }
    }

    /// Revokes grants. One grant by id must exist and be active; by identity or service, every
    /// live grant the caller may revoke is revoked (none is not an error).
    pub fn revoke(
        &self,
        caller: &Caller,
        target: &RevokeTarget,
        reason: &str,
    ) -> Result<Vec<Grant>, EngineError> {
        check_text("reason", reason)?;
        let mut revoked_by_requests = Vec::new();
        let candidates: Vec<String> = match target {
            RevokeTarget::Grant(id) => {
                if id.is_empty() {
                    return Err(EngineError::InvalidArgument {
                        field: "grant_id",
                        message: "is empty".into(),
                    });
                }
                let g = self
                    .store
                    .grant(id)?
                    .ok_or_else(|| EngineError::NotFound(format!("no grant with id {id:?}")))?;
                if !self.may_revoke(caller, &g.value) {
                    return Err(EngineError::PermissionDenied(format!(
                        "{} may not revoke grant {id}",
                        caller.name()
                    )));
                }
                if g.value.state != GrantState::Active {
                    return Err(EngineError::FailedPrecondition(format!(
                        "grant {id} is already {}",
                        grant_word(g.value.state)
                    )));
                }
                vec![id.clone()]
            }
            RevokeTarget::Identity(who) | RevokeTarget::Service(who) if who.is_empty() => {
                return Err(EngineError::InvalidArgument {
                    field: if matches!(target, RevokeTarget::Identity(_)) {
                        "identity"
                    } else {
                        "service"
                    },
                    message: "is empty".into(),
                });
            }
            // Grants are listed once to check permission, pending requests are ended, then the
            // grants are listed again: an approval that completed in between is caught either
            // as a granted request or as a new active grant.
            RevokeTarget::Identity(who) => {
                self.matching_active(caller, |g| g.identity == *who)?;
                revoked_by_requests = self.end_pending(caller, |r| r.requester == *who, reason)?;
                self.matching_active(caller, |g| g.identity == *who)?
            }
            RevokeTarget::Service(name) => {
                self.service(name)?;
                self.matching_active(caller, |g| g.service == *name)?;
                revoked_by_requests = self.end_pending(caller, |r| r.service == *name, reason)?;
                self.matching_active(caller, |g| g.service == *name)?
            }
        };
        let mut revoked = revoked_by_requests;
        for id in candidates {
            if let Some(g) = self.revoke_one(caller, &id, reason)? {
                revoked.push(g);
            }
        }
        Ok(revoked)
    }

    /// Ends the pending requests matching `pred`, so that an approval racing a revoke cannot
    /// open access a moment after it was taken away: each is denied, or, if an approval won the
    /// race and granted it, its grant is revoked. Returns the grants revoked that way.
    fn end_pending(
        &self,
        caller: &Caller,
        pred: impl Fn(&Request) -> bool,
        reason: &str,
    ) -> Result<Vec<Grant>, EngineError> {
        let mut revoked = Vec::new();
        let ids: Vec<String> = self
            .store
            .requests()?
            .into_iter()
            .filter(|r| {
                r.value.state == RequestState::Pending
                    && pred(&r.value)
                    && self.may_see_request(caller, &r.value)
            })
            .map(|r| r.value.id)
            .collect();
        for id in ids {
            let mut done = false;
            for _ in 0..RETRIES {
                let Some(r) = self.store.request(&id)? else {
                    done = true;
                    break;
                };
                match r.value.state {
                    RequestState::Pending => {
                        let mut nr = r.value.clone();
                        nr.state = RequestState::Denied;
                        nr.denied_by = caller.name();
                        nr.denial_reason = format!("access revoked: {reason}");
                        match self.store.commit(Txn {
                            compares: vec![(RecordKey::Request(id.clone()), r.revision)],
                            puts: vec![Record::Request(nr)],
                        }) {
                            Ok(_) => {
                                done = true;
                                break;
                            }
                            Err(StoreError::Conflict(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    RequestState::Granted => {
                        if let Some(g) = self.revoke_one(caller, &r.value.grant_id, reason)? {
                            revoked.push(g);
                        }
                        done = true;
                        break;
                    }
                    RequestState::Denied | RequestState::Expired => {
                        done = true;
                        break;
                    }
                }
            }
            if !done {
                return Err(EngineError::Aborted(format!("request {id}")));
            }
        }
        Ok(revoked)
    }

    fn matching_active(
        &self,
        caller: &Caller,
        pred: impl Fn(&Grant) -> bool,
    ) -> Result<Vec<String>, EngineError> {
        let all: Vec<Grant> = self
            .store
            .grants()?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| g.state == GrantState::Active && pred(g))
            .collect();
        if let Some(g) = all.iter().find(|g| !self.may_revoke(caller, g)) {
            return Err(EngineError::PermissionDenied(format!(
                "{} may not revoke grant {} ({} on {:?})",
                caller.name(),
                g.id,
                g.identity,
                g.service
            )));
        }
        Ok(all.into_iter().map(|g| g.id).collect())
    }

    /// Revokes one grant if still active; `None` if someone else ended it first.
    fn revoke_one(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<Option<Grant>, EngineError> {
        for _ in 0..RETRIES {
            let Some(g) = self.store.grant(id)? else {
                return Ok(None);
            };
            if g.value.state != GrantState::Active {
                return Ok(None);
            }
            let mut ng = g.value.clone();
            ng.state = GrantState::Revoked;
            ng.revoked_by = caller.name();
            ng.revoke_reason = reason.to_string();
            ng.ended_ms = self.now();
            match self.store.commit(Txn {
                compares: vec![(RecordKey::Grant(id.to_string()), g.revision)],
                puts: vec![Record::Grant(ng.clone())],
            }) {
                Ok(_) => return Ok(Some(ng)),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Aborted(format!("grant {id}")))
    }

    /// Ends what time has ended: active grants past their expiry, pending requests past their
    /// TTL. Returns how many of each it ended.
    pub fn sweep(&self) -> Result<(usize, usize), EngineError> {
        let now = self.now();
        let mut grants = 0;
        for g in self.store.grants()? {
            if g.value.state == GrantState::Active && g.value.expires_ms <= now {
                let mut ng = g.value.clone();
                ng.state = GrantState::Expired;
                ng.ended_ms = now;
                match self.store.commit(Txn {
                    compares: vec![(RecordKey::Grant(ng.id.clone()), g.revision)],
                    puts: vec![Record::Grant(ng)],
                }) {
                    Ok(_) => grants += 1,
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut requests = 0;
        for r in self.store.requests()? {
            if self.expire_if_due(&r, now)? {
                requests += 1;
            }
        }
        Ok((grants, requests))
    }

    /// Whether `caller` may see `req`.
    pub fn may_see_request(&self, caller: &Caller, req: &Request) -> bool {
        let Caller::Spiffe(id) = caller else {
            return self.is_admin(caller);
        };
        if *id == req.requester {
            return true;
        }
        let Some(service) = self.cfg.services.get(&req.service) else {
            return false;
        };
        let ask = Ask::of_request(req);
        [Action::Approve, Action::Deny, Action::Revoke]
            .into_iter()
            .any(|a| self.decide(a, id, service, &ask).allowed)
    }

    /// Whether `caller` may see `grant`.
    pub fn may_see_grant(&self, caller: &Caller, grant: &Grant) -> bool {
        self.may_revoke(caller, grant)
    }

    /// One request the caller may see.
    pub fn get_request(&self, caller: &Caller, id: &str) -> Result<Request, EngineError> {
        let r = self.load_request(id)?.value;
        if !self.may_see_request(caller, &r) {
            return Err(EngineError::NotFound(format!("no request with id {id:?}")));
        }
        Ok(r)
    }

    /// Requests the caller may see, newest first.
    pub fn list_requests(
        &self,
        caller: &Caller,
        pending_only: bool,
    ) -> Result<Vec<Request>, EngineError> {
        let now = self.now();
        let mut out: Vec<Request> = self
            .store
            .requests()?
            .into_iter()
            .map(|r| r.value)
            .filter(|r| self.may_see_request(caller, r))
            .filter(|r| {
                !pending_only || (r.state == RequestState::Pending && now < r.pending_until_ms)
            })
            .collect();
        out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// One grant the caller may see.
    pub fn get_grant(&self, caller: &Caller, id: &str) -> Result<Grant, EngineError> {
        let g = self
            .store
            .grant(id)?
            .map(|g| g.value)
            .filter(|g| self.may_see_grant(caller, g))
            .ok_or_else(|| EngineError::NotFound(format!("no grant with id {id:?}")))?;
        Ok(g)
    }

    /// Grants the caller may see, newest first.
    pub fn list_grants(
        &self,
        caller: &Caller,
        active_only: bool,
    ) -> Result<Vec<Grant>, EngineError> {
        let now = self.now();
        let mut out: Vec<Grant> = self
            .store
            .grants()?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| self.may_see_grant(caller, g))
            .filter(|g| !active_only || g.is_live(now))
            .collect();
        out.sort_by(|a, b| b.not_before_ms.cmp(&a.not_before_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }
}

/// Free text kept with a decision is bounded like a reason.
fn check_text(field: &'static str, text: &str) -> Result<(), EngineError> {
    if text.len() > 1024 {
        return Err(EngineError::InvalidArgument {
            field,
            message: "is longer than 1024 bytes".into(),
        });
    }
    Ok(())
}

/// A request state in words.
#[must_use]
pub const fn state_word(s: RequestState) -> &'static str {
    match s {
        RequestState::Pending => "pending",
        RequestState::Granted => "granted",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
    }
}

/// A grant state in words.
#[must_use]
pub const fn grant_word(s: GrantState) -> &'static str {
    match s {
        GrantState::Active => "active",
        GrantState::Revoked => "revoked",
        GrantState::Expired => "expired",
    }
}
