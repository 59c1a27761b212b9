//! Programs that measure and test the gate, never attached in production:
//!
//! - `harness_empty`: XDP that passes everything, the floor every cost is compared with;
//! - `harness_reference`: the least a correct gate must do (parse Ethernet, IPv4 and TCP, one
//!   exact-match lookup on `(source, port)`, one clock read, pass or drop), the yardstick of
//!   `cargo xtask bench`;
//! - `harness_rotate`: rewrites the IPv4 source address of each test frame to the next of
//!   `HARNESS_ROTATE[0].count` addresses from `.base`, then tail-calls slot 0 of `HARNESS_NEXT`,
//!   so a benchmark walks across its loaded grants instead of hitting one hot key;
//! - `harness_flood`: a packet generator for `BPF_PROG_TEST_RUN` in live-frames mode: gives
//!   each frame (Ethernet, IPv4, TCP) a random source of `HARNESS_FLOOD[0]`'s range, mends the
//!   IPv4 and TCP checksums, and redirects it out of `.ifindex`, so a veth peer receives XDP
//!   frames as from a NIC;
//! - `harness_tc_ok` / `harness_tc_next`: TCX neighbours that count packets in `HARNESS_SEEN` and
//!   return "ok" (ends the chain) or "next", for the tests of the gate's place in the chain.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns, bpf_redirect},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};

/// Key of the reference program's grants: IPv4 source (network order) and destination port.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefKey {
    pub src: u32,
    pub port: u32,
}

/// Rotation settings at index 0: first address (host order) and how many to walk.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rotate {
    pub base: u32,
    pub count: u32,
}

/// Flood settings at index 0: sources `base..base + count` (host order, count > 0) and the
/// interface to send from.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flood {
    pub base: u32,
    pub count: u32,
    pub ifindex: u32,
    pub _pad: u32,
}

#[map]
static HARNESS_FLOOD: Array<Flood> = Array::with_max_entries(1, 0);

#[map]
static HARNESS_REF: HashMap<RefKey, u64> = HashMap::with_max_entries(1_048_576, 0);

#[map]
static HARNESS_ROTATE: Array<Rotate> = Array::with_max_entries(1, 0);

#[map]
static HARNESS_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static HARNESS_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map]
static HARNESS_SEEN: Array<u64> = Array::with_max_entries(2, 0);

/// Passes everything.
#[xdp]
fn harness_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Ethernet + IPv4 (no options) + TCP, one lookup, one clock read.
#[xdp]
fn harness_reference(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 54 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 54 bytes read below were bounds-checked above.
    let (ether_type, proto, src, dport) = unsafe {
        (
            *((start + 12) as *const u16),
            *((start + 23) as *const u8),
            core::ptr::read_unaligned((start + 26) as *const u32),
            *((start + 36) as *const u16),
        )
    };
    if ether_type != 0x0800u16.to_be() || proto != 6 {
        return xdp_action::XDP_PASS;
    }
    let key = RefKey {
        src,
        port: u32::from(u16::from_be(dport)),
    };
    // SAFETY: the value is copied at once.
    match unsafe { HARNESS_REF.get(key) } {
        // SAFETY: a helper without arguments.
        Some(expires) if unsafe { bpf_ktime_get_boot_ns() } < *expires => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// Next source address, then the program under test.
#[xdp]
fn harness_rotate(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 > end {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(cfg), Some(cursor)) = (HARNESS_ROTATE.get(0), HARNESS_CURSOR.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a per-CPU slot; the program is not preempted on its CPU.
    let cursor = unsafe { &mut *cursor };
    let n = if cfg.count == 0 { 1 } else { cfg.count };
    let mut next = *cursor + 1;
    if next >= n {
        next = 0;
    }
    *cursor = next;
    let src = (cfg.base.wrapping_add(next)).to_be();
    // SAFETY: bounds-checked above; the source address is bytes 26..30.
    unsafe { core::ptr::write_unaligned((start + 26) as *mut u32, src) };
    // SAFETY: slot 0 holds an XDP program; a failed tail call falls through.
    unsafe { HARNESS_NEXT.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// A one's complement checksum (host-order value of the big-endian field) with a 32-bit word
/// of the covered data changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline(always)]
fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!check);
    sum += (!old >> 16) + (!old & 0xffff);
    sum += (new >> 16) + (new & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    // Folded to 16 bits above.
    !(sum as u16)
}

/// A random source from the range, checksums mended, out of the configured interface.
#[xdp]
fn harness_flood(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 54 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(cfg) = HARNESS_FLOOD.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    if cfg.count == 0 {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() } % cfg.count;
    let new = cfg.base.wrapping_add(pick);
    // SAFETY: the 54 bytes read and written below were bounds-checked above: the IPv4 checksum
    // at 24, the source at 26, the TCP checksum at 50.
    unsafe {
        let src = (start + 26) as *mut u32;
        let old = u32::from_be(core::ptr::read_unaligned(src));
        core::ptr::write_unaligned(src, new.to_be());
        let ip_check = (start + 24) as *mut u16;
        let c = csum_replace4(u16::from_be(core::ptr::read_unaligned(ip_check)), old, new);
        core::ptr::write_unaligned(ip_check, c.to_be());
        let tcp_check = (start + 50) as *mut u16;
        let c = csum_replace4(u16::from_be(core::ptr::read_unaligned(tcp_check)), old, new);
        core::ptr::write_unaligned(tcp_check, c.to_be());
    }
    // SAFETY: plain helper; an unknown interface makes the redirect fail, not the program.
    unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
}

#[inline(always)]
fn seen(i: u32) {
    if let Some(n) = HARNESS_SEEN.get_ptr_mut(i) {
        // SAFETY: a valid slot of the array. Racing CPUs may lose an increment; tests only ask
        // whether a program ran at all.
        unsafe { *n += 1 };
    }
}

/// A TCX neighbour that ends the chain with "ok".
#[classifier]
fn harness_tc_ok(_ctx: TcContext) -> i32 {
    seen(0);
    TC_ACT_OK
}

/// A TCX neighbour that passes to the next program.
#[classifier]
fn harness_tc_next(_ctx: TcContext) -> i32 {
    seen(1);
    TC_ACT_UNSPEC
}

/// Unreachable: the programs have no panicking path (see main.rs).
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
