//! Typed access to the pinned kernel maps. This is the only code that writes them; it never
//! decides whether something should be written (that is policy's and the store's business).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use jit_common::{
    FAMILY_V4, FAMILY_V6, GRANT_FLAG_SEEN, GRANT_KIND_HOST, GRANT_KIND_IDENTITY, GateConfig,
    GrantKey, GrantValue, IdentityValue, LAYOUT_VERSION, MAX_SERVICES, MODE_AUDIT, MODE_ENFORCE,
    PORT_EXACT, PORT_WILDCARD, PROTO_TCP, PROTO_UDP, RateState, ServiceCounters, ServiceKey,
    ServiceValue, counter, map_names, port_bit_position, port_index, v4_mapped,
};

use super::error::{DatapathError, Result};
use crate::spec::{Mode, Protocol, ServiceDest};

impl Protocol {
    pub(crate) const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    pub(crate) const fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl Mode {
    const fn raw(self) -> u32 {
        match self {
            Self::Enforce => MODE_ENFORCE,
            Self::Audit => MODE_AUDIT,
        }
    }
}

impl ServiceDest {
    fn key(&self) -> Result<ServiceKey> {
        if self.port == 0 {
            return Err(DatapathError::Invalid {
                field: "port",
                reason: "0 is not a destination port".into(),
            });
        }
        let (family, addr) = addr_bytes(self.addr);
        Ok(ServiceKey::new(
            family,
            self.proto.number(),
            self.port,
            addr,
        ))
    }
}

/// A map lookup: the value, `None` when the key is absent, an error when the read failed (a
/// failed read is never taken for "absent").
fn present<V>(read: std::result::Result<V, MapError>, map: &'static str) -> Result<Option<V>> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(DatapathError::Map { map, source }),
    }
}

/// A service as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEntry {
    /// Where it listens.
    pub dest: ServiceDest,
    /// Its numeric id.
    pub service_id: u32,
    /// Enforcement mode.
    pub mode: Mode,
}

/// Which packets a kernel grant lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "address")]
pub enum GrantScope {
    /// Packets from this one source address (the address the grant was bound to).
    Host(IpAddr),
    /// Packets from the static source prefixes of the grant's identity.
    Identity,
}

/// A grant as the kernel holds it. Times are `CLOCK_BOOTTIME` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GrantEntry {
    /// Which sources it opens the service to.
    pub scope: GrantScope,
    /// Identity holding the grant.
    pub identity_id: u32,
    /// Service it opens.
    pub service_id: u32,
    /// The agent's grant id.
    pub grant_id: u64,
    /// Opens at.
    pub not_before_ns: u64,
    /// Closes at (exclusive).
    pub expires_at_ns: u64,
    /// What the kernel counted under this entry (zero in entries the agent wants written).
    pub usage: Usage,
}

/// Packets the kernel allowed under one grant entry. Times are `CLOCK_BOOTTIME` nanoseconds, 0
/// for never.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// The first packet.
    pub first_seen_ns: u64,
    /// The last packet.
    pub last_seen_ns: u64,
    /// Packets allowed.
    pub packets: u64,
}

impl Usage {
    /// Whether any packet was allowed.
    #[must_use]
    pub const fn used(&self) -> bool {
        self.packets != 0 || self.first_seen_ns != 0
    }

    fn of(v: &GrantValue) -> Self {
        Self {
            first_seen_ns: if v.flags & GRANT_FLAG_SEEN != 0 {
                v.first_seen_ns
            } else {
                0
            },
            last_seen_ns: v.last_seen_ns,
            packets: v.packets,
        }
    }
}

impl GrantEntry {
    /// The map key of this grant.
    #[must_use]
    pub fn key(&self) -> GrantKey {
        grant_key(self.scope, self.identity_id, self.service_id)
    }
}

/// The map key of a grant of `identity_id` for `service_id` with `scope`.
#[must_use]
pub fn grant_key(scope: GrantScope, identity_id: u32, service_id: u32) -> GrantKey {
    match scope {
        GrantScope::Host(addr) => GrantKey::host(service_id, source_bytes(addr)),
        GrantScope::Identity => GrantKey::identity(service_id, identity_id),
    }
}

/// A source address in the 16-byte form of grant keys and the identity trie.
fn source_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.octets(), |v4| v4_mapped(v4.octets())),
    }
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Global counters by name (see [`jit_common::counter::NAMES`]).
    pub global: BTreeMap<&'static str, u64>,
    /// Per-service verdict counters, only services with a non-zero count.
    pub per_service: BTreeMap<u32, BTreeMap<&'static str, u64>>,
}

/// How full a map is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    /// Map name.
    pub name: &'static str,
    /// Entries in use.
    pub entries: u64,
    /// Capacity.
    pub max_entries: u32,
}

/// The gate's maps, opened from their pins.
pub struct GateMaps {
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    ports: Array<MapData, u64>,
    dests: HashMap<MapData, ServiceKey, u32>,
    id_prefixes: LpmTrie<MapData, [u8; 16], IdentityValue>,
    grants: HashMap<MapData, GrantKey, GrantValue>,
    svc_id_grants: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    svc_counters: PerCpuArray<MapData, ServiceCounters>,
    rate: PerCpuArray<MapData, RateState>,
    config: Array<MapData, GateConfig>,
    capacity: BTreeMap<&'static str, u32>,
    /// Destinations per port index, `(exact, wildcard)`: what the port bitmap is derived from.
    /// Built from the services map when the maps are opened (this is their only writer).
    port_use: BTreeMap<u32, (u32, u32)>,
    /// Destinations per port index and service: what the per-port service hint is derived from.
    port_services: BTreeMap<u32, BTreeMap<u32, u32>>,
    port_svc: Array<MapData, u32>,
}

/// Where the maps of the current layout are pinned under `pin_dir`.
#[must_use]
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

fn open<T>(
    pin_dir: &Path,
    name: &'static str,
    capacity: &mut BTreeMap<&'static str, u32>,
) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotLoaded {
            pin_dir: pin_dir.to_path_buf(),
            map: name,
        });
    }
    let map_err = |source| DatapathError::Map { map: name, source };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let info = data.info().map_err(map_err)?;
    capacity.insert(name, info.max_entries());
    T::try_from(Map::from_map_data(data).map_err(map_err)?).map_err(map_err)
}

impl GateMaps {
    /// Opens the maps pinned under `pin_dir` by [`super::Gate::load`].
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let mut cap = BTreeMap::new();
        let dir = maps_dir(pin_dir);
        let port_svc = open(&dir, map_names::PORT_SERVICES, &mut cap)?;
        let mut maps = Self {
            pin_dir: pin_dir.to_path_buf(),
            services: open(&dir, map_names::SERVICES, &mut cap)?,
            ports: open(&dir, map_names::PORTS, &mut cap)?,
            dests: open(&dir, map_names::DESTS, &mut cap)?,
            id_prefixes: open(&dir, map_names::ID_PREFIXES, &mut cap)?,
            grants: open(&dir, map_names::GRANTS, &mut cap)?,
            svc_id_grants: open(&dir, map_names::SERVICE_ID_GRANTS, &mut cap)?,
            counters: open(&dir, map_names::COUNTERS, &mut cap)?,
            svc_counters: open(&dir, map_names::SERVICE_COUNTERS, &mut cap)?,
            rate: open(&dir, map_names::RATE, &mut cap)?,
            config: open(&dir, map_names::CONFIG, &mut cap)?,
            capacity: cap,
            port_use: BTreeMap::new(),
            port_services: BTreeMap::new(),
            port_svc,
        };
        for entry in maps.services()? {
            let key = entry.dest.key()?;
            if let Some(index) = port_index(key.proto, key.port) {
                let use_ = maps.port_use.entry(index).or_default();
                if key.addr == [0; 16] {
                    use_.1 += 1;
                } else {
                    use_.0 += 1;
                }
                *maps
                    .port_services
                    .entry(index)
                    .or_default()
                    .entry(entry.service_id)
                    .or_default() += 1;
            }
        }
        Ok(maps)
    }

    /// The pin directory the maps came from.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn capacity(&self, name: &'static str) -> u32 {
        self.capacity.get(name).copied().unwrap_or(0)
    }

    /// Maps an insert error to [`DatapathError::MapFull`] when the kernel says the map is full.
    fn insert_error(&self, map: &'static str, source: MapError) -> DatapathError {
        if let MapError::SyscallError(e) = &source
            && matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        {
            return DatapathError::MapFull {
                map,
                max_entries: self.capacity(map),
            };
        }
        DatapathError::Map { map, source }
    }

    // ---- services ----

    /// Protects `dest` as service `service_id`. Re-adding an existing destination updates its id
    /// and mode in place.
    pub fn add_service(&mut self, dest: ServiceDest, service_id: u32, mode: Mode) -> Result<()> {
        if service_id >= MAX_SERVICES {
            return Err(DatapathError::Invalid {
                field: "service id",
                reason: format!("{service_id} is not below {MAX_SERVICES}"),
            });
        }
        let key = dest.key()?;
        let value = ServiceValue {
            service_id,
            mode: mode.raw(),
        };
        let existing = present(self.services.get(&key, 0), map_names::SERVICES)?;
        match existing {
            // Indexes first: a packet that sees the index but not yet the service just pays
            // one more lookup and passes, as it did before.
            None => self.bump_indexes(&key, service_id, 1)?,
            // Moving to another service: the port hint counts the new one before the entry
            // changes (so it is never the old service alone while the new one is there).
            Some(old) if old.service_id != service_id => {
                self.bump_port_service(&key, service_id, 1)?;
            }
            Some(_) => {}
        }
        if let Err(e) = self.services.insert(key, value, 0) {
            match existing {
                None => self.bump_indexes(&key, service_id, -1)?,
                Some(old) if old.service_id != service_id => {
                    self.bump_port_service(&key, service_id, -1)?;
                }
                Some(_) => {}
            }
            return Err(self.insert_error(map_names::SERVICES, e));
        }
        if let Some(old) = existing
            && old.service_id != service_id
        {
            self.bump_port_service(&key, old.service_id, -1)?;
        }
        Ok(())
    }

    /// Stops protecting `dest`. Returns whether it was protected.
    pub fn remove_service(&mut self, dest: ServiceDest) -> Result<bool> {
        let key = dest.key()?;
        let Ok(old) = self.services.get(&key, 0) else {
            return Ok(false);
        };
        let removed = absent_is_false(self.services.remove(&key), map_names::SERVICES)?;
        if removed {
            self.bump_indexes(&key, old.service_id, -1)?;
        }
        Ok(removed)
    }

    /// Counts a destination of `service_id` on `key`'s port in or out of the per-port service
    /// hint, and writes the hint: the service plus one when it is the port's only one, else 0.
    fn bump_port_service(&mut self, key: &ServiceKey, service_id: u32, delta: i64) -> Result<()> {
        let Some(index) = port_index(key.proto, key.port) else {
            return Ok(());
        };
        let services = self.port_services.entry(index).or_default();
        let n = services.entry(service_id).or_default();
        *n = u32::try_from((i64::from(*n) + delta).max(0)).unwrap_or(u32::MAX);
        if *n == 0 {
            services.remove(&service_id);
        }
        let hint = match services.keys().collect::<Vec<_>>().as_slice() {
            [only] => **only + 1,
            _ => 0,
        };
        if services.is_empty() {
            self.port_services.remove(&index);
        }
        self.port_svc
            .set(index, hint, 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::PORT_SERVICES,
                source,
            })
    }

    fn bump_indexes(&mut self, key: &ServiceKey, service_id: u32, delta: i64) -> Result<()> {
        self.bump_port_service(key, service_id, delta)?;
        let Some(index) = port_index(key.proto, key.port) else {
            return Ok(());
        };
        let bump = |n: u32| u32::try_from((i64::from(n) + delta).max(0)).unwrap_or(u32::MAX);
        let use_ = self.port_use.entry(index).or_default();
        if key.addr == [0; 16] {
            use_.1 = bump(use_.1);
        } else {
            use_.0 = bump(use_.0);
        }
        let (exact, wildcard) = *use_;
        if exact == 0 && wildcard == 0 {
            self.port_use.remove(&index);
        }
        let bits =
            if exact > 0 { PORT_EXACT } else { 0 } | if wildcard > 0 { PORT_WILDCARD } else { 0 };
        let (word, shift) = port_bit_position(index);
        let map_err = |map, source| DatapathError::Map { map, source };
        let old = self
            .ports
            .get(&word, 0)
            .map_err(|e| map_err(map_names::PORTS, e))?;
        let new = (old & !((PORT_EXACT | PORT_WILDCARD) << shift)) | (bits << shift);
        if new != old {
            self.ports
                .set(word, new, 0)
                .map_err(|e| map_err(map_names::PORTS, e))?;
        }

        let dest_key = ServiceKey { port: 0, ..*key };
        let current = present(self.dests.get(&dest_key, 0), map_names::DESTS)?.unwrap_or(0);
        let n = bump(current);
        if n == 0 {
            match self.dests.remove(&dest_key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::DESTS, e)),
            }
        } else {
            self.dests
                .insert(dest_key, n, 0)
                .map_err(|e| self.insert_error(map_names::DESTS, e))?;
        }
        Ok(())
    }

    /// Every protected service.
    pub fn services(&self) -> Result<Vec<ServiceEntry>> {
        let mut out = Vec::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(|source| DatapathError::Map {
                map: map_names::SERVICES,
                source,
            })?;
            let Some(proto) = Protocol::from_number(k.proto) else {
                continue;
            };
            out.push(ServiceEntry {
                dest: ServiceDest {
                    addr: addr_from_bytes(k.family, k.addr),
                    port: k.port,
                    proto,
                },
                service_id: v.service_id,
                mode: if v.mode == MODE_AUDIT {
                    Mode::Audit
                } else {
                    Mode::Enforce
                },
            });
        }
        out.sort_by_key(|s| s.service_id);
        Ok(out)
    }

    // ---- identities ----

    /// Binds the static source prefix `net` (a single host is a prefix too) to `identity_id`.
    /// Binding a prefix already bound to another identity is refused.
    pub fn bind_identity(&mut self, net: IpNet, identity_id: u32) -> Result<()> {
        if identity_id == 0 {
            return Err(DatapathError::Invalid {
                field: "identity id",
                reason: "0 is reserved for \"no identity\"".into(),
            });
        }
        let net = net.trunc();
        let (prefix_len, addr) = identity_key(net);
        let key = Key::new(prefix_len, addr);
        let existing = present(self.id_prefixes.get(&key, 0), map_names::ID_PREFIXES)?;
        if let Some(existing) = existing {
            if existing.identity_id != identity_id {
                return Err(DatapathError::IdentityConflict {
                    prefix: net,
                    existing: existing.identity_id,
                    requested: identity_id,
                });
            }
            return Ok(());
        }
        let value = IdentityValue {
            identity_id,
            _reserved: 0,
        };
        self.id_prefixes
            .insert(&key, value, 0)
            .map_err(|e| self.insert_error(map_names::ID_PREFIXES, e))
    }

    /// Removes the binding of `net`. Returns whether there was one.
    pub fn unbind_identity(&mut self, net: IpNet) -> Result<bool> {
        let (prefix_len, addr) = identity_key(net.trunc());
        absent_is_false(
            self.id_prefixes.remove(&Key::new(prefix_len, addr)),
            map_names::ID_PREFIXES,
        )
    }

    /// Every identity binding, as `(prefix, identity id)`.
    pub fn identities(&self) -> Result<Vec<(IpNet, u32)>> {
        let mut out = Vec::new();
        for item in self.id_prefixes.iter() {
            let (k, v) = item.map_err(|source| DatapathError::Map {
                map: map_names::ID_PREFIXES,
                source,
            })?;
            out.push((net_from_key(k.prefix_len(), k.data()), v.identity_id));
        }
        out.sort();
        Ok(out)
    }

    // ---- grants ----

    fn check_grant(grant: &GrantEntry) -> Result<()> {
        if grant.expires_at_ns <= grant.not_before_ns {
            return Err(DatapathError::Invalid {
                field: "grant window",
                reason: "expires_at must be after not_before".into(),
            });
        }
        if grant.service_id >= MAX_SERVICES {
            return Err(DatapathError::Invalid {
                field: "service id",
                reason: format!("{} is not below {MAX_SERVICES}", grant.service_id),
            });
        }
        if grant.identity_id == 0 {
            return Err(DatapathError::Invalid {
                field: "identity id",
                reason: "0 is reserved for \"no identity\"".into(),
            });
        }
        Ok(())
    }

    /// The value of a new grant: no usage yet.
    fn grant_value(grant: &GrantEntry) -> GrantValue {
        GrantValue {
            not_before_ns: grant.not_before_ns,
            expires_at_ns: grant.expires_at_ns,
            grant_id: grant.grant_id,
            identity_id: grant.identity_id,
            flags: 0,
            first_seen_ns: 0,
            last_seen_ns: 0,
            packets: 0,
        }
    }

    /// The entry held under `key`, if any.
    fn held_grant(&self, key: &GrantKey) -> Result<Option<GrantValue>> {
        match self.grants.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(source) => Err(DatapathError::Map {
                map: map_names::GRANTS,
                source,
            }),
        }
    }

    /// Writes a grant (replacing the one with the same key in place). A full map is
    /// [`DatapathError::MapFull`]: nothing is evicted to make room.
    ///
    /// Rewriting the same grant (same grant id) keeps the kernel's usage counts (packets allowed
    /// between the read and the write are lost: a window of microseconds, and only on a rewrite).
    /// Replacing another grant's entry returns that entry, usage and all: its grant no longer
    /// holds the key.
    ///
    /// An identity-keyed grant is written before its service's identity-grant count is raised,
    /// so a packet never follows the count to a grant that is not there yet (it is denied).
    pub fn put_grant(&mut self, grant: GrantEntry) -> Result<Option<GrantEntry>> {
        Self::check_grant(&grant)?;
        let key = grant.key();
        // A failed read never stops the write (the grant was approved; a rewrite may be a
        // narrowing): it is written as new, its usage starting from zero.
        let held = self.held_grant(&key).unwrap_or(None);
        let mut value = Self::grant_value(&grant);
        let mut replaced = None;
        match held {
            Some(h) if h.grant_id == grant.grant_id => {
                // Only the kernel's own flag is carried over.
                value.flags = h.flags & GRANT_FLAG_SEEN;
                value.first_seen_ns = h.first_seen_ns;
                value.last_seen_ns = h.last_seen_ns;
                value.packets = h.packets;
            }
            Some(h) => replaced = Some(entry_of(&key, &h)),
            None => {}
        }
        self.grants
            .insert(key, value, 0)
            .map_err(|e| self.insert_error(map_names::GRANTS, e))?;
        if held.is_none() && grant.scope == GrantScope::Identity {
            self.bump_identity_grants(grant.service_id, 1)?;
        }
        Ok(replaced)
    }

    /// The entry under `key`, usage and all, if any (a read failure is an error).
    pub fn grant(&self, key: &GrantKey) -> Result<Option<GrantEntry>> {
        Ok(self.held_grant(key)?.map(|v| entry_of(key, &v)))
    }

    /// Writes many new grants at once (`BPF_MAP_UPDATE_BATCH`), for bulk loads: one system call
    /// per batch instead of one per grant. Each grant must not be in the map yet.
    pub fn put_new_grants(&mut self, grants: &[GrantEntry]) -> Result<()> {
        const BATCH: usize = 65_536;
        for g in grants {
            Self::check_grant(g)?;
        }
        for chunk in grants.chunks(BATCH) {
            let keys: Vec<GrantKey> = chunk.iter().map(GrantEntry::key).collect();
            let values: Vec<GrantValue> = chunk.iter().map(Self::grant_value).collect();
            self.update_batch(&keys, &values)?;
            for g in chunk {
                if g.scope == GrantScope::Identity {
                    self.bump_identity_grants(g.service_id, 1)?;
                }
            }
        }
        Ok(())
    }

    fn update_batch(&self, keys: &[GrantKey], values: &[GrantValue]) -> Result<()> {
        use aya_obj::generated::{bpf_attr, bpf_cmd};

        let fd = aya::maps::IterableMap::map(&self.grants)
            .fd()
            .as_fd()
            .as_raw_fd();
        let mut done = 0usize;
        while done < keys.len() {
            // SAFETY: bpf_attr is a plain C union; all zeroes is its "no options" value.
            let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
            let count = u32::try_from(keys.len() - done).unwrap_or(u32::MAX);
            // The batch member of the union, which BPF_MAP_UPDATE_BATCH reads.
            attr.batch.map_fd = u32::try_from(fd).unwrap_or(u32::MAX);
            attr.batch.keys = keys[done..].as_ptr() as u64;
            attr.batch.values = values[done..].as_ptr() as u64;
            attr.batch.count = count;
            // SAFETY: keys and values point at `count` elements each, alive during the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
                    &raw mut attr,
                    size_of::<bpf_attr>(),
                )
            };
            // SAFETY: the kernel wrote back how many elements it processed.
            let written = unsafe { attr.batch.count } as usize;
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                return Err(self.insert_error(
                    map_names::GRANTS,
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_batch",
                        io_error: e,
                    }),
                ));
            }
            if written == 0 {
                // The kernel processed nothing and said nothing: never skip an element.
                return Err(DatapathError::Invalid {
                    field: "grants batch",
                    reason: "the kernel wrote no element of the batch".into(),
                });
            }
            done += written.min(keys.len() - done);
        }
        Ok(())
    }

    fn bump_identity_grants(&mut self, service_id: u32, delta: i64) -> Result<()> {
        let map_err = |source| DatapathError::Map {
            map: map_names::SERVICE_ID_GRANTS,
            source,
        };
        let n = self.svc_id_grants.get(&service_id, 0).map_err(map_err)?;
        let n = u32::try_from((i64::from(n) + delta).max(0)).unwrap_or(u32::MAX);
        self.svc_id_grants.set(service_id, n, 0).map_err(map_err)
    }

    /// Deletes the grant with `key`: the next packet of a live connection is dropped. Returns
    /// whether there was one. The identity-grant count of the service is lowered after the grant
    /// is gone.
    pub fn delete_grant(&mut self, key: &GrantKey) -> Result<bool> {
        let removed = absent_is_false(self.grants.remove(key), map_names::GRANTS)?;
        if removed && key.kind == GRANT_KIND_IDENTITY {
            self.bump_identity_grants(key.service_id, -1)?;
        }
        Ok(removed)
    }

    /// Deletes the grant with `key` like [`Self::delete_grant`]; `None` when there was none, else
    /// the entry as it was last read, usage included (`Some(None)` when that read failed: the
    /// delete never depends on it). Packets allowed between the read and the delete (a window of
    /// microseconds) are not in it; a grant that has expired allows none.
    pub fn take_grant(&mut self, key: &GrantKey) -> Result<Option<Option<GrantEntry>>> {
        let held = self.grant(key).unwrap_or(None);
        let removed = self.delete_grant(key)?;
        Ok(removed.then_some(held))
    }

    /// Every grant the kernel holds.
    pub fn grants(&self) -> Result<Vec<GrantEntry>> {
        all_grants(&self.grants)
    }

    /// A second handle on the grants map, for reads that must not hold up the writer (a
    /// reconciliation reads every entry; with a million grants that takes seconds).
    pub fn grants_reader(&self) -> Result<GrantsReader> {
        let mut cap = BTreeMap::new();
        Ok(GrantsReader {
            grants: open(&maps_dir(&self.pin_dir), map_names::GRANTS, &mut cap)?,
        })
    }

    /// Brings the identity-grant counts in line with the grants map (after a crash between a
    /// grant write and its count). Returns how many services were corrected.
    pub fn recount_identity_grants(&mut self) -> Result<u32> {
        let mut wanted: BTreeMap<u32, u32> = BTreeMap::new();
        for g in self.grants()? {
            if g.scope == GrantScope::Identity {
                *wanted.entry(g.service_id).or_default() += 1;
            }
        }
        let mut fixed = 0;
        for service_id in 0..MAX_SERVICES {
            let want = wanted.get(&service_id).copied().unwrap_or(0);
            let have =
                self.svc_id_grants
                    .get(&service_id, 0)
                    .map_err(|source| DatapathError::Map {
                        map: map_names::SERVICE_ID_GRANTS,
                        source,
                    })?;
            if have != want {
                self.svc_id_grants
                    .set(service_id, want, 0)
                    .map_err(|source| DatapathError::Map {
                        map: map_names::SERVICE_ID_GRANTS,
                        source,
                    })?;
                fixed += 1;
            }
        }
        Ok(fixed)
    }

    // ---- counters, config, fill ----

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map_err = |map, source| DatapathError::Map { map, source };
        let mut out = Counters::default();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            if index < counter::SERVICE_SLOTS || index == counter::EVENTS_RATE_LIMITED {
                // Sums over services and over the rate state, below.
                out.global.insert(name, 0);
                continue;
            }
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| map_err(map_names::COUNTERS, e))?;
            out.global.insert(name, values.iter().sum());
        }
        let suppressed: u64 = self
            .rate
            .get(&0, 0)
            .map_err(|e| map_err(map_names::RATE, e))?
            .iter()
            .map(|r| r.suppressed)
            .sum();
        out.global.insert(
            counter::NAMES[counter::EVENTS_RATE_LIMITED as usize],
            suppressed,
        );
        for service_id in 0..MAX_SERVICES {
            let per_cpu = self
                .svc_counters
                .get(&service_id, 0)
                .map_err(|e| map_err(map_names::SERVICE_COUNTERS, e))?;
            let mut per = BTreeMap::new();
            for (slot, name) in counter::NAMES[..counter::SERVICE_SLOTS as usize]
                .iter()
                .enumerate()
            {
                let sum: u64 = per_cpu.iter().map(|c| c.verdicts[slot]).sum();
                if sum != 0 {
                    per.insert(*name, sum);
                    *out.global.entry(name).or_default() += sum;
                }
            }
            if !per.is_empty() {
                out.per_service.insert(service_id, per);
            }
        }
        Ok(out)
    }

    /// Starts a new event budget period: every CPU may write `events` more events (the event
    /// reader calls it every second). Without it the kernel writes no events, and reads no clock
    /// for them.
    pub fn refill_event_tokens(&mut self, events: u32) -> Result<()> {
        let map_err = |source| DatapathError::Map {
            map: map_names::CONFIG,
            source,
        };
        let old = self.config.get(&0, 0).map_err(map_err)?;
        let cfg = GateConfig {
            events_per_period: events,
            event_epoch: old.event_epoch.wrapping_add(1),
        };
        self.config.set(0, cfg, 0).map_err(map_err)
    }

    /// How full the services, identity and grant maps are.
    pub fn fill(&self) -> Vec<MapFill> {
        let fill = |name: &'static str, entries: usize| MapFill {
            name,
            entries: entries as u64,
            max_entries: self.capacity(name),
        };
        vec![
            fill(map_names::SERVICES, self.services.keys().count()),
            fill(map_names::ID_PREFIXES, self.id_prefixes.keys().count()),
            fill(map_names::GRANTS, self.grants.keys().count()),
        ]
    }
}

/// `Ok(true)` for a removed entry, `Ok(false)` for one that was not there.
fn absent_is_false(result: std::result::Result<(), MapError>, map: &'static str) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(source) => Err(DatapathError::Map { map, source }),
    }
}

/// Every entry of a grants map, ordered by service, scope and identity.
fn all_grants(map: &HashMap<MapData, GrantKey, GrantValue>) -> Result<Vec<GrantEntry>> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, v) = item.map_err(|source| DatapathError::Map {
            map: map_names::GRANTS,
            source,
        })?;
        out.push(entry_of(&k, &v));
    }
    out.sort_by_key(|g| (g.service_id, g.scope, g.identity_id));
    Ok(out)
}

/// A read-only handle on the grants map (see [`GateMaps::grants_reader`]).
pub struct GrantsReader {
    grants: HashMap<MapData, GrantKey, GrantValue>,
}

impl GrantsReader {
    /// Every grant entry, as [`GateMaps::grants`] reads them.
    pub fn grants(&self) -> Result<Vec<GrantEntry>> {
        all_grants(&self.grants)
    }
}

/// A grants map entry in the agent's terms.
fn entry_of(k: &GrantKey, v: &GrantValue) -> GrantEntry {
    let scope = match k.kind {
        GRANT_KIND_HOST => GrantScope::Host(addr_from_source(k.source)),
        _ => GrantScope::Identity,
    };
    GrantEntry {
        scope,
        identity_id: v.identity_id,
        service_id: k.service_id,
        grant_id: v.grant_id,
        not_before_ns: v.not_before_ns,
        expires_at_ns: v.expires_at_ns,
        usage: Usage::of(v),
    }
}

/// The address of a host grant key's 16-byte source.
fn addr_from_source(b: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(b);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// `(family, 16 address bytes)` as service keys store them.
fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    match addr {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, b)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

fn addr_from_bytes(family: u8, b: [u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(b)
    }
}

/// `(prefix length, address)` in the identity maps' IPv6 space.
fn identity_key(net: IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (96 + u32::from(n.prefix_len()), v4_mapped(n.addr().octets())),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.addr().octets()),
    }
}

fn net_from_key(prefix_len: u32, addr: [u8; 16]) -> IpNet {
    let v6 = std::net::Ipv6Addr::from(addr);
    match (v6.to_ipv4_mapped(), prefix_len >= 96) {
        (Some(v4), true) => IpNet::new(IpAddr::V4(v4), u8::try_from(prefix_len - 96).unwrap_or(32))
            .unwrap_or_else(|_| IpNet::from(IpAddr::V4(v4))),
        _ => IpNet::new(IpAddr::V6(v6), u8::try_from(prefix_len).unwrap_or(128))
            .unwrap_or_else(|_| IpNet::from(IpAddr::V6(v6))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_keys_round_trip_both_families() {
        for s in [
            "10.1.0.0/16",
            "10.2.0.5/32",
            "0.0.0.0/0",
            "fd00:1::/64",
            "::1/128",
            "::/0",
        ] {
            let net: IpNet = s.parse().unwrap();
            let (len, addr) = identity_key(net);
            assert_eq!(net_from_key(len, addr), net, "{s}");
        }
        assert_eq!(identity_key("10.0.0.0/8".parse().unwrap()).0, 104);
    }

    #[test]
    fn service_keys_refuse_port_zero_and_keep_the_family() {
        let dest = |addr: &str, port| ServiceDest {
            addr: addr.parse().unwrap(),
            port,
            proto: Protocol::Udp,
        };
        assert!(dest("10.0.0.1", 0).key().is_err());
        let k = dest("10.0.0.1", 53).key().unwrap();
        assert_eq!((k.family, k.proto, k.port), (FAMILY_V4, PROTO_UDP, 53));
        assert_eq!(k.addr[..4], [10, 0, 0, 1]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        let k = dest("::", 53).key().unwrap();
        assert_eq!((k.family, k.addr), (FAMILY_V6, [0; 16]));
    }
}
