//! Counters and events: how operators see what the gate decided.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use jit_common::{Event, counter};

use crate::maps::{JIT_CONFIG, JIT_COUNTERS, JIT_EVENTS, JIT_RATE, JIT_SVC_COUNT};

/// Adds one to a global counter.
#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(slot) = JIT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program cannot be preempted on its CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one to a verdict counter of the service (the global verdict counters are their sums).
#[inline(always)]
pub(crate) fn count_verdict(service_id: u32, verdict: u32) {
    if let Some(c) = JIT_SVC_COUNT.get_ptr_mut(service_id)
        && let Some(slot) = usize::try_from(verdict)
            .ok()
            // SAFETY: as in `count`.
            .and_then(|v| unsafe { (*c).verdicts.get_mut(v) })
    {
        *slot += 1;
    }
}

/// Writes the event `make(now)` builds to the ring buffer, if this CPU has a token left (a flood
/// must not starve the buffer, and once the budget is spent a packet pays neither the clock nor
/// the event) and the buffer has room; either miss is counted.
#[inline(always)]
pub(crate) fn emit(make: impl FnOnce(u64) -> Event) {
    let Some(state) = JIT_RATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, and the program cannot be preempted on its CPU.
    let state = unsafe { &mut *state };
    if let Some(cfg) = JIT_CONFIG.get(0)
        && cfg.event_epoch != state.epoch
    {
        state.epoch = cfg.event_epoch;
        state.tokens = cfg.events_per_period;
    }
    if state.tokens == 0 {
        state.suppressed += 1;
        return;
    }
    state.tokens -= 1;
    if JIT_EVENTS.output::<Event>(&make(now_ns()), 0).is_err() {
        count(counter::EVENTS_LOST);
    }
}

/// The current `CLOCK_BOOTTIME` time: grant times are in this clock, which does not stop in
/// suspend and does not jump with the wall clock.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}
