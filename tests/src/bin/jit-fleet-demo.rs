//! `cargo xtask demo --nodes 3`: a fleet on one machine. Three agents, each in its own network
//! namespace as a node, share a three-member etcd cluster; the `echo` service runs on node 1.
//! Access approved through node 0 opens node 1; a revoke through node 2 cuts it; one etcd member
//! down changes nothing; without quorum no grant is issued while the grant in force still works;
//! quorum back, the agents carry on. Removes everything on exit and on Ctrl-C.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use jit_tests::{
    echo::round_trip,
    fleet::{ECHO_PORT, Fleet, NODES, connect, ctl, eventually, host_ip, node_ip, request_id},
};

/// The fleet, where Ctrl-C can take it down.
static FLEET: Mutex<Option<Fleet>> = Mutex::new(None);

fn say(step: &str) {
    println!("\n\x1b[1m==> {step}\x1b[0m");
}

fn show(cmd: &str) {
    println!("\x1b[2m$ {cmd}\x1b[0m");
}

/// The fleet's slot (a panic elsewhere does not keep it from being cleaned up).
fn slot() -> std::sync::MutexGuard<'static, Option<Fleet>> {
    FLEET
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` on the fleet; an error if Ctrl-C took it down.
fn with<T>(f: impl FnOnce(&mut Fleet) -> T) -> Result<T, String> {
    let mut guard = slot();
    let fleet = guard.as_mut().ok_or("the fleet is gone")?;
    Ok(f(fleet))
}

/// jitctl as `who` through node `i`, shown first.
fn jitctl(i: usize, who: &str, args: &[&str]) -> Result<std::process::Output, String> {
    show(&format!(
        "jitctl --agent https://{}:7443 (as {who}) {}",
        node_ip(i),
        args.join(" ")
    ));
    with(|f| {
        let home = f.home.path().to_path_buf();
        ctl(&home.join("certs"), &home, i, who, args)
    })
}

fn print_output(out: &std::process::Output) {
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("    {line}");
    }
}

fn succeeded(out: std::process::Output) -> Result<String, String> {
    print_output(&out);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("jitctl failed ({})", out.status))
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the fleet demo needs root (it loads BPF and creates network namespaces)");
        std::process::exit(1);
    }
    if let Err(e) = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        drop(slot().take());
        std::process::exit(130);
    }) {
        eprintln!("installing the Ctrl-C handler: {e}");
        std::process::exit(1);
    }
    // Whatever happens in the story (an error or a panic), everything is taken down.
    let result = std::panic::catch_unwind(run)
        .unwrap_or_else(|_| Err("the demo panicked (see above)".into()));
    say("Done: stopping the agents and etcd, removing namespaces, pins and files");
    drop(slot().take());
    if let Err(e) = result {
        eprintln!("fleet demo failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    say("Setting up: a three-member etcd cluster and three nodes, each a namespace with its agent");
    *slot() = Some(Fleet::start());
    for i in 0..NODES {
        println!(
            "    node {i}: {} (agent API https://{}:7443), reached from the host at {}",
            with(|f| f.nodes[i].ns.name().to_string())?,
            node_ip(i),
            host_ip(i)
        );
    }
    println!("    etcd: {}", with(|f| f.etcd.endpoints().join(", "))?);
    println!("    echo service on node 1: {}:{ECHO_PORT}", node_ip(1));

    say("Without a grant the kernel of node 1 drops the connection");
    show(&format!("connect {}:{ECHO_PORT}", node_ip(1)));
    if connect().is_some() {
        return Err("connected without a grant".into());
    }
    println!("    dropped");

    say("ci asks through node 0; carol approves through node 0; node 1 enforces it");
    let out = succeeded(jitctl(
        0,
        "ci",
        &["request", "echo", "--for", "10m", "--reason", "deploy"],
    )?)?;
    let id = request_id(&out);
    let approved = Instant::now();
    succeeded(jitctl(0, "sre_carol", &["approve", &id])?)?;
    let mut conn = None;
    if !eventually(Duration::from_secs(5), || {
        conn = connect();
        conn.is_some()
    }) {
        return Err("the grant never opened node 1".into());
    }
    println!(
        "    connected through node 1 {:?} after the approval on node 0",
        approved.elapsed()
    );
    let mut conn = conn.ok_or("no connection")?;
    if !round_trip(&mut conn, b"hello", Duration::from_secs(2)) {
        return Err("no data through the grant".into());
    }

    say("carol revokes through node 2: the live connection on node 1 is cut");
    let grants = succeeded(jitctl(
        2,
        "sre_carol",
        &["ls", "grants", "--active", "--json"],
    )?)?;
    let grants: serde_json::Value = serde_json::from_str(&grants).map_err(|e| e.to_string())?;
    let grant = grants[0]["id"].as_str().ok_or("no grant")?.to_string();
    succeeded(jitctl(
        2,
        "sre_carol",
        &["revoke", &grant, "--reason", "done"],
    )?)?;
    if !eventually(Duration::from_secs(3), || {
        !round_trip(&mut conn, b"again", Duration::from_millis(300))
    }) {
        return Err("data still flowed after the revoke".into());
    }
    println!("    cut");

    say("One etcd member down: nothing changes for users");
    with(|f| f.etcd.kill(0))?;
    println!("    killed etcd member m0");
    let out = succeeded(jitctl(
        1,
        "ci",
        &["request", "echo", "--for", "10m", "--reason", "again"],
    )?)?;
    let id = request_id(&out);
    succeeded(jitctl(2, "sre_carol", &["approve", &id])?)?;
    let mut conn = None;
    if !eventually(Duration::from_secs(5), || {
        conn = connect();
        conn.is_some()
    }) {
        return Err("no access with one member down".into());
    }
    let mut conn = conn.ok_or("no connection")?;
    println!("    granted and connected");

    say("Quorum lost: no new grant, and the grant in force keeps working");
    with(|f| f.etcd.kill(1))?;
    println!("    killed etcd member m1 (one of three left)");
    let out = jitctl(
        0,
        "ci",
        &["request", "echo", "--for", "10m", "--reason", "no quorum"],
    )?;
    print_output(&out);
    if out.status.success() {
        return Err("granted without quorum".into());
    }
    if !round_trip(&mut conn, b"still", Duration::from_secs(2)) {
        return Err("the grant in force stopped working".into());
    }
    println!("    refused, as it should be; the existing connection still carries data");

    say("Quorum back: the agents carry on, no restart");
    with(|f| {
        f.etcd.restart(0);
        f.etcd.restart(1);
        f.etcd.wait_healthy(Duration::from_secs(30));
    })?;
    let mut back = false;
    for _ in 0..50 {
        let out = with(|f| {
            let home = f.home.path().to_path_buf();
            ctl(
                &home.join("certs"),
                &home,
                0,
                "ci",
                &["request", "echo", "--for", "5m", "--reason", "back"],
            )
        })?;
        if out.status.success() {
            print_output(&out);
            back = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !back {
        return Err("requests never worked again".into());
    }
    Ok(())
}
