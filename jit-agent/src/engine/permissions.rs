//! Who may do what: see a request or grant, request, approve, deny, break the glass, revoke.
//! Policies decide, with three rules no policy can change: root on the node's Unix socket is the
//! administrator, a requester never decides its own request, and a holder may always release its
//! own grant.

use super::{Ask, Engine, EngineError};
use crate::{
    config::Service,
    identity::Caller,
    model::{Grant, Request},
    policy::Action,
    store::Store,
};

impl<S: Store> Engine<S> {
    /// Whether `caller` is the node's administrator (root on the Unix socket): it may revoke
    /// and see everything, whatever the policies say.
    pub fn is_admin(&self, caller: &Caller) -> bool {
        matches!(caller, Caller::Local { uid: 0 })
    }

    /// Whether `caller` may (in general) request `service`.
    pub fn may_request(&self, caller: &Caller, service: &Service) -> bool {
        matches!(caller, Caller::Spiffe(id) if self.decide(Action::Request, id, service, &Ask::probe(service, id)).allowed)
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
        self.decide(Action::Approve, id, service, &Ask::probe(service, &other))
            .allowed
    }

    /// Whether `caller` may (in general) break the glass on `service`.
    pub fn may_break_glass(&self, caller: &Caller, service: &Service) -> bool {
        matches!(caller, Caller::Spiffe(id) if self.decide(Action::BreakGlass, id, service, &Ask::probe(service, id)).allowed)
    }

    /// Whether `caller` may revoke every grant of `service`.
    pub fn may_revoke_service(&self, caller: &Caller, service: &Service) -> bool {
        match caller {
            Caller::Local { .. } => self.is_admin(caller),
            Caller::Spiffe(id) => {
                self.decide(Action::Revoke, id, service, &Ask::probe(service, id))
                    .allowed
            }
        }
    }

    /// Whether `caller` may revoke `grant`: root on the local socket, the holder itself
    /// (releasing its own access early), and whoever a `revoke` policy permits.
    pub(crate) fn may_revoke(&self, caller: &Caller, grant: &Grant) -> bool {
        match caller {
            Caller::Local { .. } => self.is_admin(caller),
            Caller::Spiffe(id) if *id == grant.identity => true,
            Caller::Spiffe(id) => self.cfg.services.get(&grant.service).is_some_and(|s| {
                self.decide(Action::Revoke, id, s, &Ask::of_grant(grant))
                    .allowed
            }),
        }
    }

    /// Refuses unless `approver` may approve `req` on `service`; never its own request.
    pub(crate) fn check_may_approve(
        &self,
        caller: &Caller,
        service: &Service,
        req: &Request,
    ) -> Result<(), EngineError> {
        let Caller::Spiffe(approver) = caller else {
            return Err(EngineError::PermissionDenied(
                "approvals need an approver's client certificate, not the local socket".into(),
            ));
        };
        if *approver == req.requester {
            return Err(EngineError::PermissionDenied(
                "a requester can never approve its own request".into(),
            ));
        }
        let v = self.decide(Action::Approve, approver, service, &Ask::of_request(req));
        if !v.allowed {
            return Err(EngineError::PermissionDenied(format!(
                "{approver} may not approve requests for {:?}: {}",
                service.name,
                v.why()
            )));
        }
        Ok(())
    }

    /// Refuses unless `caller` may deny `req` on `service` (root on the local socket may).
    pub(crate) fn check_may_deny(
        &self,
        caller: &Caller,
        service: &Service,
        req: &Request,
    ) -> Result<(), EngineError> {
        match caller {
            Caller::Spiffe(id) => {
                let v = self.decide(Action::Deny, id, service, &Ask::of_request(req));
                if v.allowed {
                    Ok(())
                } else {
                    Err(EngineError::PermissionDenied(format!(
                        "{id} may not deny requests for {:?}: {}",
                        service.name,
                        v.why()
                    )))
                }
            }
            Caller::Local { .. } if self.is_admin(caller) => Ok(()),
            Caller::Local { .. } => Err(EngineError::PermissionDenied(
                "only root may use the local socket".into(),
            )),
        }
    }

    /// Whether `caller` may see `req`: its requester, the administrator, and whoever may
    /// approve, deny or revoke it.
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

    /// Whether `caller` may see `grant`: whoever may revoke it.
    pub fn may_see_grant(&self, caller: &Caller, grant: &Grant) -> bool {
        self.may_revoke(caller, grant)
    }
}
