//! `cargo xtask bench`: the gate's per-packet cost and grant loading, measured through
//! `BPF_PROG_TEST_RUN` in one run against two yardsticks on the same frames:
//!
//! - the empty program (XDP_PASS): the floor;
//! - the reference program: the least a correct gate must do (parse Ethernet/IPv4/TCP, one
//!   exact-match lookup on `(source, port)`, one clock read).
//!
//! Grant populations are walked, not hit on one hot key: a rotator program rewrites the source
//! address of every run to the next of N addresses, then tail-calls the program under test. The
//! rotator's own cost (rotator + empty program) is measured in the same run and subtracted before
//! ratios to the reference are taken. Per-packet cost is wall time over a large repeat count (the
//! kernel reports whole nanoseconds only).
//!
//! Then a fleet (three agents in three namespaces on a three-member etcd cluster, as the fleet
//! test runs it): the time from an approval through node 0 to the first connection that passes
//! on node 1, p50 and p99, beside a no-op call through the same `jitctl` in the same run. Needs
//! root and etcd (`cargo xtask setup`), and the release `jit-agent` and `jitctl` beside this
//! binary (`cargo xtask bench` builds them).

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd as _,
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use jit_agent::datapath::{GrantEntry, GrantScope, boottime_ns, harness, load_harness};
use jit_agent::spec::{Mode, Protocol, ServiceDest};
use jit_tests::{TestGate, frames::Packet};

/// Packets per measurement.
const REPEAT: u32 = 2_000_000;
/// Measurements per figure; the median is reported with the spread. The measurements of the
/// figures compared with each other are interleaved (one of each per round), so a machine that
/// speeds up or slows down during the run moves them together.
const ROUNDS: usize = 11;
/// The protected service's address and port.
const SERVICE: &str = "10.0.0.1";
const PORT: u16 = 443;
/// First address of the granted sources (10.64.0.0 and up).
const GRANTED_BASE: u32 = 0x0a40_0000;
/// First address of sources without grants (10.128.0.0 and up).
const STRANGER_BASE: u32 = 0x0a80_0000;

/// `#[repr(C)]` twins of the harness program's types.
#[repr(C)]
#[derive(Clone, Copy)]
struct RefKey {
    src: u32,
    port: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for RefKey {}

#[repr(C)]
#[derive(Clone, Copy)]
struct Rotate {
    base: u32,
    count: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for Rotate {}

/// A median with its spread, ns per packet.
#[derive(Clone, Copy)]
struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

impl Figure {
    fn show(&self) -> String {
        format!(
            "{:6.2} ns  [{:.2} .. {:.2}]",
            self.median, self.min, self.max
        )
    }
}

/// One measurement: ns per packet over `REPEAT` runs.
fn sample(prog: &Xdp, frame: &[u8]) -> f64 {
    let mut o = TestRunOptions::new();
    o.data_in = Some(frame);
    o.repeat = REPEAT;
    let started = Instant::now();
    let r = prog.test_run(o).unwrap_or_else(|e| panic!("test run: {e}"));
    let elapsed = started.elapsed();
    assert!(r.return_value != 0, "the program aborted (XDP_ABORTED)");
    elapsed.as_secs_f64() * 1e9 / f64::from(REPEAT)
}

fn figure(mut samples: Vec<f64>) -> Figure {
    samples.sort_by(f64::total_cmp);
    Figure {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    }
}

/// Interleaved figures: each round takes one sample of every case, in order.
fn measure_all(mut cases: Vec<&mut dyn FnMut() -> f64>) -> Vec<Figure> {
    let mut samples = vec![Vec::with_capacity(ROUNDS); cases.len()];
    for _ in 0..ROUNDS {
        for (case, out) in cases.iter_mut().zip(samples.iter_mut()) {
            out.push(case());
        }
    }
    samples.into_iter().map(figure).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name)
        .and_then(|p| <&Xdp>::try_from(p).ok())
        .unwrap_or_else(|| panic!("program {name}"))
}

/// The harness with its rotator pointed at `count` sources from `base` and at `target`.
fn aim(h: &mut Ebpf, base: u32, count: u32, target: &ProgramFd) {
    let mut rot: Array<_, Rotate> =
        Array::try_from(h.map_mut("HARNESS_ROTATE").expect("rotate map")).expect("array");
    rot.set(0, Rotate { base, count }, 0)
        .expect("rotate settings");
    let mut next: ProgramArray<_> =
        ProgramArray::try_from(h.map_mut("HARNESS_NEXT").expect("next map")).expect("prog array");
    next.set(0, target, 0).expect("tail call target");
}

fn prog_fd(p: &Xdp) -> ProgramFd {
    p.fd()
        .expect("program fd")
        .try_clone()
        .expect("duplicating the program fd")
}

/// Reference grants for `count` sources from `base`, on PORT.
fn fill_reference(h: &mut Ebpf, base: u32, count: u32) {
    let mut map: HashMap<_, RefKey, u64> =
        HashMap::try_from(h.map_mut("HARNESS_REF").expect("reference map")).expect("hash map");
    let expires = boottime_ns().expect("clock") + 3_600_000_000_000;
    let keys: Vec<RefKey> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
    for i in 0..count {
        let key = RefKey {
            src: (base + i).to_be(),
            port: u32::from(PORT),
        };
        map.insert(key, expires, 0).expect("reference grant");
    }
}

/// A gate protecting SERVICE:PORT/tcp (service 1) with `count` host grants from GRANTED_BASE,
/// loaded in batches. Returns the gate and the load time in seconds.
fn gate_with(count: u32) -> (TestGate, f64) {
    let mut g = TestGate::load_with(count.max(16));
    g.maps
        .add_service(
            ServiceDest {
                addr: ip(SERVICE),
                port: PORT,
                proto: Protocol::Tcp,
            },
            1,
            Mode::Enforce,
        )
        .expect("service");
    let now = boottime_ns().expect("clock");
    let grants: Vec<GrantEntry> = (0..count)
        .map(|i| {
            jit_tests::fixtures::grant_between(
                GrantScope::Host(IpAddr::V4(Ipv4Addr::from(GRANTED_BASE + i))),
                1 + i % 1000,
                1,
                u64::from(i) + 1,
                now,
                now + 3_600_000_000_000,
            )
        })
        .collect();
    let started = Instant::now();
    g.maps.put_new_grants(&grants).expect("loading grants");
    (g, started.elapsed().as_secs_f64())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

struct Row {
    name: String,
    fig: Figure,
    vs_empty: f64,
    vs_reference: Option<f64>,
    target: Option<(f64, &'static str)>,
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the benchmarks need root (they load BPF programs)");
        std::process::exit(1);
    }
    let mut h = load_harness().unwrap_or_else(|e| panic!("harness: {e}"));
    let frame = Packet::tcp(ip("10.64.0.1"), ip(SERVICE), PORT).build();
    let unprotected = Packet::tcp(ip("10.64.0.1"), ip(SERVICE), 80).build();
    let mut rows: Vec<Row> = Vec::new();

    println!(
        "per-packet cost through BPF_PROG_TEST_RUN (XDP), median of {ROUNDS} interleaved runs of \
         {REPEAT} packets [min .. max]; kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let empty_fd = prog_fd(xdp(&h, harness::EMPTY));
    let reference_fd = prog_fd(xdp(&h, harness::REFERENCE));

    // Unprotected destination: no rotation needed (no lookup depends on the source).
    let (small, _) = gate_with(10);
    let figs = measure_all(vec![
        &mut || sample(xdp(&h, harness::EMPTY), &frame),
        &mut || sample(small.gate.xdp(), &unprotected),
    ]);
    let (empty, un) = (figs[0], figs[1]);
    rows.push(Row {
        name: "empty program".into(),
        fig: empty,
        vs_empty: 1.0,
        vs_reference: None,
        target: None,
    });
    rows.push(Row {
        name: "gate, unprotected port".into(),
        fig: un,
        vs_empty: un.median / empty.median,
        vs_reference: None,
        target: Some((1.2, "x empty")),
    });
    drop(small);

    for count in [10_000u32, 1_000_000] {
        let (g, load_s) = gate_with(count);
        if count == 1_000_000 {
            println!(
                "  loaded {count} grants in {load_s:.3} s (batched; target < 1 s: {})",
                verdict(load_s < 1.0)
            );
        }
        fill_reference(&mut h, GRANTED_BASE, count);
        let gate_fd = prog_fd(g.gate.xdp());
        let h = std::cell::RefCell::new(&mut h);
        let rotate = |base, target: &ProgramFd| {
            let mut h = h.borrow_mut();
            aim(&mut h, base, count, target);
            sample(xdp(&h, harness::ROTATE), &frame)
        };
        let figs = measure_all(vec![
            &mut || rotate(GRANTED_BASE, &empty_fd),
            &mut || rotate(GRANTED_BASE, &reference_fd),
            &mut || rotate(GRANTED_BASE, &gate_fd),
            &mut || rotate(STRANGER_BASE, &reference_fd),
            &mut || rotate(STRANGER_BASE, &gate_fd),
        ]);
        let (wrapper, reference, granted, ref_drop, dropped) =
            (figs[0], figs[1], figs[2], figs[3], figs[4]);
        // Counter check: the rotated runs really were allowed and dropped.
        let c = g.maps.counters().expect("counters");
        assert!(c.global["allowed"] > 0 && c.global["no_grant"] > 0, "{c:?}");
        let net = |f: Figure| f.median - wrapper.median;
        let label = if count == 10_000 {
            "10 000"
        } else {
            "1 000 000"
        };
        rows.push(Row {
            name: format!("rotator + empty, {label} sources"),
            fig: wrapper,
            vs_empty: wrapper.median / empty.median,
            vs_reference: None,
            target: None,
        });
        rows.push(Row {
            name: format!("reference, granted, {label} keys"),
            fig: reference,
            vs_empty: reference.median / empty.median,
            vs_reference: Some(1.0),
            target: None,
        });
        rows.push(Row {
            name: format!("gate, granted, {label} grants"),
            fig: granted,
            vs_empty: granted.median / empty.median,
            vs_reference: Some(net(granted) / net(reference)),
            target: Some((1.5, "x reference")),
        });
        rows.push(Row {
            name: format!("reference, no grant, {label} keys"),
            fig: ref_drop,
            vs_empty: ref_drop.median / empty.median,
            vs_reference: Some(1.0),
            target: None,
        });
        rows.push(Row {
            name: format!("gate, dropped (no grant), {label} grants"),
            fig: dropped,
            vs_empty: dropped.median / empty.median,
            vs_reference: Some(net(dropped) / net(ref_drop)),
            target: Some((1.5, "x reference")),
        });
        drop(g);
    }

    println!(
        "\n  {:<42} {:>30} {:>9} {:>11}  target",
        "path", "ns/packet [spread]", "x empty", "x reference"
    );
    for r in &rows {
        let vs_ref = r
            .vs_reference
            .map_or_else(String::new, |v| format!("{v:.2}"));
        let target = r.target.map_or_else(String::new, |(t, what)| {
            let value = if what == "x empty" {
                r.vs_empty
            } else {
                r.vs_reference.unwrap_or(f64::INFINITY)
            };
            format!("<= {t}{what}: {}", verdict(value <= t))
        });
        println!(
            "  {:<42} {:>30} {:>9.2} {:>11}  {target}",
            r.name,
            r.fig.show(),
            r.vs_empty,
            vs_ref
        );
    }
    println!(
        "\n  x reference: (path - rotator) / (reference - rotator), the rotator measured in the \
         same run;\n  x empty: raw ratio to the empty program (rotated rows include the rotator)."
    );
    let _ = empty_fd.as_fd();
    fleet_propagation();
}

/// Propagation samples of the fleet.
const FLEET_SAMPLES: usize = 20;

/// The `q` quantile (0..=1) of sorted `v`, nearest rank.
fn quantile(v: &[std::time::Duration], q: f64) -> std::time::Duration {
    // Nearest rank on a short list: the index is small and non-negative.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn fleet_propagation() {
    use jit_tests::fleet::{Fleet, ok};
    println!(
        "\nfleet: 3 agents on a 3-member etcd cluster (loopback, one namespace per node); \
         approval through node 0 to the first connection passing on node 1, {FLEET_SAMPLES} \
         samples, probes every 2 ms"
    );
    let fleet = Fleet::start();
    let mut noop = Vec::new();
    let mut took = Vec::new();
    let mut passed = Vec::new();
    for _ in 0..FLEET_SAMPLES {
        let t = Instant::now();
        ok(&fleet.ctl(0, "ci", &["whoami"]));
        noop.push(t.elapsed());
        let (p, a) = fleet.approval_to_first_connection();
        passed.push(p);
        took.push(a);
    }
    for v in [&mut noop, &mut took, &mut passed] {
        v.sort();
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let line = |name: &str, v: &[std::time::Duration]| {
        println!(
            "  {name:<52} p50 {:>7.1} ms  p99 {:>7.1} ms  [{:.1} .. {:.1}]",
            ms(quantile(v, 0.5)),
            ms(quantile(v, 0.99)),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    };
    line("no-op call (jitctl whoami through node 0)", &noop);
    line("approval call (jitctl approve through node 0)", &took);
    line(
        "approval on node 0 to first packet passing on node 1",
        &passed,
    );
    let p99 = quantile(&passed, 0.99);
    println!(
        "  p99 {:.1} ms, target < 100 ms: {}; x no-op call (p50): {:.2}",
        ms(p99),
        verdict(p99 < std::time::Duration::from_millis(100)),
        ms(quantile(&passed, 0.5)) / ms(quantile(&noop, 0.5))
    );
}
