//! End to end: the gate attached (XDP, then TC) to the server's end of a veth pair between two
//! network namespaces, real TCP connections from the client namespace.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use jit_agent::datapath::{
    self, DeviceKind, Gate, GateMaps, GrantScope, LoadOptions, boottime_after, boottime_ns,
    grant_key,
};
use jit_agent::spec::{AttachMode, Mode, Protocol, ServiceDest};
use jit_tests::{
    PinDirGuard,
    echo::{EchoServer, round_trip},
    fixtures,
    netns::{CLIENT_V4, CLIENT_V6, Link, Netns, SERVER_V4, SERVER_V6},
    require_root, unique,
};

const PORT: u16 = 8443;
const SERVICE: u32 = 1;
const SERVICE_V6: u32 = 2;
const CLIENT: u32 = 5;
const CONNECT: Duration = Duration::from_millis(1500);
const ECHO: Duration = Duration::from_secs(2);
const CUT: Duration = Duration::from_millis(1500);

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("address"), port)
}

fn connect(ns: &Netns, to: SocketAddr) -> Option<TcpStream> {
    ns.run(move || TcpStream::connect_timeout(&to, CONNECT).ok())
}

fn grant_for(maps: &mut GateMaps, identity_id: u32, service_id: u32, d: Duration) {
    maps.put_grant(fixtures::grant_between(
        GrantScope::Identity,
        identity_id,
        service_id,
        42,
        boottime_ns().expect("clock"),
        boottime_after(d).expect("clock"),
    ))
    .expect("grant");
}

fn protect(maps: &mut GateMaps) {
    maps.add_service(
        ServiceDest {
            addr: SERVER_V4.parse().expect("address"),
            port: PORT,
            proto: Protocol::Tcp,
        },
        SERVICE,
        Mode::Enforce,
    )
    .expect("service");
    maps.add_service(
        ServiceDest {
            addr: SERVER_V6.parse().expect("address"),
            port: PORT,
            proto: Protocol::Tcp,
        },
        SERVICE_V6,
        Mode::Enforce,
    )
    .expect("service");
    maps.bind_identity(
        format!("{CLIENT_V4}/32").parse::<IpNet>().expect("net"),
        CLIENT,
    )
    .expect("identity");
    maps.bind_identity(
        format!("{CLIENT_V6}/128").parse::<IpNet>().expect("net"),
        CLIENT,
    )
    .expect("identity");
}

fn load(pin_dir: &std::path::Path) -> Gate {
    Gate::load(&LoadOptions {
        pin_dir: pin_dir.to_path_buf(),
        max_grants: 1024,
    })
    .expect("loading the gate")
}

/// The whole story in one attach mode: dropped without a grant, passes with one, an established
/// connection is cut when the grant is deleted, and an expired grant blocks new connections and
/// cuts live ones.
fn story(mode: AttachMode) {
    let link = Link::new();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-e2e-")));
    let _pins = PinDirGuard(pin_dir.clone());
    let mut gate = load(&pin_dir);
    let iface = link.server_if.clone();
    link.server
        .run(|| gate.attach(&iface, mode))
        .unwrap_or_else(|e| panic!("attaching in {mode} mode: {e}"));
    let mut maps = GateMaps::open(&pin_dir).expect("maps");
    protect(&mut maps);
    let _server4 = EchoServer::start(&link.server, addr(SERVER_V4, PORT));
    let _server6 = EchoServer::start(&link.server, addr(SERVER_V6, PORT));
    let to4 = addr(SERVER_V4, PORT);
    let to6 = addr(SERVER_V6, PORT);

    // No grant: the SYN is dropped, the connection times out.
    assert!(
        connect(&link.client, to4).is_none(),
        "{mode}: connected without a grant"
    );
    assert!(
        connect(&link.client, to6).is_none(),
        "{mode}: IPv6 connected without a grant"
    );
    let counters = maps.counters().expect("counters");
    assert!(counters.global["no_grant"] > 0, "{counters:?}");

    // A grant opens the service.
    grant_for(&mut maps, CLIENT, SERVICE, Duration::from_secs(600));
    let mut conn =
        connect(&link.client, to4).unwrap_or_else(|| panic!("{mode}: granted, no connection"));
    assert!(round_trip(&mut conn, b"hello", ECHO), "{mode}: echo failed");
    assert!(
        connect(&link.client, to6).is_none(),
        "{mode}: the v4 grant's service is not the v6 one"
    );

    // Deleting the grant cuts the established connection at its next packet.
    assert!(
        maps.delete_grant(&grant_key(GrantScope::Identity, CLIENT, SERVICE))
            .expect("delete")
    );
    assert!(
        !round_trip(&mut conn, b"after revoke", CUT),
        "{mode}: data still flows after the grant was deleted"
    );
    assert!(
        connect(&link.client, to4).is_none(),
        "{mode}: reconnected after revoke"
    );

    // IPv6 with its own grant; then expiry, enforced by the kernel with no one deleting anything.
    grant_for(&mut maps, CLIENT, SERVICE_V6, Duration::from_secs(3));
    let mut conn6 =
        connect(&link.client, to6).unwrap_or_else(|| panic!("{mode}: v6 granted, no connection"));
    assert!(
        round_trip(&mut conn6, b"v6", ECHO),
        "{mode}: v6 echo failed"
    );
    std::thread::sleep(Duration::from_millis(3200));
    assert!(
        !round_trip(&mut conn6, b"after expiry", CUT),
        "{mode}: data still flows after the grant expired"
    );
    assert!(
        connect(&link.client, to6).is_none(),
        "{mode}: connected with an expired grant"
    );
    let counters = maps.counters().expect("counters");
    assert!(counters.global["expired"] > 0, "{counters:?}");
    assert!(counters.global["allowed"] > 0, "{counters:?}");
}

#[test]
#[ignore = "needs root"]
fn xdp_end_to_end() {
    if !require_root() {
        return;
    }
    story(AttachMode::Xdp);
}

#[test]
#[ignore = "needs root"]
fn tc_end_to_end() {
    if !require_root() {
        return;
    }
    story(AttachMode::Tc);
}

/// The gate outlives the process that loaded it; a reload swaps the program in place and keeps
/// the grants; only an explicit detach opens the service.
#[test]
#[ignore = "needs root"]
fn enforcement_survives_the_loader_and_reload() {
    if !require_root() {
        return;
    }
    let link = Link::new();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-e2e-")));
    let _pins = PinDirGuard(pin_dir.clone());
    let to4 = addr(SERVER_V4, PORT);
    let _server = EchoServer::start(&link.server, to4);
    let iface = link.server_if.clone();

    let mut first = load(&pin_dir);
    link.server
        .run(|| first.attach(&iface, AttachMode::Xdp))
        .expect("attach");
    drop(first); // the "agent" exits
    let mut maps = GateMaps::open(&pin_dir).expect("maps");
    protect(&mut maps);
    assert!(
        connect(&link.client, to4).is_none(),
        "the gate must enforce with no loader alive"
    );
    grant_for(&mut maps, CLIENT, SERVICE, Duration::from_secs(600));
    let mut conn = connect(&link.client, to4).expect("granted");
    assert!(round_trip(&mut conn, b"one", ECHO));

    // A new "agent" loads again and re-attaches: same pinned maps, program swapped in the link.
    let before = datapath::attachments(&pin_dir).expect("attachments");
    let mut second = load(&pin_dir);
    link.server
        .run(|| second.attach(&iface, AttachMode::Xdp))
        .expect("re-attach");
    let after = datapath::attachments(&pin_dir).expect("attachments");
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].link_id, after[0].link_id, "the link is reused");
    assert_ne!(
        before[0].program_id, after[0].program_id,
        "the program is replaced"
    );
    assert!(
        round_trip(&mut conn, b"two", ECHO),
        "the connection survives the reload"
    );
    assert_eq!(
        GateMaps::open(&pin_dir)
            .expect("maps")
            .grants()
            .expect("grants")
            .len(),
        1
    );

    // Detaching is explicit, and opens the port.
    assert!(
        maps.delete_grant(&grant_key(GrantScope::Identity, CLIENT, SERVICE))
            .expect("delete")
    );
    assert!(connect(&link.client, to4).is_none());
    datapath::detach(&pin_dir, &iface, AttachMode::Xdp).expect("detach");
    assert!(
        datapath::attachments(&pin_dir)
            .expect("attachments")
            .is_empty()
    );
    assert!(connect(&link.client, to4).is_some(), "detached: no gate");
}

/// `auto` (the default): TC on a veth (native XDP there would turn off the peer's TSO); it
/// takes over from an XDP link of the gate's own on the same interface without a gap (a live
/// granted connection keeps flowing, enforcement never stops), and `detach --mode auto` removes
/// whatever the gate has there. A device of a physical driver resolves to native XDP.
#[test]
#[ignore = "needs root"]
fn auto_mode_is_tc_on_a_veth_and_takes_over_from_xdp() {
    if !require_root() {
        return;
    }
    let link = Link::new();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-e2e-")));
    let _pins = PinDirGuard(pin_dir.clone());
    let to4 = addr(SERVER_V4, PORT);
    let _server = EchoServer::start(&link.server, to4);
    let iface = link.server_if.clone();
    let mut gate = load(&pin_dir);
    assert_eq!(
        link.server
            .run(|| datapath::auto_hooks_of(&iface))
            .expect("auto"),
        &[AttachMode::Tc]
    );
    link.server
        .run(|| gate.attach(&iface, AttachMode::Xdp))
        .expect("attach xdp");
    let mut maps = GateMaps::open(&pin_dir).expect("maps");
    protect(&mut maps);
    grant_for(&mut maps, CLIENT, SERVICE, Duration::from_secs(600));
    let mut conn = connect(&link.client, to4).expect("granted");
    assert!(round_trip(&mut conn, b"one", ECHO));

    link.server
        .run(|| gate.attach(&iface, AttachMode::Auto))
        .expect("attach auto");
    let hooks: Vec<String> = datapath::attachments(&pin_dir)
        .expect("attachments")
        .into_iter()
        .map(|a| a.hook)
        .collect();
    assert_eq!(hooks, vec!["tc".to_string()], "auto on a veth is TC only");
    assert!(
        round_trip(&mut conn, b"two", ECHO),
        "the granted connection survives the switch"
    );
    // Still enforcing, now in TC: the grant deleted cuts the live connection.
    assert!(
        maps.delete_grant(&grant_key(GrantScope::Identity, CLIENT, SERVICE))
            .expect("delete")
    );
    assert!(
        !round_trip(&mut conn, b"three", CUT),
        "revoked: the connection is cut in TC mode"
    );
    assert!(connect(&link.client, to4).is_none());
    // Attaching in auto again swaps the program in the same TC link.
    let before = datapath::attachments(&pin_dir).expect("attachments");
    link.server
        .run(|| gate.attach(&iface, AttachMode::Auto))
        .expect("attach auto again");
    let after = datapath::attachments(&pin_dir).expect("attachments");
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].link_id, after[0].link_id);

    datapath::detach(&pin_dir, &iface, AttachMode::Auto).expect("detach auto");
    assert!(
        datapath::attachments(&pin_dir)
            .expect("attachments")
            .is_empty()
    );
    assert!(
        datapath::detach(&pin_dir, &iface, AttachMode::Auto).is_err(),
        "nothing left to detach"
    );

    // The host's own Ethernet NICs (a bus address in sysfs) resolve to native XDP and TC;
    // nothing is attached to them.
    let nics: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|d| datapath::device_kind(d).is_ok_and(|k| k == DeviceKind::Ethernet))
        .collect();
    for dev in &nics {
        assert_eq!(
            datapath::auto_hooks_of(dev).expect("auto"),
            &[AttachMode::XdpNative, AttachMode::Tc],
            "{dev} is a NIC"
        );
    }
}

/// Problem 3 of datapath v2: in TC mode the gate goes first in the TCX chain, so a neighbour that
/// passes everything ("ok", as a CNI might) cannot blind it, and the gate passes with "next", so
/// the neighbours after it still run.
#[test]
#[ignore = "needs root"]
fn tc_mode_is_a_good_neighbour_in_the_tcx_chain() {
    use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
    if !require_root() {
        return;
    }
    let link = Link::new();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-e2e-")));
    let _pins = PinDirGuard(pin_dir.clone());
    let iface = link.server_if.clone();
    let mut harness = datapath::load_harness().expect("harness programs");
    // Already on the interface before the gate: "next" first, then "ok" at the end.
    for (name, order) in [
        (datapath::harness::TC_OK, LinkOrder::last()),
        (datapath::harness::TC_NEXT, LinkOrder::first()),
    ] {
        let prog: &mut SchedClassifier = harness
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("harness classifier");
        link.server
            .run(|| {
                prog.attach_with_options(
                    &iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(order),
                )
            })
            .unwrap_or_else(|e| panic!("attaching {name}: {e}"));
    }
    let mut gate = load(&pin_dir);
    link.server
        .run(|| gate.attach(&iface, AttachMode::Tc))
        .expect("attaching the gate");
    let mut maps = GateMaps::open(&pin_dir).expect("maps");
    protect(&mut maps);
    let _server = EchoServer::start(&link.server, addr(SERVER_V4, PORT));
    let to4 = addr(SERVER_V4, PORT);
    let seen = |h: &aya::Ebpf| -> (u64, u64) {
        let a: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(h.map("HARNESS_SEEN").expect("map")).expect("array");
        (
            a.get(&0, 0).expect("ok count"),
            a.get(&1, 0).expect("next count"),
        )
    };

    // The "ok" neighbour would pass anything, yet the gate, first, drops it.
    assert!(
        connect(&link.client, to4).is_none(),
        "a neighbour ending the chain blinded the gate"
    );
    // Granted traffic passes the gate with "next": both neighbours after it still see it.
    let before = seen(&harness);
    grant_for(&mut maps, CLIENT, SERVICE, Duration::from_secs(600));
    let mut conn = connect(&link.client, to4).expect("granted connection");
    assert!(round_trip(&mut conn, b"neighbours", ECHO));
    let after = seen(&harness);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "programs after the gate did not run: {before:?} -> {after:?}"
    );
}

/// Problem 4 of datapath v2: a tun device (packets start at the IP header) is gated in TC mode;
/// XDP on it is refused with a reason.
#[test]
#[ignore = "needs root"]
fn an_l3_device_is_gated_in_tc_mode_and_refused_in_xdp() {
    use std::net::UdpSocket;
    if !require_root() {
        return;
    }
    let ns = jit_tests::netns::Netns::new("jits");
    let dev = format!("jt{}", jit_tests::short_tag());
    let mut tun = jit_tests::tun::Tun::create(&ns, &dev, "10.77.0.1/24");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("jit-e2e-")));
    let _pins = PinDirGuard(pin_dir.clone());
    let mut gate = load(&pin_dir);
    let err = ns
        .run(|| gate.attach(&dev, AttachMode::Xdp))
        .expect_err("XDP on a tun device")
        .to_string();
    assert!(
        err.contains("L3 device") && err.contains("--mode tc"),
        "{err}"
    );
    ns.run(|| gate.attach(&dev, AttachMode::Tc))
        .expect("TC on a tun device");
    let mut maps = GateMaps::open(&pin_dir).expect("maps");
    maps.add_service(
        ServiceDest {
            addr: "10.77.0.1".parse().expect("address"),
            port: 9999,
            proto: Protocol::Udp,
        },
        SERVICE,
        Mode::Enforce,
    )
    .expect("service");
    maps.bind_identity("10.77.0.2/32".parse::<IpNet>().expect("net"), CLIENT)
        .expect("identity");
    let sock = ns.run(|| UdpSocket::bind("10.77.0.1:9999").expect("bind"));
    sock.set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    let delivered = |tun: &mut jit_tests::tun::Tun| {
        tun.send_udp([10, 77, 0, 2].into(), [10, 77, 0, 1].into(), 9999);
        let mut buf = [0u8; 64];
        sock.recv(&mut buf).is_ok()
    };
    assert!(
        !delivered(&mut tun),
        "an L3 device let an ungranted packet through"
    );
    let counters = maps.counters().expect("counters");
    assert!(counters.global["no_grant"] > 0, "{counters:?}");
    grant_for(&mut maps, CLIENT, SERVICE, Duration::from_secs(600));
    assert!(delivered(&mut tun), "a granted packet did not arrive");
}
