//! Typed access to the pinned kernel maps. This is the only code that writes them; it never
//! decides whether something should be written (that is policy's and the store's business).

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use jit_common::{
    FAMILY_V4, FAMILY_V6, GateConfig, GrantKey, GrantValue, IdentityValue, MAX_SERVICES,
    MODE_AUDIT, MODE_ENFORCE, PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, counter, map_names,
    port_index, v4_mapped,
};

use super::error::{DatapathError, Result};

/// A transport protocol the gate can protect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    const fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = DatapathError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(DatapathError::Invalid {
                field: "protocol",
                reason: format!("{s:?}; expected tcp or udp"),
            }),
        }
    }
}

/// How a service treats packets without a live grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop them.
    Enforce,
    /// Count and report them, then pass them.
    Audit,
}

impl Mode {
    const fn raw(self) -> u32 {
        match self {
            Self::Enforce => MODE_ENFORCE,
            Self::Audit => MODE_AUDIT,
        }
    }
}

impl FromStr for Mode {
    type Err = DatapathError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "audit" => Ok(Self::Audit),
            _ => Err(DatapathError::Invalid {
                field: "mode",
                reason: format!("{s:?}; expected enforce or audit"),
            }),
        }
    }
}

/// A protected destination. An unspecified address (`0.0.0.0` or `::`) matches every destination
/// address of that family arriving on an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceDest {
    /// Destination address, or unspecified for any.
    pub addr: IpAddr,
    /// Destination port, 1-65535.
    pub port: u16,
    /// Transport protocol.
    pub proto: Protocol,
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
        Ok(ServiceKey {
            family,
            proto: self.proto.number(),
            port: self.port,
            addr,
        })
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

/// A grant as the kernel holds it. Times are `CLOCK_BOOTTIME` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GrantEntry {
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
    /// Whether the kernel has seen a packet allowed under it.
    pub seen: bool,
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
    ports: Array<MapData, u32>,
    dests: HashMap<MapData, ServiceKey, u32>,
    id_hosts: HashMap<MapData, [u8; 16], IdentityValue>,
    id_prefixes: LpmTrie<MapData, [u8; 16], IdentityValue>,
    grants: HashMap<MapData, GrantKey, GrantValue>,
    counters: PerCpuArray<MapData, u64>,
    svc_counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, GateConfig>,
    capacity: BTreeMap<&'static str, u32>,
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
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            services: open(pin_dir, map_names::SERVICES, &mut cap)?,
            ports: open(pin_dir, map_names::PORTS, &mut cap)?,
            dests: open(pin_dir, map_names::DESTS, &mut cap)?,
            id_hosts: open(pin_dir, map_names::ID_HOSTS, &mut cap)?,
            id_prefixes: open(pin_dir, map_names::ID_PREFIXES, &mut cap)?,
            grants: open(pin_dir, map_names::GRANTS, &mut cap)?,
            counters: open(pin_dir, map_names::COUNTERS, &mut cap)?,
            svc_counters: open(pin_dir, map_names::SERVICE_COUNTERS, &mut cap)?,
            config: open(pin_dir, map_names::CONFIG, &mut cap)?,
            capacity: cap,
        })
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
        let existed = self.services.get(&key, 0).is_ok();
        if !existed {
            // Indexes first: a packet that sees the index but not yet the service just pays
            // one more lookup and passes, as it did before.
            self.bump_indexes(&key, 1)?;
        }
        if let Err(e) = self.services.insert(key, value, 0) {
            if !existed {
                self.bump_indexes(&key, -1)?;
            }
            return Err(self.insert_error(map_names::SERVICES, e));
        }
        Ok(())
    }

    /// Stops protecting `dest`. Returns whether it was protected.
    pub fn remove_service(&mut self, dest: ServiceDest) -> Result<bool> {
        let key = dest.key()?;
        match self.services.remove(&key) {
            Ok(()) => {
                self.bump_indexes(&key, -1)?;
                Ok(true)
            }
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(DatapathError::Map {
                map: map_names::SERVICES,
                source,
            }),
        }
    }

    fn bump_indexes(&mut self, key: &ServiceKey, delta: i64) -> Result<()> {
        let Some(index) = port_index(key.proto, key.port) else {
            return Ok(());
        };
        let map_err = |map, source| DatapathError::Map { map, source };
        let n = self
            .ports
            .get(&index, 0)
            .map_err(|e| map_err(map_names::PORTS, e))?;
        let n = u32::try_from((i64::from(n) + delta).max(0)).unwrap_or(u32::MAX);
        self.ports
            .set(index, n, 0)
            .map_err(|e| map_err(map_names::PORTS, e))?;

        let dest_key = ServiceKey { port: 0, ..*key };
        let n = self.dests.get(&dest_key, 0).unwrap_or(0);
        let n = u32::try_from((i64::from(n) + delta).max(0)).unwrap_or(u32::MAX);
        if n == 0 {
            let _ = self.dests.remove(&dest_key);
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

    /// Binds the source prefix `net` to `identity_id`. Single hosts go to the exact-match map,
    /// wider prefixes to the trie. Binding a prefix already bound to another identity is refused.
    pub fn bind_identity(&mut self, net: IpNet, identity_id: u32) -> Result<()> {
        if identity_id == 0 {
            return Err(DatapathError::Invalid {
                field: "identity id",
                reason: "0 is reserved for \"no identity\"".into(),
            });
        }
        let net = net.trunc();
        let value = IdentityValue {
            identity_id,
            _reserved: 0,
        };
        let (prefix_len, addr) = identity_key(net);
        let existing = if prefix_len == 128 {
            self.id_hosts.get(&addr, 0).ok()
        } else {
            self.id_prefixes.get(&Key::new(prefix_len, addr), 0).ok()
        };
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
        if prefix_len == 128 {
            self.id_hosts
                .insert(addr, value, 0)
                .map_err(|e| self.insert_error(map_names::ID_HOSTS, e))
        } else {
            self.id_prefixes
                .insert(&Key::new(prefix_len, addr), value, 0)
                .map_err(|e| self.insert_error(map_names::ID_PREFIXES, e))
        }
    }

    /// Removes the binding of `net`. Returns whether there was one.
    pub fn unbind_identity(&mut self, net: IpNet) -> Result<bool> {
        let (prefix_len, addr) = identity_key(net.trunc());
        let result = if prefix_len == 128 {
            self.id_hosts.remove(&addr)
        } else {
            self.id_prefixes.remove(&Key::new(prefix_len, addr))
        };
        match result {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(DatapathError::Map {
                map: map_names::ID_PREFIXES,
                source,
            }),
        }
    }

    /// Every identity binding, as `(prefix, identity id)`.
    pub fn identities(&self) -> Result<Vec<(IpNet, u32)>> {
        let map_err = |map, source| DatapathError::Map { map, source };
        let mut out = Vec::new();
        for item in self.id_hosts.iter() {
            let (addr, v) = item.map_err(|e| map_err(map_names::ID_HOSTS, e))?;
            out.push((net_from_key(128, addr), v.identity_id));
        }
        for item in self.id_prefixes.iter() {
            let (k, v) = item.map_err(|e| map_err(map_names::ID_PREFIXES, e))?;
            out.push((net_from_key(k.prefix_len(), k.data()), v.identity_id));
        }
        out.sort();
        Ok(out)
    }

    // ---- grants ----

    /// Writes a grant. A full map is [`DatapathError::MapFull`]: nothing is evicted to make room.
    pub fn put_grant(&mut self, grant: GrantEntry) -> Result<()> {
        if grant.expires_at_ns <= grant.not_before_ns {
            return Err(DatapathError::Invalid {
                field: "grant window",
                reason: "expires_at must be after not_before".into(),
            });
        }
        let key = GrantKey {
            identity_id: grant.identity_id,
            service_id: grant.service_id,
        };
        let value = GrantValue {
            not_before_ns: grant.not_before_ns,
            expires_at_ns: grant.expires_at_ns,
            grant_id: grant.grant_id,
            flags: 0,
            _pad: 0,
        };
        self.grants
            .insert(key, value, 0)
            .map_err(|e| self.insert_error(map_names::GRANTS, e))
    }

    /// Deletes the grant of `identity_id` for `service_id`: the next packet of a live connection
    /// is dropped. Returns whether there was one.
    pub fn delete_grant(&mut self, identity_id: u32, service_id: u32) -> Result<bool> {
        let key = GrantKey {
            identity_id,
            service_id,
        };
        match self.grants.remove(&key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(DatapathError::Map {
                map: map_names::GRANTS,
                source,
            }),
        }
    }

    /// Every grant the kernel holds.
    pub fn grants(&self) -> Result<Vec<GrantEntry>> {
        let mut out = Vec::new();
        for item in self.grants.iter() {
            let (k, v) = item.map_err(|source| DatapathError::Map {
                map: map_names::GRANTS,
                source,
            })?;
            out.push(GrantEntry {
                identity_id: k.identity_id,
                service_id: k.service_id,
                grant_id: v.grant_id,
                not_before_ns: v.not_before_ns,
                expires_at_ns: v.expires_at_ns,
                seen: v.flags & jit_common::GRANT_FLAG_SEEN != 0,
            });
        }
        out.sort_by_key(|g| (g.identity_id, g.service_id));
        Ok(out)
    }

    // ---- counters, config, fill ----

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map_err = |map, source| DatapathError::Map { map, source };
        let mut out = Counters::default();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| map_err(map_names::COUNTERS, e))?;
            out.global.insert(name, values.iter().sum());
        }
        for service in self.services()? {
            let mut per = BTreeMap::new();
            for slot in 0..counter::SERVICE_SLOTS {
                let index = service.service_id * counter::SERVICE_SLOTS + slot;
                let values = self
                    .svc_counters
                    .get(&index, 0)
                    .map_err(|e| map_err(map_names::SERVICE_COUNTERS, e))?;
                let sum: u64 = values.iter().sum();
                if sum != 0 {
                    per.insert(counter::NAMES[slot as usize], sum);
                }
            }
            if !per.is_empty() {
                out.per_service.insert(service.service_id, per);
            }
        }
        Ok(out)
    }

    /// Sets how many events each CPU may write per second (0: the default).
    pub fn set_events_per_sec(&mut self, events_per_sec: u32) -> Result<()> {
        self.config
            .set(
                0,
                GateConfig {
                    events_per_sec,
                    _reserved: 0,
                },
                0,
            )
            .map_err(|source| DatapathError::Map {
                map: map_names::CONFIG,
                source,
            })
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
            fill(map_names::ID_HOSTS, self.id_hosts.keys().count()),
            fill(map_names::ID_PREFIXES, self.id_prefixes.keys().count()),
            fill(map_names::GRANTS, self.grants.keys().count()),
        ]
    }
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

    #[test]
    fn protocol_and_mode_parse() {
        assert_eq!("TCP".parse::<Protocol>().ok(), Some(Protocol::Tcp));
        assert!("icmp".parse::<Protocol>().is_err());
        assert_eq!("audit".parse::<Mode>().ok(), Some(Mode::Audit));
        assert!("permissive".parse::<Mode>().is_err());
    }
}
