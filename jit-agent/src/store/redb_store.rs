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
/// Index of open grants by what they open and when they end (`super::grant_index_entries`).
const GRANT_INDEX: TableDefinition<&str, ()> = TableDefinition::new("open_grant_index");

const REVISION: &str = "revision";
const NEXT_SERVICE_ID: &str = "next_service_id";
const NEXT_IDENTITY_ID: &str = "next_identity_id";
/// The revision the indexes were last kept at. A file whose `revision` moved past it was written
/// by a binary that does not keep them (before them, or a downgrade): its indexes are rebuilt
/// on open.
const INDEXED_REVISION: &str = "indexed_revision";
/// The revision the index of open grants was last kept at: written by binaries that keep it,
/// so a file written since by one that does not (before it, or a downgrade) is indexed again.
const GRANTS_INDEXED_REVISION: &str = "grants_indexed_revision";

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
        tx.open_table(GRANT_INDEX).map_err(backend)?;
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
                Err(e) => super::report_corrupt(
                    &self.corrupt,
                    &format!("{}/{}", table.name(), k.value()),
                    &e,
                ),
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

/// Rebuilds the indexes of a file whose records were written without them (see
/// [`INDEXED_REVISION`]), in the opening transaction: every record that decodes is indexed; one
/// that does not stays as it is (listings report it).
fn index_once(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(backend)?;
    let revision = meta.get(REVISION).map_err(backend)?.map(|v| v.value());
    let indexed = meta
        .get(INDEXED_REVISION)
        .map_err(backend)?
        .map(|v| v.value());
    let grants_indexed = meta
        .get(GRANTS_INDEXED_REVISION)
        .map_err(backend)?
        .map(|v| v.value());
    if indexed.is_some() && indexed == revision && grants_indexed == revision {
        return Ok(());
    }
    for table in [OPEN_REQUESTS, OPEN_GRANTS, CLOSED, GRANT_INDEX] {
        tx.delete_table(table).map_err(backend)?;
        tx.open_table(table).map_err(backend)?;
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
            "store: indexing {} record(s) written without indexes",
            records.len()
        );
    }
    for record in &records {
        index(tx, record, None)?;
    }
    meta.insert(INDEXED_REVISION, revision.unwrap_or(0))
        .map_err(backend)?;
    meta.insert(GRANTS_INDEXED_REVISION, revision.unwrap_or(0))
        .map_err(backend)?;
    Ok(())
}

/// Keeps the indexes of `record` (as it is being written over `old`, if it replaces one that
/// decodes) in `tx`.
fn index(
    tx: &redb::WriteTransaction,
    record: &Record,
    old: Option<&Record>,
) -> Result<(), StoreError> {
    if let Record::Grant(g) = record {
        let mut by = tx.open_table(GRANT_INDEX).map_err(backend)?;
        let entries = super::grant_index_entries(g);
        // Entries of the record replaced that this one does not have (a grant's keys never
        // change, but an index must not trust that).
        if let Some(Record::Grant(was)) = old {
            for (entry, _) in super::grant_index_entries(was) {
                if !entries.iter().any(|(e, there)| *there && *e == entry) {
                    by.remove(entry.as_str()).map_err(backend)?;
                }
            }
        }
        for (entry, there) in &entries {
            if *there {
                by.insert(entry.as_str(), ()).map_err(backend)?;
            } else {
                by.remove(entry.as_str()).map_err(backend)?;
            }
        }
    }
    let (table, id) = match record {
        Record::Request(r) => (OPEN_REQUESTS, r.id.as_str()),
        Record::Grant(g) => (OPEN_GRANTS, g.id.as_str()),
    };
    let mut open = tx.open_table(table).map_err(backend)?;
    if record.is_open() {
        open.insert(id, ()).map_err(backend)?;
    } else {
        open.remove(id).map_err(backend)?;
    }
    if let Some(at) = record.prune_at_ms() {
        let mut closed = tx.open_table(CLOSED).map_err(backend)?;
        closed
            .insert(super::closed_key(at, &record.key()).as_str(), ())
            .map_err(backend)?;
    }
    Ok(())
}

/// A record of `key` in `requests`/`grants`: `Ok(None)` when absent, `Err(())` when it does not
/// decode.
fn stored(
    requests: &redb::Table<&str, &[u8]>,
    grants: &redb::Table<&str, &[u8]>,
    key: &RecordKey,
) -> Result<Result<Option<Record>, ()>, StoreError> {
    Ok(match key {
        RecordKey::Request(id) => match requests.get(id.as_str()).map_err(backend)? {
            None => Ok(None),
            Some(v) => decode::<Request>(id, v.value())
                .map(|r| Some(Record::Request(r.value)))
                .map_err(|_| ()),
        },
        RecordKey::Grant(id) => match grants.get(id.as_str()).map_err(backend)? {
            None => Ok(None),
            Some(v) => decode::<Grant>(id, v.value())
                .map(|g| Some(Record::Grant(g.value)))
                .map_err(|_| ()),
        },
    })
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
                    super::report_corrupt(&self.corrupt, &format!("{}/{id}", table.name()), &e);
                }
            }
        }
        Ok(out)
    }
}

impl RedbStore {
    /// The open grants the index of open grants finds for `lookup`, read in one transaction.
    fn grants_by(&self, lookup: &super::GrantLookup) -> Result<Vec<Versioned<Grant>>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let by = tx.open_table(GRANT_INDEX).map_err(backend)?;
        let grants = tx.open_table(GRANTS).map_err(backend)?;
        let (start, end) = lookup.range();
        let mut out: Vec<Versioned<Grant>> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for item in by
            .range::<&str>(start.as_str()..end.as_str())
            .map_err(backend)?
        {
            let (k, _) = item.map_err(backend)?;
            let Some(id) = super::indexed_grant(k.value()) else {
                continue;
            };
            let Some(v) = grants.get(id.as_str()).map_err(backend)? else {
                continue;
            };
            match decode::<Grant>(&id, v.value()) {
                // A grant bound to two hosts is found once per host.
                Ok(g) if super::answers(lookup, &g.value) && seen.insert(id.clone()) => out.push(g),
                Ok(_) => {}
                Err(e) => {
                    super::report_corrupt(&self.corrupt, &format!("{}/{id}", GRANTS.name()), &e);
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
        // The record decides, not the index.
        let mut open: Vec<Versioned<Request>> = self.open_of(OPEN_REQUESTS, REQUESTS)?;
        open.retain(|r| Record::Request(r.value.clone()).is_open());
        Ok(open)
    }

    fn open_grants(&self) -> Result<Vec<Versioned<Grant>>, StoreError> {
        let mut open: Vec<Versioned<Grant>> = self.open_of(OPEN_GRANTS, GRANTS)?;
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
                let record = match stored(&requests, &grants, &key)? {
                    // Undecodable: kept as it is for the operator (listings report it).
                    Err(()) => continue,
                    Ok(r) => r,
                };
                closed.remove(index_key.as_str()).map_err(backend)?;
                // Gone already, or not prunable under this entry (a stale one).
                let Some(record) = record.filter(|r| super::prunable(r, before_ms)) else {
                    continue;
                };
                match &record {
                    Record::Request(r) => {
                        requests.remove(r.id.as_str()).map_err(backend)?;
                    }
                    Record::Grant(g) => {
                        grants.remove(g.id.as_str()).map_err(backend)?;
                        // Its request goes with it, unless it is somehow still open.
                        let rk = RecordKey::Request(g.request_id.clone());
                        if let Ok(Some(r)) = stored(&requests, &grants, &rk)?
                            && !r.is_open()
                        {
                            requests.remove(g.request_id.as_str()).map_err(backend)?;
                        }
                    }
                }
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
                let old = stored(&requests, &grants, &record.key())?.ok().flatten();
                index(&tx, record, old.as_ref())?;
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
            meta.insert(INDEXED_REVISION, revision).map_err(backend)?;
            meta.insert(GRANTS_INDEXED_REVISION, revision)
                .map_err(backend)?;
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
