//! Packet parsing: Ethernet, up to two VLAN tags, IPv4 (with options), IPv6 (with a bounded chain
//! of extension headers), TCP and UDP. Works on a `[start, end)` window of linear packet data,
//! so XDP and TC share it.

use core::mem::size_of;

use jit_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, counter, v4_mapped};

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
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_NONE: u8 = 59;
const IPPROTO_DSTOPTS: u8 = 60;

/// A fully classified TCP or UDP packet.
pub(crate) struct Flow {
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    /// Source in the 16-byte identity form (IPv4-mapped for IPv4).
    pub(crate) src_key: [u8; 16],
    /// Source as written in events (IPv4 in the first 4 bytes).
    pub(crate) src: [u8; 16],
    /// Destination (IPv4 in the first 4 bytes), the form of service keys.
    pub(crate) dst: [u8; 16],
}

/// What the parser made of a frame.
pub(crate) enum Parsed {
    /// Not IPv4 or IPv6: outside the gate's concern.
    NotIp,
    /// IP, but carrying no port the gate can protect (ICMP, a "no next header" ...).
    NoPorts,
    /// A TCP or UDP packet with all its addresses and ports.
    Flow(Flow),
    /// A packet that could not be fully classified. `dst` and `proto` are what was learnt before
    /// the parser stopped: `family == 0` means the destination is unknown, `proto == 0` that the
    /// protocol is.
    Unclassified {
        reason: u32,
        family: u8,
        proto: u8,
        dst: [u8; 16],
    },
}

const fn unknown(reason: u32) -> Parsed {
    Parsed::Unclassified {
        reason,
        family: 0,
        proto: 0,
        dst: [0; 16],
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

/// Parses the frame in `[start, end)`.
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
    let Some(hdr) = load::<[u8; 20]>(start, end, l3) else {
        return unknown(counter::UNPARSEABLE);
    };
    let proto = hdr[9];
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&hdr[16..20]);
    let unclassified = |reason| Parsed::Unclassified {
        reason,
        family: FAMILY_V4,
        proto,
        dst,
    };
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if hdr[0] >> 4 != 4 || ihl < 20 || total_len < ihl {
        return unclassified(counter::UNPARSEABLE);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if frag & 0x1fff != 0 {
        // A non-first fragment has no L4 header: its ports cannot be known.
        return unclassified(counter::FRAGMENT);
    }
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&hdr[12..16]);
    let src_key = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    parse_l4(start, end, l3 + ihl, FAMILY_V4, proto, src, src_key, dst)
}

#[inline(always)]
fn parse_v6(start: usize, end: usize, l3: usize) -> Parsed {
    let Some(hdr) = load::<[u8; 40]>(start, end, l3) else {
        return unknown(counter::UNPARSEABLE);
    };
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    if hdr[0] >> 4 != 6 {
        return Parsed::Unclassified {
            reason: counter::UNPARSEABLE,
            family: FAMILY_V6,
            proto: 0,
            dst,
        };
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut next = hdr[6];
    let mut off = 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => {
                return parse_l4(start, end, l3 + off, FAMILY_V6, next, src, src, dst);
            }
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let Some([nh, len]) = load::<[u8; 2]>(start, end, l3 + off) else {
                    return Parsed::Unclassified {
                        reason: counter::UNPARSEABLE,
                        family: FAMILY_V6,
                        proto: 0,
                        dst,
                    };
                };
                // AH counts its length in 4-byte units less 2, the others in 8-byte units less 1.
                off += if next == IPPROTO_AH {
                    (usize::from(len) + 2) * 4
                } else {
                    (usize::from(len) + 1) * 8
                };
                next = nh;
            }
            IPPROTO_FRAGMENT => {
                let Some(fh) = load::<[u8; 8]>(start, end, l3 + off) else {
                    return Parsed::Unclassified {
                        reason: counter::UNPARSEABLE,
                        family: FAMILY_V6,
                        proto: 0,
                        dst,
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
                        dst,
                    };
                }
                next = fh[0];
                off += 8;
            }
            IPPROTO_ESP => break,
            IPPROTO_NONE => return Parsed::NoPorts,
            _ => return Parsed::NoPorts,
        }
        if off > MAX_EXT_OFFSET {
            break;
        }
    }
    // Ran out of followed headers, went past the window, or met ESP (which hides the rest).
    Parsed::Unclassified {
        reason: counter::TOO_MANY_EXT_HEADERS,
        family: FAMILY_V6,
        proto: 0,
        dst,
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "flat values keep the verifier's job simple"
)]
fn parse_l4(
    start: usize,
    end: usize,
    l4: usize,
    family: u8,
    proto: u8,
    src: [u8; 16],
    src_key: [u8; 16],
    dst: [u8; 16],
) -> Parsed {
    let ports = match proto {
        // A TCP header is at least 20 bytes, its data offset at least 5 words.
        PROTO_TCP => match load::<[u8; 20]>(start, end, l4) {
            Some(h) if h[12] >> 4 >= 5 => Some([h[0], h[1], h[2], h[3]]),
            _ => None,
        },
        PROTO_UDP => load::<[u8; 8]>(start, end, l4).map(|h| [h[0], h[1], h[2], h[3]]),
        _ => return Parsed::NoPorts,
    };
    match ports {
        Some(p) => Parsed::Flow(Flow {
            family,
            proto,
            src_port: u16::from_be_bytes([p[0], p[1]]),
            dst_port: u16::from_be_bytes([p[2], p[3]]),
            src_key,
            src,
            dst,
        }),
        None => Parsed::Unclassified {
            reason: counter::UNPARSEABLE,
            family,
            proto,
            dst,
        },
    }
}
