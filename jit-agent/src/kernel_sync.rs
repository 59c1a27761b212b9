//! Turns durable state into kernel map entries. It consumes the store's change stream (whoever
//! produced the change), reconciles the whole kernel with the store at start, after a gap and
//! periodically, and follows the node's addresses. It never evaluates policy: what is live in the
//! store is what the kernel gets.
//!
//! Serialisation: every write takes the map lock *before* it reads the store, so a write always
//! reflects a store state at least as new as the one any earlier write saw. A grant enforced
//! while it is being revoked therefore cannot be written back after the revoke's delete: whichever
//! write comes second reads the revoked record. The one exception, a reconciliation while the
//! node serves ([`KernelSync::catch_up`]), reads everything without the lock and then settles
//! each key that differs under the lock only if the key is untouched since and the grant to
//! write is still in force when read again under the lock (see `settle_grants`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use ipnet::IpNet;
use jit_common::GrantKey;
use tokio::sync::broadcast::error::RecvError;

use crate::{
    config::Config,
    coverage,
    datapath::{self, DatapathError, GateMaps, GrantEntry, GrantScope, grant_key},
    kernel_names::KernelNames,
    local_addrs::LocalAddrs,
    model::{Grant, Usage, now_ms},
    spec::{Mode, ServiceDest},
    store::{Change, GrantLookup, IdKind, Record, Store, StoreError},
};

/// Kernel sync failures.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A map write failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored grant cannot be put in kernel form (a bound source or its id does not parse);
    /// it opens nothing.
    #[error("grant {grant}: {problem}; it opens nothing")]
    BadGrant {
        /// The grant id.
        grant: String,
        /// What does not parse.
        problem: String,
    },
}

/// Differences a reconciliation found between the kernel and the store, and repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Repairs {
    /// Entries the store wants and the kernel lacked (or held with other values).
    pub written: u64,
    /// Entries the kernel held and the store does not want.
    pub deleted: u64,
}

impl Repairs {
    /// Total repairs.
    #[must_use]
    pub const fn total(&self) -> u64 {
        self.written + self.deleted
    }
}

/// What the kernel sync has done, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    /// Kernel entries repaired by reconciliations after start (a non-zero value means the kernel
    /// drifted from the store: a failed write, a crash between writes, a change behind the
    /// agent's back).
    pub repairs: u64,
    /// Reconciliations run.
    pub reconciliations: u64,
    /// Reconciliations or writes that failed (retried by the next reconciliation).
    pub failures: u64,
}

/// A grant's kernel entry that left the kernel (its grant ended, or a grant lasting longer took
/// its key), with what the kernel counted under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedEntry {
    /// The grant.
    pub grant_id: String,
    /// The address the entry let through, or `identity prefixes`.
    pub source: String,
    /// What the kernel counted (wall-clock times).
    pub usage: Usage,
}

/// Ended entries waiting for the node to record them. Bounded: if the node falls this far
/// behind, an entry's usage is logged and not recorded rather than held without limit.
const ENDED_BACKLOG: usize = 65_536;

/// Writes the kernel maps from the store.
pub struct KernelSync<S: Store> {
    store: Arc<S>,
    cfg: Arc<Config>,
    maps: Mutex<GateMaps>,
    local: Mutex<LocalAddrs>,
    repairs: AtomicU64,
    reconciliations: AtomicU64,
    failures: AtomicU64,
    /// Wakes the reconciliation loop early (a kernel write failed).
    wake: tokio::sync::Notify,
    /// A kernel write failed since the identity-grant counts were last checked.
    recount_due: AtomicBool,
    /// Single-grant syncs (grants, revokes) waiting for the map lock: a reconciliation settling
    /// in batches lets them in between its batches.
    waiting: AtomicU64,
    /// The names behind the ids written so far (see `kernel_names`).
    names: Mutex<KernelNames>,
    /// Grants already reported as impossible to put in kernel form.
    bad_grants: Mutex<BTreeSet<String>>,
    /// Where removed entries go (see [`Self::ended_entries`]).
    ended_tx: tokio::sync::mpsc::Sender<EndedEntry>,
    ended_rx: Mutex<Option<tokio::sync::mpsc::Receiver<EndedEntry>>>,
}

/// How soon a failed reconciliation is tried again.
const RECONCILE_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The numeric form of a grant id (`grant-<12 hex>`), carried in kernel events.
pub fn numeric_grant_id(id: &str) -> Result<u64, SyncError> {
    id.strip_prefix("grant-")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| SyncError::BadGrant {
            grant: id.to_string(),
            problem: "the id is not grant-<hex>".into(),
        })
}

/// Converts a kernel `CLOCK_BOOTTIME` instant (ns) to wall-clock Unix ms, relative to now; 0
/// (never) stays 0.
fn to_wall_ms(boot_ns: u64) -> Result<i64, DatapathError> {
    if boot_ns == 0 {
        return Ok(0);
    }
    let boot_now = datapath::boottime_ns()?;
    let ago_ms = (i128::from(boot_now) - i128::from(boot_ns)) / 1_000_000;
    let t = i128::from(now_ms()) - ago_ms;
    Ok(i64::try_from(t.max(0)).unwrap_or(i64::MAX))
}

/// The wall-clock form of what the kernel counted under an entry.
fn wall_usage(u: &datapath::Usage) -> Result<Usage, DatapathError> {
    Ok(Usage {
        packets: u.packets,
        first_seen_ms: to_wall_ms(u.first_seen_ns)?,
        last_seen_ms: to_wall_ms(u.last_seen_ns)?,
    })
}

/// The id of a grant from its numeric form in the kernel (the inverse of [`numeric_grant_id`]).
#[must_use]
pub fn grant_id_of(numeric: u64) -> String {
    format!("grant-{numeric:012x}")
}

/// Converts a wall-clock instant (Unix ms) to the kernel's `CLOCK_BOOTTIME` ns, relative to now.
fn to_boottime_ns(wall_ms: i64) -> Result<u64, DatapathError> {
    let boot_now = datapath::boottime_ns()?;
    let delta_ms = wall_ms.saturating_sub(now_ms());
    let delta_ns = i128::from(delta_ms) * 1_000_000;
    let t = i128::from(boot_now) + delta_ns;
    Ok(u64::try_from(t.max(0)).unwrap_or(u64::MAX))
}

/// The kernel scopes of a grant: its bound host addresses, or its identity's static prefixes.
/// A binding that is not one host address is an error: what was approved cannot be known.
fn scopes(g: &Grant) -> Result<Vec<GrantScope>, SyncError> {
    if g.extra_sources.is_empty() {
        return Ok(vec![GrantScope::Identity]);
    }
    g.extra_sources
        .iter()
        .map(|s| match s.parse::<IpNet>() {
            // Only single hosts are ever bound; anything wider is not what was approved.
            Ok(net) if net.prefix_len() == net.max_prefix_len() => Ok(GrantScope::Host(net.addr())),
            _ => Err(SyncError::BadGrant {
                grant: g.id.clone(),
                problem: format!("bound source {s:?} is not one host address"),
            }),
        })
        .collect()
}

/// The store lookups that find every open grant sharing a kernel key with `g` (see
/// [`scopes`]): its service and identity, or its service and each bound host. A source that is
/// not one host has no key (the grant opens nothing).
fn lookups(g: &Grant) -> Vec<GrantLookup> {
    if g.extra_sources.is_empty() {
        return vec![GrantLookup::Identity {
            service: g.service.clone(),
            identity: g.identity.clone(),
        }];
    }
    g.extra_sources
        .iter()
        .filter_map(|s| s.parse::<IpNet>().ok())
        .filter(|net| net.prefix_len() == net.max_prefix_len())
        .map(|net| GrantLookup::Host {
            addr: net.addr(),
            service: Some(g.service.clone()),
        })
        .collect()
}

impl<S: Store> KernelSync<S> {
    /// A sync writing `maps`, with the node's addresses read now.
    pub fn new(store: Arc<S>, cfg: Arc<Config>, maps: GateMaps) -> Self {
        let (ended_tx, ended_rx) = tokio::sync::mpsc::channel(ENDED_BACKLOG);
        let local = LocalAddrs::read().unwrap_or_else(|e| {
            tracing::error!("reading the node's addresses: {e}; services on them cover only themselves until it works");
            LocalAddrs::default()
        });
        Self {
            store,
            cfg,
            maps: Mutex::new(maps),
            local: Mutex::new(local),
            repairs: AtomicU64::new(0),
            reconciliations: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            recount_due: AtomicBool::new(true),
            waiting: AtomicU64::new(0),
            names: Mutex::new(KernelNames::default()),
            bad_grants: Mutex::new(BTreeSet::new()),
            ended_tx,
            ended_rx: Mutex::new(Some(ended_rx)),
        }
    }

    /// The entries removed from the kernel, with their usage, from the start: the node records
    /// them. `None` after the first call.
    pub fn ended_entries(&self) -> Option<tokio::sync::mpsc::Receiver<EndedEntry>> {
        self.ended_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Hands an entry that left the kernel to the node. A full backlog or a node that is gone
    /// loses the figures (logged): the entry is out of the kernel either way.
    fn report_ended(&self, e: &GrantEntry) {
        let source = match e.scope {
            GrantScope::Host(addr) => addr.to_string(),
            GrantScope::Identity => "identity prefixes".to_string(),
        };
        let grant_id = grant_id_of(e.grant_id);
        let usage = match wall_usage(&e.usage) {
            Ok(u) => u,
            Err(err) => {
                tracing::error!(
                    grant_id,
                    source,
                    "a grant entry's usage not recorded: {err}"
                );
                return;
            }
        };
        let ended = EndedEntry {
            grant_id,
            source,
            usage,
        };
        if let Err(err) = self.ended_tx.try_send(ended) {
            let e = err.into_inner();
            tracing::error!(
                grant_id = %e.grant_id,
                source = %e.source,
                packets = e.usage.packets,
                "a grant entry's usage not recorded: the node is not taking them"
            );
        }
    }

    /// Removes the entry under `key`, handing its usage to the node.
    fn take(&self, maps: &mut GateMaps, key: &GrantKey) -> Result<(), SyncError> {
        let taken = maps.take_grant(key).inspect_err(|_| {
            // It may have failed between the entry and its service's count.
            self.recount_due.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        })?;
        match taken {
            Some(Some(e)) => self.report_ended(&e),
            Some(None) => tracing::error!(
                service_id = key.service_id,
                "a grant entry was deleted, but reading its usage first failed: not recorded"
            ),
            None => {}
        }
        Ok(())
    }

    /// Writes `entry`, handing the usage of any other grant's entry it replaces to the node.
    fn put(&self, maps: &mut GateMaps, entry: GrantEntry) -> Result<(), SyncError> {
        let replaced = maps.put_grant(entry).inspect_err(|_| {
            // It may have failed between the entry and its service's count.
            self.recount_due.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        })?;
        if let Some(replaced) = replaced {
            self.report_ended(&replaced);
        }
        Ok(())
    }

    /// What the kernel counts under `grant` right now, plus what its removed entries counted:
    /// `None` when its service is not on this node, or when it has ended and no figures were
    /// recorded for it (a grant from before usage was counted, or one whose record was lost).
    pub fn usage(&self, grant: &Grant) -> Result<Option<Usage>, SyncError> {
        if !self.cfg.services.contains_key(&grant.service) {
            return Ok(None);
        }
        // Not (or no longer) in the kernel: what its removed entries recorded, if anything
        // (`None` is unknown, never "unused").
        if grant.state != crate::model::GrantState::Active || !grant.issued {
            return Ok(grant.usage);
        }
        let mut total = grant.usage.unwrap_or_default();
        let identity_id = self.identity_id(&grant.identity)?;
        let service_id = self.service_id(&grant.service)?;
        let grant_id = numeric_grant_id(&grant.id)?;
        let maps = self.maps();
        for scope in scopes(grant)? {
            if let Some(e) = maps.grant(&grant_key(scope, identity_id, service_id))?
                && e.grant_id == grant_id
            {
                total = total.merge(wall_usage(&e.usage)?);
            }
        }
        Ok(Some(total))
    }

    /// Reports a grant that cannot be put in kernel form: logged and counted once per grant
    /// (it is left out of the kernel at every sync, and would otherwise be counted at each).
    fn report_bad_grant(&self, id: &str, e: &SyncError) {
        let first = self
            .bad_grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string());
        if first {
            tracing::error!("{e}");
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that `id` names `name` (for `jit-agent bpf status|grants`); writes the names
    /// file when this is new. A failed write is logged: the names are advisory.
    fn remember(&self, kind: IdKind, id: u32, name: &str) {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = match kind {
            IdKind::Service => &mut names.services,
            IdKind::Identity => &mut names.identities,
        };
        if table.get(&id).is_some_and(|n| n == name) {
            return;
        }
        table.insert(id, name.to_string());
        if let Err(e) = names.save(&self.cfg.state_dir) {
            tracing::warn!("recording the kernel's names: {e}");
        }
    }

    /// Asks the reconciliation loop to run now (a kernel write failed and must be retried).
    pub fn request_reconcile(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.recount_due.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Reconciles every `every` (or, when a reconciliation takes longer than a tenth of that,
    /// ten times as long as the last one took: with a million grants a pass takes seconds, and
    /// the node's CPU is for its work), and at once when asked to; after a failure, again and
    /// again (every 200 ms) until a reconciliation succeeds, so a failed delete is retried
    /// until the kernel entry is gone.
    pub async fn reconcile_loop(self: Arc<Self>, every: std::time::Duration) {
        let mut retry = false;
        let mut took = std::time::Duration::ZERO;
        loop {
            let wait = if retry {
                RECONCILE_RETRY
            } else {
                every.max(took.saturating_mul(10))
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
            }
            let me = Arc::clone(&self);
            let started = std::time::Instant::now();
            let done = tokio::task::spawn_blocking(move || me.reconcile()).await;
            took = started.elapsed();
            match done {
                Ok(Ok(_)) => retry = false,
                Ok(Err(e)) => {
                    tracing::error!("reconciliation failed: {e}; retrying");
                    retry = true;
                }
                Err(e) => {
                    tracing::error!("reconciliation task failed: {e}; retrying");
                    retry = true;
                }
            }
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, GateMaps> {
        // A panic while holding the lock leaves the maps as the kernel has them: still usable.
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn local(&self) -> LocalAddrs {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Numeric id of a service.
    pub fn service_id(&self, name: &str) -> Result<u32, StoreError> {
        let id = self.store.numeric_id(IdKind::Service, name)?;
        self.remember(IdKind::Service, id, name);
        Ok(id)
    }

    /// Numeric id of an identity.
    pub fn identity_id(&self, name: &str) -> Result<u32, StoreError> {
        let id = self.store.numeric_id(IdKind::Identity, name)?;
        self.remember(IdKind::Identity, id, name);
        Ok(id)
    }

    /// What the sync has done so far.
    pub fn stats(&self) -> SyncStats {
        SyncStats {
            repairs: self.repairs.load(Ordering::Relaxed),
            reconciliations: self.reconciliations.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// The kernel entries the store wants for `grants`: per key, the live grant that lasts
    /// longest. Grants of services not configured here are not this node's.
    fn wanted<'a>(
        &self,
        grants: &'a [Grant],
    ) -> Result<BTreeMap<GrantKeyOrd, GrantEntry>, SyncError> {
        let now = now_ms();
        let boot_now = datapath::boottime_ns()?;
        let mut wanted: BTreeMap<GrantKeyOrd, GrantEntry> = BTreeMap::new();
        // Numeric ids looked up once per name, not once per grant.
        let mut ids: HashMap<(IdKind, &str), u32> = HashMap::new();
        for g in grants {
            // A grant whose audit record is not durable yet is not the kernel's.
            if !g.is_unended(now) || !g.issued || !self.cfg.services.contains_key(&g.service) {
                continue;
            }
            let mut id_of = |kind: IdKind, name: &'a str| -> Result<u32, StoreError> {
                if let Some(id) = ids.get(&(kind, name)) {
                    return Ok(*id);
                }
                let id = match kind {
                    IdKind::Identity => self.identity_id(name)?,
                    IdKind::Service => self.service_id(name)?,
                };
                ids.insert((kind, name), id);
                Ok(id)
            };
            let identity_id = id_of(IdKind::Identity, &g.identity)?;
            let service_id = id_of(IdKind::Service, &g.service)?;
            // A grant that cannot be put in kernel form opens nothing; it is reported (log,
            // failure count) every time, never passed over in silence, and stops no other grant.
            let (scopes, grant_id) = match scopes(g).and_then(|s| Ok((s, numeric_grant_id(&g.id)?)))
            {
                Ok(k) => k,
                Err(e) => {
                    self.report_bad_grant(&g.id, &e);
                    continue;
                }
            };
            for scope in scopes {
                let entry = GrantEntry {
                    scope,
                    identity_id,
                    service_id,
                    grant_id,
                    not_before_ns: to_boottime_ns(g.not_before_ms)?,
                    expires_at_ns: to_boottime_ns(g.expires_ms)?,
                    usage: datapath::Usage::default(),
                };
                let key = GrantKeyOrd(entry.key());
                // One entry per key: a grant in force before one yet to start, then the
                // later expiry.
                let rank = |e: &GrantEntry| (e.not_before_ns <= boot_now, e.expires_at_ns);
                let keep = wanted.get(&key).is_none_or(|w| rank(w) < rank(&entry));
                if keep {
                    wanted.insert(key, entry);
                }
            }
        }
        Ok(wanted)
    }

    /// Brings every map in line with the configuration, the node's addresses and the store:
    /// services, identity bindings, grants, in both directions. Returns what it repaired.
    /// Revoked and expired grants are never written back.
    pub fn resync(&self) -> Result<Repairs, SyncError> {
        let mut maps = self.maps();
        // Every phase runs even when an earlier one fails (a full services map must not keep a
        // revoked grant in the kernel); the first error is returned after all have run.
        let services = self.sync_services_locked(&mut maps);
        let identities = self.sync_identities_locked(&mut maps);
        let grants = self.sync_grants_locked(&mut maps);
        all_phases([services, identities, grants])
    }

    /// Grants: the kernel holds exactly the store's grants that are live or yet to start (the
    /// kernel opens each at its start by itself).
    fn sync_grants_locked(&self, maps: &mut GateMaps) -> Result<Repairs, SyncError> {
        let mut repairs = Repairs::default();
        let grants: Vec<Grant> = self
            .store
            .open_grants()?
            .into_iter()
            .map(|g| g.value)
            .collect();
        let wanted = self.wanted(&grants)?;
        let mut held: BTreeMap<GrantKeyOrd, GrantEntry> = BTreeMap::new();
        for e in maps.grants()? {
            held.insert(GrantKeyOrd(e.key()), e);
        }
        // Deletes first: a grant that moved to another key is never open twice.
        for key in held.keys() {
            if !wanted.contains_key(key) {
                self.take(maps, &key.0)?;
                repairs.deleted += 1;
            }
        }
        for (key, entry) in &wanted {
            let same = held.get(key).is_some_and(|h| same_grant(h, entry));
            if !same {
                self.put(maps, *entry)?;
                repairs.written += 1;
            }
        }
        self.recount_due.store(false, Ordering::Relaxed);
        let fixed = maps.recount_identity_grants().inspect_err(|_| {
            self.recount_due.store(true, Ordering::Relaxed);
        })?;
        repairs.written += u64::from(fixed);
        Ok(repairs)
    }

    /// [`Self::resync`] without holding the map lock over the reads of every grant: services and
    /// identity bindings under the lock (a few entries), grants by [`Self::settle_grants`].
    /// What runs while the node serves: grants and revokes never wait for a full read.
    pub fn catch_up(&self) -> Result<Repairs, SyncError> {
        let (services, identities) = {
            let mut maps = self.maps();
            (
                self.sync_services_locked(&mut maps),
                self.sync_identities_locked(&mut maps),
            )
        };
        let grants = self.settle_grants();
        all_phases([services, identities, grants])
    }

    /// Grants, as [`Self::sync_grants_locked`] brings them in line, but with the kernel and then
    /// the store read without the map lock (with a million grants each read takes seconds).
    /// Each key where they differ is then settled under the lock, in short batches, and only if
    /// nothing touched it since the reads:
    /// - a kernel entry that changed since the kernel read was written by a sync that read the
    ///   store later: left as it is;
    /// - a grant about to be written is read again and must still be in force and issued: a
    ///   revoke that landed after the reads has taken its entry, or will take it once it has the
    ///   lock, and is never undone;
    /// - an entry about to be deleted belongs to no grant in force at the reads; a grant that
    ///   came after has its own sync, which writes it back after this one.
    fn settle_grants(&self) -> Result<Repairs, SyncError> {
        /// Keys settled per hold of the lock (each write reads its grant again under it).
        const BATCH: usize = 32;
        // The kernel first, then the store: every sync that wrote an entry before the kernel
        // read had read the store before this read of it, so the store read here is at least
        // as new as what the kernel read shows; a sync that writes after the kernel read
        // changes the entry, which the settling sees and leaves alone.
        let reader = self.maps().grants_reader()?;
        let held: BTreeMap<GrantKeyOrd, GrantEntry> = reader
            .grants()?
            .into_iter()
            .map(|e| (GrantKeyOrd(e.key()), e))
            .collect();
        drop(reader);
        let grants: Vec<Grant> = self
            .store
            .open_grants()?
            .into_iter()
            .map(|g| g.value)
            .collect();
        let wanted = self.wanted(&grants)?;
        drop(grants);
        // Deletes first, as in a full resync.
        let mut todo: Vec<(GrantKey, Option<GrantEntry>, Option<GrantEntry>)> = held
            .iter()
            .filter(|(k, _)| !wanted.contains_key(k))
            .map(|(k, h)| (k.0, Some(*h), None))
            .collect();
        for (k, w) in &wanted {
            let h = held.get(k);
            if !h.is_some_and(|h| same_grant(h, w)) {
                todo.push((k.0, h.copied(), Some(*w)));
            }
        }
        drop((held, wanted));
        let mut repairs = Repairs::default();
        let now = now_ms();
        for batch in todo.chunks(BATCH) {
            // A grant or a revoke waiting for the lock goes first (a mutex is not fair: the
            // settling would take it back at once); bounded, so a stream of them cannot stall
            // the settling for long.
            for _ in 0..200 {
                if self.waiting.load(Ordering::Relaxed) == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            let mut maps = self.maps();
            for (key, was, want) in batch {
                if !same_entry(maps.grant(key)?.as_ref(), was.as_ref()) {
                    continue;
                }
                match want {
                    None => {
                        self.take(&mut maps, key)?;
                        repairs.deleted += 1;
                    }
                    Some(entry) => {
                        let still = self
                            .store
                            .grant(&grant_id_of(entry.grant_id))?
                            .is_some_and(|g| g.value.is_unended(now) && g.value.issued);
                        if still {
                            self.put(&mut maps, *entry)?;
                            repairs.written += 1;
                        }
                    }
                }
            }
        }
        // The per-service counts of identity grants: every write keeps them, so they are
        // checked (a walk of the whole map under the lock) only after a write failed.
        if self.recount_due.swap(false, Ordering::Relaxed) {
            let fixed = self.maps().recount_identity_grants().inspect_err(|_| {
                self.recount_due.store(true, Ordering::Relaxed);
            })?;
            repairs.written += u64::from(fixed);
        }
        Ok(repairs)
    }

    /// A reconciliation on a timer or after a failure: [`Self::catch_up`], counted.
    pub fn reconcile(&self) -> Result<Repairs, SyncError> {
        self.reconciliations.fetch_add(1, Ordering::Relaxed);
        // The address follower may have missed a change (or stopped): read them again.
        match LocalAddrs::read() {
            Ok(addrs) => {
                self.merge_local_addrs(addrs);
            }
            Err(e) => tracing::error!("re-reading the node's addresses: {e}"),
        }
        match self.catch_up() {
            Ok(r) => {
                if r.total() > 0 {
                    self.repairs.fetch_add(r.total(), Ordering::Relaxed);
                    tracing::warn!(
                        "reconciliation repaired the kernel: {} entries written, {} deleted",
                        r.written,
                        r.deleted
                    );
                }
                Ok(r)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Services: every kernel destination the configuration covers on this node's addresses;
    /// others removed. Removals go first, so a destination that moves between services is never
    /// held by two.
    fn sync_services_locked(&self, maps: &mut GateMaps) -> Result<Repairs, SyncError> {
        let (covered, overlaps) = coverage::expand(&self.cfg, &self.local());
        for o in &overlaps {
            tracing::error!(
                "services {:?} and {:?} both cover {}:{}/{}; {:?} keeps it",
                o.kept,
                o.dropped,
                o.dest.addr,
                o.dest.port,
                o.dest.proto,
                o.kept
            );
        }
        let mut wanted: BTreeMap<ServiceDest, (u32, Mode)> = BTreeMap::new();
        for c in covered {
            wanted.insert(c.dest, (self.service_id(&c.service)?, c.mode));
        }
        let mut repairs = Repairs::default();
        let mut first_error = None;
        for existing in maps.services()? {
            match wanted.get(&existing.dest) {
                Some((id, mode)) if *id == existing.service_id && *mode == existing.mode => {
                    wanted.remove(&existing.dest);
                }
                Some(_) => {}
                None => match maps.remove_service(existing.dest) {
                    Ok(_) => repairs.deleted += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
            }
        }
        // One destination that cannot be written (a full map) must not leave the others out.
        for (dest, (id, mode)) in wanted {
            match maps.add_service(dest, id, mode) {
                Ok(()) => repairs.written += 1,
                Err(e) => {
                    tracing::error!("protecting {}:{}/{}: {e}", dest.addr, dest.port, dest.proto);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(repairs),
        }
    }

    /// Identity bindings: exactly the static ones from the configuration. Requester addresses
    /// are never bound to an identity: they live in host-bound grant keys.
    fn sync_identities_locked(&self, maps: &mut GateMaps) -> Result<Repairs, SyncError> {
        let mut wanted: BTreeMap<IpNet, u32> = BTreeMap::new();
        for (identity, nets) in &self.cfg.identities {
            let id = self.identity_id(identity)?;
            for n in nets {
                wanted.insert(n.trunc(), id);
            }
        }
        let mut repairs = Repairs::default();
        let current: BTreeSet<(IpNet, u32)> = maps.identities()?.into_iter().collect();
        // Unbind before bind: a prefix that changes owner is never bound to both.
        for (net, id) in &current {
            if wanted.get(net) != Some(id) {
                maps.unbind_identity(*net)?;
                repairs.deleted += 1;
            }
        }
        for (net, id) in wanted {
            if !current.contains(&(net, id)) {
                maps.bind_identity(net, id)?;
                repairs.written += 1;
            }
        }
        Ok(repairs)
    }

    /// Puts the kernel entries of `grant`'s keys in line with the store: for each key, the
    /// longest live grant with that key, or nothing. Takes the map lock before reading the store.
    pub fn sync_grant(&self, grant: &Grant) -> Result<(), SyncError> {
        if !self.cfg.services.contains_key(&grant.service) {
            return Ok(());
        }
        let identity_id = self.identity_id(&grant.identity)?;
        let service_id = self.service_id(&grant.service)?;
        let keys: Vec<GrantKey> = scopes(grant)?
            .into_iter()
            .map(|s| grant_key(s, identity_id, service_id))
            .collect();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let mut maps = self.maps();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        // The grants behind these keys alone, through the store's index of open grants, and
        // the grant itself as stored now (found even when the index lags its record: one
        // written by an agent that does not keep the index, until it is repaired).
        let mut grants: Vec<Grant> = Vec::new();
        if let Some(g) = self.store.grant(&grant.id)?
            && g.value.state == crate::model::GrantState::Active
        {
            grants.push(g.value);
        }
        for lookup in lookups(grant) {
            for g in self.store.open_grants_by(&lookup)? {
                if !grants.iter().any(|h| h.id == g.value.id) {
                    grants.push(g.value);
                }
            }
        }
        let wanted = self.wanted(&grants)?;
        for key in keys {
            match wanted.get(&GrantKeyOrd(key)) {
                // The same grant, its window not to be narrowed: left as it is.
                Some(entry)
                    if maps
                        .grant(&key)?
                        .is_some_and(|held| same_grant(&held, entry)) => {}
                Some(entry) => self.put(&mut maps, *entry)?,
                None => self.take(&mut maps, &key)?,
            }
        }
        Ok(())
    }

    /// Applies one committed change.
    pub fn apply(&self, change: &Change) -> Result<(), SyncError> {
        if let Record::Grant(g) = &change.record {
            self.sync_grant(g)?;
        }
        Ok(())
    }

    /// Takes a new set of node addresses (remembering configured service addresses that left
    /// the node); returns whether anything changed.
    fn merge_local_addrs(&self, addrs: LocalAddrs) -> bool {
        let named: Vec<IpAddr> = self
            .cfg
            .services
            .values()
            .flat_map(|s| s.destinations.iter().map(|d| d.addr))
            .collect();
        let mut local = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = addrs.after(&local, named);
        if *local == next {
            return false;
        }
        *local = next;
        true
    }

    /// Takes a new set of node addresses and, when it differs, rewrites the services.
    pub fn set_local_addrs(&self, addrs: LocalAddrs) -> Result<bool, SyncError> {
        if !self.merge_local_addrs(addrs) {
            return Ok(false);
        }
        let mut maps = self.maps();
        self.sync_services_locked(&mut maps)?;
        Ok(true)
    }

    /// Follows the change stream until it closes; resynchronises fully after a gap.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.store.subscribe();
        // Anything committed before we subscribed is covered by this full read.
        let me = Arc::clone(&self);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.catch_up()).await {
            tracing::error!("kernel resync failed: {e}; reconciling again");
            self.request_reconcile();
        }
        loop {
            match rx.recv().await {
                Ok(change) => {
                    // Store reads and map writes block: off the async workers.
                    let revision = change.revision;
                    let me = Arc::clone(&self);
                    let applied = tokio::task::spawn_blocking(move || me.apply(&change)).await;
                    let failed = match applied {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(e) = failed {
                        tracing::error!(
                            "kernel sync of revision {revision} failed: {e}; reconciling now"
                        );
                        self.request_reconcile();
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        "kernel sync missed {n} changes; resynchronising from a full read"
                    );
                    let me = Arc::clone(&self);
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.reconcile()).await {
                        tracing::error!("kernel resync failed: {e}; reconciling again");
                        self.request_reconcile();
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Returns once no map write is in flight (a write holds the map lock throughout). For the
    /// stop: once the writers are stopped, nothing leaves the kernel after this.
    pub fn quiesce(&self) {
        drop(self.maps());
    }

    /// The names of the service ids written to the kernel so far.
    pub fn service_names(&self) -> BTreeMap<u32, String> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .services
            .clone()
    }

    /// How many grants the kernel holds (read without the map lock: with a million grants the
    /// read takes seconds, and grants and revokes must not wait for a status).
    pub fn kernel_grants(&self) -> Result<usize, SyncError> {
        let reader = self.maps().grants_reader()?;
        // A walk without the lock may meet a key twice (it starts over when its place is
        // deleted): distinct keys.
        let keys: BTreeSet<GrantKeyOrd> = reader
            .grants()?
            .iter()
            .map(|e| GrantKeyOrd(e.key()))
            .collect();
        Ok(keys.len())
    }
}

/// Grant keys ordered, for diffing the kernel against the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GrantKeyOrd(GrantKey);

impl GrantKeyOrd {
    fn tuple(&self) -> (u32, u32, [u8; 16]) {
        (self.0.service_id, self.0.kind, self.0.source)
    }
}

impl PartialOrd for GrantKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for GrantKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

/// The repairs of phases that all ran, added up; the first error if any failed.
fn all_phases<const N: usize>(
    phases: [Result<Repairs, SyncError>; N],
) -> Result<Repairs, SyncError> {
    let mut repairs = Repairs::default();
    let mut first_error = None;
    for phase in phases {
        match phase {
            Ok(r) => {
                repairs.written += r.written;
                repairs.deleted += r.deleted;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(repairs),
    }
}

/// Whether two reads of one key found the same entry (its usage aside: traffic moves it).
fn same_entry(a: Option<&GrantEntry>, b: Option<&GrantEntry>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.grant_id == b.grant_id
                && a.identity_id == b.identity_id
                && a.service_id == b.service_id
                && a.scope == b.scope
                && a.not_before_ns == b.not_before_ns
                && a.expires_at_ns == b.expires_at_ns
        }
        _ => false,
    }
}

/// Whether the kernel's entry may stay as it is. The store's times are wall-clock and the
/// kernel's are `CLOCK_BOOTTIME`, so a conversion drifts between two reads, and a wall clock set
/// back would make the same grant look longer: for the same grant the kernel's window is only
/// ever narrowed, never widened (a later start or an earlier end is rewritten; anything within
/// 5 ms, or wider, is not).
fn same_grant(held: &GrantEntry, wanted: &GrantEntry) -> bool {
    const SLACK_NS: u64 = 5_000_000;
    held.grant_id == wanted.grant_id
        && held.identity_id == wanted.identity_id
        && wanted.not_before_ns <= held.not_before_ns.saturating_add(SLACK_NS)
        && wanted.expires_at_ns.saturating_add(SLACK_NS) >= held.expires_at_ns
}
