//! CPU placement for the benchmarks: pinning threads.

use std::io;

/// Lets the calling thread run on `cpus` only.
fn set_affinity(cpus: impl IntoIterator<Item = usize>) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the macro only sets bits in it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> io::Result<()> {
    set_affinity([cpu])
}

/// Lets the calling thread run on every CPU again.
pub fn unpin_thread() -> io::Result<()> {
    set_affinity(0..std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}
