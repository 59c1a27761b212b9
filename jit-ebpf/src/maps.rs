//! The kernel maps. All are pinned by name under the loader's pin directory, so their contents
//! outlive the agent process. Sizes here are defaults; the agent may resize at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use jit_common::{
    GateConfig, GrantKey, GrantValue, IdentityValue, MAX_SERVICE_DESTS, MAX_SERVICES,
    PORT_BITMAP_WORDS, PORT_INDEX_ENTRIES, RateState, ServiceCounters, ServiceKey, ServiceValue,
    counter,
};

/// Protected destinations: exact `(family, proto, port, addr)`, or the same with an all-zero
/// address for "any address of the family". The agent expands a service on a local address to
/// every address of the node.
#[map]
pub(crate) static JIT_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICE_DESTS, 0);

/// Port bitmap, two bits per `(proto, port)`: the one lookup an unprotected packet costs.
#[map]
pub(crate) static JIT_PORTS: Array<u64> = Array::pinned(PORT_BITMAP_WORDS, 0);

/// The one service of each `(proto, port)`, plus one; 0 for none or several.
#[map]
pub(crate) static JIT_PORT_SVC: Array<u32> = Array::pinned(PORT_INDEX_ENTRIES, 0);

/// Number of services on each `(family, proto, addr)` (port 0), wildcard address included.
#[map]
pub(crate) static JIT_DESTS: HashMap<ServiceKey, u32> = HashMap::pinned(MAX_SERVICE_DESTS, 0);

/// Identities of static source prefixes, longest match on the 16-byte source address.
#[map]
pub(crate) static JIT_ID_PREFIX: LpmTrie<[u8; 16], IdentityValue> = LpmTrie::pinned(65_536, 0);

/// Grants, host-bound and identity-keyed. A plain hash map, never LRU: a live grant must never
/// be evicted silently.
#[map]
pub(crate) static JIT_GRANTS: HashMap<GrantKey, GrantValue> = HashMap::pinned(65_536, 0);

/// Identity-keyed grants per service id.
#[map]
pub(crate) static JIT_SVC_IDGR: Array<u32> = Array::pinned(MAX_SERVICES, 0);

/// Global counters by [`counter`] index.
#[map]
pub(crate) static JIT_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Per-service verdict counters, by service id.
#[map]
pub(crate) static JIT_SVC_COUNT: PerCpuArray<ServiceCounters> =
    PerCpuArray::pinned(MAX_SERVICES, 0);

/// Deny, audit and first-allowed events for the agent.
#[map]
pub(crate) static JIT_EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// Budget settings from the agent, index 0.
#[map]
pub(crate) static JIT_CONFIG: Array<GateConfig> = Array::pinned(1, 0);

/// Event budget per CPU, refilled when the agent starts a new budget period.
#[map]
pub(crate) static JIT_RATE: PerCpuArray<RateState> = PerCpuArray::pinned(1, 0);
