//! Packet parsing: Ethernet, up to two VLAN tags, IPv4 (with options), IPv6 (with a bounded chain
//! of extension headers), TCP and UDP. Works on a `[start, end)` window of linear packet data,
//! so XDP and TC share it; L3 devices (tun, IP tunnels) enter at the IP header.
//!
//! One rule for what the parser cannot see into: a transport that hides or wraps the real one
//! (ESP, AH, IP-in-IP, IPv6-in-IPv4, GRE) or an IPv6 next header it does not know is
//! [`counter::OPAQUE`], and is dropped when its destination address has a protected service.

use core::mem::size_of;

use jit_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, counter};

use crate::addr::Words;

/// VLAN tags the parser follows; a third one makes the frame unclassifiable.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers the parser follows before giving up.
pub(crate) const MAX_EXT_HEADERS: usize = 8;
/// Furthest offset (from the IPv6 header) the extension-header walk may reach.
const MAX_EXT_OFFSET: usize = 512;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_GRE: u8 = 47;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_IPCOMP: u8 = 108;
const IPPROTO_L2TP: u8 = 115;
const IPPROTO_MPLS: u8 = 137;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_NONE: u8 = 59;
const IPPROTO_DSTOPTS: u8 = 60;

/// A fully classified TCP or UDP packet. Addresses stay in the packet until they are needed
/// (after the port check), so traffic to unprotected ports never copies them.
pub(crate) struct Flow {
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    /// Offset of the IP header.
    pub(crate) l3: usize,
}

/// What the parser made of a frame.
pub(crate) enum Parsed {
    /// Not IPv4 or IPv6: outside the gate's concern.
    NotIp,
    /// IP, but carrying no port the gate can protect (ICMP, a "no next header" ...).
    NoPorts,
    /// A TCP or UDP packet with its ports.
    Flow(Flow),
    /// A packet that could not be fully classified. `family == 0` means the destination is
    /// unknown (else it is in the fixed IP header at `l3`), `proto == 0` that the protocol is.
    Unclassified {
        reason: u32,
        family: u8,
        proto: u8,
        l3: usize,
    },
}

const fn unknown(reason: u32) -> Parsed {
    Parsed::Unclassified {
        reason,
        family: 0,
        proto: 0,
        l3: 0,
    }
}

/// Reads a `T` at `off` if the whole of it lies inside the window.
#[inline(always)]
fn load<T: Copy>(start: usize, end: usize, off: usize) -> Option<T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    // SAFETY: the bounds check above keeps the read inside the packet, which is what the
    // verifier demands; `read_unaligned` because packet fields have no alignment.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

#[inline(always)]
fn load_be16(start: usize, end: usize, off: usize) -> Option<u16> {
    load::<[u8; 2]>(start, end, off).map(u16::from_be_bytes)
}

/// A checked view of `len` bytes at `off`: the address of the first, when all lie inside the
/// window. Reads at constant offsets below `len` from it need no further check (the verifier
/// follows the one comparison), and copy nothing.
#[inline(always)]
fn window(start: usize, end: usize, off: usize, len: usize) -> Option<usize> {
    let p = start + off;
    if p + len > end {
        return None;
    }
    Some(p)
}

/// The byte at `p + k` of a [`window`] (`k` below its length).
#[inline(always)]
fn byte(p: usize, k: usize) -> u8 {
    // SAFETY: `p` comes from `window`, which checked that its length (> k) is in the packet.
    unsafe { *((p + k) as *const u8) }
}

/// The big-endian `u16` at `p + k` of a [`window`] (`k + 1` below its length).
#[inline(always)]
fn be16(p: usize, k: usize) -> u16 {
    u16::from_be_bytes([byte(p, k), byte(p, k + 1)])
}

/// The destination address of the IP header at `l3`, in the service-key form (IPv4 in the
/// first 4 bytes).
#[inline(always)]
pub(crate) fn dst_addr(start: usize, end: usize, family: u8, l3: usize) -> Option<Words> {
    if family == FAMILY_V4 {
        load::<u32>(start, end, l3 + 16).map(Words::v4)
    } else {
        Some(Words {
            hi: load::<u64>(start, end, l3 + 24)?,
            lo: load::<u64>(start, end, l3 + 32)?,
        })
    }
}

/// The source address of the IP header at `l3`, in the form of identity and grant keys
/// (IPv4-mapped for IPv4).
#[inline(always)]
pub(crate) fn src_addr(start: usize, end: usize, family: u8, l3: usize) -> Option<Words> {
    if family == FAMILY_V4 {
        load::<u32>(start, end, l3 + 12).map(Words::v4_mapped)
    } else {
        Some(Words {
            hi: load::<u64>(start, end, l3 + 8)?,
            lo: load::<u64>(start, end, l3 + 16)?,
        })
    }
}

/// Whether an IP protocol number wraps or hides the transport the gate would have to see.
#[inline(always)]
const fn is_opaque(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_ESP
            | IPPROTO_AH
            | IPPROTO_IPIP
            | IPPROTO_IPV6
            | IPPROTO_GRE
            | IPPROTO_IPCOMP
            | IPPROTO_L2TP
            | IPPROTO_MPLS
    )
}

/// Parses a packet that starts at its IP header (an L3 device), with `ether_type` the protocol
/// the skb carries.
#[inline(always)]
pub(crate) fn parse_l3(start: usize, end: usize, ether_type: u16) -> Parsed {
    match ether_type {
        ETH_P_IP => parse_v4(start, end, 0),
        ETH_P_IPV6 => parse_v6(start, end, 0),
        _ => Parsed::NotIp,
    }
}

/// Parses the Ethernet frame in `[start, end)`.
#[inline(always)]
pub(crate) fn parse(start: usize, end: usize) -> Parsed {
    let Some(mut ether_type) = load_be16(start, end, 12) else {
        return unknown(counter::UNPARSEABLE);
    };
    let mut l3 = ETH_HLEN;
    let mut tags = 0;
    while ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return unknown(counter::TOO_MANY_VLANS);
        }
        // The tag is 4 bytes: TCI, then the next EtherType.
        let Some(next) = load_be16(start, end, l3 + 2) else {
            return unknown(counter::UNPARSEABLE);
        };
        ether_type = next;
        l3 += 4;
        tags += 1;
    }
    match ether_type {
        ETH_P_IP => parse_v4(start, end, l3),
        ETH_P_IPV6 => parse_v6(start, end, l3),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(start: usize, end: usize, l3: usize) -> Parsed {
    // The fixed 20-byte header holds both addresses; without it nothing is known.
    let Some(h) = window(start, end, l3, 20) else {
        return unknown(counter::UNPARSEABLE);
    };
    let (ver_ihl, total_len, frag, proto) = (byte(h, 0), be16(h, 2), be16(h, 6), byte(h, 9));
    let unclassified = |reason| Parsed::Unclassified {
        reason,
        family: FAMILY_V4,
        proto,
        l3,
    };
    if ver_ihl >> 4 != 4 {
        // Not the header the EtherType (or the skb) says: where anything is, is unknown.
        return unknown(counter::UNPARSEABLE);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 || usize::from(total_len) < ihl {
        return unclassified(counter::UNPARSEABLE);
    }
    if frag & 0x1fff != 0 {
        // A non-first fragment has no L4 header: its ports cannot be known.
        return unclassified(counter::FRAGMENT);
    }
    if is_opaque(proto) {
        return Parsed::Unclassified {
            reason: counter::OPAQUE,
            family: FAMILY_V4,
            proto: 0,
            l3,
        };
    }
    parse_l4(start, end, l3, l3 + ihl, FAMILY_V4, proto)
}

#[inline(always)]
fn parse_v6(start: usize, end: usize, l3: usize) -> Parsed {
    let Some(h) = window(start, end, l3, 40) else {
        return unknown(counter::UNPARSEABLE);
    };
    let (version, first) = (byte(h, 0), byte(h, 6));
    if version >> 4 != 6 {
        // Not the header the EtherType (or the skb) says: where anything is, is unknown.
        return unknown(counter::UNPARSEABLE);
    }
    let mut next = first;
    let mut off = 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => {
                return parse_l4(start, end, l3, l3 + off, FAMILY_V6, next);
            }
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some([nh, len]) = load::<[u8; 2]>(start, end, l3 + off) else {
                    return Parsed::Unclassified {
                        reason: counter::UNPARSEABLE,
                        family: FAMILY_V6,
                        proto: 0,
                        l3,
                    };
                };
                // Length in 8-byte units, not counting the first 8.
                off += (usize::from(len) + 1) * 8;
                next = nh;
            }
            IPPROTO_FRAGMENT => {
                let Some(fh) = load::<[u8; 8]>(start, end, l3 + off) else {
                    return Parsed::Unclassified {
                        reason: counter::UNPARSEABLE,
                        family: FAMILY_V6,
                        proto: 0,
                        l3,
                    };
                };
                if u16::from_be_bytes([fh[2], fh[3]]) & 0xfff8 != 0 {
                    // Only the first fragment carries the L4 header. The next-header field of a
                    // later one names the first header of the fragmentable part, which may be
                    // another extension header: then the protocol is unknown.
                    let proto = if fh[0] == PROTO_TCP || fh[0] == PROTO_UDP {
                        fh[0]
                    } else {
                        0
                    };
                    return Parsed::Unclassified {
                        reason: counter::FRAGMENT,
                        family: FAMILY_V6,
                        proto,
                        l3,
                    };
                }
                next = fh[0];
                off += 8;
            }
            IPPROTO_ICMPV6 | IPPROTO_NONE => return Parsed::NoPorts,
            // ESP, AH, tunnels, and any header this parser does not know (it may be an
            // extension header with TCP behind it).
            _ => {
                return Parsed::Unclassified {
                    reason: counter::OPAQUE,
                    family: FAMILY_V6,
                    proto: 0,
                    l3,
                };
            }
        }
        if off > MAX_EXT_OFFSET {
            break;
        }
    }
    // Ran out of followed headers or went past the window.
    Parsed::Unclassified {
        reason: counter::TOO_MANY_EXT_HEADERS,
        family: FAMILY_V6,
        proto: 0,
        l3,
    }
}

#[inline(always)]
fn parse_l4(start: usize, end: usize, l3: usize, l4: usize, family: u8, proto: u8) -> Parsed {
    let ports = match proto {
        // A TCP header is at least 20 bytes, its data offset at least 5 words.
        PROTO_TCP => window(start, end, l4, 20).filter(|&h| byte(h, 12) >> 4 >= 5),
        PROTO_UDP => window(start, end, l4, 8),
        _ => return Parsed::NoPorts,
    }
    .map(|h| (be16(h, 0), be16(h, 2)));
    match ports {
        Some((src_port, dst_port)) => Parsed::Flow(Flow {
            family,
            proto,
            src_port,
            dst_port,
            l3,
        }),
        None => Parsed::Unclassified {
            reason: counter::UNPARSEABLE,
            family,
            proto,
            l3,
        },
    }
}
