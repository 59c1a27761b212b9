//! What a caller may read: requests and grants, filtered by what the caller may see.

use super::{Engine, EngineError};
use crate::{
    identity::Caller,
    model::{Grant, Request},
    store::{Store, Versioned},
};

impl<S: Store> Engine<S> {
    pub(crate) fn load_request(&self, id: &str) -> Result<Versioned<Request>, EngineError> {
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
            .filter(|r| !pending_only || r.is_waiting(now))
            .collect();
        out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// One grant the caller may see.
    pub fn get_grant(&self, caller: &Caller, id: &str) -> Result<Grant, EngineError> {
        self.store
            .grant(id)?
            .map(|g| g.value)
            .filter(|g| self.may_see_grant(caller, g))
            .ok_or_else(|| EngineError::NotFound(format!("no grant with id {id:?}")))
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

    /// Requests still waiting for a decision at `now` (pending, TTL not passed), and grants in
    /// force: the node's counts for its status.
    pub fn counts(&self) -> Result<(Vec<Request>, Vec<Grant>), EngineError> {
        let now = self.now();
        let waiting = self
            .store
            .requests()?
            .into_iter()
            .map(|r| r.value)
            .filter(|r| r.is_waiting(now))
            .collect();
        let live = self
            .store
            .grants()?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| g.is_live(now))
            .collect();
        Ok((waiting, live))
    }
}
