//! A TCP echo server for end-to-end tests, bounded in time, stopped on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long any server lives at most, whatever the test does.
const MAX_LIFETIME: Duration = Duration::from_secs(120);

/// An echo server listening in a namespace; stops (and joins) on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `addr` inside `ns`.
    #[must_use]
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            let deadline = Instant::now() + MAX_LIFETIME;
            let mut handlers = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let flag = Arc::clone(&flag);
                        handlers.push(std::thread::spawn(move || echo(conn, &flag, deadline)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for h in handlers {
                let _ = h.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("echo server did not start");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut conn: TcpStream, stop: &AtomicBool, deadline: Instant) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `msg` and waits up to `timeout` for it to come back. False when it does not.
#[must_use]
pub fn round_trip(conn: &mut TcpStream, msg: &[u8], timeout: Duration) -> bool {
    if conn.write_all(msg).is_err() {
        return false;
    }
    let _ = conn.set_read_timeout(Some(timeout));
    let mut got = vec![0u8; msg.len()];
    conn.read_exact(&mut got).is_ok() && got == msg
}
