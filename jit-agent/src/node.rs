//! The node: the state machine plus the kernel sync, joined at the one place where a decision
//! becomes enforcement: "make it durable, then enforce". A grant reaches the kernel only after the
//! store has committed it; if the kernel refuses it (its grants map is full), the grant is revoked
//! again and the caller learns why. Revocation and expiry never depend on this path: the kernel
//! sync applies them from the change stream, and the kernel expires grants by itself.

use std::sync::Arc;

use crate::{
    datapath::DatapathError,
    engine::{Engine, EngineError, RequestOptions, RevokeTarget},
    identity::Caller,
    kernel_sync::{KernelSync, SyncError},
    model::{Grant, Request, RequestState},
    notify::{Notice, Notifier},
    store::Store,
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
}

/// Engine and kernel sync of one node.
pub struct Node<S: Store> {
    /// The state machine.
    pub engine: Engine<S>,
    /// The kernel writer.
    pub sync: Arc<KernelSync<S>>,
    /// Webhooks.
    pub notifier: Notifier,
}

impl<S: Store> Node<S> {
    /// Asks for access; enforces at once when granted, and tells the webhooks.
    pub fn request_access(
        &self,
        caller: &Caller,
        service: &str,
        duration: &str,
        opts: &RequestOptions<'_>,
    ) -> Result<Request, NodeError> {
        let req = self
            .engine
            .request_access(caller, service, duration, opts)?;
        let req = self.enforce(req)?;
        let event = match (req.state, req.break_glass) {
            (RequestState::Pending, _) => "request.pending",
            (RequestState::Granted, true) => "grant.break_glass",
            _ => "request.granted",
        };
        self.notify(event, caller, &req);
        Ok(req)
    }

    /// Approves; enforces at once when this approval completes the request.
    pub fn approve(&self, caller: &Caller, id: &str, comment: &str) -> Result<Request, NodeError> {
        let req = self.engine.approve(caller, id, comment)?;
        let req = self.enforce(req)?;
        if req.state == RequestState::Granted {
            self.notify("request.granted", caller, &req);
        }
        Ok(req)
    }

    /// Denies a pending request.
    pub fn deny(&self, caller: &Caller, id: &str, comment: &str) -> Result<Request, NodeError> {
        let req = self.engine.deny(caller, id, comment)?;
        self.notify("request.denied", caller, &req);
        Ok(req)
    }

    fn notify(&self, event: &'static str, caller: &Caller, req: &Request) {
        let grant = if req.grant_id.is_empty() {
            None
        } else {
            self.engine
                .store()
                .grant(&req.grant_id)
                .ok()
                .flatten()
                .map(|g| g.value)
        };
        self.notifier.send(Notice {
            event,
            actor: caller.name(),
            request: Some(req.clone()),
            grant,
        });
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
        let revoked = self.engine.revoke(caller, target, reason)?;
        let mut pending = Vec::new();
        let mut last_error = String::new();
        for g in &revoked {
            if let Err(e) = self.sync.sync_grant(g) {
                log::error!("deleting the kernel entry of revoked grant {}: {e}", g.id);
                pending.push(g.id.clone());
                last_error = e.to_string();
            }
        }
        for g in &revoked {
            self.notifier.send(Notice {
                event: "grant.revoked",
                actor: caller.name(),
                request: self
                    .engine
                    .store()
                    .request(&g.request_id)
                    .ok()
                    .flatten()
                    .map(|r| r.value),
                grant: Some(g.clone()),
            });
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

    /// The durable-then-enforce step for a request the store now holds.
    fn enforce(&self, req: Request) -> Result<Request, NodeError> {
        if req.state != RequestState::Granted {
            return Ok(req);
        }
        let result = (|| -> Result<(), SyncError> {
            let grant = self.engine.store().grant(&req.grant_id)?.map(|g| g.value);
            if let Some(g) = grant {
                self.sync.sync_grant(&g)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(req),
            Err(e) => {
                let full = matches!(e, SyncError::Datapath(DatapathError::MapFull { .. }));
                let system = Caller::Local { uid: 0 };
                match self.engine.revoke(
                    &system,
                    &RevokeTarget::Grant(req.grant_id.clone()),
                    &format!("kernel refused the grant: {e}"),
                ) {
                    // Remove whatever part of the grant did reach the kernel.
                    Ok(revoked) => {
                        for g in &revoked {
                            if let Err(de) = self.sync.sync_grant(g) {
                                log::error!("deleting the partial kernel entry of {}: {de}", g.id);
                                self.sync.request_reconcile();
                            }
                        }
                    }
                    Err(re) => log::error!(
                        "revoking grant {} after a kernel failure: {re}",
                        req.grant_id
                    ),
                }
                Err(if full {
                    NodeError::KernelFull(e.to_string())
                } else {
                    NodeError::Kernel(e.to_string())
                })
            }
        }
    }
}
