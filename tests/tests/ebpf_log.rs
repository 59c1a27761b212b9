//! The kernel program's aya-log records (the `ebpf-log` feature, off by default) reach the
//! agent's log: a packet run through the gate is logged with what the parser made of it and the
//! verdict. Built and run by `cargo xtask test` with `--features ebpf-log`.
#![cfg(feature = "ebpf-log")]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jit_tests::{TestGate, frames::Packet, require_root};

/// Keeps every record logged.
struct Capture(Arc<Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push(format!("{} {}", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

#[test]
#[ignore = "needs root"]
fn the_programs_log_records_reach_the_agents_log() {
    if !require_root() {
        return;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    log::set_boxed_logger(Box::new(Capture(Arc::clone(&seen)))).expect("the only logger");
    log::set_max_level(log::LevelFilter::Debug);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = TestGate::load();
    runtime
        .block_on(async { g.gate.forward_logs() })
        .expect("forwarding the program's logs");

    let frame = Packet::tcp(
        "10.1.0.1".parse().expect("src"),
        "10.0.0.1".parse().expect("dst"),
        443,
    )
    .build();
    assert!(g.passes(&frame), "nothing is protected: the frame passes");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found =
            seen.lock().expect("lock").iter().any(|r| {
                r.contains("xdp: kind=2") && r.contains("dport=443") && r.contains("pass=1")
            });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log record of the packet within 5 s: {:?}",
            seen.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
