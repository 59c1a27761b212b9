//! Types shared by the kernel program (`jit-ebpf`) and the agent (`jit-agent`).
//!
//! Every type that crosses the user/kernel boundary is `#[repr(C)]`, uses fixed-width integers,
//! spells out its padding as named fields, and has its size checked at compile time, so the two
//! sides can never disagree about a layout. Enumerations are plain `u32` constants: a value read
//! from a map is never transmuted into a Rust enum.
#![cfg_attr(not(test), no_std)]

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

/// Highest number of services the kernel program accounts for; service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 4096;

/// Slots in the per-port index: one block of 65 536 ports per protected L4 protocol.
pub const PORT_INDEX_ENTRIES: u32 = 2 * 65_536;

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

/// Names of the maps, as pinned under the pin directory. They are the symbol names in the
/// kernel object; the kernel keeps at most 15 characters of a map name.
pub mod map_names {
    /// [`crate::ServiceKey`] → [`crate::ServiceValue`].
    pub const SERVICES: &str = "JIT_SERVICES";
    /// Port index: `u32` count of services per `(proto, port)`; see [`crate::port_index`].
    pub const PORTS: &str = "JIT_PORTS";
    /// [`crate::ServiceKey`] with port 0 → `u32` count of services on that address and protocol.
    /// Used only to decide whether an unclassifiable packet (a non-first fragment, a truncated L4
    /// header) is bound for a protected destination.
    pub const DESTS: &str = "JIT_DESTS";
    /// Exact source address (`[u8; 16]`, see [`crate::v4_mapped`]) → [`crate::IdentityValue`];
    /// checked before the trie.
    pub const ID_HOSTS: &str = "JIT_ID_HOSTS";
    /// LPM trie of source prefixes (`[u8; 16]`, see [`crate::v4_mapped`]) →
    /// [`crate::IdentityValue`].
    pub const ID_PREFIXES: &str = "JIT_ID_PREFIX";
    /// [`crate::GrantKey`] → [`crate::GrantValue`].
    pub const GRANTS: &str = "JIT_GRANTS";
    /// Per-CPU `u64` counters indexed by [`crate::counter`].
    pub const COUNTERS: &str = "JIT_COUNTERS";
    /// Per-CPU `u64` counters indexed by `service_id * counter::SERVICE_SLOTS + verdict`.
    pub const SERVICE_COUNTERS: &str = "JIT_SVC_COUNT";
    /// Ring buffer of [`crate::Event`].
    pub const EVENTS: &str = "JIT_EVENTS";
    /// One [`crate::GateConfig`] at index 0.
    pub const CONFIG: &str = "JIT_CONFIG";
    /// Per-CPU [`crate::RateState`] for the event rate limit.
    pub const RATE: &str = "JIT_RATE";
}

/// Names of the programs in the kernel object.
pub mod program_names {
    /// The XDP entry point.
    pub const XDP: &str = "jit_gate_xdp";
    /// The TC (clsact/TCX ingress) entry point.
    pub const TC: &str = "jit_gate_tc";
}

/// Verdict reasons and other counters. The first [`counter::SERVICE_SLOTS`] values are the
/// verdicts on packets bound for a protected service; they are counted globally and per service.
pub mod counter {
    /// A packet to a protected service passed: its source holds a live grant.
    pub const ALLOWED: u32 = 0;
    /// Audit mode: the packet would have been dropped (for any reason below) and was passed.
    pub const AUDIT_WOULD_DROP: u32 = 1;
    /// Dropped: the source address maps to no identity.
    pub const NO_IDENTITY: u32 = 2;
    /// Dropped: the identity holds no grant for the service.
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
    /// Dropped: an IPv6 extension header chain longer than the parser follows, or one it cannot
    /// see through (ESP), bound for a protected address.
    pub const TOO_MANY_EXT_HEADERS: u32 = 9;
    /// An event was not written to the ring buffer because of the rate limit.
    pub const EVENTS_RATE_LIMITED: u32 = 10;
    /// An event was not written to the ring buffer because it was full.
    pub const EVENTS_LOST: u32 = 11;
    /// Number of counters.
    pub const COUNT: u32 = 12;

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
        "events_rate_limited",
        "events_lost",
    ];

    /// Whether the counter is a drop (as opposed to a pass or an event statistic).
    #[must_use]
    pub const fn is_drop(counter: u32) -> bool {
        matches!(counter, 2..=9)
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
/// zeros means "any local address" for that family. `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Destination port, host byte order (0 in the destinations index).
    pub port: u16,
    /// Destination address, network byte order; all zeros is the wildcard.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

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

/// Maps an address to the 16-byte form both identity maps use: IPv6 as is, IPv4 IPv4-mapped
/// (`::ffff:a.b.c.d`), so one trie serves both families. An IPv4 prefix of length `n` is stored
/// with prefix length `96 + n`.
#[inline(always)]
#[must_use]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Value of both identity maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityValue {
    /// Numeric identity id; the first half of a [`GrantKey`]. Never 0.
    pub identity_id: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}
const _: () = assert!(size_of::<IdentityValue>() == 8);

/// Key of the grants map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantKey {
    /// Identity holding the grant.
    pub identity_id: u32,
    /// Service the grant opens.
    pub service_id: u32,
}
const _: () = assert!(size_of::<GrantKey>() == 8);

/// Grant flag: the kernel has reported the first packet allowed under this grant.
pub const GRANT_FLAG_SEEN: u32 = 1;

/// Value of the grants map. Times are `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`),
/// which keep counting through suspend and never jump with the wall clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantValue {
    /// The grant opens at this instant.
    pub not_before_ns: u64,
    /// The grant closes at this instant (exclusive).
    pub expires_at_ns: u64,
    /// The agent's id of the grant, reported in events.
    pub grant_id: u64,
    /// `GRANT_FLAG_*` bits.
    pub flags: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<GrantValue>() == 32);

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
    /// [`FAMILY_V4`] or [`FAMILY_V6`], 0 when unknown.
    pub family: u8,
    /// IP protocol, 0 when unknown.
    pub proto: u8,
    /// Source port, host byte order.
    pub src_port: u16,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// Explicit padding, zero.
    pub _pad: u16,
    /// Source address (IPv4 in the first 4 bytes).
    pub src_addr: [u8; 16],
    /// Destination address (IPv4 in the first 4 bytes).
    pub dst_addr: [u8; 16],
}
const _: () = assert!(size_of::<Event>() == 72);

/// Runtime settings of the kernel program, at index 0 of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Events each CPU may write per second; 0 means the default
    /// ([`DEFAULT_EVENTS_PER_SEC`]).
    pub events_per_sec: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}
const _: () = assert!(size_of::<GateConfig>() == 8);

/// Events each CPU may write per second when the config map says 0.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 1_000;

/// Per-CPU state of the event rate limit: a fixed one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateState {
    /// Start of the current window, `CLOCK_BOOTTIME` ns.
    pub window_start_ns: u64,
    /// Events written in the current window.
    pub count: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<RateState>() == 16);

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
    unsafe impl aya::Pod for super::GateConfig {}
    unsafe impl aya::Pod for super::RateState {}
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
