//! The shared store: etcd (v3 API, etcd-client), for agents on many nodes. Every commit is one
//! etcd transaction whose compares are the records' mod revisions (0: the key must not exist),
//! so two agents changing one record at once end with exactly one winner; nothing is locked and
//! nothing is read-modify-written outside a transaction. A record's revision is its etcd mod
//! revision, and the change stream is an etcd watch on the records' prefix: commits made through
//! any agent reach every agent's stream. After a watch error, a compaction or a reconnect the
//! stream starts again from a full read at a known revision (every record is published again,
//! as a change at its own revision), never trusting the gap.
//!
//! Keys, under the configured prefix (default `/jit/`): `requests/<id>` and `grants/<id>` (the
//! record as JSON), `ids/<kind>/<name>` (a numeric id, decimal) and `ids-next/<kind>` (the next
//! id to hand out). Numeric ids are allocated cluster-wide by a transaction that creates the
//! name's key and moves the counter together, so two agents never hand out one id twice.
//!
//! The [`Store`] trait is synchronous (the engine runs on blocking threads); etcd-client is
//! async. The store owns a small runtime of its own, and a call waits for its future there with
//! a bound ([`EtcdOptions::timeout`]): a cluster without quorum answers with an error after that
//! bound, never a hang.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::Mutex,
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KvClient, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::broadcast;

use super::{Change, IdKind, Record, RecordKey, Store, StoreError, Txn as StoreTxn, Versioned};
use crate::model::{Grant, Request};

/// How to reach etcd.
#[derive(Clone, Debug)]
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

/// etcd-backed [`Store`].
pub struct EtcdStore {
    /// `Option` only so `Drop` can shut it down without blocking (the store may be dropped on
    /// an async worker).
    rt: Option<tokio::runtime::Runtime>,
    kv: KvClient,
    opts: EtcdOptions,
    changes: broadcast::Sender<Change>,
    /// Records that could not be decoded, by key, each reported once.
    corrupt: std::sync::Arc<Mutex<BTreeSet<String>>>,
    /// Numeric ids already known: an id, once allocated, never changes.
    ids: Mutex<HashMap<(u8, String), u32>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

const REQUESTS: &str = "requests/";
const GRANTS: &str = "grants/";
/// How soon the change stream tries again after its watch failed.
const WATCH_RETRY: Duration = Duration::from_millis(200);
/// How soon a store call is tried again after a backend error (within its bound).
const RETRY_AFTER: Duration = Duration::from_millis(100);

fn kind_name(kind: IdKind) -> &'static str {
    match kind {
        IdKind::Service => "service",
        IdKind::Identity => "identity",
    }
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
            .worker_threads(1)
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
            .with_keep_alive(Duration::from_secs(2), attempt);
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
                .map_err(|_| backend(format!("no endpoint answered within {timeout:?}")))?
                .map_err(backend)
        })?;
        let (changes, _) = broadcast::channel(4096);
        let corrupt = std::sync::Arc::new(Mutex::new(BTreeSet::new()));
        let store = Self {
            kv: client.kv_client(),
            rt: Some(rt),
            opts,
            changes,
            corrupt,
            ids: Mutex::new(HashMap::new()),
        };
        // Fail now, not at the first request, when the cluster cannot be read.
        store.call(|mut kv, prefix| async move {
            kv.get(
                prefix,
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            )
            .await
            .map(|_| ())
            .map_err(backend)
        })?;
        store.runtime().spawn(follow(
            client,
            store.opts.prefix.clone(),
            store.changes.clone(),
            std::sync::Arc::clone(&store.corrupt),
        ));
        Ok(store)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Only `Drop` takes it.
        self.rt
            .as_ref()
            .unwrap_or_else(|| unreachable!("the runtime lives until drop"))
    }

    /// Runs `f(kv, prefix)` on the store's runtime and waits for it, at most `timeout`.
    /// `f` must be safe to run again: a backend error (a member down, a leader election, a
    /// broken connection) runs it again after [`RETRY_AFTER`] until the bound, so the loss of
    /// one member is not seen by callers. Conflicts and decoding errors are answers, not retried.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(KvClient, String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let timeout = self.opts.timeout;
        let (kv, prefix) = (self.kv.clone(), self.opts.prefix.clone());
        let fut = async move {
            loop {
                match f(kv.clone(), prefix.clone()).await {
                    Err(StoreError::Backend(e)) => {
                        tracing::debug!("etcd: {e}; trying again");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                    other => return other,
                }
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime().spawn(async move {
            let result = tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(backend(format!(
                        "no answer within {timeout:?} (is the cluster reachable and in quorum?)"
                    )))
                });
            let _ = tx.send(result);
        });
        rx.recv()
            .map_err(|_| backend("the store's runtime stopped"))?
    }

    fn get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: &'static str,
        id: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let id = id.to_string();
        let corrupt = std::sync::Arc::clone(&self.corrupt);
        self.call(move |mut kv, prefix| {
            let key = format!("{prefix}{table}{id}");
            let corrupt = std::sync::Arc::clone(&corrupt);
            async move {
                let resp = kv.get(key.as_str(), None).await.map_err(backend)?;
                let Some(item) = resp.kvs().first() else {
                    return Ok(None);
                };
                decode(&key, item.value(), item.mod_revision())
                    .map(Some)
                    .inspect_err(|_| {
                        note_corrupt(&corrupt, &key);
                    })
            }
        })
    }

    fn all<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: &'static str,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let corrupt = std::sync::Arc::clone(&self.corrupt);
        self.call(move |mut kv, prefix| {
            let corrupt = std::sync::Arc::clone(&corrupt);
            async move {
                let start = format!("{prefix}{table}");
                let resp = kv
                    .get(start.as_str(), Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(backend)?;
                let mut out = Vec::new();
                for item in resp.kvs() {
                    let key = String::from_utf8_lossy(item.key()).into_owned();
                    match decode(&key, item.value(), item.mod_revision()) {
                        Ok(v) => out.push(v),
                        // One bad record must not hide the others: report it once and go on.
                        Err(e) => {
                            if note_corrupt(&corrupt, &key) {
                                tracing::error!(
                                    "store record {key} cannot be decoded and is skipped: {e}"
                                );
                            }
                        }
                    }
                }
                Ok(out)
            }
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Records a corrupt key; whether it is new.
fn note_corrupt(corrupt: &Mutex<BTreeSet<String>>, key: &str) -> bool {
    corrupt
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(key.to_string())
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

/// The record a key under `prefix` holds, decoded; `None` for keys that are not records.
fn record_of(prefix: &str, key: &[u8], value: &[u8]) -> Option<Result<Record, StoreError>> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?;
    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    };
    if rest.starts_with(REQUESTS) {
        Some(
            serde_json::from_slice::<Request>(value)
                .map(Record::Request)
                .map_err(corrupt),
        )
    } else if rest.starts_with(GRANTS) {
        Some(
            serde_json::from_slice::<Grant>(value)
                .map(Record::Grant)
                .map_err(corrupt),
        )
    } else {
        None
    }
}

/// The change stream: a full read of the records at a known revision, then a watch from the
/// next one; after any failure, again from a full read.
async fn follow(
    mut client: Client,
    prefix: String,
    changes: broadcast::Sender<Change>,
    corrupt: std::sync::Arc<Mutex<BTreeSet<String>>>,
) {
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(WATCH_RETRY).await;
        }
        first = false;
        let read = match client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("etcd: reading the records for the change stream: {e}; retrying");
                continue;
            }
        };
        let Some(at) = read.header().map(etcd_client::ResponseHeader::revision) else {
            continue;
        };
        for item in read.kvs() {
            publish(
                &prefix,
                &changes,
                &corrupt,
                item.key(),
                item.value(),
                item.mod_revision(),
            );
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(at + 1);
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
                    for event in resp.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        if let Some(kv) = event.kv() {
                            publish(
                                &prefix,
                                &changes,
                                &corrupt,
                                kv.key(),
                                kv.value(),
                                kv.mod_revision(),
                            );
                        }
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
        Some(Err(e)) => {
            let name = String::from_utf8_lossy(key).into_owned();
            if note_corrupt(corrupt, &name) {
                tracing::error!("store record {name} cannot be decoded and is skipped: {e}");
            }
        }
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
        self.corrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    fn commit(&self, txn: StoreTxn) -> Result<u64, StoreError> {
        let prefix = self.opts.prefix.clone();
        let key_of = |k: &RecordKey| match k {
            RecordKey::Request(id) => format!("{prefix}{REQUESTS}{id}"),
            RecordKey::Grant(id) => format!("{prefix}{GRANTS}{id}"),
        };
        let mut compares = Vec::new();
        for (key, expected) in &txn.compares {
            let rev = i64::try_from(*expected).map_err(backend)?;
            compares.push(if rev == 0 {
                Compare::create_revision(key_of(key), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key_of(key), CompareOp::Equal, rev)
            });
        }
        let mut puts = Vec::new();
        for record in &txn.puts {
            let value = match record {
                Record::Request(r) => serde_json::to_vec(r),
                Record::Grant(g) => serde_json::to_vec(g),
            }
            .map_err(backend)?;
            puts.push(TxnOp::put(key_of(&record.key()), value, None));
        }
        let first_key = txn.compares.first().map(|(k, _)| k.clone());
        // What tells, after an error that leaves it unknown whether the commit landed, that it
        // did: the first record holds exactly the bytes written (records carry ids and times, so
        // another writer does not write the same bytes).
        let landed = match txn.puts.first() {
            Some(r) => Some((
                key_of(&r.key()),
                match r {
                    Record::Request(r) => serde_json::to_vec(r),
                    Record::Grant(g) => serde_json::to_vec(g),
                }
                .map_err(backend)?,
            )),
            None => None,
        };
        let txn = Txn::new().when(compares).and_then(puts);
        let unsure = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.call(move |mut kv, _| {
            let (txn, first_key, landed, unsure) = (
                txn.clone(),
                first_key.clone(),
                landed.clone(),
                std::sync::Arc::clone(&unsure),
            );
            async move {
                // A retry after an error: did the earlier attempt land?
                if unsure.load(std::sync::atomic::Ordering::Relaxed)
                    && let Some((key, bytes)) = &landed
                {
                    let now = kv.get(key.as_str(), None).await.map_err(backend)?;
                    if let Some(item) = now.kvs().first()
                        && item.value() == bytes.as_slice()
                    {
                        return u64::try_from(item.mod_revision()).map_err(backend);
                    }
                }
                let resp = match kv.txn(txn).await {
                    Ok(r) => r,
                    Err(e) => {
                        unsure.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(backend(e));
                    }
                };
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
                // Bounded: each round loses only to an agent that allocated meanwhile.
                for _ in 0..32 {
                    let have = kv.get(name_key.as_str(), None).await.map_err(backend)?;
                    if let Some(item) = have.kvs().first() {
                        return parse(item.value());
                    }
                    let counter = kv.get(next_key.as_str(), None).await.map_err(backend)?;
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
                        .map_err(backend)?;
                    if resp.succeeded() {
                        return Ok(next);
                    }
                }
                // Tried again by `call` until its bound.
                Err(backend(format!(
                    "allocating an id for {name_key}: 32 rounds of contention"
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
