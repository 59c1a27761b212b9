//! `cargo xtask bench`: the gate's per-packet cost and grant loading, measured through
//! `BPF_PROG_TEST_RUN` against an XDP program that passes everything, in the same run, on the
//! same frames. Results are ratios and differences against that baseline, compared with the
//! targets in shared/ROADMAP.md. Needs root.

use std::{net::IpAddr, time::Instant};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use jit_agent::datapath::{GrantEntry, Mode, Protocol, ServiceDest, boottime_ns, load_baseline};
use jit_tests::{TestGate, frames::Packet};

/// Packets per measurement (the kernel reports the mean time per run).
const REPEAT: u32 = 2_000_000;
/// Measurements per figure; the median is reported.
const ROUNDS: usize = 7;

fn ns_per_packet(prog: &Xdp, frame: &[u8]) -> f64 {
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let mut o = TestRunOptions::new();
            o.data_in = Some(frame);
            o.repeat = REPEAT;
            let r = prog.test_run(o).unwrap_or_else(|e| panic!("test run: {e}"));
            r.duration.as_secs_f64() * 1e9
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// A gate protecting 10.0.0.1:443/tcp with `grants` grants, one of them for 10.1.0.1.
fn gate_with(grants: u32) -> TestGate {
    let mut g = TestGate::load_with(grants.max(16));
    g.maps
        .add_service(
            ServiceDest {
                addr: ip("10.0.0.1"),
                port: 443,
                proto: Protocol::Tcp,
            },
            1,
            Mode::Enforce,
        )
        .expect("service");
    g.maps
        .bind_identity("10.1.0.1/32".parse().expect("net"), 1)
        .expect("identity");
    let now = boottime_ns().expect("clock");
    let started = Instant::now();
    for i in 0..grants {
        g.maps
            .put_grant(GrantEntry {
                identity_id: i + 1,
                service_id: 1,
                grant_id: u64::from(i),
                not_before_ns: now,
                expires_at_ns: now + 3_600_000_000_000,
                seen: false,
            })
            .expect("grant");
    }
    if grants >= 100_000 {
        println!(
            "  loaded {grants} grants in {:.2} s ({:.0} ns each; target for 1 000 000: < 2 s)",
            started.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64() * 1e9 / f64::from(grants)
        );
    }
    g
}

fn verdict(ok: bool) -> &'static str {
    if ok { "meets target" } else { "MISSES target" }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the benchmarks need root (they load BPF programs)");
        std::process::exit(1);
    }
    let (baseline, name) = load_baseline().unwrap_or_else(|e| panic!("baseline: {e}"));
    let base: &Xdp = baseline
        .program(name)
        .and_then(|p| <&Xdp>::try_from(p).ok())
        .expect("baseline program");
    let unprotected = Packet::tcp(ip("10.1.0.1"), ip("10.0.0.1"), 80).build();
    let granted = Packet::tcp(ip("10.1.0.1"), ip("10.0.0.1"), 443).build();
    let stranger = Packet::tcp(ip("10.9.9.9"), ip("10.0.0.1"), 443).build();

    println!("per-packet cost, BPF_PROG_TEST_RUN, median of {ROUNDS} x {REPEAT} packets");
    let b = ns_per_packet(base, &unprotected);
    println!("  baseline (XDP_PASS)              {b:7.1} ns");

    let small = gate_with(10);
    let un = ns_per_packet(small.gate.xdp(), &unprotected);
    println!(
        "  unprotected port                 {un:7.1} ns  {:.2}x baseline (target <= 1.3x: {})",
        un / b,
        verdict(un / b <= 1.3)
    );
    let g10 = ns_per_packet(small.gate.xdp(), &granted);
    println!("  granted, 10 grants               {g10:7.1} ns");
    let d = ns_per_packet(small.gate.xdp(), &stranger);
    println!("  dropped (no identity)            {d:7.1} ns");
    drop(small);

    let mid = gate_with(10_000);
    let g10k = ns_per_packet(mid.gate.xdp(), &granted);
    println!(
        "  granted, 10 000 grants           {g10k:7.1} ns  +{:.1} ns over baseline (target <= 60 ns: {})",
        g10k - b,
        verdict(g10k - b <= 60.0)
    );
    drop(mid);

    let big = gate_with(1_000_000);
    let g1m = ns_per_packet(big.gate.xdp(), &granted);
    println!(
        "  granted, 1 000 000 grants        {g1m:7.1} ns  {:.2}x the cost at 10 (target <= 2x: {})",
        g1m / g10,
        verdict(g1m / g10 <= 2.0)
    );
    drop(big);
    println!(
        "\nNot measured here yet: drop rate against nftables/iptables, TCP throughput, request-to-first-packet and revoke-to-drop latency."
    );
}
