//! Overhead on allowed traffic, for `cargo xtask bench`: a granted client's TCP throughput
//! (iperf3) and request-response latency (one byte each way on a kept connection, `TCP_NODELAY`)
//! across a veth pair, with no filter, with the gate in each attach mode, and with the nftables
//! set, each holding 10 000 grants besides the client's. The link keeps veth's defaults (TSO,
//! GSO), as a container's link has them: what a filter changes about them (native XDP on a veth
//! turns off its peer's TSO) is part of its cost.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use jit_agent::spec::AttachMode;

use crate::{
    bench_filters::{Filter, GateFixture, Installed, PORT},
    cpus::pin_thread,
    netns::{CLIENT_V4, Link, SERVER_V4},
};

/// Grants every filter holds besides the client's.
pub const GRANTS: u32 = 10_000;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Runs per filter (interleaved: one of each per round).
    pub rounds: usize,
    /// Length of one iperf3 run.
    pub throughput_for: Duration,
    /// Round trips per latency run.
    pub round_trips: usize,
}

/// One run's reading.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// TCP throughput, bits per second (iperf3, received).
    pub bits_per_second: f64,
    /// Median round trip of one byte each way, µs.
    pub rtt_us: f64,
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
    ]
}

/// Measures every filter `plan.rounds` times, interleaved.
#[must_use]
pub fn run(plan: Plan) -> Vec<(Filter, Vec<Sample>)> {
    let link = Link::new();
    let server: Ipv4Addr = SERVER_V4.parse().expect("address");
    let client: Ipv4Addr = CLIENT_V4.parse().expect("address");
    let mut gate = GateFixture::load(server, GRANTS, &[client]);
    let mut out: Vec<(Filter, Vec<Sample>)> = filters().into_iter().map(|f| (f, vec![])).collect();
    for _ in 0..plan.rounds {
        for (filter, samples) in &mut out {
            let installed = Installed::new(&link, *filter, Some(&mut gate), GRANTS, &[client]);
            let bits_per_second = throughput(&link, plan.throughput_for);
            let rtt_us = round_trip(&link, plan.round_trips);
            // The granted flow really passed through the filter's accept path.
            if let Filter::Gate(_) = filter {
                assert_eq!(
                    installed.dropped(),
                    Some(0),
                    "the gate dropped granted traffic"
                );
            }
            samples.push(Sample {
                bits_per_second,
                rtt_us,
            });
            installed.remove();
        }
    }
    out
}

/// One iperf3 run from the client to the server, server on CPU 1, client on CPU 0.
fn throughput(link: &Link, run_for: Duration) -> f64 {
    let mut server = link
        .server
        .command("iperf3")
        .args([
            "--server",
            "--one-off",
            "--affinity",
            "1",
            "--bind",
            SERVER_V4,
        ])
        .args(["--port", &PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("iperf3: {e} (run `cargo xtask setup`)"));
    let secs = run_for.as_secs().max(1).to_string();
    // The server takes a moment to listen: retry the client a bounded number of times.
    let mut last = String::new();
    for _ in 0..50 {
        let out = link
            .client
            .command("iperf3")
            .args(["--client", SERVER_V4, "--json", "--affinity", "0"])
            .args(["--port", &PORT.to_string(), "--time", &secs])
            .output()
            .expect("iperf3 client");
        // With --json, iperf3 reports a refused connection in the document (exit status 0 on
        // some versions): the server is not listening yet.
        let doc: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        let done = doc
            .as_ref()
            .filter(|v| v.get("error").is_none() && out.status.success());
        if let Some(v) = done {
            // `--one-off` does not always end the server (iperf3 3.12): end it here.
            let _ = server.kill();
            let _ = server.wait();
            return v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {v}"));
        }
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    panic!("iperf3 client never connected: {last}");
}

/// `n` round trips of one byte each way; the median in µs.
fn round_trip(link: &Link, n: usize) -> f64 {
    let listener = link.server.run(|| {
        TcpListener::bind((SERVER_V4.parse::<Ipv4Addr>().expect("address"), PORT))
            .expect("binding the echo port")
    });
    let server = std::thread::spawn(move || {
        pin_thread(1).expect("pinning the echo server");
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut rtts = link.client.run(|| {
        pin_thread(0).expect("pinning the client");
        let mut s = TcpStream::connect_timeout(
            &(SERVER_V4.parse::<Ipv4Addr>().expect("address"), PORT).into(),
            Duration::from_secs(5),
        )
        .expect("connecting through the filter");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut b = [7u8; 1];
        let mut rtts = Vec::with_capacity(n);
        for i in 0..n + n / 10 {
            let t = Instant::now();
            s.write_all(&b).expect("request");
            s.read_exact(&mut b).expect("response");
            // The first tenth warms the path up.
            if i >= n / 10 {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        rtts
    });
    server
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    rtts.sort_by(f64::total_cmp);
    rtts[rtts.len() / 2]
}
