//! CPU placement for the benchmarks: pinning threads, and keeping CPUs awake.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

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

/// Spinners at idle priority on every CPU until dropped: a thread that wakes there runs at
/// once instead of waiting for the hypervisor to resume a halted virtual CPU. For a reading
/// beside the plain one, never instead of it.
pub struct Awake {
    stop: Arc<AtomicBool>,
    spinners: Vec<std::thread::JoinHandle<()>>,
}

impl Awake {
    /// Starts one spinner per CPU.
    #[must_use]
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let spinners = (0..cpus)
            .map(|cpu| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    if pin_thread(cpu).is_err() {
                        return;
                    }
                    // SAFETY: a zeroed sched_param is valid for SCHED_IDLE (priority 0).
                    let rc = unsafe {
                        let param: libc::sched_param = std::mem::zeroed();
                        libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param)
                    };
                    if rc != 0 {
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, spinners }
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.spinners.drain(..) {
            let _ = s.join();
        }
    }
}
