//! The kernel maps. All are pinned by name under the loader's pin directory, so their contents
//! outlive the agent process. Sizes here are defaults; the agent may resize at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use jit_common::{
    GateConfig, GrantKey, GrantValue, IdentityValue, MAX_SERVICES, PORT_INDEX_ENTRIES, RateState,
    ServiceKey, ServiceValue, counter,
};

/// Protected services: exact `(family, proto, port, addr)`, or the same with an all-zero
/// address for "any address".
#[map]
pub(crate) static JIT_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, 0);

/// Number of services on each `(proto, port)`: the one lookup an unprotected packet costs.
#[map]
pub(crate) static JIT_PORTS: Array<u32> = Array::pinned(PORT_INDEX_ENTRIES, 0);

/// Number of services on each `(family, proto, addr)` (port 0), wildcard address included.
#[map]
pub(crate) static JIT_DESTS: HashMap<ServiceKey, u32> = HashMap::pinned(MAX_SERVICES, 0);

/// Identities of single hosts, exact match on the 16-byte source address.
#[map]
pub(crate) static JIT_ID_HOSTS: HashMap<[u8; 16], IdentityValue> = HashMap::pinned(65_536, 0);

/// Identities of prefixes, longest match on the 16-byte source address.
#[map]
pub(crate) static JIT_ID_PREFIX: LpmTrie<[u8; 16], IdentityValue> = LpmTrie::pinned(65_536, 0);

/// Grants. A plain hash map, never LRU: a live grant must never be evicted silently.
#[map]
pub(crate) static JIT_GRANTS: HashMap<GrantKey, GrantValue> = HashMap::pinned(65_536, 0);

/// Global counters by [`counter`] index.
#[map]
pub(crate) static JIT_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Per-service verdict counters at `service_id * SERVICE_SLOTS + verdict`.
#[map]
pub(crate) static JIT_SVC_COUNT: PerCpuArray<u64> =
    PerCpuArray::pinned(MAX_SERVICES * counter::SERVICE_SLOTS, 0);

/// Deny, audit and first-allowed events for the agent.
#[map]
pub(crate) static JIT_EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// Runtime settings, index 0.
#[map]
pub(crate) static JIT_CONFIG: Array<GateConfig> = Array::pinned(1, 0);

/// Event rate-limit state per CPU.
#[map]
pub(crate) static JIT_RATE: PerCpuArray<RateState> = PerCpuArray::pinned(1, 0);
