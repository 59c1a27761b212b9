//! The decision: does this packet reach a protected service, and does its sender hold a live
//! grant for exactly that service? Shared by the XDP and TC entry points.
//!
//! The granted path is: one bitmap word (is the port protected at all), one service lookup, one
//! host-grant lookup keyed by `(source address, service)`, one clock read. A packet that misses
//! its host grant consults the identity trie and the identity-keyed grant only when the service
//! has identity-keyed grants.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use jit_common::{
    FAMILY_V4, GRANT_FLAG_SEEN, GrantValue, MODE_AUDIT, PORT_EXACT, PORT_WILDCARD, PROTO_TCP,
    PROTO_UDP, ServiceValue, V4_BROADCAST, V6_MULTICAST, counter, event_kind, port_bit_position,
    port_index,
};

/// The low 32 bits of the second word of an IPv4-mapped address (`::ffff:0:0/96`).
const V4_MAPPED_TAG: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

use crate::{
    addr::{EventHead, Words, event, host_grant_key, identity_grant_key, service_key, trie_key},
    maps::{
        JIT_DESTS, JIT_GRANTS, JIT_ID_PREFIX, JIT_PORT_SVC, JIT_PORTS, JIT_SERVICES, JIT_SVC_IDGR,
    },
    parse::{Flow, Parsed, dst_addr, src_addr},
    report::{count, count_verdict, emit, now_ns},
};

/// What to do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Drop,
}

/// Decides the fate of a parsed packet in `[start, end)`.
#[inline(always)]
pub(crate) fn decide(start: usize, end: usize, parsed: Parsed) -> Verdict {
    match parsed {
        Parsed::NotIp | Parsed::NoPorts => Verdict::Pass,
        Parsed::Flow(flow) => decide_flow(start, end, &flow),
        Parsed::Unclassified {
            reason,
            family,
            proto,
            l3,
        } => {
            // With `family` set the parser saw the whole fixed IP header.
            let dst = if family == 0 {
                None
            } else {
                dst_addr(start, end, family, l3)
            };
            decide_unclassified(reason, family, proto, dst)
        }
    }
}

/// The address a destination is looked up as: broadcast and multicast destinations collapse
/// onto one address per family, which the agent writes for every service on a local address.
#[inline(always)]
fn canonical_dst(family: u8, dst: Words) -> Words {
    let first = dst.first_byte();
    if family == FAMILY_V4 {
        // 224.0.0.0/4 multicast, and 255.255.255.255.
        if first & 0xf0 == 0xe0 || dst.first_u32() == u32::MAX {
            return Words::v4(u32::from_ne_bytes(V4_BROADCAST));
        }
    } else if first == 0xff {
        return Words::from_bytes(V6_MULTICAST);
    }
    dst
}

/// Fail closed: a packet the parser could not classify is dropped when it is, or may be, bound
/// for a protected destination. With the destination unknown (a truncated IP header, too many
/// VLAN tags) that is always; with the address known, when a service protects that address (or
/// every address) for the protocol, or for TCP or UDP when the protocol is unknown.
#[inline(always)]
fn decide_unclassified(reason: u32, family: u8, proto: u8, dst: Option<Words>) -> Verdict {
    let Some(dst) = dst else {
        return drop_unclassified(reason, family, proto, Words::ZERO);
    };
    let key_addr = canonical_dst(family, dst);
    let protected = match proto {
        0 => {
            dest_protected(family, PROTO_TCP, key_addr)
                || dest_protected(family, PROTO_UDP, key_addr)
        }
        PROTO_TCP | PROTO_UDP => dest_protected(family, proto, key_addr),
        _ => false,
    };
    if !protected {
        return Verdict::Pass;
    }
    drop_unclassified(reason, family, proto, dst)
}

/// Counts, reports and drops an unclassifiable packet.
#[inline(always)]
fn drop_unclassified(reason: u32, family: u8, proto: u8, dst: Words) -> Verdict {
    count(reason);
    let head = EventHead {
        timestamp_ns: 0,
        grant_id: 0,
        kind: event_kind::DENY,
        reason,
        identity_id: 0,
        service_id: u32::MAX,
        src_port: 0,
        dst_port: 0,
        family,
        proto,
    };
    emit(|now| {
        event(
            &EventHead {
                timestamp_ns: now,
                ..head
            },
            Words::ZERO,
            dst,
        )
    });
    Verdict::Drop
}

#[inline(always)]
fn dest_protected(family: u8, proto: u8, addr: Words) -> bool {
    // SAFETY: the value is only tested for presence.
    if unsafe { JIT_DESTS.get(service_key(family, proto, 0, addr)) }.is_some() {
        return true;
    }
    // SAFETY: as above.
    unsafe { JIT_DESTS.get(service_key(family, proto, 0, Words::ZERO)) }.is_some()
}

/// The service a flow to `dst` is bound for, if any. `bits` are the port's bitmap bits
/// (non-zero).
#[inline(always)]
fn service_of(flow: &Flow, dst: Words, bits: u64) -> Option<ServiceValue> {
    if bits & PORT_EXACT != 0 {
        let key = service_key(
            flow.family,
            flow.proto,
            flow.dst_port,
            canonical_dst(flow.family, dst),
        );
        // SAFETY: map values are read once and copied; the agent replaces, never mutates them.
        if let Some(s) = unsafe { JIT_SERVICES.get(key) } {
            return Some(*s);
        }
    }
    if bits & PORT_WILDCARD != 0 {
        let key = service_key(flow.family, flow.proto, flow.dst_port, Words::ZERO);
        // SAFETY: as above.
        if let Some(s) = unsafe { JIT_SERVICES.get(key) } {
            return Some(*s);
        }
    }
    None
}

/// Why a grant does not let a packet through now.
#[inline(always)]
fn grant_refusal(grant: &GrantValue, now: u64) -> Option<u32> {
    if now < grant.not_before_ns {
        Some(counter::NOT_YET_VALID)
    } else if now >= grant.expires_at_ns {
        Some(counter::EXPIRED)
    } else {
        None
    }
}

#[inline(always)]
fn decide_flow(start: usize, end: usize, flow: &Flow) -> Verdict {
    // The one lookup every unprotected packet costs: does any service name this port at all?
    let Some(index) = port_index(flow.proto, flow.dst_port) else {
        return Verdict::Pass;
    };
    let (word, shift) = port_bit_position(index);
    let bits = match JIT_PORTS.get(word) {
        Some(w) => (*w >> shift) & (PORT_EXACT | PORT_WILDCARD),
        None => 0,
    };
    if bits == 0 {
        return Verdict::Pass;
    }
    // The parser checked that the fixed IP header is there, so these reads cannot fail; if they
    // did, fail closed.
    let (Some(dst), Some(src)) = (
        dst_addr(start, end, flow.family, flow.l3),
        src_addr(start, end, flow.family, flow.l3),
    ) else {
        return drop_unclassified(counter::UNPARSEABLE, flow.family, flow.proto, Words::ZERO);
    };
    // An IPv6 packet whose source spells an IPv4 address (`::ffff:a.b.c.d`) would match that
    // IPv4 host's grants and prefixes: it gets none.
    let seen_for = |service_id| Seen {
        flow,
        start,
        end,
        source: src,
        service_id,
    };
    let mapped_v6 =
        flow.family != FAMILY_V4 && src.hi == 0 && src.lo & 0xffff_ffff == u64::from(V4_MAPPED_TAG);
    if mapped_v6 {
        let Some(service) = service_of(flow, dst, bits) else {
            return Verdict::Pass;
        };
        let seen = seen_for(service.service_id);
        return deny(service.mode, &seen, &Refused::NONE);
    }

    // What was approved for this very address: a host-bound grant. When one service owns every
    // destination on the port, its host grant is looked up before the service itself: a live
    // one lets the packet through whatever its destination (one the service does not cover is
    // not protected), so the granted path is one exact-match lookup.
    let mut refused = Refused::NONE;
    let mut tried = u32::MAX;
    let mut now = 0u64;
    let hint = JIT_PORT_SVC.get(index).map_or(0, |v| *v);
    if hint != 0 {
        tried = hint - 1;
        if let Some(grant) = JIT_GRANTS.get_ptr_mut(host_grant_key(tried, src)) {
            // SAFETY: the pointer comes from a successful lookup; hash map values stay valid
            // for the rest of this program run (RCU).
            let grant = unsafe { &mut *grant };
            now = now_ns();
            match grant_refusal(grant, now) {
                None => {
                    let seen = seen_for(tried);
                    return allow(&seen, grant, now);
                }
                Some(reason) => refused = Refused::by(reason, grant),
            }
        }
    }

    let Some(service) = service_of(flow, dst, bits) else {
        return Verdict::Pass;
    };
    let seen = seen_for(service.service_id);
    if tried != service.service_id {
        refused = Refused::NONE;
        if let Some(grant) = JIT_GRANTS.get_ptr_mut(host_grant_key(service.service_id, src)) {
            // SAFETY: as above.
            let grant = unsafe { &mut *grant };
            now = now_ns();
            match grant_refusal(grant, now) {
                None => return allow(&seen, grant, now),
                Some(reason) => refused = Refused::by(reason, grant),
            }
        }
    }

    // What was approved for the identity of a static prefix, only if the service has any.
    let prefix_grants = JIT_SVC_IDGR.get(service.service_id).map_or(0, |n| *n);
    if prefix_grants != 0 {
        match JIT_ID_PREFIX.get(&trie_key(src).0) {
            None => {
                if refused.reason == counter::NO_GRANT {
                    refused.reason = counter::NO_IDENTITY;
                }
            }
            Some(identity) => {
                let identity_id = identity.identity_id;
                let key = identity_grant_key(service.service_id, identity_id);
                if let Some(grant) = JIT_GRANTS.get_ptr_mut(key) {
                    // SAFETY: as above.
                    let grant = unsafe { &mut *grant };
                    if now == 0 {
                        now = now_ns();
                    }
                    match grant_refusal(grant, now) {
                        None => return allow(&seen, grant, now),
                        Some(reason) if refused.reason == counter::NO_GRANT => {
                            refused = Refused::by(reason, grant);
                        }
                        Some(_) => {}
                    }
                } else if refused.reason == counter::NO_GRANT {
                    refused.identity_id = identity_id;
                }
            }
        }
    }
    deny(service.mode, &seen, &refused)
}

/// Why a packet to a protected service is denied, and the grant that came closest.
struct Refused {
    reason: u32,
    identity_id: u32,
    grant_id: u64,
}

impl Refused {
    /// No grant found (yet).
    const NONE: Self = Self {
        reason: counter::NO_GRANT,
        identity_id: 0,
        grant_id: 0,
    };

    #[inline(always)]
    fn by(reason: u32, grant: &GrantValue) -> Self {
        Self {
            reason,
            identity_id: grant.identity_id,
            grant_id: grant.grant_id,
        }
    }
}

/// Counts a packet allowed under `grant` (globally, per service, and in the grant's own usage),
/// and reports the first one.
///
/// Usage costs one atomic add and one store on the grant's value, which the lookup has just
/// brought into the cache; it lives in the grant itself (not a per-CPU map) so its memory grows
/// with the grants, not with grants times CPUs. `last_seen_ns` is a plain store: CPUs racing on
/// one grant each write a time of the same instant.
#[inline(always)]
fn allow(seen: &Seen<'_>, grant: &mut GrantValue, now: u64) -> Verdict {
    count_verdict(seen.service_id, counter::ALLOWED);
    // The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is not offered; the
    // intrinsic is the kernel's atomic add (BPF_ATOMIC | BPF_ADD).
    // SAFETY: `packets` is 8-aligned (checked in jit-common) and lives as long as `grant`.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut grant.packets, 1) };
    grant.last_seen_ns = now;
    if grant.flags & GRANT_FLAG_SEEN == 0 {
        // Racing CPUs may both report the first packet; the flag only keeps it to a few.
        grant.flags |= GRANT_FLAG_SEEN;
        grant.first_seen_ns = now;
        let (identity_id, grant_id) = (grant.identity_id, grant.grant_id);
        emit(|_| {
            seen.event(
                now,
                event_kind::FIRST_ALLOWED,
                counter::ALLOWED,
                identity_id,
                grant_id,
            )
        });
    }
    Verdict::Pass
}

/// A packet to a protected service, as events describe it. The destination is read from the
/// packet again only when an event is written.
struct Seen<'a> {
    flow: &'a Flow,
    start: usize,
    end: usize,
    /// Source in the IPv4-mapped form.
    source: Words,
    service_id: u32,
}

impl Seen<'_> {
    #[inline(always)]
    fn event(
        &self,
        now: u64,
        kind: u32,
        reason: u32,
        identity_id: u32,
        grant_id: u64,
    ) -> jit_common::Event {
        let dst =
            dst_addr(self.start, self.end, self.flow.family, self.flow.l3).unwrap_or(Words::ZERO);
        event(
            &EventHead {
                timestamp_ns: now,
                grant_id,
                kind,
                reason,
                identity_id,
                service_id: self.service_id,
                src_port: self.flow.src_port,
                dst_port: self.flow.dst_port,
                family: self.flow.family,
                proto: self.flow.proto,
            },
            self.source,
            dst,
        )
    }
}

/// A packet to a protected service without a live grant: dropped in `enforce` mode; counted,
/// reported and passed in `audit` mode.
#[inline(always)]
fn deny(mode: u32, seen: &Seen<'_>, refused: &Refused) -> Verdict {
    let (kind, verdict, counted) = if mode == MODE_AUDIT {
        (event_kind::AUDIT, Verdict::Pass, counter::AUDIT_WOULD_DROP)
    } else {
        (event_kind::DENY, Verdict::Drop, refused.reason)
    };
    count_verdict(seen.service_id, counted);
    emit(|now| {
        seen.event(
            now,
            kind,
            refused.reason,
            refused.identity_id,
            refused.grant_id,
        )
    });
    verdict
}
