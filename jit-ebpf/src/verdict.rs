//! The decision: does this packet reach a protected service, and does its sender hold a live
//! grant for it? Shared by the XDP and TC entry points.

use aya_ebpf::maps::lpm_trie::Key;
use jit_common::{
    Event, GRANT_FLAG_SEEN, GrantKey, MODE_AUDIT, PROTO_TCP, PROTO_UDP, ServiceKey, counter,
    event_kind, port_index,
};

use crate::{
    maps::{JIT_DESTS, JIT_GRANTS, JIT_ID_HOSTS, JIT_ID_PREFIX, JIT_PORTS, JIT_SERVICES},
    parse::{Addrs, Flow, Parsed, addrs, dst_addr, parse},
    report::{count, count_verdict, emit, now_ns},
};

/// What to do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Drop,
}

/// Decides the fate of the frame in `[start, end)`.
#[inline(always)]
pub(crate) fn decide(start: usize, end: usize) -> Verdict {
    match parse(start, end) {
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

/// Fail closed: a packet the parser could not classify is dropped when it is, or may be, bound
/// for a protected destination. With the destination unknown (a truncated IP header, too many
/// VLAN tags) that is always; with the address known, when a service protects that address (or
/// every address) for the protocol, or for TCP or UDP when the protocol is unknown.
#[inline(always)]
fn decide_unclassified(reason: u32, family: u8, proto: u8, dst: Option<[u8; 16]>) -> Verdict {
    let Some(dst) = dst else {
        return drop_unclassified(reason, family, proto, [0; 16]);
    };
    let protected = match proto {
        0 => dest_protected(family, PROTO_TCP, dst) || dest_protected(family, PROTO_UDP, dst),
        PROTO_TCP | PROTO_UDP => dest_protected(family, proto, dst),
        _ => false,
    };
    if !protected {
        return Verdict::Pass;
    }
    drop_unclassified(reason, family, proto, dst)
}

/// Counts, reports and drops an unclassifiable packet.
#[inline(always)]
fn drop_unclassified(reason: u32, family: u8, proto: u8, dst: [u8; 16]) -> Verdict {
    count(reason);
    emit(&Event {
        timestamp_ns: now_ns(),
        grant_id: 0,
        kind: event_kind::DENY,
        reason,
        identity_id: 0,
        service_id: u32::MAX,
        family,
        proto,
        src_port: 0,
        dst_port: 0,
        _pad: 0,
        src_addr: [0; 16],
        dst_addr: dst,
    });
    Verdict::Drop
}

#[inline(always)]
fn dest_protected(family: u8, proto: u8, addr: [u8; 16]) -> bool {
    let mut key = ServiceKey {
        family,
        proto,
        port: 0,
        addr,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { JIT_DESTS.get(key) }.is_some() {
        return true;
    }
    key.addr = [0; 16];
    // SAFETY: as above.
    unsafe { JIT_DESTS.get(key) }.is_some()
}

#[inline(always)]
fn decide_flow(start: usize, end: usize, flow: &Flow) -> Verdict {
    // The one lookup every unprotected packet costs: is any service on this port at all?
    let Some(index) = port_index(flow.proto, flow.dst_port) else {
        return Verdict::Pass;
    };
    match JIT_PORTS.get(index) {
        Some(n) if *n != 0 => {}
        _ => return Verdict::Pass,
    }
    // The parser checked that the fixed IP header is there, so this cannot fail; if it did,
    // fail closed.
    let Some(a) = addrs(start, end, flow) else {
        return drop_unclassified(counter::UNPARSEABLE, flow.family, flow.proto, [0; 16]);
    };
    let mut key = ServiceKey {
        family: flow.family,
        proto: flow.proto,
        port: flow.dst_port,
        addr: a.dst,
    };
    // SAFETY: map values are read once and copied; the agent replaces, never mutates in place.
    let service = match unsafe { JIT_SERVICES.get(key) } {
        Some(s) => *s,
        None => {
            key.addr = [0; 16];
            // SAFETY: as above.
            match unsafe { JIT_SERVICES.get(key) } {
                Some(s) => *s,
                None => return Verdict::Pass,
            }
        }
    };

    let now = now_ns();
    // What an event would say; built only when one is written.
    let seen = Seen {
        flow,
        addrs: &a,
        service_id: service.service_id,
        now,
    };

    // SAFETY: as above.
    let identity = match unsafe { JIT_ID_HOSTS.get(a.src_key) } {
        Some(v) => Some(v.identity_id),
        None => JIT_ID_PREFIX
            .get(Key::new(128, a.src_key))
            .map(|v| v.identity_id),
    };
    let Some(identity_id) = identity else {
        return deny(service.mode, &seen, counter::NO_IDENTITY, 0, 0);
    };

    let grant_key = GrantKey {
        identity_id,
        service_id: service.service_id,
    };
    let Some(grant) = JIT_GRANTS.get_ptr_mut(grant_key) else {
        return deny(service.mode, &seen, counter::NO_GRANT, identity_id, 0);
    };
    // SAFETY: the pointer comes from a successful lookup; hash map values stay valid for the
    // rest of this program run (RCU).
    let grant = unsafe { &mut *grant };
    if now < grant.not_before_ns {
        return deny(
            service.mode,
            &seen,
            counter::NOT_YET_VALID,
            identity_id,
            grant.grant_id,
        );
    }
    if now >= grant.expires_at_ns {
        return deny(
            service.mode,
            &seen,
            counter::EXPIRED,
            identity_id,
            grant.grant_id,
        );
    }

    count_verdict(service.service_id, counter::ALLOWED);
    if grant.flags & GRANT_FLAG_SEEN == 0 {
        // Racing CPUs may both report the first packet; the flag only keeps it to a few.
        grant.flags |= GRANT_FLAG_SEEN;
        emit(&seen.event(
            event_kind::FIRST_ALLOWED,
            counter::ALLOWED,
            identity_id,
            grant.grant_id,
        ));
    }
    Verdict::Pass
}

/// A packet to a protected service, as events describe it.
struct Seen<'a> {
    flow: &'a Flow,
    addrs: &'a Addrs,
    service_id: u32,
    now: u64,
}

impl Seen<'_> {
    #[inline(always)]
    fn event(&self, kind: u32, reason: u32, identity_id: u32, grant_id: u64) -> Event {
        Event {
            timestamp_ns: self.now,
            grant_id,
            kind,
            reason,
            identity_id,
            service_id: self.service_id,
            family: self.flow.family,
            proto: self.flow.proto,
            src_port: self.flow.src_port,
            dst_port: self.flow.dst_port,
            _pad: 0,
            src_addr: self.addrs.src,
            dst_addr: self.addrs.dst,
        }
    }
}

/// A packet to a protected service without a live grant: dropped in `enforce` mode; counted,
/// reported and passed in `audit` mode.
#[inline(always)]
fn deny(mode: u32, seen: &Seen<'_>, reason: u32, identity_id: u32, grant_id: u64) -> Verdict {
    if mode == MODE_AUDIT {
        count_verdict(seen.service_id, counter::AUDIT_WOULD_DROP);
        emit(&seen.event(event_kind::AUDIT, reason, identity_id, grant_id));
        return Verdict::Pass;
    }
    count_verdict(seen.service_id, reason);
    emit(&seen.event(event_kind::DENY, reason, identity_id, grant_id));
    Verdict::Drop
}
