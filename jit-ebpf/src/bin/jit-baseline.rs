//! An XDP program that passes every packet: the baseline that `cargo xtask bench` measures the
//! gate against, in the same run, on the same frames.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Passes everything.
#[xdp]
fn jit_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Unreachable: the program has no panicking path (see main.rs).
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
