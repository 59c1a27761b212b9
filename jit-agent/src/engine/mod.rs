//! The request and grant state machine. Every transition reads, checks, and commits with a
//! compare on what it read ([`Engine::update`], the one compare-and-retry loop), so concurrent
//! calls (two approvals, an approval racing a revoke, the sweeper racing either) serialise in
//! the store: a revoked grant is never brought back, and no grant exists without the approvals
//! its service requires.
//!
//! - `ask`: the duration clamp and the policy facts (shared with `jit-agent policy explain`);
//! - `permissions`: who may see, request, approve, deny, break the glass and revoke;
//! - `transitions`: request, approve, deny, revoke, sweep;
//! - `queries`: what a caller may read.
//!
//! Ownership: the engine decides transitions; the store keeps them; the kernel sync turns them
//! into map entries after they are durable.

mod ask;
mod permissions;
mod queries;
mod transitions;

use std::{net::IpAddr, sync::Arc, time::Duration};

pub use ask::{Ask, Clamped, Question, ask_for, clamp, decide, facts};
pub use queries::{DEFAULT_PAGE, ListQuery, MAX_PAGE, Page};
pub use transitions::Revoked;

use crate::{
    config::{Config, Service, service_names},
    policy::Policies,
    store::{Store, StoreError, Txn},
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
    /// A per-caller limit is reached.
    #[error("{0}")]
    LimitReached(String),
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

/// One attempt of a transition: commit a transaction (whose compares are on what the attempt
/// read) and answer `T`, or answer `T` with nothing to write.
pub(crate) enum Step<T> {
    /// Commit, then answer.
    Commit(Txn, T),
    /// Nothing to write.
    Done(T),
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

    /// The policies in force.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Now, by the engine's clock (Unix ms).
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The lock that makes "the address is free" and "bind it" one step.
    fn binding_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.binding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides `action` by `principal` on `service` for `ask` now; logs evaluation errors.
    pub fn decide(
        &self,
        action: crate::policy::Action,
        principal: &str,
        service: &Service,
        ask: &Ask<'_>,
    ) -> crate::policy::Verdict {
        let v = decide(
            &self.policies,
            &self.cfg,
            action,
            principal,
            service,
            ask,
            self.now(),
        );
        for e in &v.errors {
            tracing::warn!(
                "policy evaluation error ({} by {principal} on {}): {e}",
                action.name(),
                service.name
            );
        }
        v
    }

    fn service(&self, name: &str) -> Result<&Service, EngineError> {
        self.cfg.services.get(name).ok_or_else(|| {
            EngineError::NotFound(format!(
                "service {name:?} is not configured on this agent (known: {})",
                service_names(&self.cfg)
            ))
        })
    }

    /// The compare-and-retry loop every transition runs through: `attempt` reads what it needs,
    /// checks it, and returns the transaction to commit (comparing on the revisions it read);
    /// when another writer changed a record in between, the commit fails with a conflict and the
    /// attempt runs again on fresh reads, up to [`RETRIES`] times, then gives up with
    /// [`EngineError::Aborted`] naming `what`.
    pub(crate) fn update<T>(
        &self,
        what: impl FnOnce() -> String,
        mut attempt: impl FnMut() -> Result<Step<T>, EngineError>,
    ) -> Result<T, EngineError> {
        for _ in 0..RETRIES {
            match attempt()? {
                Step::Done(out) => return Ok(out),
                Step::Commit(txn, out) => match self.store.commit(txn) {
                    Ok(_) => return Ok(out),
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                },
            }
        }
        Err(EngineError::Aborted(what()))
    }
}

fn short_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &u[..12])
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
