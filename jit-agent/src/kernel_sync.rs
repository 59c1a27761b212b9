//! Turns durable state into kernel map entries. It consumes the store's change stream (whoever
//! produced the change) and, after a gap or at start, resynchronises from a full read. It never
//! evaluates policy: what is live in the store is what the kernel gets.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use ipnet::IpNet;
use tokio::sync::broadcast::error::RecvError;

use crate::{
    config::Config,
    datapath::{self, DatapathError, GateMaps, GrantEntry},
    model::{Grant, now_ms},
    store::{Change, IdKind, Record, Store, StoreError},
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
}

/// Writes the kernel maps from the store.
pub struct KernelSync<S: Store> {
    store: Arc<S>,
    cfg: Arc<Config>,
    maps: Mutex<GateMaps>,
}

/// The numeric form of a grant id (`grant-<12 hex>`), carried in kernel events.
#[must_use]
pub fn numeric_grant_id(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

/// Converts a wall-clock instant (Unix ms) to the kernel's `CLOCK_BOOTTIME` ns, relative to now.
fn to_boottime_ns(wall_ms: i64) -> Result<u64, DatapathError> {
    let boot_now = datapath::boottime_ns()?;
    let delta_ms = wall_ms.saturating_sub(now_ms());
    let delta_ns = i128::from(delta_ms) * 1_000_000;
    let t = i128::from(boot_now) + delta_ns;
    Ok(u64::try_from(t.max(0)).unwrap_or(u64::MAX))
}

impl<S: Store> KernelSync<S> {
    /// A sync writing `maps`.
    pub fn new(store: Arc<S>, cfg: Arc<Config>, maps: GateMaps) -> Self {
        Self {
            store,
            cfg,
            maps: Mutex::new(maps),
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, GateMaps> {
        // A panic while holding the lock leaves the maps as the kernel has them: still usable.
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Numeric id of a service.
    pub fn service_id(&self, name: &str) -> Result<u32, StoreError> {
        self.store.numeric_id(IdKind::Service, name)
    }

    /// Numeric id of an identity.
    pub fn identity_id(&self, name: &str) -> Result<u32, StoreError> {
        self.store.numeric_id(IdKind::Identity, name)
    }

    /// Brings every map in line with the configuration and the store: services, identity
    /// bindings, grants. Entries with no live grant behind them are deleted; revoked and expired
    /// grants are never written back.
    pub fn resync(&self) -> Result<(), SyncError> {
        self.sync_services()?;
        self.sync_identities()?;
        let now = now_ms();
        let live: Vec<Grant> = self
            .store
            .grants()?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| g.is_live(now))
            .collect();
        let mut wanted: BTreeMap<(u32, u32), Grant> = BTreeMap::new();
        for g in live {
            if !self.cfg.services.contains_key(&g.service) {
                continue;
            }
            let key = (self.identity_id(&g.identity)?, self.service_id(&g.service)?);
            let keep = wanted.get(&key).is_none_or(|w| w.expires_ms < g.expires_ms);
            if keep {
                wanted.insert(key, g);
            }
        }
        let mut maps = self.maps();
        for k in maps.grants()? {
            if !wanted.contains_key(&(k.identity_id, k.service_id)) {
                maps.delete_grant(k.identity_id, k.service_id)?;
            }
        }
        for ((identity_id, service_id), g) in wanted {
            maps.put_grant(entry(identity_id, service_id, &g)?)?;
        }
        Ok(())
    }

    /// Services: one entry per configured destination; others removed.
    fn sync_services(&self) -> Result<(), SyncError> {
        let mut wanted = Vec::new();
        for s in self.cfg.services.values() {
            let id = self.service_id(&s.name)?;
            for d in &s.destinations {
                wanted.push((*d, id, s.mode));
            }
        }
        let mut maps = self.maps();
        for existing in maps.services()? {
            if !wanted.iter().any(|(d, ..)| *d == existing.dest) {
                maps.remove_service(existing.dest)?;
            }
        }
        for (dest, id, mode) in wanted {
            maps.add_service(dest, id, mode)?;
        }
        Ok(())
    }

    /// Identity bindings: the static ones from config, plus the requester addresses of live
    /// grants; anything else is removed.
    pub fn sync_identities(&self) -> Result<(), SyncError> {
        let mut wanted: BTreeMap<IpNet, u32> = BTreeMap::new();
        for (identity, nets) in &self.cfg.identities {
            let id = self.identity_id(identity)?;
            for n in nets {
                wanted.insert(*n, id);
            }
        }
        let now = now_ms();
        for g in self.store.grants()? {
            let g = g.value;
            if !g.is_live(now) {
                continue;
            }
            for src in &g.extra_sources {
                if let Ok(net) = src.parse::<IpNet>() {
                    let id = self.identity_id(&g.identity)?;
                    wanted.entry(net).or_insert(id);
                }
            }
        }
        let mut maps = self.maps();
        let current: BTreeSet<(IpNet, u32)> = maps.identities()?.into_iter().collect();
        for (net, id) in &current {
            if wanted.get(net) != Some(id) {
                maps.unbind_identity(*net)?;
            }
        }
        for (net, id) in wanted {
            if !current.contains(&(net, id)) {
                maps.bind_identity(net, id)?;
            }
        }
        Ok(())
    }

    /// Puts the kernel entry for `(grant.identity, grant.service)` in line with the store: the
    /// longest live grant for that pair, or nothing.
    pub fn sync_pair(&self, identity: &str, service: &str) -> Result<(), SyncError> {
        if !self.cfg.services.contains_key(service) {
            return Ok(());
        }
        let identity_id = self.identity_id(identity)?;
        let service_id = self.service_id(service)?;
        let now = now_ms();
        let best = self
            .store
            .grants()?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| g.identity == identity && g.service == service && g.is_live(now))
            .max_by_key(|g| g.expires_ms);
        let mut maps = self.maps();
        match best {
            Some(g) => maps.put_grant(entry(identity_id, service_id, &g)?)?,
            None => {
                maps.delete_grant(identity_id, service_id)?;
            }
        }
        Ok(())
    }

    /// Applies one committed change.
    pub fn apply(&self, change: &Change) -> Result<(), SyncError> {
        if let Record::Grant(g) = &change.record {
            if !g.extra_sources.is_empty() {
                self.sync_identities()?;
            }
            self.sync_pair(&g.identity, &g.service)?;
        }
        Ok(())
    }

    /// Follows the change stream until it closes; resynchronises fully after a gap.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.store.subscribe();
        // Anything committed before we subscribed is covered by this full read.
        if let Err(e) = self.resync() {
            log::error!("kernel resync failed: {e}");
        }
        loop {
            match rx.recv().await {
                Ok(change) => {
                    if let Err(e) = self.apply(&change) {
                        log::error!("kernel sync of revision {} failed: {e}", change.revision);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    log::warn!("kernel sync missed {n} changes; resynchronising from a full read");
                    if let Err(e) = self.resync() {
                        log::error!("kernel resync failed: {e}");
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// How many grants the kernel holds.
    pub fn kernel_grants(&self) -> usize {
        self.maps().grants().map_or(0, |g| g.len())
    }
}

fn entry(identity_id: u32, service_id: u32, g: &Grant) -> Result<GrantEntry, DatapathError> {
    Ok(GrantEntry {
        identity_id,
        service_id,
        grant_id: numeric_grant_id(&g.id),
        not_before_ns: to_boottime_ns(g.not_before_ms)?,
        expires_at_ns: to_boottime_ns(g.expires_ms)?,
        seen: false,
    })
}
