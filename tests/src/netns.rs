//! Network namespaces joined by veth pairs: the project's own test hosts. Traffic stays inside
//! them. Guards delete what they made on drop.

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: a valid namespace fd; only the calling thread changes namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {path}: {}",
        std::io::Error::last_os_error()
    );
}

/// A named network namespace (`ip netns add`), deleted on drop with all its interfaces.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name starting with `prefix`, loopback up.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let name = crate::unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip` inside the namespace.
    pub fn exec_ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Runs `f` on a thread that has entered this namespace (network only: the mount namespace,
    /// and so bpffs, stays the caller's). Sockets made there stay in the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Netns {
    /// Like [`Netns::run`], on a detached thread: for servers that outlive the call.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

impl Netns {
    /// A command that runs inside this namespace (network only, like `nsenter --net`): the
    /// mount namespace, and so bpffs, stays the caller's.
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt as _;
        let path = format!("/run/netns/{}", self.name);
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec only open and setns run, both async-signal-safe; the
        // path is prepared before the fork.
        let c_path = std::ffi::CString::new(path).expect("namespace path");
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !matches!(out, Ok(ref o) if o.status.success()) {
            eprintln!("cleanup: ip netns del {} failed: {out:?}", self.name);
        }
    }
}

/// Two namespaces, `server` and `client`, joined by a veth pair with IPv4 and IPv6 addresses.
pub struct Link {
    /// Where the service runs and the gate is attached.
    pub server: Netns,
    /// Where requests come from.
    pub client: Netns,
    /// The server's end of the veth pair.
    pub server_if: String,
    /// The client's end.
    pub client_if: String,
}

/// The server's IPv4 address on a [`Link`].
pub const SERVER_V4: &str = "10.213.0.1";
/// The client's IPv4 address on a [`Link`].
pub const CLIENT_V4: &str = "10.213.0.2";
/// The server's IPv6 address on a [`Link`].
pub const SERVER_V6: &str = "fd00:213::1";
/// The client's IPv6 address on a [`Link`].
pub const CLIENT_V6: &str = "fd00:213::2";

impl Link {
    /// Creates the two namespaces and the veth pair between them, addressed and up.
    #[must_use]
    pub fn new() -> Self {
        let server = Netns::new("jits");
        let client = Netns::new("jitc");
        let tag = crate::short_tag();
        let server_if = format!("js{tag}");
        let client_if = format!("jc{tag}");
        // Create the pair inside the server namespace and move one end out, so nothing is ever
        // left behind in the caller's namespace.
        server.exec_ip(&[
            "link",
            "add",
            &server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            client.name(),
        ]);
        server.exec_ip(&["addr", "add", &format!("{SERVER_V4}/24"), "dev", &server_if]);
        client.exec_ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", &client_if]);
        server.exec_ip(&[
            "addr",
            "add",
            &format!("{SERVER_V6}/64"),
            "dev",
            &server_if,
            "nodad",
        ]);
        client.exec_ip(&[
            "addr",
            "add",
            &format!("{CLIENT_V6}/64"),
            "dev",
            &client_if,
            "nodad",
        ]);
        server.exec_ip(&["link", "set", &server_if, "up"]);
        client.exec_ip(&["link", "set", &client_if, "up"]);
        Self {
            server,
            client,
            server_if,
            client_if,
        }
    }
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}
