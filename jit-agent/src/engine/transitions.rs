//! The transitions: request, approve, deny, revoke, and the sweep that ends what time has ended.
//! Each one that changes an existing record runs through [`Engine::update`].

use std::net::IpAddr;

use ipnet::IpNet;
use jit_api::duration::parse_duration;

use super::{
    Ask, Engine, EngineError, RequestOptions, RevokeTarget, Step, check_text, clamp, ms, short_id,
};
use crate::{
    config::Service,
    identity::Caller,
    model::{Approval, Grant, GrantState, Request, RequestState, Usage},
    policy::Action,
    store::{GrantLookup, Record, Store, StoreError, Txn, Versioned},
};

/// What a revoke ended.
#[derive(Debug, Default)]
pub struct Revoked {
    /// Grants revoked.
    pub grants: Vec<Grant>,
    /// Pending requests denied (a revoke by identity or service ends them too).
    pub denied: Vec<Request>,
    /// The error that stopped the revoke part way; what it ended before is above (committed,
    /// and to be recorded like any other end).
    pub failed: Option<EngineError>,
}

/// What became of a pending request a revoke ended.
enum Pending {
    Denied(Box<Request>),
    Granted(String),
    Gone,
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

impl<S: Store> Engine<S> {
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
        let duration = clamp(service, wanted, opts.break_glass);
        let ask = Ask::at_request(
            duration.duration_s,
            reason,
            opts.ticket,
            opts.peer,
            requester,
        );
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
        let now = self.now();
        if !granted_now {
            // One caller cannot fill the store (or the approvers' queue) with waiting requests.
            // A soft limit: requests racing each other may pass it together.
            let limit = self.cfg.max_pending_per_identity;
            let waiting = self
                .store
                .open_requests()?
                .iter()
                .filter(|r| r.value.requester == *requester && r.value.is_waiting(now))
                .count();
            if waiting >= limit as usize {
                return Err(EngineError::LimitReached(format!(
                    "{requester} already has {waiting} request(s) waiting for a decision (the \
                     limit is {limit}, agent.max_pending_per_identity); wait for them or let them \
                     expire"
                )));
            }
        }
        let _binding = service.bind_requester_address.then(|| self.binding_lock());
        let extra_sources = self.requester_sources(requester, service, opts.peer)?;
        let mut req = Request {
            id: short_id("req"),
            requester: requester.clone(),
            service: service_name.to_string(),
            duration_s: duration.duration_s,
            clamped: duration.clamped,
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
        let mut grant = None;
        if granted_now {
            let g = self.new_grant(&req, now, extra_sources);
            req.state = RequestState::Granted;
            req.grant_id.clone_from(&g.id);
            grant = Some(g);
        } else if let Some(net) = extra_sources.first() {
            // Remember the address to bind until the request is decided.
            req.peer_address = net.to_string();
        }
        // New ids: both records must not exist yet (revision 0). The grant is written first.
        let txn = match grant {
            Some(g) => Txn::put(Record::Grant(g), 0).and_put(Record::Request(req.clone()), 0),
            None => Txn::put(Record::Request(req.clone()), 0),
        };
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
        if net.prefix_len() != net.max_prefix_len() {
            return Err(EngineError::FailedPrecondition(format!(
                "{net} is not one host address; only single hosts are bound"
            )));
        }
        let now = self.now();
        // Grants bound to this host, through the store's index (a bound source that is not one
        // host opens nothing anywhere, so it holds no address).
        let lookup = GrantLookup::Host {
            addr: net.addr(),
            service: None,
        };
        for g in self.store.open_grants_by(&lookup)? {
            let g = g.value;
            // A grant yet to start holds its address too (kernels hold it already).
            if g.is_unended(now) && g.identity != requester {
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
            // Not enforceable until its audit record is durable (see `mark_issued`).
            issued: false,
            usage: None,
        }
    }

    /// Expires `req` if its TTL has passed. `Some` when it was due: the expired request, or
    /// `None` inside when someone else changed it first (the caller re-reads).
    fn expire_if_due(
        &self,
        req: &Versioned<Request>,
        now: i64,
    ) -> Result<Option<Option<Request>>, EngineError> {
        if req.value.state != RequestState::Pending || now < req.value.pending_until_ms {
            return Ok(None);
        }
        let mut r = req.value.clone();
        r.state = RequestState::Expired;
        match self
            .store
            .commit(Txn::put(Record::Request(r.clone()), req.revision))
        {
            Ok(_) => Ok(Some(Some(r))),
            Err(StoreError::Conflict(_)) => Ok(Some(None)),
            Err(e) => Err(e.into()),
        }
    }

    fn check_pending(&self, req: &Versioned<Request>) -> Result<(), EngineError> {
        let now = self.now();
        if self.expire_if_due(req, now)?.is_some() {
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
                s.word()
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
        // The binding lock (when the grant binds an address) is returned with the request, so it
        // stays held until `update` has committed.
        let (req, _binding) = self.update(
            || format!("request {id}"),
            || {
                let req = self.load_request(id)?;
                self.check_pending(&req)?;
                let service = self.service(&req.value.service)?;
                self.check_may_approve(caller, service, &req.value)?;
                let approver = caller.name();
                if req.value.approvals.iter().any(|a| a.approver == approver) {
                    return Err(EngineError::AlreadyExists(format!(
                        "{approver} has already approved request {id}"
                    )));
                }
                let now = self.now();
                let mut r = req.value.clone();
                r.approvals.push(Approval {
                    approver,
                    comment: comment.to_string(),
                    at_ms: now,
                });
                let mut binding = None;
                let mut grant = None;
                if u32::try_from(r.approvals.len()).unwrap_or(u32::MAX) >= r.approvals_required {
                    binding = service.bind_requester_address.then(|| self.binding_lock());
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
                    let g = self.new_grant(&r, now, extra);
                    r.state = RequestState::Granted;
                    r.grant_id.clone_from(&g.id);
                    grant = Some(g);
                }
                let request = Record::Request(r.clone());
                let txn = match grant {
                    Some(g) => Txn::put(Record::Grant(g), 0).and_put(request, req.revision),
                    None => Txn::put(request, req.revision),
                };
                Ok(Step::Commit(txn, (r, binding)))
            },
        )?;
        Ok(req)
    }

    /// Denies a pending request.
    pub fn deny(&self, caller: &Caller, id: &str, comment: &str) -> Result<Request, EngineError> {
        check_text("comment", comment)?;
        self.update(
            || format!("request {id}"),
            || {
                let req = self.load_request(id)?;
                self.check_pending(&req)?;
                let service = self.service(&req.value.service)?;
                self.check_may_deny(caller, service, &req.value)?;
                let mut r = req.value.clone();
                r.state = RequestState::Denied;
                r.denied_by = caller.name();
                r.denial_reason = comment.to_string();
                Ok(Step::Commit(
                    Txn::put(Record::Request(r.clone()), req.revision),
                    r,
                ))
            },
        )
    }

    /// Revokes grants. One grant by id must exist and be active; by identity or service, every
    /// live grant the caller may revoke is revoked (none is not an error).
    pub fn revoke(
        &self,
        caller: &Caller,
        target: &RevokeTarget,
        reason: &str,
    ) -> Result<Vec<Grant>, EngineError> {
        let ended = self.revoke_all(caller, target, reason)?;
        match ended.failed {
            Some(e) => Err(e),
            None => Ok(ended.grants),
        }
    }

    /// [`Self::revoke`], also returning the pending requests a revoke by identity or service
    /// denied (so they can be recorded and announced). An error before anything changed is
    /// `Err`; one after is [`Revoked::failed`], beside what was ended until then.
    pub fn revoke_all(
        &self,
        caller: &Caller,
        target: &RevokeTarget,
        reason: &str,
    ) -> Result<Revoked, EngineError> {
        check_text("reason", reason)?;
        let mut ended = Revoked::default();
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
                        g.value.state.word()
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
                let again = self
                    .end_pending(&mut ended, caller, |r| r.requester == *who, reason)
                    .and_then(|()| self.matching_active(caller, |g| g.identity == *who));
                match again {
                    Ok(c) => c,
                    Err(e) => {
                        ended.failed = Some(e);
                        return Ok(ended);
                    }
                }
            }
            RevokeTarget::Service(name) => {
                self.service(name)?;
                self.matching_active(caller, |g| g.service == *name)?;
                let again = self
                    .end_pending(&mut ended, caller, |r| r.service == *name, reason)
                    .and_then(|()| self.matching_active(caller, |g| g.service == *name));
                match again {
                    Ok(c) => c,
                    Err(e) => {
                        ended.failed = Some(e);
                        return Ok(ended);
                    }
                }
            }
        };
        for id in candidates {
            match self.revoke_one(caller, &id, reason) {
                Ok(Some(g)) => ended.grants.push(g),
                Ok(None) => {}
                Err(e) => {
                    ended.failed = Some(e);
                    break;
                }
            }
        }
        Ok(ended)
    }

    /// Ends the pending requests matching `pred`, so that an approval racing a revoke cannot
    /// open access a moment after it was taken away: each is denied, or, if an approval won the
    /// race and granted it, its grant is revoked. Adds the requests denied and the grants
    /// revoked that way to `ended` as it goes, so a failure part way loses none of them.
    fn end_pending(
        &self,
        ended: &mut Revoked,
        caller: &Caller,
        pred: impl Fn(&Request) -> bool,
        reason: &str,
    ) -> Result<(), EngineError> {
        let ids: Vec<String> = self
            .store
            .open_requests()?
            .into_iter()
            .filter(|r| {
                r.value.state == RequestState::Pending
                    && pred(&r.value)
                    && self.may_see_request(caller, &r.value)
            })
            .map(|r| r.value.id)
            .collect();
        for id in ids {
            // Denied here, or the grant an approval won the race with.
            let outcome = self.update(
                || format!("request {id}"),
                || {
                    let Some(r) = self.store.request(&id)? else {
                        return Ok(Step::Done(Pending::Gone));
                    };
                    match r.value.state {
                        RequestState::Pending => {
                            let mut nr = r.value.clone();
                            nr.state = RequestState::Denied;
                            nr.denied_by = caller.name();
                            nr.denial_reason = format!("access revoked: {reason}");
                            Ok(Step::Commit(
                                Txn::put(Record::Request(nr.clone()), r.revision),
                                Pending::Denied(Box::new(nr)),
                            ))
                        }
                        RequestState::Granted => Ok(Step::Done(Pending::Granted(r.value.grant_id))),
                        RequestState::Denied
                        | RequestState::Expired
                        | RequestState::Unspecified => Ok(Step::Done(Pending::Gone)),
                    }
                },
            )?;
            match outcome {
                Pending::Denied(r) => ended.denied.push(*r),
                Pending::Granted(grant_id) => {
                    if let Some(g) = self.revoke_one(caller, &grant_id, reason)? {
                        ended.grants.push(g);
                    }
                }
                Pending::Gone => {}
            }
        }
        Ok(())
    }

    fn matching_active(
        &self,
        caller: &Caller,
        pred: impl Fn(&Grant) -> bool,
    ) -> Result<Vec<String>, EngineError> {
        let all: Vec<Grant> = self
            .store
            .open_grants()?
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

    /// Changes grant `id` while it is active: `change` returns the new grant, or `None` to leave
    /// it as it is. Returns the grant as it stands after, or `None` if it is gone or ended.
    fn update_active_grant(
        &self,
        id: &str,
        change: impl Fn(&Grant) -> Option<Grant>,
    ) -> Result<Option<Grant>, EngineError> {
        self.update(
            || format!("grant {id}"),
            || {
                let Some(g) = self.store.grant(id)? else {
                    return Ok(Step::Done(None));
                };
                if g.value.state != GrantState::Active {
                    return Ok(Step::Done(None));
                }
                Ok(match change(&g.value) {
                    None => Step::Done(Some(g.value)),
                    Some(ng) => {
                        Step::Commit(Txn::put(Record::Grant(ng.clone()), g.revision), Some(ng))
                    }
                })
            },
        )
    }

    /// Marks an active grant issued (its audit record is durable), so the kernel may hold it.
    /// `None` if it ended meanwhile.
    pub fn mark_issued(&self, id: &str) -> Result<Option<Grant>, EngineError> {
        self.update_active_grant(id, |g| {
            (!g.issued).then(|| Grant {
                issued: true,
                ..g.clone()
            })
        })
    }

    /// Adds what the kernel counted under one of a grant's entries, which has left the kernel,
    /// to the grant's usage (whatever its state). `false` if there is no such grant.
    pub fn add_usage(&self, id: &str, usage: Usage) -> Result<bool, EngineError> {
        self.update(
            || format!("grant {id}"),
            || {
                let Some(g) = self.store.grant(id)? else {
                    return Ok(Step::Done(false));
                };
                let merged = g.value.usage.map_or(usage, |u| u.merge(usage));
                let ng = Grant {
                    usage: Some(merged),
                    ..g.value.clone()
                };
                Ok(Step::Commit(Txn::put(Record::Grant(ng), g.revision), true))
            },
        )
    }

    /// Revokes one grant if still active; `None` if someone else ended it first.
    fn revoke_one(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<Option<Grant>, EngineError> {
        self.update_active_grant(id, |g| {
            Some(Grant {
                state: GrantState::Revoked,
                revoked_by: caller.name(),
                revoke_reason: reason.to_string(),
                ended_ms: self.now(),
                ..g.clone()
            })
        })
    }

    /// Ends what time has ended: active grants past their expiry, pending requests past their
    /// TTL. Returns what it ended. A record changed by someone else meanwhile is left to the next
    /// sweep.
    pub fn sweep(&self) -> Result<(Vec<Grant>, Vec<Request>), EngineError> {
        let now = self.now();
        let mut grants = Vec::new();
        for g in self.store.open_grants_by(&GrantLookup::DueBy(now))? {
            if g.value.state == GrantState::Active && g.value.expires_ms <= now {
                let mut ng = g.value.clone();
                ng.state = GrantState::Expired;
                ng.ended_ms = now;
                match self
                    .store
                    .commit(Txn::put(Record::Grant(ng.clone()), g.revision))
                {
                    Ok(_) => grants.push(ng),
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut requests = Vec::new();
        for r in self.store.open_requests()? {
            if let Some(Some(expired)) = self.expire_if_due(&r, now)? {
                requests.push(expired);
            }
        }
        Ok((grants, requests))
    }
}
