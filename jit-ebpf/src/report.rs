//! Counters and events: how operators see what the gate decided.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use jit_common::{DEFAULT_EVENTS_PER_SEC, Event, MAX_SERVICES, counter};

use crate::maps::{JIT_CONFIG, JIT_COUNTERS, JIT_EVENTS, JIT_RATE, JIT_SVC_COUNT};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Adds one to a global counter.
#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(slot) = JIT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program cannot be preempted on its CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one to a verdict counter, globally and for the service.
#[inline(always)]
pub(crate) fn count_verdict(service_id: u32, verdict: u32) {
    count(verdict);
    if service_id < MAX_SERVICES
        && verdict < counter::SERVICE_SLOTS
        && let Some(slot) = JIT_SVC_COUNT.get_ptr_mut(service_id * counter::SERVICE_SLOTS + verdict)
    {
        // SAFETY: as in `count`.
        unsafe { *slot += 1 };
    }
}

/// Writes `event` to the ring buffer unless this CPU has used its events for the current second
/// (a flood must not starve the buffer) or the buffer is full; either case is counted.
#[inline(always)]
pub(crate) fn emit(event: &Event) {
    if !take_event_token(event.timestamp_ns) {
        count(counter::EVENTS_RATE_LIMITED);
        return;
    }
    if JIT_EVENTS.output::<Event>(event, 0).is_err() {
        count(counter::EVENTS_LOST);
    }
}

#[inline(always)]
fn take_event_token(now: u64) -> bool {
    let limit = match JIT_CONFIG.get(0) {
        Some(cfg) if cfg.events_per_sec != 0 => cfg.events_per_sec,
        _ => DEFAULT_EVENTS_PER_SEC,
    };
    let Some(state) = JIT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, and the program cannot be preempted on its CPU.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.window_start_ns) >= NS_PER_SEC {
        state.window_start_ns = now;
        state.count = 0;
    }
    if state.count >= limit {
        return false;
    }
    state.count += 1;
    true
}

/// The current `CLOCK_BOOTTIME` time: grant times are in this clock, which does not stop in
/// suspend and does not jump with the wall clock.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}
