//! Durable state behind one trait with two backends: every state transition is a transaction
//! that compares revisions and then writes, and every committed write is published on a change
//! stream. The embedded backend is redb (one node); the shared one is etcd (many nodes: etcd
//! transactions on mod revisions, and a watch as the change stream). Both pass one contract
//! test suite (`tests/tests/store_contract.rs`).
//!
//! Ownership: the store keeps records; it never writes kernel maps and never evaluates policy.

mod etcd_store;
mod redb_store;

pub use etcd_store::{EtcdOptions, EtcdStore};
pub use redb_store::RedbStore;
use std::net::IpAddr;

use tokio::sync::broadcast;

use crate::model::{Grant, Request};

/// A record and its revision (the store-wide revision of its last write).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// Revision of its last write; never 0.
    pub revision: u64,
}

/// Any record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A request.
    Request(Request),
    /// A grant.
    Grant(Grant),
}

/// The key of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordKey {
    /// A request id.
    Request(String),
    /// A grant id.
    Grant(String),
}

/// A committed write, as the change stream carries it.
#[derive(Clone, Debug)]
pub struct Change {
    /// Revision of the commit.
    pub revision: u64,
    /// The record as written.
    pub record: Record,
}

/// Compare-then-write: every compare must hold or nothing is written.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    /// Keys with the revision they must still have; 0 means "must not exist".
    pub compares: Vec<(RecordKey, u64)>,
    /// Records to write.
    pub puts: Vec<Record>,
}

impl Record {
    /// Whether the record is open: a request waiting for a decision, or a grant not ended (in
    /// force, or not yet started). The stores index open records, so what the agent does on
    /// every request and every sweep costs what is open, never the history.
    #[must_use]
    pub fn is_open(&self) -> bool {
        match self {
            Self::Request(r) => r.state == crate::model::RequestState::Pending,
            Self::Grant(g) => g.state == crate::model::GrantState::Active,
        }
    }

    /// Where a closed record sits in the index by closing time, the time its retention counts
    /// from: a grant's end (its expiry if it has no end time), the creation of a request that
    /// never got a grant. `None` while open, and for a request with a grant: it is pruned with
    /// its grant.
    #[must_use]
    pub fn prune_at_ms(&self) -> Option<i64> {
        if self.is_open() {
            return None;
        }
        match self {
            Self::Request(r) if r.grant_id.is_empty() => Some(r.created_ms),
            Self::Request(_) => None,
            Self::Grant(g) if g.ended_ms > 0 => Some(g.ended_ms),
            Self::Grant(g) => Some(g.expires_ms),
        }
    }

    /// The record's key.
    #[must_use]
    pub fn key(&self) -> RecordKey {
        match self {
            Self::Request(r) => RecordKey::Request(r.id.clone()),
            Self::Grant(g) => RecordKey::Grant(g.id.clone()),
        }
    }
}

impl Txn {
    /// Writes `record` if it still has `revision` (0: if it does not exist yet).
    #[must_use]
    pub fn put(record: Record, revision: u64) -> Self {
        Self {
            compares: vec![(record.key(), revision)],
            puts: vec![record],
        }
    }

    /// Also writes `record` if it still has `revision` (0: if it does not exist yet).
    #[must_use]
    pub fn and_put(mut self, record: Record, revision: u64) -> Self {
        self.compares.push((record.key(), revision));
        self.puts.push(record);
        self
    }
}

/// Kinds of numeric ids the kernel needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// Service ids (below `jit_common::MAX_SERVICES`).
    Service,
    /// Identity ids (from 1).
    Identity,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare failed: someone else changed the record first. Re-read and retry.
    #[error("conflict on {0:?}: it changed since it was read")]
    Conflict(RecordKey),
    /// The id space is used up.
    #[error("no {0:?} ids left")]
    IdsExhausted(IdKind),
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
    /// The backend did not answer in time (down, or without quorum). A read may be made again;
    /// a commit may or may not have landed (read the record again before deciding).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// How many index entries a prune may look at per record it may delete (stale entries and
/// undecodable records are passed over); a pass stays bounded.
const PRUNE_LOOKAHEAD: usize = 4;

/// The key of a closed record in the index by closing time: ordered by time as text.
fn closed_key(at_ms: i64, key: &RecordKey) -> String {
    let at = u64::try_from(at_ms).unwrap_or(0);
    match key {
        RecordKey::Request(id) => format!("{at:020}/requests/{id}"),
        RecordKey::Grant(id) => format!("{at:020}/grants/{id}"),
    }
}

/// The first key of the index by closing time at or after `at_ms` (prune's end, exclusive).
fn closed_bound(at_ms: i64) -> String {
    format!("{:020}/", u64::try_from(at_ms).unwrap_or(0))
}

/// The record key of a closing-time index key.
fn closed_record(index_key: &str) -> Option<RecordKey> {
    let (_, rest) = index_key.split_once('/')?;
    if let Some(id) = rest.strip_prefix("requests/") {
        return Some(RecordKey::Request(id.to_string()));
    }
    rest.strip_prefix("grants/")
        .map(|id| RecordKey::Grant(id.to_string()))
}

/// Whether a record found through the index by closing time may go: it is closed and its
/// retention started before `before_ms`.
fn prunable(record: &Record, before_ms: i64) -> bool {
    record.prune_at_ms().is_some_and(|at| at < before_ms)
}

/// Records an undecodable record's name in a backend's set; whether it is new.
fn note_corrupt(
    corrupt: &std::sync::Mutex<std::collections::BTreeSet<String>>,
    name: &str,
) -> bool {
    corrupt
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(name.to_string())
}

/// Reports an undecodable record a listing skips: in the backend's set, and logged once. One bad
/// record never hides the others.
fn report_corrupt(
    corrupt: &std::sync::Mutex<std::collections::BTreeSet<String>>,
    name: &str,
    why: &dyn std::fmt::Display,
) {
    if note_corrupt(corrupt, name) {
        tracing::error!("store record {name} cannot be decoded and is skipped: {why}");
    }
}

/// The keys in a backend's set of undecodable records, in order (for [`Store::corrupt_records`]).
fn listed(corrupt: &std::sync::Mutex<std::collections::BTreeSet<String>>) -> Vec<String> {
    corrupt
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .cloned()
        .collect()
}

/// A lookup in the index of open grants by what a grant opens and when it ends: what the
/// agent does per request, per change and per sweep costs what matches, never every open grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantLookup {
    /// Grants of `service` that open it to `identity`'s static prefixes (no bound host): the
    /// grants behind one identity key of the kernel.
    Identity {
        /// The service.
        service: String,
        /// The identity.
        identity: String,
    },
    /// Grants bound to the host `addr` (an IPv4-mapped IPv6 address is its IPv4 one), of
    /// `service` (the grants behind one host key of the kernel) or of any service.
    Host {
        /// The host.
        addr: IpAddr,
        /// The service, or `None` for every service.
        service: Option<String>,
    },
    /// Grants whose expiry is at or before this time (Unix ms): due to end.
    DueBy(i64),
    /// Grants whose `grant.issued` audit record is not durable yet.
    Unissued,
}

impl GrantLookup {
    /// Whether `g` answers the lookup (the record decides; the index only finds it). Open or
    /// not is checked apart.
    #[must_use]
    pub fn matches(&self, g: &Grant) -> bool {
        match self {
            Self::Identity { service, identity } => {
                g.extra_sources.is_empty() && g.service == *service && g.identity == *identity
            }
            Self::Host { addr, service } => {
                service.as_ref().is_none_or(|s| *s == g.service)
                    && g.extra_sources
                        .iter()
                        .any(|src| bound_host(src).is_some_and(|h| h == addr.to_canonical()))
            }
            Self::DueBy(at) => g.expires_ms <= *at,
            Self::Unissued => !g.issued,
        }
    }

    /// The range of index entries to read: `[start, end)`.
    fn range(&self) -> (String, String) {
        let under = |prefix: String| {
            // Every prefix ends with '/': the range ends just after it ('0' follows '/').
            let end = format!("{}0", &prefix[..prefix.len() - 1]);
            (prefix, end)
        };
        match self {
            Self::Identity { service, identity } => under(format!(
                "{IX_IDENTITY}/{}/{}/",
                escape(service),
                escape(identity)
            )),
            Self::Host {
                addr,
                service: Some(s),
            } => under(format!("{IX_HOST}/{}/{}/", addr.to_canonical(), escape(s))),
            Self::Host {
                addr,
                service: None,
            } => under(format!("{IX_HOST}/{}/", addr.to_canonical())),
            Self::DueBy(at) => (
                format!("{IX_DUE}/"),
                // Entries of expiries up to `at` inclusive sort before this one.
                format!("{IX_DUE}/{:020}/", ms_key(*at).saturating_add(1)),
            ),
            Self::Unissued => under(format!("{IX_UNISSUED}/")),
        }
    }
}

/// Index entry kinds (the first part of an entry's name).
const IX_IDENTITY: &str = "identity";
const IX_HOST: &str = "host";
const IX_DUE: &str = "due";
const IX_UNISSUED: &str = "unissued";

/// A time as an index key's number (before the epoch counts as the epoch).
fn ms_key(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

/// A name part of an index entry: no '/' left in it (`%` and `/` escaped).
fn escape(part: &str) -> String {
    part.replace('%', "%25").replace('/', "%2F")
}

fn unescape(part: &str) -> String {
    part.replace("%2F", "/").replace("%25", "%")
}

/// The host a grant's bound source names, in the kernel's form (IPv4-mapped IPv6 as IPv4);
/// `None` for anything but one host (such a grant opens nothing in any kernel).
fn bound_host(source: &str) -> Option<IpAddr> {
    let net: ipnet::IpNet = source.parse().ok()?;
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr().to_canonical())
}

/// The entries a grant can have in the index of open grants, each with whether it is there
/// now. They derive from what never changes after a grant is created (id, service, identity,
/// bound hosts, expiry) and from whether it is open and issued, so a write puts the ones that
/// are there and deletes the others without reading what it replaces.
fn grant_index_entries(g: &Grant) -> Vec<(String, bool)> {
    // Each entry once (two sources may name one host: an etcd transaction takes a key once).
    let mut seen = std::collections::BTreeSet::new();
    grant_index_candidates(g)
        .into_iter()
        .filter(|(entry, _)| seen.insert(entry.clone()))
        .collect()
}

fn grant_index_candidates(g: &Grant) -> Vec<(String, bool)> {
    let open = g.state == crate::model::GrantState::Active;
    let id = escape(&g.id);
    let mut out = vec![
        (format!("{IX_DUE}/{:020}/{id}", ms_key(g.expires_ms)), open),
        (format!("{IX_UNISSUED}/{id}"), open && !g.issued),
    ];
    if g.extra_sources.is_empty() {
        out.push((
            format!(
                "{IX_IDENTITY}/{}/{}/{id}",
                escape(&g.service),
                escape(&g.identity)
            ),
            open,
        ));
    }
    for source in &g.extra_sources {
        // A source that is not one host opens nothing; it is indexed under its text, where no
        // lookup finds it.
        let host = bound_host(source).map_or_else(|| escape(source), |h| h.to_string());
        out.push((
            format!("{IX_HOST}/{host}/{}/{id}", escape(&g.service)),
            open,
        ));
    }
    out
}

/// The grant id an index entry names (its last part).
fn indexed_grant(entry: &str) -> Option<String> {
    let (_, id) = entry.rsplit_once('/')?;
    (!id.is_empty()).then(|| unescape(id))
}

/// What a lookup through the index returns: the open grants that answer it.
fn answers(lookup: &GrantLookup, g: &Grant) -> bool {
    g.state == crate::model::GrantState::Active && lookup.matches(g)
}

/// Durable state of requests, grants and numeric ids.
pub trait Store: Send + Sync + 'static {
    /// One request.
    fn request(&self, id: &str) -> Result<Option<Versioned<Request>>, StoreError>;
    /// All requests.
    fn requests(&self) -> Result<Vec<Versioned<Request>>, StoreError>;
    /// One grant.
    fn grant(&self, id: &str) -> Result<Option<Versioned<Grant>>, StoreError>;
    /// All grants.
    fn grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError>;
    /// Requests waiting for a decision (pending, whether or not their TTL has passed), read
    /// through the index of open records.
    fn open_requests(&self) -> Result<Vec<Versioned<Request>>, StoreError>;
    /// Grants not ended (active, in force or not yet started), read through the index of open
    /// records.
    fn open_grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError>;
    /// The open grants that answer `lookup`, read through the index of open grants (kept in
    /// the same transaction as every write).
    fn open_grants_by(&self, lookup: &GrantLookup) -> Result<Vec<Versioned<Grant>>, StoreError>;
    /// Applies `txn` atomically and durably, with the indexes; returns the new revision.
    fn commit(&self, txn: Txn) -> Result<u64, StoreError>;
    /// Deletes closed records whose retention started before `before_ms` (see
    /// [`Record::prune_at_ms`]), oldest first, at most `limit` of them; returns how many. A
    /// grant goes with its request, in one transaction (a grant always finds its request). Never
    /// an open record. An undecodable record is passed over (listings report it). Changes
    /// nothing on the change stream (a closed record has no effect on any kernel).
    fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError>;
    /// Records that listings skipped because they could not be decoded (`table/key`). Listings
    /// report such a record and go on: one bad record never hides the others.
    fn corrupt_records(&self) -> Vec<String>;
    /// The numeric id of `name`, allocated on first use and stable forever after.
    fn numeric_id(&self, kind: IdKind, name: &str) -> Result<u32, StoreError>;
    /// The stream of committed changes from now on. A receiver that lags must re-read
    /// everything (it gets `RecvError::Lagged`).
    fn subscribe(&self) -> broadcast::Receiver<Change>;
}
