//! Types shared by the kernel program (`jit-ebpf`) and the agent (`jit-agent`).
//!
//! Every type that crosses the user/kernel boundary is `#[repr(C)]`, uses fixed-width integers,
//! spells out its padding as named fields, and has its size checked at compile time, so the two
//! sides can never disagree about a layout. Enumerations are plain `u32` constants: a value read
//! from a map is never transmuted into a Rust enum.
#![cfg_attr(not(test), no_std)]

// Keys are built from native-endian words of their memory image (`jit-ebpf/src/addr.rs` shifts
// bytes into place assuming little-endian); the agent and the kernel must agree.
#[cfg(target_endian = "big")]
compile_error!(
    "JIT Gate's map keys assume a little-endian machine (x86-64, aarch64 little-endian)"
);

use core::mem::size_of;

/// Address family code for IPv4 in map keys (our own code, not `AF_INET`).
pub const FAMILY_V4: u8 = 4;
/// Address family code for IPv6 in map keys.
pub const FAMILY_V6: u8 = 6;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Service enforcement mode: packets without a live grant are dropped.
pub const MODE_ENFORCE: u32 = 0;
/// Service enforcement mode: packets without a live grant are counted and reported, then passed.
pub const MODE_AUDIT: u32 = 1;

/// Version of the map layout. Maps are pinned under `<pin dir>/v<LAYOUT_VERSION>`, so a program
/// built for another layout never opens maps whose keys or values it would misread; an upgrade
/// loads fresh maps beside the old ones, fills them, and swaps the program into the pinned links.
pub const LAYOUT_VERSION: u32 = 3;

/// Highest number of services the kernel program accounts for; service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 4096;

/// Capacity of the services map: destinations after expansion (a service on a local address is
/// written once for every address of the node).
pub const MAX_SERVICE_DESTS: u32 = 16_384;

/// Slots in the per-port index: one block of 65 536 ports per protected L4 protocol.
pub const PORT_INDEX_ENTRIES: u32 = 2 * 65_536;

/// Bits the port bitmap keeps per `(proto, port)`.
pub const PORT_BITS: u32 = 2;
/// Port bitmap bit: some service names this port on a specific destination address.
pub const PORT_EXACT: u64 = 1;
/// Port bitmap bit: some service names this port on the wildcard address of a family.
pub const PORT_WILDCARD: u64 = 2;
/// Ports per `u64` word of the port bitmap.
pub const PORTS_PER_WORD: u32 = 64 / PORT_BITS;
/// Words in the port bitmap.
pub const PORT_BITMAP_WORDS: u32 = PORT_INDEX_ENTRIES / PORTS_PER_WORD;

/// Index into the port index for `(proto, port)`, or `None` for a protocol the gate cannot
/// protect (only TCP and UDP carry ports).
#[inline(always)]
#[must_use]
pub const fn port_index(proto: u8, port: u16) -> Option<u32> {
    match proto {
        PROTO_TCP => Some(port as u32),
        PROTO_UDP => Some(65_536 + port as u32),
        _ => None,
    }
}

/// `(word, shift)` of a port index in the port bitmap: the port's bits are
/// `(bitmap[word] >> shift) & 3`.
#[inline(always)]
#[must_use]
pub const fn port_bit_position(index: u32) -> (u32, u32) {
    (index / PORTS_PER_WORD, (index % PORTS_PER_WORD) * PORT_BITS)
}

/// The IPv4 address every IPv4 broadcast and multicast destination is looked up as: the agent
/// writes services on local addresses for it too, so a datagram to 255.255.255.255, a subnet
/// broadcast or a multicast group reaches a local service's port only through the gate.
pub const V4_BROADCAST: [u8; 4] = [255, 255, 255, 255];
/// The IPv6 address every IPv6 multicast destination (`ff00::/8`) is looked up as (all nodes).
pub const V6_MULTICAST: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Names of the maps, as pinned under `<pin dir>/v<LAYOUT_VERSION>`. They are the symbol names
/// in the kernel object; the kernel keeps at most 15 characters of a map name.
pub mod map_names {
    /// [`crate::ServiceKey`] → [`crate::ServiceValue`].
    pub const SERVICES: &str = "JIT_SERVICES";
    /// Port bitmap: [`crate::PORT_BITS`] bits per `(proto, port)` ([`crate::PORT_EXACT`],
    /// [`crate::PORT_WILDCARD`]); see [`crate::port_bit_position`].
    pub const PORTS: &str = "JIT_PORTS";
    /// `u32` per port index (see [`crate::port_index`]): `service_id + 1` when every destination
    /// on that `(proto, port)` belongs to one service, else 0. A packet to such a port is allowed
    /// by a live host grant of that service before the service lookup: a destination the service
    /// does not cover is not protected at all, so the verdict is the same.
    pub const PORT_SERVICES: &str = "JIT_PORT_SVC";
    /// [`crate::ServiceKey`] with port 0 → `u32` count of services on that address and protocol.
    /// Used only to decide whether an unclassifiable packet (a non-first fragment, a truncated L4
    /// header, an opaque protocol) is bound for a protected destination.
    pub const DESTS: &str = "JIT_DESTS";
    /// LPM trie of static source prefixes (`[u8; 16]`, see [`crate::v4_mapped`]) →
    /// [`crate::IdentityValue`]. Only identity-keyed grants consult it.
    pub const ID_PREFIXES: &str = "JIT_ID_PREFIX";
    /// [`crate::GrantKey`] → [`crate::GrantValue`]: host-bound and identity-keyed grants.
    pub const GRANTS: &str = "JIT_GRANTS";
    /// `u32` per service id: how many identity-keyed grants of the service the grants map holds.
    /// Zero spares a packet that misses its host grant the identity lookups.
    pub const SERVICE_ID_GRANTS: &str = "JIT_SVC_IDGR";
    /// Per-CPU `u64` counters indexed by [`crate::counter`], for the counters that are not
    /// verdicts of a service (those live per service) or rate-limited events (in the rate state).
    pub const COUNTERS: &str = "JIT_COUNTERS";
    /// Per-CPU [`crate::ServiceCounters`] indexed by service id.
    pub const SERVICE_COUNTERS: &str = "JIT_SVC_COUNT";
    /// Ring buffer of [`crate::Event`].
    pub const EVENTS: &str = "JIT_EVENTS";
    /// Per-CPU [`crate::RateState`] for the event rate limit.
    pub const RATE: &str = "JIT_RATE";
    /// One [`crate::GateConfig`] at index 0.
    pub const CONFIG: &str = "JIT_CONFIG";
}

/// Names of the programs in the kernel object.
pub mod program_names {
    /// The XDP entry point (Ethernet devices).
    pub const XDP: &str = "jit_gate_xdp";
    /// The TC (TCX ingress) entry point for Ethernet devices.
    pub const TC: &str = "jit_gate_tc";
    /// The TC (TCX ingress) entry point for L3 devices (tun, WireGuard, IP tunnels): the packet
    /// starts at the IP header and its protocol comes from the skb.
    pub const TC_L3: &str = "jit_gate_tc_l3";
}

/// Verdict reasons and other counters. The first [`counter::SERVICE_SLOTS`] values are the
/// verdicts on packets bound for a protected service; they are counted globally and per service.
pub mod counter {
    /// A packet to a protected service passed: its source holds a live grant.
    pub const ALLOWED: u32 = 0;
    /// Audit mode: the packet would have been dropped (for any reason below) and was passed.
    pub const AUDIT_WOULD_DROP: u32 = 1;
    /// Dropped: the source holds no host-bound grant, the service has identity-keyed grants, and
    /// the source address is in no static prefix.
    pub const NO_IDENTITY: u32 = 2;
    /// Dropped: neither the source address (host-bound) nor its identity (static prefix) holds a
    /// grant for the service.
    pub const NO_GRANT: u32 = 3;
    /// Dropped: the grant has expired.
    pub const EXPIRED: u32 = 4;
    /// Dropped: the grant is not valid yet.
    pub const NOT_YET_VALID: u32 = 5;
    /// Verdict slots counted per service.
    pub const SERVICE_SLOTS: u32 = 6;

    /// Dropped: a frame too short for its Ethernet or IP header, an IP header that contradicts
    /// itself, or an L4 header cut short, bound for (or possibly bound for) a protected
    /// destination.
    pub const UNPARSEABLE: u32 = 6;
    /// Dropped: a non-first fragment bound for a protected address and protocol.
    pub const FRAGMENT: u32 = 7;
    /// Dropped: more VLAN tags than the parser follows (2).
    pub const TOO_MANY_VLANS: u32 = 8;
    /// Dropped: an IPv6 extension header chain longer than the parser follows, bound for a
    /// protected address.
    pub const TOO_MANY_EXT_HEADERS: u32 = 9;
    /// Dropped: a transport the gate cannot see into (ESP, AH, IP-in-IP, IPv6-in-IPv4, GRE) or an
    /// IPv6 next header it does not know, bound for an address that has a protected service.
    pub const OPAQUE: u32 = 10;
    /// An event was not written to the ring buffer because of the rate limit.
    pub const EVENTS_RATE_LIMITED: u32 = 11;
    /// An event was not written to the ring buffer because it was full.
    pub const EVENTS_LOST: u32 = 12;
    /// Number of counters.
    pub const COUNT: u32 = 13;

    /// Stable, human-readable names, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "allowed",
        "audit_would_drop",
        "no_identity",
        "no_grant",
        "expired",
        "not_yet_valid",
        "unparseable",
        "fragment",
        "too_many_vlans",
        "too_many_ext_headers",
        "opaque",
        "events_rate_limited",
        "events_lost",
    ];

    /// Whether the counter is a drop (as opposed to a pass or an event statistic).
    #[must_use]
    pub const fn is_drop(counter: u32) -> bool {
        matches!(counter, 2..=10)
    }
}

/// Event kinds carried in [`Event::kind`].
pub mod event_kind {
    /// A packet was dropped; [`crate::Event::reason`] says why.
    pub const DENY: u32 = 1;
    /// Audit mode: a packet would have been dropped; [`crate::Event::reason`] says why.
    pub const AUDIT: u32 = 2;
    /// The first packet allowed under a grant.
    pub const FIRST_ALLOWED: u32 = 3;
}

/// Key of the services map and of the destinations index.
///
/// `addr` holds an IPv4 address in its first 4 bytes (the rest zero) or an IPv6 address; all
/// zeros means "any address" of that family. `port` is in host byte order. Aligned to 8 bytes
/// with the address at offset 8, so the kernel program writes it with two 8-byte stores (the
/// verifier refuses misaligned stack access).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Destination port, host byte order (0 in the destinations index).
    pub port: u16,
    /// Explicit padding, zero (it is part of the hashed key).
    pub _pad: u32,
    /// Destination address, network byte order; all zeros is the wildcard.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ServiceKey>() == 24);

impl ServiceKey {
    /// A key with zero padding.
    #[inline(always)]
    #[must_use]
    pub const fn new(family: u8, proto: u8, port: u16, addr: [u8; 16]) -> Self {
        Self {
            family,
            proto,
            port,
            _pad: 0,
            addr,
        }
    }
}

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service id, below [`MAX_SERVICES`]; the second half of a [`GrantKey`].
    pub service_id: u32,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 8);

/// Maps an IPv4 address to the 16-byte form source addresses take in the identity trie and in
/// host-bound grant keys: IPv6 as is, IPv4 IPv4-mapped (`::ffff:a.b.c.d`), so one map serves both
/// families. An IPv4 prefix of length `n` is stored with prefix length `96 + n`.
#[inline(always)]
#[must_use]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Value of the identity trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityValue {
    /// Numeric identity id. Never 0.
    pub identity_id: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}
const _: () = assert!(size_of::<IdentityValue>() == 8);

/// [`GrantKey::kind`]: the grant opens the service to one source address, the one it was bound
/// to (the requester's own address), and to nothing else its identity may have.
pub const GRANT_KIND_HOST: u32 = 1;
/// [`GrantKey::kind`]: the grant opens the service to the identity's static source prefixes.
pub const GRANT_KIND_IDENTITY: u32 = 2;

/// Key of the grants map: what was approved, exactly. 8-byte aligned, the address at offset 8.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantKey {
    /// Service the grant opens.
    pub service_id: u32,
    /// [`GRANT_KIND_HOST`] or [`GRANT_KIND_IDENTITY`].
    pub kind: u32,
    /// Host grants: the source address in the 16-byte form of [`v4_mapped`]. Identity grants: the
    /// identity id in native byte order in the first 4 bytes, the rest zero.
    pub source: [u8; 16],
}
const _: () = assert!(size_of::<GrantKey>() == 24);

impl GrantKey {
    /// The key of a grant bound to the source address `source` (16-byte form).
    #[inline(always)]
    #[must_use]
    pub const fn host(service_id: u32, source: [u8; 16]) -> Self {
        Self {
            service_id,
            kind: GRANT_KIND_HOST,
            source,
        }
    }

    /// The key of a grant of `identity_id` through its static prefixes.
    #[inline(always)]
    #[must_use]
    pub const fn identity(service_id: u32, identity_id: u32) -> Self {
        let b = identity_id.to_ne_bytes();
        Self {
            service_id,
            kind: GRANT_KIND_IDENTITY,
            source: [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

/// Grant flag: the kernel has reported the first packet allowed under this grant.
pub const GRANT_FLAG_SEEN: u32 = 1;

/// Value of the grants map. Times are `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`),
/// which keep counting through suspend and never jump with the wall clock.
///
/// The first five fields are the agent's (what was approved); the usage fields after them are
/// the kernel's: the agent writes them as zero for a new grant and carries them over when it
/// rewrites the same grant.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantValue {
    /// The grant opens at this instant.
    pub not_before_ns: u64,
    /// The grant closes at this instant (exclusive).
    pub expires_at_ns: u64,
    /// The agent's id of the grant, reported in events.
    pub grant_id: u64,
    /// The identity holding the grant, reported in events.
    pub identity_id: u32,
    /// `GRANT_FLAG_*` bits.
    pub flags: u32,
    /// When the first packet was allowed under this entry, 0 for never.
    pub first_seen_ns: u64,
    /// When the last packet was allowed under this entry, 0 for never.
    pub last_seen_ns: u64,
    /// Packets allowed under this entry (an atomic add: exact across CPUs).
    pub packets: u64,
}
const _: () = assert!(size_of::<GrantValue>() == 56);

// The kernel adds to `packets` atomically: it must be 8-aligned.
const _: () = assert!(core::mem::offset_of!(GrantValue, packets) % 8 == 0);

/// One record of the event ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_BOOTTIME` nanoseconds when the packet was seen.
    pub timestamp_ns: u64,
    /// Grant id for [`event_kind::FIRST_ALLOWED`] and for expired or not-yet-valid grants, else 0.
    pub grant_id: u64,
    /// One of [`event_kind`].
    pub kind: u32,
    /// One of [`counter`] (the verdict).
    pub reason: u32,
    /// Identity of the source, 0 when unknown.
    pub identity_id: u32,
    /// Service id, or `u32::MAX` when the packet was dropped before a service was known.
    pub service_id: u32,
    /// Source port, host byte order.
    pub src_port: u16,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`], 0 when unknown.
    pub family: u8,
    /// IP protocol, 0 when unknown.
    pub proto: u8,
    /// Explicit padding, zero.
    pub _pad: u16,
    /// Source address (IPv4 in the first 4 bytes).
    pub src_addr: [u8; 16],
    /// Destination address (IPv4 in the first 4 bytes).
    pub dst_addr: [u8; 16],
}
const _: () = assert!(size_of::<Event>() == 72);

/// Settings the agent gives the kernel program, at index 0 of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Events each CPU may write per budget period.
    pub events_per_period: u32,
    /// Budget period: the agent's event reader raises it every second; a CPU that sees a new
    /// period refills its budget to `events_per_period`. Never raised, never refilled: with no
    /// reader, no events are written.
    pub event_epoch: u32,
}
const _: () = assert!(size_of::<GateConfig>() == 8);

/// Events each CPU may write per second unless the agent is configured otherwise.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 1_000;

/// Per-CPU event budget. The kernel spends one token per event and writes none without one, so
/// a flood costs no clock read once the budget is spent; see [`GateConfig::event_epoch`] for the
/// refill. Only the kernel writes it, so its counts are exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateState {
    /// Events this CPU may still write in `epoch`.
    pub tokens: u32,
    /// The budget period the tokens belong to.
    pub epoch: u32,
    /// Events this CPU did not write for want of a token (the `events_rate_limited` counter).
    pub suppressed: u64,
}
const _: () = assert!(size_of::<RateState>() == 16);

/// Verdict counters of one service on one CPU (value of the per-service counters map). The
/// global verdict counters are their sums over services: a packet's verdict costs one counter
/// lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Indexed by the verdicts of [`counter`] below [`counter::SERVICE_SLOTS`].
    pub verdicts: [u64; counter::SERVICE_SLOTS as usize],
}
const _: () = assert!(size_of::<ServiceCounters>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, made only of integers and byte arrays, and has no
    // implicit padding (checked by the size asserts above), so any bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::IdentityValue {}
    unsafe impl aya::Pod for super::GrantKey {}
    unsafe impl aya::Pod for super::GrantValue {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for super::GateConfig {}
    unsafe impl aya::Pod for super::ServiceCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_index_separates_protocols_and_rejects_others() {
        assert_eq!(port_index(PROTO_TCP, 443), Some(443));
        assert_eq!(port_index(PROTO_UDP, 443), Some(65_536 + 443));
        assert_eq!(
            port_index(PROTO_UDP, u16::MAX),
            Some(PORT_INDEX_ENTRIES - 1)
        );
        assert_eq!(port_index(1, 443), None);
    }

    #[test]
    fn port_bits_cover_every_port_once() {
        assert_eq!(port_bit_position(0), (0, 0));
        assert_eq!(port_bit_position(31), (0, 62));
        assert_eq!(port_bit_position(32), (1, 0));
        let last = port_index(PROTO_UDP, u16::MAX).unwrap();
        assert_eq!(port_bit_position(last).0, PORT_BITMAP_WORDS - 1);
    }

    #[test]
    fn grant_keys_keep_kinds_apart() {
        let h = GrantKey::host(3, v4_mapped([0, 0, 0, 7]));
        let i = GrantKey::identity(3, 7);
        assert_ne!(h, i);
        assert_eq!(i.source[4..], [0; 12]);
        assert_eq!(
            u32::from_ne_bytes([i.source[0], i.source[1], i.source[2], i.source[3]]),
            7
        );
    }

    #[test]
    fn v4_mapped_is_the_ipv6_mapped_form() {
        let mapped = v4_mapped([10, 1, 2, 3]);
        let std_mapped = core::net::Ipv4Addr::new(10, 1, 2, 3)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(mapped, std_mapped);
    }

    #[test]
    fn counter_names_cover_every_counter() {
        assert_eq!(counter::NAMES.len(), counter::COUNT as usize);
        assert_eq!(counter::NAMES[counter::ALLOWED as usize], "allowed");
        assert_eq!(counter::NAMES[counter::EVENTS_LOST as usize], "events_lost");
        assert!(counter::is_drop(counter::NO_GRANT));
        assert!(!counter::is_drop(counter::ALLOWED));
        assert!(!counter::is_drop(counter::AUDIT_WOULD_DROP));
        // Service verdict slots are exactly the verdicts before the parser's reasons.
        assert_eq!(counter::SERVICE_SLOTS, counter::UNPARSEABLE);
    }
}
