//! Drop rate, for `cargo xtask bench`: a SYN flood from sources without grants to a protected
//! port, across a veth pair between two namespaces, against each filter of
//! [`crate::bench_filters`] holding the same 10 000 grants, in two forms of traffic
//! ([`Traffic`]): XDP frames redirected into the veth (as a NIC delivers them) and socket
//! buffers from an `AF_PACKET` socket (as a container's stack sends them).
//!
//! The receiver is isolated from the sender: the sender is pinned to CPU 0; the server's veth
//! end runs its whole receive path in a NAPI thread (threaded NAPI; GRO on so that every packet
//! takes the NAPI path, not only XDP's, which needs the sender's TSO off) pinned to CPU 1. Every
//! filter runs in that thread: native XDP in the NAPI poll, generic XDP, TC and the nftables
//! ingress hook in `__netif_receive_skb` after GRO, iptables at the input hook after routing.
//! The figure that counts is the receive path's CPU time per dropped packet: the NAPI thread's
//! own run time (`/proc/<pid>/schedstat`, ns) over the packets the filter counted dropped.
//! Packets per second dropped are reported beside it, but on a veth they also depend on how
//! the sender and the receiver's wake-ups interleave (the veth ring holds 256 frames; what
//! does not fit is dropped before any filter), so the CPU per packet is what the comparison
//! uses.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use jit_agent::spec::AttachMode;

use crate::{
    bench_filters::{Filter, GateFixture, Installed, PORT},
    flood,
    netns::{Link, SERVER_V4},
};

/// Grants every filter holds.
pub const GRANTS: u32 = 10_000;
/// The sender's CPU and the receiver's.
pub const SENDER_CPU: usize = 0;
/// The receiver's CPU.
pub const RECEIVER_CPU: usize = 1;
/// Flood sources (no grant): 172.16.0.0/12.
const STRANGERS: (u32, u32) = (0xac10_0000, 1 << 20);

/// How the flood reaches the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// XDP frames redirected into the veth (as a NIC delivers them: no socket buffer until a
    /// hook past native XDP needs one).
    Frames,
    /// Socket buffers from an `AF_PACKET` socket (as a container's own stack sends them: the
    /// buffer exists before the receiver sees the packet).
    Skbs,
}

impl Traffic {
    /// A short description for reports.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Frames => "XDP frames redirected into the veth (as from a NIC)",
            Self::Skbs => "socket buffers from an AF_PACKET socket (as from a container)",
        }
    }
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Runs per filter (interleaved: one of each per round).
    pub rounds: usize,
    /// Length of one run.
    pub run_for: Duration,
}

/// One run's reading.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Packets the sender handed to the kernel per second.
    pub offered_pps: f64,
    /// Packets per second the filter dropped (received, for no filter).
    pub dropped_pps: f64,
    /// The receive path's CPU time per dropped (received) packet, ns: the NAPI thread's run
    /// time over the packets.
    pub cpu_ns: f64,
    /// The NAPI thread's share of its CPU over the run, 0..=1.
    pub busy: f64,
}

/// The filters compared, in report order.
#[must_use]
pub fn filters() -> Vec<Filter> {
    vec![
        Filter::None,
        Filter::Gate(AttachMode::XdpNative),
        Filter::Gate(AttachMode::XdpGeneric),
        Filter::Gate(AttachMode::Tc),
        Filter::NftSet,
        Filter::Iptables(1_000),
        Filter::Iptables(10_000),
    ]
}

/// Pins the receive-side NAPI threads of `iface` to `cpu` (their pids change when XDP is
/// attached or detached, so this runs before every run).
fn pin_napi_threads(iface: &str, cpu: usize) -> Vec<i32> {
    let prefix = format!("napi/{iface}-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&prefix) {
            // SAFETY: a zeroed cpu_set_t is a valid empty set.
            let rc = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
            };
            assert_eq!(rc, 0, "pinning {comm}: {}", std::io::Error::last_os_error());
            found.push(pid);
        }
    }
    assert!(
        !found.is_empty(),
        "no NAPI thread for {iface}: is threaded NAPI on?"
    );
    found
}

/// Run time of the threads `pids` so far, ns (`/proc/<pid>/schedstat`, first field).
fn run_time_ns(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .unwrap_or_else(|e| panic!("/proc/{pid}/schedstat: {e}"));
            text.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unreadable schedstat of {pid}: {text}"))
        })
        .sum()
}

fn in_ns(link: &Link, server: bool, script: &str) {
    let ns = if server { &link.server } else { &link.client };
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-ec", script])
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The interface's MAC address and index, read inside its namespace.
fn mac_and_index(link: &Link, server: bool) -> ([u8; 6], i32) {
    let (ns, iface) = if server {
        (&link.server, &link.server_if)
    } else {
        (&link.client, &link.client_if)
    };
    let iface = iface.clone();
    ns.run(move || {
        let c = std::ffi::CString::new(iface.clone()).expect("name");
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(index > 0, "no interface {iface}");
        // sysfs shows the caller's namespace, not the thread's: ask the kernel with an ioctl.
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0, "socket");
        // SAFETY: a zeroed ifreq with its name set is a valid SIOCGIFHWADDR argument.
        let mac = unsafe {
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(c.as_bytes()) {
                *d = libc::c_char::from_ne_bytes([*s]);
            }
            let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &raw mut req);
            libc::close(fd);
            assert_eq!(rc, 0, "SIOCGIFHWADDR {iface}");
            let data = req.ifr_ifru.ifru_hwaddr.sa_data;
            let mut mac = [0u8; 6];
            for (m, d) in mac.iter_mut().zip(data.iter()) {
                *m = d.to_ne_bytes()[0];
            }
            mac
        };
        (mac, i32::try_from(index).expect("index"))
    })
}

/// The link for the flood: GRO and threaded NAPI on the server's end, TSO off on the client's.
pub fn prepare(link: &Link) {
    in_ns(
        link,
        true,
        &format!(
            "ethtool -K {i} gro on; echo 1 > /sys/class/net/{i}/threaded;",
            i = link.server_if
        ),
    );
    in_ns(
        link,
        false,
        &format!("ethtool -K {} tso off", link.client_if),
    );
}

/// Measures every filter `plan.rounds` times, interleaved. Returns the samples per filter, in
/// [`filters`] order.
#[must_use]
pub fn run(plan: Plan, traffic: Traffic) -> Vec<(Filter, Vec<Sample>)> {
    let link = Link::new();
    prepare(&link);
    let (dst_mac, _) = mac_and_index(&link, true);
    let (src_mac, ifindex) = mac_and_index(&link, false);
    let server: Ipv4Addr = SERVER_V4.parse().expect("address");
    let spec = flood::Spec {
        ifindex,
        dst_mac,
        src_mac,
        dst: server,
        port: PORT,
        base: STRANGERS.0,
        count: STRANGERS.1,
    };
    let mut gate = GateFixture::load(server, GRANTS, &[]);
    // This process stays off the receiver's CPU while it measures.
    crate::cpus::pin_thread(SENDER_CPU).expect("pinning the benchmark thread");
    let mut out: Vec<(Filter, Vec<Sample>)> = filters().into_iter().map(|f| (f, vec![])).collect();
    for _ in 0..plan.rounds {
        for (filter, samples) in &mut out {
            let installed = Installed::new(&link, *filter, Some(&mut gate), GRANTS, &[]);
            let napi = pin_napi_threads(&link.server_if, RECEIVER_CPU);
            samples.push(measure(
                &link,
                &spec,
                traffic,
                &installed,
                &napi,
                plan.run_for,
            ));
            installed.remove();
        }
    }
    crate::cpus::unpin_thread().expect("unpinning the benchmark thread");
    out
}

/// Received packets on the server's end (every packet the NAPI poll took from the ring).
fn received(link: &Link) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", link.server.name(), "ethtool", "-S"])
        .arg(&link.server_if)
        .output()
        .expect("ethtool -S");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("rx_queue_0_xdp_packets:"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

fn measure(
    link: &Link,
    spec: &flood::Spec,
    traffic: Traffic,
    filter: &Installed<'_>,
    napi: &[i32],
    run_for: Duration,
) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent, spec) = (stop.clone(), sent.clone(), *spec);
        link.client.spawn(move || {
            crate::cpus::pin_thread(SENDER_CPU).expect("pinning the sender");
            match traffic {
                Traffic::Frames => flood::run_frames(&spec, &stop, &sent),
                Traffic::Skbs => flood::run(&spec, &stop, &sent),
            }
        })
    };
    // Warm up, then read everything at the start and the end of the run.
    std::thread::sleep(Duration::from_millis(300));
    let count = || filter.dropped().unwrap_or_else(|| received(link));
    let (s0, d0, c0, t0) = (
        sent.load(Ordering::Relaxed),
        count(),
        run_time_ns(napi),
        Instant::now(),
    );
    std::thread::sleep(run_for);
    let (s1, d1, c1, elapsed) = (
        sent.load(Ordering::Relaxed),
        count(),
        run_time_ns(napi),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    sender
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
        .expect("the flood's sender failed");
    let secs = elapsed.as_secs_f64();
    // Counts over a few seconds: far below 2^52, exact in f64.
    #[allow(clippy::cast_precision_loss)]
    let (sent_n, dropped_n, busy_ns) = ((s1 - s0) as f64, (d1 - d0) as f64, (c1 - c0) as f64);
    assert!(
        dropped_n > 0.0,
        "{}: nothing dropped (sent {sent_n})",
        filter.filter().name()
    );
    Sample {
        offered_pps: sent_n / secs,
        dropped_pps: dropped_n / secs,
        cpu_ns: busy_ns / dropped_n,
        busy: busy_ns / 1e9 / secs,
    }
}
