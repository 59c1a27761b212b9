//! JIT Gate kernel program: drops packets to protected services unless the sender holds a live
//! grant. Two thin entry points (XDP and TC ingress) share one decision path in [`verdict`].
#![no_std]
#![no_main]

mod maps;
mod parse;
mod report;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::verdict::{Verdict, decide};

/// Bytes of headers TC makes linear before parsing: Ethernet, two VLAN tags, IPv6 with the
/// followed extension headers, and TCP. Headers beyond it count as truncated (fail closed).
const TC_PULL_LEN: u32 = 640;

/// XDP entry point.
#[xdp]
fn jit_gate_xdp(ctx: XdpContext) -> u32 {
    match decide(ctx.data(), ctx.data_end()) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// TC ingress entry point (attached through TCX).
#[classifier]
fn jit_gate_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    // Make the headers linear so direct packet access sees them. When this fails the window is
    // whatever is linear already, and anything cut short is treated as truncated.
    let _ = ctx.pull_data(if len < TC_PULL_LEN { len } else { TC_PULL_LEN });
    match decide(ctx.data(), ctx.data_end()) {
        Verdict::Pass => TC_ACT_OK,
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
