//! Real etcd for the tests (Debian's `etcd-server`, installed by `cargo xtask setup`): members on
//! loopback with free ports and their own data directories, stopped (`SIGKILL`) and removed on
//! drop, so a failing test leaves no process or directory behind.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::TempDir;

/// One etcd member.
pub struct Member {
    /// Its name in the cluster.
    pub name: String,
    /// Its client URL (`http://127.0.0.1:<port>`).
    pub client_url: String,
    /// Its client port (also listened on at the cluster's extra addresses).
    pub client_port: u16,
    peer_url: String,
    dir: TempDir,
    child: Option<Child>,
}

/// An etcd cluster of one or more members on loopback.
pub struct Cluster {
    /// The members, in order.
    pub members: Vec<Member>,
    token: String,
    /// Addresses besides loopback every member serves clients on (host ends of veth pairs to
    /// the tests' namespaces).
    extra_hosts: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether `GET /health` on `client_url` says the member is healthy (it has a leader).
fn healthy(client_url: &str) -> bool {
    let Some(addr) = client_url
        .strip_prefix("http://")
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

impl Cluster {
    /// Starts `n` members on loopback and waits (at most 30 s) until every one is healthy.
    #[must_use]
    pub fn start(n: usize) -> Self {
        Self::start_on(n, &[])
    }

    /// Starts `n` members serving clients on loopback and on `extra_hosts` too (addresses of
    /// this namespace that other test namespaces reach), and waits until they are healthy.
    #[must_use]
    pub fn start_on(n: usize, extra_hosts: &[&str]) -> Self {
        let which = Command::new("etcd").arg("--version").output();
        assert!(
            which.is_ok_and(|o| o.status.success()),
            "etcd is not installed: run `cargo xtask setup` (Debian package etcd-server)"
        );
        let token = crate::unique("jit-etcd-");
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let client_port = free_port();
                Member {
                    name: format!("m{i}"),
                    client_url: format!("http://127.0.0.1:{client_port}"),
                    client_port,
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    dir: TempDir::new("jit-etcd-"),
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self {
            members,
            token,
            extra_hosts: extra_hosts.iter().map(ToString::to_string).collect(),
        };
        for i in 0..n {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let extra: Vec<String> = self
            .extra_hosts
            .iter()
            .map(|h| format!("http://{h}:{}", self.members[i].client_port))
            .collect();
        let m = &mut self.members[i];
        let listen = std::iter::once(m.client_url.clone())
            .chain(extra)
            .collect::<Vec<_>>()
            .join(",");
        let log = std::fs::File::create(m.dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(m.dir.path().join("data"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        m.child = Some(child);
    }

    /// Waits until every running member is healthy; panics with the logs after `within`.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self
                .members
                .iter()
                .filter(|m| m.child.is_some())
                .all(|m| healthy(&m.client_url))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy within {within:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URLs of every member.
    #[must_use]
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URLs of every member at `host` (one of the extra addresses).
    #[must_use]
    pub fn endpoints_at(&self, host: &str) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{host}:{}", m.client_port))
            .collect()
    }

    /// Kills member `i` (`SIGKILL`), keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
    }

    /// The members' logs, for failure messages.
    #[must_use]
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log =
                    std::fs::read_to_string(m.dir.path().join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                format!(
                    "--- {} ---\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
