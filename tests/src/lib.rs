//! Test harness for JIT Gate: root checks, a private pin directory per test, network namespaces
//! joined by veth pairs, crafted frames, and `BPF_PROG_TEST_RUN` helpers. Every resource is a
//! guard that removes what it made on drop, so a failing test cleans up too.

pub mod bench_allowed;
pub mod bench_control;
pub mod bench_drop;
pub mod bench_filters;
pub mod cpus;
pub mod deploy;
pub mod echo;
pub mod etcd;
pub mod fixtures;
pub mod fleet;
pub mod flood;
pub mod frames;
pub mod netns;
pub mod tun;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun as _, TestRunOptions};
use jit_agent::datapath::{Gate, GateMaps, LoadOptions};

/// Frames shorter than Ethernet plus an IPv6 header may be refused by the kernel's skb test run.
const SHORTEST_TC_TEST_FRAME: usize = 14 + 40;

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name no other test of any run on this machine uses at the same time: the process id plus a
/// per-process counter. Leftovers of a killed run are recognised by the dead process id and
/// removed by [`sweep_stale`].
pub fn unique(prefix: &str) -> String {
    sweep_stale();
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A short unique tag (for interface names, at most 15 bytes with a 2-byte prefix).
pub fn short_tag() -> String {
    format!(
        "{}x{}",
        std::process::id() % 100_000,
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Prefixes of the pin directories (under /sys/fs/bpf) and namespaces (under /run/netns) the
/// tests create.
const TEST_PREFIXES: [&str; 5] = ["jit-test-", "jit-e2e-", "jit-cli-", "jits", "jitc"];

/// Removes pin directories and namespaces left by test processes that no longer run (a test
/// binary killed before its guards could clean up). Runs once per process.
pub fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let stale = |name: &str| {
            TEST_PREFIXES.iter().find_map(|p| {
                let pid = name.strip_prefix(p)?.split('x').next()?;
                let pid: u32 = pid.parse().ok()?;
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            })
        };
        if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
            for e in entries.flatten() {
                if stale(&e.file_name().to_string_lossy()).is_some() {
                    eprintln!("cleanup: removing stale {}", e.path().display());
                    remove_pin_dir(&e.path());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if stale(&name).is_some() {
                    eprintln!("cleanup: deleting stale namespace {name}");
                    let _ = std::process::Command::new("ip")
                        .args(["netns", "del", &name])
                        .status();
                }
            }
        }
    });
}

/// Whether the calling test may touch the kernel. Such tests are also marked
/// `#[ignore = "needs root"]`, so a plain `cargo test` counts them as skipped and `cargo xtask
/// test` runs them as root (`--include-ignored`). Run without root anyway, the test is skipped
/// with a message naming it, except under CI (`CI` set), where that is a failure.
#[must_use]
pub fn require_root() -> bool {
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root (BPF, network namespaces) and CI is set: refusing to skip"
    );
    eprintln!("SKIPPED {test}: needs root (BPF, network namespaces); run as root to include it");
    false
}

/// A gate loaded into a private pin directory, removed with everything pinned in it on drop.
pub struct TestGate {
    /// The loaded program (keep it alive while testing).
    pub gate: Gate,
    /// Its maps.
    pub maps: GateMaps,
    pin_dir: PathBuf,
}

impl TestGate {
    /// Loads a fresh gate under `/sys/fs/bpf/jit-test-<unique>`.
    #[must_use]
    pub fn load() -> Self {
        Self::load_with(65_536)
    }

    /// Loads a fresh gate with a grants map of `max_grants` entries.
    #[must_use]
    pub fn load_with(max_grants: u32) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-test-")));
        // Build the guard's cleanup before anything is pinned.
        let cleanup = PinDirGuard(pin_dir.clone());
        let gate = Gate::load(&LoadOptions {
            pin_dir: pin_dir.clone(),
            max_grants,
        })
        .unwrap_or_else(|e| panic!("loading the gate under {}: {e}", pin_dir.display()));
        let maps = GateMaps::open(&pin_dir).unwrap_or_else(|e| panic!("opening maps: {e}"));
        std::mem::forget(cleanup);
        Self {
            gate,
            maps,
            pin_dir,
        }
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Runs `frame` through the XDP and the TC entry points and returns whether it passed.
    /// Panics when the two disagree: they share one decision path.
    #[must_use]
    pub fn passes(&self, frame: &[u8]) -> bool {
        let xdp_pass = match self.run_xdp(frame, 1) {
            2 => true,  // XDP_PASS
            1 => false, // XDP_DROP
            other => panic!("unexpected XDP verdict {other}"),
        };
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let tc = match self.gate.tc().test_run(opts) {
            Ok(r) => r.return_value,
            // The kernel will not build an skb from a frame whose network header is cut short
            // (EINVAL); such a frame never reaches TC on a real interface either.
            Err(_) if frame.len() < SHORTEST_TC_TEST_FRAME => return xdp_pass,
            Err(e) => panic!("TC test run on {} bytes: {e:?}", frame.len()),
        };
        let tc_pass = match tc {
            // TC_ACT_UNSPEC (TCX_NEXT): the gate passes to the next program, never "ok".
            u32::MAX => true,
            2 => false, // TC_ACT_SHOT
            other => panic!("unexpected TC verdict {other} (a pass must be TC_ACT_UNSPEC)"),
        };
        assert_eq!(
            xdp_pass, tc_pass,
            "XDP and TC disagree on frame {frame:02x?}"
        );
        xdp_pass
    }

    /// Runs `frame` `repeat` times through the XDP program; returns its verdict.
    #[must_use]
    pub fn run_xdp(&self, frame: &[u8], repeat: u32) -> u32 {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        self.gate
            .xdp()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("XDP test run on {} bytes: {e}", frame.len()))
            .return_value
    }

    /// Runs `frame` `repeat` times through the TC program; returns its verdict.
    #[must_use]
    pub fn run_tc(&self, frame: &[u8], repeat: u32) -> u32 {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        self.gate
            .tc()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("TC test run on {} bytes: {e:?}", frame.len()))
            .return_value
    }

    /// A global counter by name, summed over CPUs.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        let c = self.maps.counters().expect("reading counters");
        *c.global
            .get(name)
            .unwrap_or_else(|| panic!("no counter named {name}"))
    }
}

impl Drop for TestGate {
    fn drop(&mut self) {
        remove_pin_dir(&self.pin_dir);
    }
}

/// A scratch directory under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/<prefix><unique>`.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        Self(p)
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes a pin directory on drop (used while a gate is being loaded).
pub struct PinDirGuard(pub PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        remove_pin_dir(&self.0);
    }
}

/// Removes a pin directory and everything pinned in it; unpinning the links detaches them.
pub fn remove_pin_dir(dir: &Path) {
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(dir)
    {
        eprintln!("cleanup: removing {}: {e}", dir.display());
    }
}
