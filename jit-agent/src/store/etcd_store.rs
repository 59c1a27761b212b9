//! The shared store: etcd (v3 API, etcd-client), for agents on many nodes. Every commit is one
//! etcd transaction whose compares are the records' mod revisions (0: the key must not exist),
//! so two agents changing one record at once end with exactly one winner; nothing is locked and
//! nothing is read-modify-written outside a transaction. A record's revision is its etcd mod
//! revision, and the change stream is an etcd watch on the records' prefix: commits made through
//! any agent reach every agent's stream. After a watch error, a compaction or a reconnect the
//! stream starts again from a full read at a known revision and publishes what changed in the
//! gap (records are never deleted, so that is every record whose mod revision is newer than the
//! last one published), never trusting the gap. Requests carry "require leader", so a member cut
//! off from its quorum fails them (and ends its watches) instead of serving stale data.
//!
//! Keys, under the configured prefix (default `/jit/`): `requests/<id>` and `grants/<id>` (the
//! record as JSON; an id never holds `/`, so one deployment's prefix cannot see into another's
//! nested under it), `ids/<kind>/<name>` (a numeric id, decimal), `ids-next/<kind>` (the next id
//! to hand out) and `txn/<uuid>` (a commit's marker, see below). Numeric ids are allocated
//! cluster-wide by a transaction that creates the name's key and moves the counter together, so
//! two agents never hand out one id twice.
//!
//! The [`Store`] trait is synchronous (the engine runs on blocking threads); etcd-client is
//! async. The store owns a small runtime of its own, and a call waits for its future there with
//! a bound ([`EtcdOptions::timeout`]): a transient failure (a member down, a leader election, a
//! broken connection) is tried again within the bound, so losing one member is not seen by
//! callers; after the bound the call fails with [`StoreError::Unavailable`]. A commit carries a
//! marker key of its own, `txn/<uuid>`, written in the same transaction: when an attempt fails
//! without saying whether it landed, the next attempt first looks for the marker, so a commit is
//! never applied twice nor reported lost when it landed. Markers are deleted after success; a
//! commit that fails for good may leave its (empty) marker behind.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, KvClient, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::broadcast;

use super::{Change, IdKind, Record, RecordKey, Store, StoreError, Txn as StoreTxn, Versioned};
use crate::model::{Grant, Request};

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://127.0.0.1:2379`, `https://etcd-0:2379` ...).
    pub endpoints: Vec<String>,
    /// Key prefix of this deployment's records (ends with `/`).
    pub prefix: String,
    /// How long one store call may take before it fails (connect, read or commit).
    pub timeout: Duration,
    /// TLS: the CA that signs the etcd servers' certificates (PEM).
    pub ca: Option<Vec<u8>>,
    /// TLS client certificate and key (PEM), when etcd asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key's bytes.
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("tls", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// etcd-backed [`Store`].
pub struct EtcdStore {
    /// `Option` only so `Drop` can shut it down without blocking (the store may be dropped on
    /// an async worker).
    rt: Option<tokio::runtime::Runtime>,
    kv: KvClient,
    opts: EtcdOptions,
    changes: broadcast::Sender<Change>,
    /// Records that could not be decoded, by key, each reported once.
    corrupt: Arc<Mutex<BTreeSet<String>>>,
    /// Numeric ids already known: an id, once allocated, never changes.
    ids: Mutex<HashMap<(u8, String), u32>>,
    /// The indexes were checked against every record since this agent connected. Until then
    /// lookups in the index of open grants read every open grant instead: records written
    /// without their entries (by an earlier version) are never missed.
    verified: Arc<std::sync::atomic::AtomicBool>,
}

const REQUESTS: &str = "requests/";
const GRANTS: &str = "grants/";
const MARKERS: &str = "txn/";
/// Index of open records: `open/requests/<id>` and `open/grants/<id>`, empty values, written in
/// the same transaction as the record. Readers take the ids from it and read the records
/// themselves: the record decides, so an index entry left stale (by an agent that does not keep
/// the indexes, in a mixed-version fleet) never makes a closed record count as open.
const OPEN: &str = "open/";
/// Index of closed records by closing time: `closed/<ms>/<table><id>`, empty values.
const CLOSED: &str = "closed/";
/// Index of open grants by what they open and when they end (`super::grant_index_entries`):
/// `grantindex1/<entry>`, empty values, kept like `open/`. The number is the entries' format:
/// an agent checks and repairs only its own format's entries, never another version's.
const GRANT_INDEX: &str = "grantindex1/";
const OPEN_REQUESTS: &str = "open/requests/";
const OPEN_GRANTS: &str = "open/grants/";
/// Records read per transaction when following the open index.
const READ_BATCH: usize = 64;
/// How soon the change stream tries again after its watch failed.
const WATCH_RETRY: Duration = Duration::from_millis(200);
/// How soon a store call is tried again after a transient failure (within its bound).
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Keys per read: a listing of any size is read in pages of this many, at one revision.
const READ_PAGE: i64 = 500;

/// A permanent failure: configuration, permissions, a refused request.
fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// An etcd error: [`StoreError::Unavailable`] when trying again may help (no connection, no
/// leader, a timeout, a broken stream), [`StoreError::Backend`] otherwise.
fn etcd_error(e: etcd_client::Error) -> StoreError {
    use tonic::Code;
    let transient = match &e {
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        _ => false,
    };
    if transient {
        StoreError::Unavailable(format!("etcd: {e}"))
    } else {
        backend(e)
    }
}

fn kind_name(kind: IdKind) -> &'static str {
    match kind {
        IdKind::Service => "service",
        IdKind::Identity => "identity",
    }
}

/// Every key under `start` at one revision (the first page's), in pages of [`READ_PAGE`].
/// Returns the revision and the keys.
async fn read_all(kv: &mut KvClient, start: &str) -> Result<(i64, Vec<KeyValue>), StoreError> {
    read_range(kv, start.as_bytes(), &prefix_end(start.as_bytes())).await
}

/// Every key in `[start, end)` at one revision (the first page's), in pages of [`READ_PAGE`].
async fn read_range(
    kv: &mut KvClient,
    start: &[u8],
    end: &[u8],
) -> Result<(i64, Vec<KeyValue>), StoreError> {
    let end = end.to_vec();
    let mut from = start.to_vec();
    let mut at = 0i64;
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(READ_PAGE);
        if at != 0 {
            opts = opts.with_revision(at);
        }
        let resp = kv.get(from.clone(), Some(opts)).await.map_err(etcd_error)?;
        if at == 0 {
            at = resp
                .header()
                .map(etcd_client::ResponseHeader::revision)
                .ok_or_else(|| backend("a read without a revision"))?;
        }
        let more = resp.more();
        let kvs = resp.kvs();
        if let Some(last) = kvs.last() {
            // The next page starts just after the last key.
            from = last.key().to_vec();
            from.push(0);
        }
        out.extend_from_slice(kvs);
        if !more || kvs.is_empty() {
            return Ok((at, out));
        }
    }
}

/// The end of the range of keys starting with `prefix` (etcd's prefix convention).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connects to `opts.endpoints` and starts the change stream. Fails (after
    /// `opts.timeout`) when no endpoint answers.
    pub fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Backend(
                "etcd: no endpoints configured (store.endpoints)".into(),
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(backend)?;
        // One attempt gets a part of the call's bound, so a request stuck on a member that is
        // going away leaves time to try another.
        let attempt = (opts.timeout / 4).max(Duration::from_millis(300));
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_timeout(attempt)
            .with_keep_alive(Duration::from_secs(2), attempt)
            .with_require_leader(true);
        if opts.ca.is_some() || opts.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &opts.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        let endpoints = opts.endpoints.clone();
        let timeout = opts.timeout;
        let client = rt.block_on(async move {
            tokio::time::timeout(timeout, Client::connect(endpoints, Some(connect)))
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!(
                        "etcd: no endpoint answered within {timeout:?}"
                    ))
                })?
                .map_err(etcd_error)
        })?;
        let (changes, _) = broadcast::channel(4096);
        let store = Self {
            kv: client.kv_client(),
            rt: Some(rt),
            opts,
            changes,
            corrupt: Arc::new(Mutex::new(BTreeSet::new())),
            ids: Mutex::new(HashMap::new()),
            verified: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        // Fail now, not at the first request, when the cluster cannot be read; and learn the
        // revision the change stream starts after.
        let start_at = store.call(|mut kv, prefix| async move {
            kv.get(
                prefix,
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            )
            .await
            .map_err(etcd_error)?
            .header()
            .map(etcd_client::ResponseHeader::revision)
            .ok_or_else(|| backend("a read without a revision"))
        })?;
        {
            let (mut kv, prefix) = (store.kv.clone(), store.opts.prefix.clone());
            let verified = Arc::clone(&store.verified);
            store.runtime().spawn(async move {
                // Until it succeeds: lookups read every open grant meanwhile.
                loop {
                    match verify_indexes(&mut kv, &prefix).await {
                        Ok(n) => {
                            verified.store(true, std::sync::atomic::Ordering::Release);
                            if n > 0 {
                                tracing::info!("store: repaired the indexes of {n} record(s)");
                            }
                            return;
                        }
                        Err(e) => tracing::warn!(
                            "store: checking the indexes failed ({e}); trying again in 30 s \
                             (meanwhile lookups read every open grant)"
                        ),
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
        store.runtime().spawn(follow(
            client,
            store.opts.prefix.clone(),
            start_at,
            store.changes.clone(),
            Arc::clone(&store.corrupt),
        ));
        Ok(store)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Only `Drop` takes it.
        self.rt
            .as_ref()
            .unwrap_or_else(|| unreachable!("the runtime lives until drop"))
    }

    /// Runs `f(kv, prefix)` on the store's runtime and waits for it, at most `timeout`. A
    /// transient failure ([`StoreError::Unavailable`]) runs `f` again after [`RETRY_AFTER`]
    /// until the bound, so `f` must be safe to run again. Conflicts, decoding errors and
    /// permanent failures are answers, not retried.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(KvClient, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let timeout = self.opts.timeout;
        let (kv, prefix) = (self.kv.clone(), self.opts.prefix.clone());
        let fut = async move {
            let mut last = String::new();
            let attempts = async {
                loop {
                    match f(kv.clone(), prefix.clone()).await {
                        Err(StoreError::Unavailable(e)) => {
                            tracing::debug!("{e}; trying again");
                            last = e;
                            tokio::time::sleep(RETRY_AFTER).await;
                        }
                        other => return other,
                    }
                }
            };
            match tokio::time::timeout(timeout, attempts).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "etcd: no answer within {timeout:?} (is the cluster reachable and in \
                     quorum?){}",
                    if last.is_empty() {
                        String::new()
                    } else {
                        format!("; last: {last}")
                    }
                ))),
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| backend("the store's runtime stopped"))?
    }

    fn get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: &'static str,
        id: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        if id.is_empty() || id.contains('/') {
            return Ok(None);
        }
        let id = id.to_string();
        let corrupt = Arc::clone(&self.corrupt);
        self.call(move |mut kv, prefix| {
            let key = format!("{prefix}{table}{id}");
            let corrupt = Arc::clone(&corrupt);
            async move {
                let resp = kv.get(key.as_str(), None).await.map_err(etcd_error)?;
                let Some(item) = resp.kvs().first() else {
                    return Ok(None);
                };
                decode(&key, item.value(), item.mod_revision())
                    .map(Some)
                    .inspect_err(|_| {
                        super::note_corrupt(&corrupt, &key);
                    })
            }
        })
    }

    fn all<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: &'static str,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let corrupt = Arc::clone(&self.corrupt);
        self.call(move |mut kv, prefix| {
            let corrupt = Arc::clone(&corrupt);
            async move {
                let start = format!("{prefix}{table}");
                let (_, kvs) = read_all(&mut kv, &start).await?;
                let mut out = Vec::new();
                for item in &kvs {
                    let key = String::from_utf8_lossy(item.key()).into_owned();
                    // Only `<prefix><table><id>`: keys of a deployment nested under this
                    // prefix are not this deployment's.
                    if key[start.len()..].contains('/') {
                        continue;
                    }
                    match decode(&key, item.value(), item.mod_revision()) {
                        Ok(v) => out.push(v),
                        Err(e) => super::report_corrupt(&corrupt, &key, &e),
                    }
                }
                Ok(out)
            }
        })
    }
}

impl EtcdStore {
    /// The records an index names (`<prefix><index><id>` → `<prefix><table><id>`), read in
    /// transactions of [`READ_BATCH`] gets; ids whose record is gone are passed over.
    fn through_index<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        index: &'static str,
        table: &'static str,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let corrupt = Arc::clone(&self.corrupt);
        self.call(move |mut kv, prefix| {
            let corrupt = Arc::clone(&corrupt);
            async move {
                let start = format!("{prefix}{index}");
                let (_, entries) = read_all(&mut kv, &start).await?;
                let ids: Vec<String> = entries
                    .iter()
                    .filter_map(|e| std::str::from_utf8(e.key()).ok())
                    .filter_map(|k| k.strip_prefix(&start))
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                    .map(str::to_string)
                    .collect();
                records_of(&mut kv, &prefix, table, &ids, &corrupt).await
            }
        })
    }

    /// The open grants the index of open grants finds for `lookup`.
    fn grants_by(&self, lookup: &super::GrantLookup) -> Result<Vec<Versioned<Grant>>, StoreError> {
        if !self.verified.load(std::sync::atomic::Ordering::Acquire) {
            let mut open: Vec<Versioned<Grant>> = self.through_index(OPEN_GRANTS, GRANTS)?;
            open.retain(|g| super::answers(lookup, &g.value));
            return Ok(open);
        }
        let corrupt = Arc::clone(&self.corrupt);
        let (start, end) = lookup.range();
        let found = self.call(move |mut kv, prefix| {
            let corrupt = Arc::clone(&corrupt);
            let (start, end) = (
                format!("{prefix}{GRANT_INDEX}{start}"),
                format!("{prefix}{GRANT_INDEX}{end}"),
            );
            async move {
                let (_, entries) = read_range(&mut kv, start.as_bytes(), end.as_bytes()).await?;
                let mut ids: Vec<String> = entries
                    .iter()
                    .filter_map(|e| std::str::from_utf8(e.key()).ok())
                    .filter_map(super::indexed_grant)
                    .collect();
                // A grant bound to two hosts is found once per host.
                ids.sort();
                ids.dedup();
                records_of::<Grant>(&mut kv, &prefix, GRANTS, &ids, &corrupt).await
            }
        })?;
        Ok(found
            .into_iter()
            .filter(|g| super::answers(lookup, &g.value))
            .collect())
    }
}

/// The records of `ids` in `table`, read in transactions of [`READ_BATCH`] gets; ids whose
/// record is gone are passed over, undecodable ones reported.
async fn records_of<T: serde::de::DeserializeOwned>(
    kv: &mut KvClient,
    prefix: &str,
    table: &str,
    ids: &[String],
    corrupt: &Mutex<BTreeSet<String>>,
) -> Result<Vec<Versioned<T>>, StoreError> {
    let mut out = Vec::new();
    for chunk in ids.chunks(READ_BATCH) {
        let gets = chunk
            .iter()
            .map(|id| TxnOp::get(format!("{prefix}{table}{id}"), None))
            .collect::<Vec<_>>();
        let resp = kv
            .txn(Txn::new().and_then(gets))
            .await
            .map_err(etcd_error)?;
        for op in resp.op_responses() {
            let etcd_client::TxnOpResponse::Get(got) = op else {
                continue;
            };
            for item in got.kvs() {
                let key = String::from_utf8_lossy(item.key()).into_owned();
                match decode(&key, item.value(), item.mod_revision()) {
                    Ok(v) => out.push(v),
                    Err(e) => super::report_corrupt(corrupt, &key, &e),
                }
            }
        }
    }
    Ok(out)
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
    mod_revision: i64,
) -> Result<Versioned<T>, StoreError> {
    let value = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    let revision = u64::try_from(mod_revision).map_err(|_| StoreError::Corrupt {
        key: key.to_string(),
        reason: format!("negative revision {mod_revision}"),
    })?;
    Ok(Versioned { value, revision })
}

/// The record a key under `prefix` holds, decoded; `None` for keys that are not this
/// deployment's records (markers, ids, a nested deployment's keys).
fn record_of(prefix: &str, key: &[u8], value: &[u8]) -> Option<Result<Record, StoreError>> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?;
    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    };
    let own = |id: &str| !id.is_empty() && !id.contains('/');
    if let Some(id) = rest.strip_prefix(REQUESTS) {
        own(id).then(|| {
            serde_json::from_slice::<Request>(value)
                .map(Record::Request)
                .map_err(corrupt)
        })
    } else if let Some(id) = rest.strip_prefix(GRANTS) {
        own(id).then(|| {
            serde_json::from_slice::<Grant>(value)
                .map(Record::Grant)
                .map_err(corrupt)
        })
    } else {
        None
    }
}

/// The writes of one record with its indexes: the record, its `open/` entry put while it is
/// open and deleted once it is not, and its `closed/` entry once it has a closing time.
fn record_ops(prefix: &str, record: &Record) -> Result<Vec<TxnOp>, StoreError> {
    let (table, id, value) = match record {
        Record::Request(r) => (REQUESTS, &r.id, serde_json::to_vec(r)),
        Record::Grant(g) => (GRANTS, &g.id, serde_json::to_vec(g)),
    };
    if id.is_empty() || id.contains('/') {
        return Err(backend(format!("record id {id:?} cannot be a key")));
    }
    let mut ops = vec![TxnOp::put(
        format!("{prefix}{table}{id}"),
        value.map_err(backend)?,
        None,
    )];
    ops.extend(index_ops(prefix, record, true));
    Ok(ops)
}

/// The index writes of `record`; `delete_open`: also the delete of its `open/` entry when it is
/// closed (a repair leaves that to a guarded transaction of its own).
fn index_ops(prefix: &str, record: &Record, delete_open: bool) -> Vec<TxnOp> {
    let (table, id) = match record {
        Record::Request(r) => (REQUESTS, &r.id),
        Record::Grant(g) => (GRANTS, &g.id),
    };
    let open = format!("{prefix}{OPEN}{table}{id}");
    let mut ops = Vec::new();
    if record.is_open() {
        ops.push(TxnOp::put(open, "", None));
    } else if delete_open {
        ops.push(TxnOp::delete(open, None));
    }
    if let Some(at) = record.prune_at_ms() {
        let closed = super::closed_key(at, &record.key());
        ops.push(TxnOp::put(format!("{prefix}{CLOSED}{closed}"), "", None));
    }
    // A grant's entries derive from what it is now: those it has are put, the others deleted
    // (a delete of a key that is not there changes nothing).
    if let Record::Grant(g) = record {
        for (entry, there) in super::grant_index_entries(g) {
            let key = format!("{prefix}{GRANT_INDEX}{entry}");
            ops.push(if there {
                TxnOp::put(key, "", None)
            } else {
                TxnOp::delete(key, None)
            });
        }
    }
    ops
}

/// Brings the indexes of one record written by someone who did not keep them (an agent of an
/// earlier version) up to date, if the record is still as written (`mod_revision`). Idempotent:
/// agents that see the same write agree.
async fn repair_index(
    kv: &mut KvClient,
    prefix: &str,
    record: &Record,
    mod_revision: i64,
) -> Result<(), StoreError> {
    let (table, id) = match record {
        Record::Request(r) => (REQUESTS, &r.id),
        Record::Grant(g) => (GRANTS, &g.id),
    };
    let main = format!("{prefix}{table}{id}");
    let unchanged = Compare::mod_revision(main, CompareOp::Equal, mod_revision);
    let ops = index_ops(prefix, record, false);
    if !ops.is_empty() {
        kv.txn(Txn::new().when(vec![unchanged.clone()]).and_then(ops))
            .await
            .map_err(etcd_error)?;
    }
    if !record.is_open() {
        let open = format!("{prefix}{OPEN}{table}{id}");
        let present = Compare::create_revision(open.as_str(), CompareOp::Greater, 0);
        kv.txn(
            Txn::new()
                .when(vec![unchanged, present])
                .and_then(vec![TxnOp::delete(open, None)]),
        )
        .await
        .map_err(etcd_error)?;
    }
    Ok(())
}

/// The names of the keys under `start` (the rest of each key after it).
async fn key_names(kv: &mut KvClient, start: &str) -> Result<BTreeSet<String>, StoreError> {
    let (_, keys) = read_all(kv, start).await?;
    Ok(keys
        .iter()
        .filter_map(|k| std::str::from_utf8(k.key()).ok())
        .filter_map(|k| k.strip_prefix(start).map(str::to_string))
        .collect())
}

/// Checks every record's indexes against the records, at start (in the background): entries
/// missing for records written without them are added, entries that say open for a closed or
/// missing record are removed. Reads everything once; writes only what differs.
async fn verify_indexes(kv: &mut KvClient, prefix: &str) -> Result<usize, StoreError> {
    let mut repaired = 0;
    let open = key_names(kv, &format!("{prefix}{OPEN}")).await?;
    let closed = key_names(kv, &format!("{prefix}{CLOSED}")).await?;
    let by = key_names(kv, &format!("{prefix}{GRANT_INDEX}")).await?;
    let mut seen = BTreeSet::new();
    // Per grant: its revision and the index entries it has.
    let mut grant_entries: BTreeMap<String, (i64, BTreeSet<String>)> = BTreeMap::new();
    for table in [REQUESTS, GRANTS] {
        let (_, records) = read_all(kv, &format!("{prefix}{table}")).await?;
        for item in &records {
            let Some(Ok(record)) = record_of(prefix, item.key(), item.value()) else {
                continue;
            };
            let name = match &record {
                Record::Request(r) => format!("{REQUESTS}{}", r.id),
                Record::Grant(g) => format!("{GRANTS}{}", g.id),
            };
            seen.insert(name.clone());
            let open_ok = record.is_open() == open.contains(&name);
            let closed_ok = record
                .prune_at_ms()
                .is_none_or(|at| closed.contains(&super::closed_key(at, &record.key())));
            let mut grant_ok = true;
            if let Record::Grant(g) = &record {
                let entries = super::grant_index_entries(g);
                grant_ok = entries
                    .iter()
                    .all(|(entry, there)| *there == by.contains(entry));
                grant_entries.insert(
                    g.id.clone(),
                    (
                        item.mod_revision(),
                        entries
                            .into_iter()
                            .filter_map(|(e, there)| there.then_some(e))
                            .collect(),
                    ),
                );
            }
            if !(open_ok && closed_ok && grant_ok) {
                repair_index(kv, prefix, &record, item.mod_revision()).await?;
                repaired += 1;
            }
        }
    }
    // Entries whose record is gone (pruned by an agent that did not keep the index).
    for name in open.difference(&seen) {
        let main = format!("{prefix}{name}");
        let entry = format!("{prefix}{OPEN}{name}");
        kv.txn(
            Txn::new()
                .when(vec![Compare::create_revision(main, CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::delete(entry, None)]),
        )
        .await
        .map_err(etcd_error)?;
        repaired += 1;
    }
    // Grant index entries no grant has as it stands (its record gone, or changed behind the
    // index's back): deleted while the record is still as read.
    for entry in &by {
        let Some(id) = super::indexed_grant(entry) else {
            continue;
        };
        let main = format!("{prefix}{GRANTS}{id}");
        let unchanged = match grant_entries.get(&id) {
            Some((_, has)) if has.contains(entry) => continue,
            Some((rev, _)) => Compare::mod_revision(main, CompareOp::Equal, *rev),
            None => Compare::create_revision(main, CompareOp::Equal, 0),
        };
        kv.txn(
            Txn::new()
                .when(vec![unchanged])
                .and_then(vec![TxnOp::delete(
                    format!("{prefix}{GRANT_INDEX}{entry}"),
                    None,
                )]),
        )
        .await
        .map_err(etcd_error)?;
        repaired += 1;
    }
    Ok(repaired)
}

/// The change stream: a watch from the revision after the last one published; after any
/// failure, a full read at a known revision publishes what changed since (the gap), then the
/// watch starts again after that read.
async fn follow(
    mut client: Client,
    prefix: String,
    start_at: i64,
    changes: broadcast::Sender<Change>,
    corrupt: Arc<Mutex<BTreeSet<String>>>,
) {
    // Everything up to here is what subscribers read for themselves when they subscribe.
    let mut published = start_at;
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(WATCH_RETRY).await;
            let mut kv = client.kv_client();
            let (at, kvs) = match read_all(&mut kv, &prefix).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("etcd: reading the records after a watch gap: {e}; retrying");
                    continue;
                }
            };
            let mut gap: Vec<&KeyValue> = kvs
                .iter()
                .filter(|kv| kv.mod_revision() > published)
                .collect();
            gap.sort_by_key(|kv| kv.mod_revision());
            if !gap.is_empty() {
                tracing::info!(
                    "etcd: {} record(s) changed during the watch gap; published now",
                    gap.len()
                );
            }
            for item in gap {
                publish(
                    &prefix,
                    &changes,
                    &corrupt,
                    item.key(),
                    item.value(),
                    item.mod_revision(),
                );
            }
            published = published.max(at);
        }
        first = false;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(published + 1);
        let mut stream = match client.watch(prefix.as_str(), Some(options)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("etcd: watching {prefix}: {e}; resynchronising");
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() != 0 {
                        tracing::warn!(
                            "etcd: the watch on {prefix} ended ({}); resynchronising from a full \
                             read",
                            if resp.compact_revision() != 0 {
                                "compacted"
                            } else {
                                resp.cancel_reason()
                            }
                        );
                        break;
                    }
                    // The index entries written with the records of this response.
                    let indexed: BTreeSet<(&[u8], i64)> = resp
                        .events()
                        .iter()
                        .filter(|e| e.event_type() == EventType::Put)
                        .filter_map(|e| e.kv())
                        .map(|kv| (kv.key(), kv.mod_revision()))
                        .collect();
                    for event in resp.events() {
                        let Some(kv) = event.kv() else { continue };
                        if event.event_type() == EventType::Put {
                            publish(
                                &prefix,
                                &changes,
                                &corrupt,
                                kv.key(),
                                kv.value(),
                                kv.mod_revision(),
                            );
                            // A record written without its index entries (an agent of an
                            // earlier version): every agent that sees it repairs them.
                            if let Some(Ok(record)) = record_of(&prefix, kv.key(), kv.value())
                                && !written_indexed(&prefix, &record, kv.mod_revision(), &indexed)
                            {
                                let (mut kv_client, prefix) = (client.kv_client(), prefix.clone());
                                let rev = kv.mod_revision();
                                tokio::spawn(async move {
                                    if let Err(e) =
                                        repair_index(&mut kv_client, &prefix, &record, rev).await
                                    {
                                        tracing::warn!("store: repairing an index entry: {e}");
                                    }
                                });
                            }
                        }
                        published = published.max(kv.mod_revision());
                    }
                }
                Ok(None) => {
                    tracing::warn!("etcd: the watch on {prefix} closed; resynchronising");
                    break;
                }
                Err(e) => {
                    tracing::warn!("etcd: the watch on {prefix} failed: {e}; resynchronising");
                    break;
                }
            }
        }
    }
}

/// Whether `record`, written at `revision`, came with the index entries it needs (as `indexed`,
/// the keys put at each revision, shows): its `open/` entry while open, its `closed/` entry once
/// it has a closing time.
fn written_indexed(
    prefix: &str,
    record: &Record,
    revision: i64,
    indexed: &BTreeSet<(&[u8], i64)>,
) -> bool {
    let (table, id) = match record {
        Record::Request(r) => (REQUESTS, &r.id),
        Record::Grant(g) => (GRANTS, &g.id),
    };
    let has = |key: String| indexed.contains(&(key.as_bytes(), revision));
    let open_ok = !record.is_open() || has(format!("{prefix}{OPEN}{table}{id}"));
    let closed_ok = record.prune_at_ms().is_none_or(|at| {
        has(format!(
            "{prefix}{CLOSED}{}",
            super::closed_key(at, &record.key())
        ))
    });
    let grant_ok = match record {
        Record::Grant(g) => super::grant_index_entries(g)
            .into_iter()
            .all(|(entry, there)| !there || has(format!("{prefix}{GRANT_INDEX}{entry}"))),
        Record::Request(_) => true,
    };
    open_ok && closed_ok && grant_ok
}

fn publish(
    prefix: &str,
    changes: &broadcast::Sender<Change>,
    corrupt: &Mutex<BTreeSet<String>>,
    key: &[u8],
    value: &[u8],
    mod_revision: i64,
) {
    match record_of(prefix, key, value) {
        None => {}
        Some(Ok(record)) => {
            let revision = u64::try_from(mod_revision).unwrap_or(0);
            // No receiver is fine: nobody is watching.
            let _ = changes.send(Change { revision, record });
        }
        Some(Err(e)) => super::report_corrupt(corrupt, &String::from_utf8_lossy(key), &e),
    }
}

impl Store for EtcdStore {
    fn request(&self, id: &str) -> Result<Option<Versioned<Request>>, StoreError> {
        self.get(REQUESTS, id)
    }

    fn requests(&self) -> Result<Vec<Versioned<Request>>, StoreError> {
        self.all(REQUESTS)
    }

    fn grant(&self, id: &str) -> Result<Option<Versioned<Grant>>, StoreError> {
        self.get(GRANTS, id)
    }

    fn grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError> {
        self.all(GRANTS)
    }

    fn corrupt_records(&self) -> Vec<String> {
        super::listed(&self.corrupt)
    }

    fn open_requests(&self) -> Result<Vec<Versioned<Request>>, StoreError> {
        let mut open: Vec<Versioned<Request>> = self.through_index(OPEN_REQUESTS, REQUESTS)?;
        open.retain(|r| Record::Request(r.value.clone()).is_open());
        Ok(open)
    }

    fn open_grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError> {
        let mut open: Vec<Versioned<Grant>> = self.through_index(OPEN_GRANTS, GRANTS)?;
        open.retain(|g| Record::Grant(g.value.clone()).is_open());
        Ok(open)
    }

    fn open_grants_by(
        &self,
        lookup: &super::GrantLookup,
    ) -> Result<Vec<Versioned<Grant>>, StoreError> {
        self.grants_by(lookup)
    }

    fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let prefix = self.opts.prefix.clone();
        let from = format!("{prefix}{CLOSED}");
        let to = format!("{from}{}", super::closed_bound(before_ms));
        let scan = i64::try_from(limit.saturating_mul(super::PRUNE_LOOKAHEAD)).unwrap_or(i64::MAX);
        let keys: Vec<String> = {
            let (from, to) = (from.clone(), to);
            self.call(move |mut kv, _| {
                let (from, to) = (from.clone(), to.clone());
                async move {
                    let resp = kv
                        .get(
                            from,
                            Some(
                                GetOptions::new()
                                    .with_range(to)
                                    .with_keys_only()
                                    .with_limit(scan),
                            ),
                        )
                        .await
                        .map_err(etcd_error)?;
                    Ok(resp
                        .kvs()
                        .iter()
                        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                        .collect())
                }
            })?
        };
        let mut pruned = 0;
        for index_key in keys {
            if pruned >= limit {
                break;
            }
            let key = index_key.strip_prefix(&from).and_then(super::closed_record);
            let found = match &key {
                None => Ok(None),
                Some(RecordKey::Request(id)) => self
                    .request(id)
                    .map(|r| r.map(|r| (Record::Request(r.value), r.revision))),
                Some(RecordKey::Grant(id)) => self
                    .grant(id)
                    .map(|g| g.map(|g| (Record::Grant(g.value), g.revision))),
            };
            let found = match found {
                Ok(f) => f,
                // Undecodable: kept as it is for the operator (listings report it).
                Err(StoreError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            };
            let mut ops = vec![TxnOp::delete(index_key.as_str(), None)];
            let mut compares = Vec::new();
            // Gone already, not an index key, or not prunable under this entry (a stale one):
            // only the entry goes.
            if let Some((record, revision)) = found.filter(|(r, _)| super::prunable(r, before_ms)) {
                let mut delete = |table: &str, id: &str, revision: u64| -> Result<(), StoreError> {
                    let key = format!("{prefix}{table}{id}");
                    let rev = i64::try_from(revision).map_err(backend)?;
                    compares.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, rev));
                    ops.push(TxnOp::delete(key, None));
                    Ok(())
                };
                match &record {
                    Record::Request(r) => delete(REQUESTS, &r.id, revision)?,
                    Record::Grant(g) => {
                        delete(GRANTS, &g.id, revision)?;
                        // Its request goes with it (unless somehow still open).
                        if let Ok(Some(r)) = self.request(&g.request_id)
                            && !Record::Request(r.value.clone()).is_open()
                        {
                            delete(REQUESTS, &r.value.id, r.revision)?;
                        }
                    }
                }
            }
            let deletes_record = !compares.is_empty();
            let txn = Txn::new().when(compares).and_then(ops);
            let done = self.call(move |mut kv, _| {
                let txn = txn.clone();
                async move { Ok(kv.txn(txn).await.map_err(etcd_error)?.succeeded()) }
            })?;
            // A record changed meanwhile stays for the next pass.
            if done && deletes_record {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    fn commit(&self, txn: StoreTxn) -> Result<u64, StoreError> {
        let prefix = self.opts.prefix.clone();
        let key_of = |k: &RecordKey| -> Result<String, StoreError> {
            let (table, id) = match k {
                RecordKey::Request(id) => (REQUESTS, id),
                RecordKey::Grant(id) => (GRANTS, id),
            };
            if id.is_empty() || id.contains('/') {
                return Err(backend(format!("record id {id:?} cannot be a key")));
            }
            Ok(format!("{prefix}{table}{id}"))
        };
        let mut compares = Vec::new();
        for (key, expected) in &txn.compares {
            let rev = i64::try_from(*expected).map_err(backend)?;
            compares.push(if rev == 0 {
                Compare::create_revision(key_of(key)?, CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key_of(key)?, CompareOp::Equal, rev)
            });
        }
        let marker = format!("{prefix}{MARKERS}{}", uuid::Uuid::new_v4().simple());
        let mut puts = vec![TxnOp::put(marker.as_str(), "", None)];
        for record in &txn.puts {
            puts.extend(record_ops(&prefix, record)?);
        }
        let first_key = txn.compares.first().map(|(k, _)| k.clone());
        let txn = Txn::new().when(compares).and_then(puts);
        let unsure = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = {
            let marker = marker.clone();
            self.call(move |mut kv, _| {
                let (txn, first_key, marker, unsure) = (
                    txn.clone(),
                    first_key.clone(),
                    marker.clone(),
                    Arc::clone(&unsure),
                );
                async move {
                    // An earlier attempt failed without an answer: did it land? Its marker says.
                    if unsure.load(std::sync::atomic::Ordering::Relaxed) {
                        let m = kv.get(marker.as_str(), None).await.map_err(etcd_error)?;
                        if let Some(item) = m.kvs().first() {
                            return u64::try_from(item.mod_revision()).map_err(backend);
                        }
                    }
                    unsure.store(true, std::sync::atomic::Ordering::Relaxed);
                    let resp = kv.txn(txn).await.map_err(etcd_error)?;
                    if !resp.succeeded() {
                        return Err(match first_key {
                            Some(k) => StoreError::Conflict(k),
                            None => backend("a transaction without compares failed"),
                        });
                    }
                    let revision = resp
                        .header()
                        .map(etcd_client::ResponseHeader::revision)
                        .ok_or_else(|| backend("a commit without a revision"))?;
                    u64::try_from(revision).map_err(backend)
                }
            })
        };
        if done.is_ok() {
            // The marker has served; removing it is best effort (a leftover is an empty key).
            let mut kv = self.kv.clone();
            self.runtime().spawn(async move {
                let _ = kv.delete(marker, None).await;
            });
        }
        done
    }

    fn numeric_id(&self, kind: IdKind, name: &str) -> Result<u32, StoreError> {
        let cache_key = (kind as u8, name.to_string());
        if let Some(id) = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&cache_key)
        {
            return Ok(*id);
        }
        let kind_word = kind_name(kind);
        let (first, limit) = match kind {
            IdKind::Service => (0u64, u64::from(jit_common::MAX_SERVICES)),
            IdKind::Identity => (1u64, u64::from(u32::MAX)),
        };
        let name_owned = name.to_string();
        let id = self.call(move |mut kv, prefix| {
            let name_owned = name_owned.clone();
            async move {
                let name_key = format!("{prefix}ids/{kind_word}/{name_owned}");
                let next_key = format!("{prefix}ids-next/{kind_word}");
                let parse = |b: &[u8]| -> Result<u64, StoreError> {
                    std::str::from_utf8(b)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| StoreError::Corrupt {
                            key: name_key.clone(),
                            reason: "not a decimal id".into(),
                        })
                };
                // Each round loses only to an agent that allocated meanwhile; the name's key is
                // read first, so a round that landed without an answer is found by the next.
                for _ in 0..32 {
                    let have = kv.get(name_key.as_str(), None).await.map_err(etcd_error)?;
                    if let Some(item) = have.kvs().first() {
                        return parse(item.value());
                    }
                    let counter = kv.get(next_key.as_str(), None).await.map_err(etcd_error)?;
                    let (next, counter_cmp) = match counter.kvs().first() {
                        Some(item) => (
                            parse(item.value())?,
                            Compare::mod_revision(
                                next_key.as_str(),
                                CompareOp::Equal,
                                item.mod_revision(),
                            ),
                        ),
                        None => (
                            first,
                            Compare::create_revision(next_key.as_str(), CompareOp::Equal, 0),
                        ),
                    };
                    if next >= limit {
                        return Err(StoreError::IdsExhausted(kind));
                    }
                    let resp = kv
                        .txn(
                            Txn::new()
                                .when([
                                    Compare::create_revision(
                                        name_key.as_str(),
                                        CompareOp::Equal,
                                        0,
                                    ),
                                    counter_cmp,
                                ])
                                .and_then([
                                    TxnOp::put(name_key.as_str(), next.to_string(), None),
                                    TxnOp::put(next_key.as_str(), (next + 1).to_string(), None),
                                ]),
                        )
                        .await
                        .map_err(etcd_error)?;
                    if resp.succeeded() {
                        return Ok(next);
                    }
                }
                // Tried again by `call` until its bound.
                Err(StoreError::Unavailable(format!(
                    "etcd: allocating an id for {name_key}: 32 rounds of contention"
                )))
            }
        })?;
        let id = u32::try_from(id).map_err(|_| StoreError::IdsExhausted(kind))?;
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(cache_key, id);
        Ok(id)
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_and_record_keys() {
        assert_eq!(prefix_end(b"/jit/"), b"/jit0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        let grant = serde_json::to_vec(&serde_json::json!({})).expect("json");
        // Not records: markers, ids, a nested deployment's keys, keys of other prefixes.
        assert!(record_of("/jit/", b"/jit/txn/abc", b"").is_none());
        assert!(record_of("/jit/", b"/jit/ids/service/db", b"0").is_none());
        assert!(record_of("/jit/", b"/jit/grants/other/grants/g-1", &grant).is_none());
        assert!(record_of("/jit/", b"/other/grants/g-1", &grant).is_none());
        // A record that does not decode is named.
        assert!(matches!(
            record_of("/jit/", b"/jit/grants/g-1", b"{"),
            Some(Err(StoreError::Corrupt { .. }))
        ));
    }
}
