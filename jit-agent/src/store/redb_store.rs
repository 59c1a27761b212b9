//! The embedded store: one redb file in the state directory. Each commit is one redb write
//! transaction, durable when it returns (it survives `kill -9` and power loss).

use std::path::Path;

use redb::{
    Database, ReadableDatabase as _, ReadableTable as _, TableDefinition, TableHandle as _,
};
use tokio::sync::broadcast;

use super::{Change, IdKind, Record, RecordKey, Store, StoreError, Txn, Versioned};
use crate::model::{Grant, Request};

const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
const IDS: TableDefinition<&str, u32> = TableDefinition::new("ids");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Index of open records (ids), one table per kind.
const OPEN_REQUESTS: TableDefinition<&str, ()> = TableDefinition::new("open_requests");
const OPEN_GRANTS: TableDefinition<&str, ()> = TableDefinition::new("open_grants");
/// Index of closed records by closing time (`super::closed_key`).
const CLOSED: TableDefinition<&str, ()> = TableDefinition::new("closed");

const REVISION: &str = "revision";
const NEXT_SERVICE_ID: &str = "next_service_id";
const NEXT_IDENTITY_ID: &str = "next_identity_id";
/// Version of the indexes in the file; files written before them are indexed once on open.
const INDEX_VERSION: &str = "index_version";

/// redb-backed [`Store`].
pub struct RedbStore {
    db: Database,
    changes: broadcast::Sender<Change>,
    /// Records that could not be decoded, by `table/key`, each reported once.
    corrupt: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        // Create the tables so readers never meet a missing one.
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(REQUESTS).map_err(backend)?;
        tx.open_table(GRANTS).map_err(backend)?;
        tx.open_table(IDS).map_err(backend)?;
        tx.open_table(META).map_err(backend)?;
        tx.open_table(OPEN_REQUESTS).map_err(backend)?;
        tx.open_table(OPEN_GRANTS).map_err(backend)?;
        tx.open_table(CLOSED).map_err(backend)?;
        index_once(&tx)?;
        tx.commit().map_err(backend)?;
        let (changes, _) = broadcast::channel(4096);
        Ok(Self {
            db,
            changes,
            corrupt: std::sync::Mutex::default(),
        })
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        id: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(table).map_err(backend)?;
        let Some(v) = t.get(id).map_err(backend)? else {
            return Ok(None);
        };
        decode(id, v.value()).map(Some)
    }

    fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(table).map_err(backend)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            match decode(k.value(), v.value()) {
                Ok(record) => out.push(record),
                // One bad record must not hide the others: report it once and go on.
                Err(e) => {
                    let name = format!("{}/{}", table.name(), k.value());
                    let mut corrupt = self
                        .corrupt
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if corrupt.insert(name.clone()) {
                        tracing::error!(
                            "store record {name} cannot be decoded and is skipped: {e}"
                        );
                    }
                }
            }
        }
        Ok(out)
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<Versioned<T>, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T, revision: u64) -> Result<Vec<u8>, StoreError> {
    #[derive(serde::Serialize)]
    struct V<'a, T> {
        value: &'a T,
        revision: u64,
    }
    serde_json::to_vec(&V { value, revision }).map_err(backend)
}

fn revision_of(bytes: Option<&[u8]>) -> u64 {
    #[derive(serde::Deserialize)]
    struct R {
        revision: u64,
    }
    bytes
        .and_then(|b| serde_json::from_slice::<R>(b).ok())
        .map_or(0, |r| r.revision)
}

/// Builds the indexes of a file written before them (in the opening transaction): every record
/// that decodes is indexed; one that does not stays as it is (listings report it).
fn index_once(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(backend)?;
    if meta.get(INDEX_VERSION).map_err(backend)?.is_some() {
        return Ok(());
    }
    let mut records = Vec::new();
    {
        let requests = tx.open_table(REQUESTS).map_err(backend)?;
        for item in requests.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            if let Ok(r) = decode::<Request>(k.value(), v.value()) {
                records.push(Record::Request(r.value));
            }
        }
        let grants = tx.open_table(GRANTS).map_err(backend)?;
        for item in grants.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            if let Ok(g) = decode::<Grant>(k.value(), v.value()) {
                records.push(Record::Grant(g.value));
            }
        }
    }
    if !records.is_empty() {
        tracing::info!(
            "store: indexing {} record(s) written before the indexes",
            records.len()
        );
    }
    for record in &records {
        index(tx, record)?;
    }
    meta.insert(INDEX_VERSION, 1).map_err(backend)?;
    Ok(())
}

/// Keeps the indexes of `record` (as it is being written) in `tx`.
fn index(tx: &redb::WriteTransaction, record: &Record) -> Result<(), StoreError> {
    let (table, id) = match record {
        Record::Request(r) => (OPEN_REQUESTS, r.id.as_str()),
        Record::Grant(g) => (OPEN_GRANTS, g.id.as_str()),
    };
    let mut open = tx.open_table(table).map_err(backend)?;
    match record.closed_at_ms() {
        None => {
            open.insert(id, ()).map_err(backend)?;
        }
        Some(at) => {
            open.remove(id).map_err(backend)?;
            let mut closed = tx.open_table(CLOSED).map_err(backend)?;
            closed
                .insert(super::closed_key(at, &record.key()).as_str(), ())
                .map_err(backend)?;
        }
    }
    Ok(())
}

impl RedbStore {
    /// The records an open index names, read in one transaction.
    fn open_of<T: serde::de::DeserializeOwned>(
        &self,
        index: TableDefinition<&str, ()>,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let open = tx.open_table(index).map_err(backend)?;
        let records = tx.open_table(table).map_err(backend)?;
        let mut out = Vec::new();
        for item in open.iter().map_err(backend)? {
            let (k, _) = item.map_err(backend)?;
            let id = k.value();
            let Some(v) = records.get(id).map_err(backend)? else {
                continue;
            };
            match decode(id, v.value()) {
                Ok(r) => out.push(r),
                Err(e) => {
                    let name = format!("{}/{id}", table.name());
                    if self
                        .corrupt
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(name.clone())
                    {
                        tracing::error!(
                            "store record {name} cannot be decoded and is skipped: {e}"
                        );
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Store for RedbStore {
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

    fn open_requests(&self) -> Result<Vec<Versioned<Request>>, StoreError> {
        self.open_of(OPEN_REQUESTS, REQUESTS)
    }

    fn open_grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError> {
        self.open_of(OPEN_GRANTS, GRANTS)
    }

    fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let mut pruned = 0;
        {
            let mut closed = tx.open_table(CLOSED).map_err(backend)?;
            let mut requests = tx.open_table(REQUESTS).map_err(backend)?;
            let mut grants = tx.open_table(GRANTS).map_err(backend)?;
            let bound = super::closed_bound(before_ms);
            let due: Vec<String> = closed
                .range::<&str>(..bound.as_str())
                .map_err(backend)?
                .take(limit.saturating_mul(super::PRUNE_LOOKAHEAD))
                .map(|item| item.map(|(k, _)| k.value().to_string()))
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            for index_key in due {
                if pruned >= limit {
                    break;
                }
                let Some(key) = super::closed_record(&index_key) else {
                    closed.remove(index_key.as_str()).map_err(backend)?;
                    continue;
                };
                let (table, id) = match &key {
                    RecordKey::Request(id) => (&mut requests, id),
                    RecordKey::Grant(id) => (&mut grants, id),
                };
                let record = match table.get(id.as_str()).map_err(backend)? {
                    None => None,
                    Some(v) => match &key {
                        RecordKey::Request(_) => decode::<Request>(id, v.value())
                            .ok()
                            .map(|r| Record::Request(r.value)),
                        RecordKey::Grant(_) => decode::<Grant>(id, v.value())
                            .ok()
                            .map(|g| Record::Grant(g.value)),
                    },
                };
                let Some(record) = record else {
                    // Gone already (or undecodable: kept for the operator to see).
                    if table.get(id.as_str()).map_err(backend)?.is_none() {
                        closed.remove(index_key.as_str()).map_err(backend)?;
                    }
                    continue;
                };
                let grant = match &record {
                    Record::Request(r) if !r.grant_id.is_empty() => grants
                        .get(r.grant_id.as_str())
                        .map_err(backend)?
                        .and_then(|v| decode::<Grant>(&r.grant_id, v.value()).ok())
                        .map(|g| g.value),
                    _ => None,
                };
                if record.closed_at_ms().is_none() {
                    // Reopened since it was indexed: not closed any more.
                    closed.remove(index_key.as_str()).map_err(backend)?;
                    continue;
                }
                if !super::prunable(&record, grant.as_ref(), before_ms) {
                    continue;
                }
                let table = match &key {
                    RecordKey::Request(_) => &mut requests,
                    RecordKey::Grant(_) => &mut grants,
                };
                table.remove(id.as_str()).map_err(backend)?;
                closed.remove(index_key.as_str()).map_err(backend)?;
                pruned += 1;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(pruned)
    }

    fn corrupt_records(&self) -> Vec<String> {
        super::listed(&self.corrupt)
    }

    fn commit(&self, txn: Txn) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let revision;
        {
            let mut requests = tx.open_table(REQUESTS).map_err(backend)?;
            let mut grants = tx.open_table(GRANTS).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            for (key, expected) in &txn.compares {
                let current = match key {
                    RecordKey::Request(id) => revision_of(
                        requests
                            .get(id.as_str())
                            .map_err(backend)?
                            .as_ref()
                            .map(|v| v.value()),
                    ),
                    RecordKey::Grant(id) => revision_of(
                        grants
                            .get(id.as_str())
                            .map_err(backend)?
                            .as_ref()
                            .map(|v| v.value()),
                    ),
                };
                if current != *expected {
                    // Dropping the transaction without commit writes nothing.
                    return Err(StoreError::Conflict(key.clone()));
                }
            }
            revision = meta
                .get(REVISION)
                .map_err(backend)?
                .map_or(0, |v| v.value())
                + 1;
            for record in &txn.puts {
                index(&tx, record)?;
                match record {
                    Record::Request(r) => {
                        requests
                            .insert(r.id.as_str(), encode(r, revision)?.as_slice())
                            .map_err(backend)?;
                    }
                    Record::Grant(g) => {
                        grants
                            .insert(g.id.as_str(), encode(g, revision)?.as_slice())
                            .map_err(backend)?;
                    }
                }
            }
            meta.insert(REVISION, revision).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        for record in txn.puts {
            // No receiver is fine: nobody is watching.
            let _ = self.changes.send(Change { revision, record });
        }
        Ok(revision)
    }

    fn numeric_id(&self, kind: IdKind, name: &str) -> Result<u32, StoreError> {
        let key = match kind {
            IdKind::Service => format!("service:{name}"),
            IdKind::Identity => format!("identity:{name}"),
        };
        {
            let tx = self.db.begin_read().map_err(backend)?;
            let t = tx.open_table(IDS).map_err(backend)?;
            if let Some(v) = t.get(key.as_str()).map_err(backend)? {
                return Ok(v.value());
            }
        }
        let tx = self.db.begin_write().map_err(backend)?;
        let id;
        {
            let mut ids = tx.open_table(IDS).map_err(backend)?;
            if let Some(v) = ids.get(key.as_str()).map_err(backend)? {
                return Ok(v.value());
            }
            let mut meta = tx.open_table(META).map_err(backend)?;
            let (counter, first, limit) = match kind {
                IdKind::Service => (NEXT_SERVICE_ID, 0u64, u64::from(jit_common::MAX_SERVICES)),
                IdKind::Identity => (NEXT_IDENTITY_ID, 1u64, u64::from(u32::MAX)),
            };
            let next = meta
                .get(counter)
                .map_err(backend)?
                .map_or(first, |v| v.value());
            if next >= limit {
                return Err(StoreError::IdsExhausted(kind));
            }
            id = u32::try_from(next).map_err(|_| StoreError::IdsExhausted(kind))?;
            meta.insert(counter, next + 1).map_err(backend)?;
            ids.insert(key.as_str(), id).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(id)
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}
