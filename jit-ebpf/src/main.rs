//! JIT Gate kernel program: drops packets to protected services unless the sender holds a live
//! grant. Two thin entry points (XDP and TC ingress) share one decision path in [`verdict`].
#![no_std]
#![no_main]
// The kernel's atomic add (`verdict::allow`): the BPF target offers no `AtomicU64::fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod maps;
mod parse;
mod report;
#[cfg(feature = "log")]
mod trace;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    parse::{parse, parse_l3},
    verdict::{Verdict, decide},
};

/// Bytes of headers TC makes linear before parsing: Ethernet, two VLAN tags, IPv6 with the
/// followed extension headers, and TCP. Headers beyond it count as truncated (fail closed).
const TC_PULL_LEN: u32 = 640;

/// XDP entry point (Ethernet devices only; the agent refuses XDP on others).
#[xdp]
fn jit_gate_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    match traced(&ctx, "xdp", start, end, parse(start, end)) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// TC ingress entry point for Ethernet devices (attached first in the TCX chain).
#[classifier]
fn jit_gate_tc(ctx: TcContext) -> i32 {
    tc_gate(&ctx, "tc", parse)
}

/// TC ingress entry point for L3 devices (tun, WireGuard, IP tunnels): the packet starts at the
/// IP header, and the skb says which IP version it is.
#[classifier]
fn jit_gate_tc_l3(ctx: TcContext) -> i32 {
    // `protocol` holds the EtherType in network byte order in its low 16 bits.
    let ether_type = u16::from_be(ctx.skb.protocol() as u16);
    tc_gate(&ctx, "tc-l3", |start, end| parse_l3(start, end, ether_type))
}

/// The verdict of a TC entry point whose headers `parse_at` reads: the linear part first, and
/// once more after [`pull_headers`] when [`cut_short`] says the headers may lie past it.
#[inline(always)]
fn tc_gate(ctx: &TcContext, hook: &str, parse_at: impl Fn(usize, usize) -> parse::Parsed) -> i32 {
    let mut attempt = 0;
    loop {
        let (start, end) = (ctx.data(), ctx.data_end());
        let parsed = parse_at(start, end);
        if attempt == 0 && cut_short(ctx, &parsed, start, end) {
            pull_headers(ctx);
            attempt += 1;
            continue;
        }
        return tc_verdict(traced(ctx, hook, start, end, parsed));
    }
}

/// Whether the parse may have stopped at the end of the skb's linear part rather than at the
/// packet's: it found the headers unparseable while more of the packet (up to
/// [`TC_PULL_LEN`]) lies beyond that end. Such a packet is parsed again after
/// [`pull_headers`]; every other packet is judged on the linear part as it is, so the common
/// case (headers linear already, as the stack and GRO leave them) costs no pull, which would
/// copy payload into the head and unclone the skb.
#[inline(always)]
fn cut_short(ctx: &TcContext, parsed: &parse::Parsed, start: usize, end: usize) -> bool {
    let unparseable = matches!(
        parsed,
        parse::Parsed::Unclassified { reason, .. } if *reason == jit_common::counter::UNPARSEABLE
    );
    let len = ctx.len();
    let wanted = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
    unparseable && end.saturating_sub(start) < wanted as usize
}

/// [`decide`], with the packet logged when the `log` feature is on (never in the shipped object).
#[inline(always)]
fn traced<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    hook: &str,
    start: usize,
    end: usize,
    parsed: parse::Parsed,
) -> Verdict {
    #[cfg(feature = "log")]
    let summary = trace::Summary::of(&parsed);
    let v = decide(start, end, parsed);
    #[cfg(feature = "log")]
    trace::packet(ctx, hook, summary, v);
    #[cfg(not(feature = "log"))]
    let _ = (ctx, hook);
    v
}

/// Makes the headers linear so direct packet access sees them (only when [`cut_short`] says the
/// linear part may not hold them). When this fails the window is whatever is linear already,
/// and anything cut short is treated as truncated.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let len = ctx.len();
    let _ = ctx.pull_data(if len < TC_PULL_LEN { len } else { TC_PULL_LEN });
}

/// A pass is "next" (`TC_ACT_UNSPEC`, TCX_NEXT), never "ok": programs after the gate in the TCX
/// chain still run, and the gate never ends the chain for them.
#[inline(always)]
fn tc_verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Any reachable panic leaves this endless loop in the program, which the verifier rejects: a
/// program that could panic fails to load instead of passing packets unchecked.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
