//! The kernel program's clock: `CLOCK_BOOTTIME`, which keeps counting through suspend and never
//! jumps with the wall clock. Grant windows are converted to it before they reach a map.

use std::time::Duration;

use super::error::{DatapathError, Result};

/// Nanoseconds of `CLOCK_BOOTTIME` now, as `bpf_ktime_get_boot_ns` sees them.
pub fn boottime_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) } != 0 {
        return Err(DatapathError::Clock(std::io::Error::last_os_error()));
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// `CLOCK_BOOTTIME` nanoseconds `d` from now (saturating).
pub fn boottime_after(d: Duration) -> Result<u64> {
    let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Ok(boottime_ns()?.saturating_add(d))
}
