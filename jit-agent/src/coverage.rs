//! What a configured destination covers in the kernel: every path a packet can take to the
//! service. Pure functions of the configuration and the node's addresses; `kernel_sync` writes
//! the result.
//!
//! - `*`, `0.0.0.0` or `[::]`: every destination address of both families (a dual-stack socket
//!   answers on both).
//! - An address of this node: the port on every address of the node, both families, link-local
//!   included, and on broadcast and multicast destinations (most servers listen on every
//!   address, so naming one of them must not leave the others open).
//! - Any other address (a pod or VM behind the node, a VIP routed to it): that address.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use jit_common::{V4_BROADCAST, V6_MULTICAST};

use crate::{
    config::{Config, Service},
    local_addrs::LocalAddrs,
    spec::{Mode, Protocol, ServiceDest},
};

/// One kernel destination of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Covered {
    /// Destination as the kernel holds it (an unspecified address is its family's wildcard).
    pub dest: ServiceDest,
    /// The service.
    pub service: String,
    /// Its mode.
    pub mode: Mode,
}

/// Two services that cover the same kernel destination; the first (in name order) keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    /// The shared destination.
    pub dest: ServiceDest,
    /// The service that keeps it.
    pub kept: String,
    /// The service that loses it there.
    pub dropped: String,
}

/// The addresses a destination address stands for.
fn addresses(addr: IpAddr, local: &LocalAddrs) -> Vec<IpAddr> {
    if addr.is_unspecified() {
        return vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ];
    }
    if !local.contains(addr) {
        return vec![addr.to_canonical()];
    }
    let mut out: Vec<IpAddr> = vec![addr.to_canonical()];
    out.extend(local.unicast.iter().copied());
    out.extend(local.remembered.iter().copied());
    out.extend(local.broadcast.iter().copied());
    out.push(IpAddr::V4(Ipv4Addr::from(V4_BROADCAST)));
    out.push(IpAddr::V6(Ipv6Addr::from(V6_MULTICAST)));
    out
}

/// The kernel destinations of one service, each marked whether the configuration names it
/// as it is (`true`) or it was spread to it from a node address (`false`).
fn service_dests(service: &Service, local: &LocalAddrs) -> Vec<(ServiceDest, bool)> {
    let mut out: Vec<(ServiceDest, bool)> = Vec::new();
    for d in &service.destinations {
        let named = d.addr.to_canonical();
        for addr in addresses(d.addr, local) {
            let dest = ServiceDest {
                addr,
                port: d.port,
                proto: d.proto,
            };
            let explicit = addr == named || addr.is_unspecified();
            match out.iter_mut().find(|(x, _)| *x == dest) {
                Some((_, e)) => *e |= explicit,
                None => out.push((dest, explicit)),
            }
        }
    }
    out
}

/// Every kernel destination of every configured service, and the overlaps. An address a service
/// names itself beats one another service's destination was spread to (so a grant for one
/// service never opens the address another service names); between two spread ones the first
/// service by name keeps it. A service on a node address also takes that port from a `*`
/// service on every node address (exact keys win in the kernel): reported as an overlap.
#[must_use]
pub fn expand(cfg: &Config, local: &LocalAddrs) -> (Vec<Covered>, Vec<Overlap>) {
    let mut owner: BTreeMap<ServiceDest, (Covered, bool)> = BTreeMap::new();
    let mut overlaps = Vec::new();
    for service in cfg.services.values() {
        for (dest, explicit) in service_dests(service, local) {
            let this = Covered {
                dest,
                service: service.name.clone(),
                mode: service.mode,
            };
            match owner.get(&dest) {
                Some((kept, kept_explicit)) => {
                    let replace = explicit && !kept_explicit;
                    let (winner, loser) = if replace {
                        (service.name.clone(), kept.service.clone())
                    } else {
                        (kept.service.clone(), service.name.clone())
                    };
                    overlaps.push(Overlap {
                        dest,
                        kept: winner,
                        dropped: loser,
                    });
                    if replace {
                        owner.insert(dest, (this, explicit));
                    }
                }
                None => {
                    owner.insert(dest, (this, explicit));
                }
            }
        }
    }
    // Exact destinations shadow another service's wildcard on the same port.
    for (c, _) in owner.values() {
        if c.dest.addr.is_unspecified() {
            continue;
        }
        let wildcard = owner.values().find(|(w, _)| {
            w.dest.addr.is_unspecified()
                && w.dest.addr.is_ipv4() == c.dest.addr.is_ipv4()
                && w.dest.port == c.dest.port
                && w.dest.proto == c.dest.proto
                && w.service != c.service
        });
        if let Some((w, _)) = wildcard {
            overlaps.push(Overlap {
                dest: c.dest,
                kept: c.service.clone(),
                dropped: w.service.clone(),
            });
        }
    }
    (owner.into_values().map(|(c, _)| c).collect(), overlaps)
}

/// A listening socket of this node that a configured port leaves reachable around the gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    /// The socket's local address and port.
    pub socket: std::net::SocketAddr,
    /// Its protocol.
    pub proto: Protocol,
    /// Services that name this port, none of which covers the addresses below.
    pub services: Vec<String>,
    /// Node addresses on which the socket answers and no service covers the port.
    pub open_on: Vec<IpAddr>,
}

/// Listening sockets on ports a service names, reachable on node addresses the services leave
/// open (for example a service named by an address that is not this node's, while the server
/// listens on every address).
#[must_use]
pub fn exposures(
    cfg: &Config,
    local: &LocalAddrs,
    sockets: &[(std::net::SocketAddr, Protocol)],
) -> Vec<Exposure> {
    let (covered, _) = expand(cfg, local);
    let mut out = Vec::new();
    for (sock, proto) in sockets {
        let on_port: Vec<&Covered> = covered
            .iter()
            .filter(|c| c.dest.port == sock.port() && c.dest.proto == *proto)
            .collect();
        if on_port.is_empty() {
            continue;
        }
        let ip = sock.ip().to_canonical();
        // A socket on a wildcard address answers on every address; on [::] on both families.
        let reachable: Vec<IpAddr> = local
            .unicast
            .iter()
            .copied()
            .filter(|a| {
                if ip.is_unspecified() {
                    ip.is_ipv6() || a.is_ipv4()
                } else {
                    *a == ip
                }
            })
            .filter(|a| !a.is_loopback())
            .collect();
        let covers = |a: &IpAddr| {
            on_port.iter().any(|c| {
                c.dest.addr == *a
                    || (c.dest.addr.is_unspecified() && c.dest.addr.is_ipv4() == a.is_ipv4())
            })
        };
        let open_on: Vec<IpAddr> = reachable.into_iter().filter(|a| !covers(a)).collect();
        if !open_on.is_empty() {
            let mut services: Vec<String> = on_port.iter().map(|c| c.service.clone()).collect();
            services.dedup();
            out.push(Exposure {
                socket: *sock,
                proto: *proto,
                services,
                open_on,
            });
        }
    }
    out
}

/// Warnings about this node (read now): services that overlap on its addresses, and listening
/// sockets the configuration leaves reachable around the gate. Sockets of other network
/// namespaces (containers) are not visible here.
#[must_use]
pub fn node_warnings(cfg: &Config) -> Vec<String> {
    let local = match LocalAddrs::read() {
        Ok(l) => l,
        Err(e) => return vec![format!("cannot read this node's addresses: {e}")],
    };
    let mut out = Vec::new();
    let (_, overlaps) = expand(cfg, &local);
    for o in overlaps {
        out.push(format!(
            "services {:?} and {:?} both cover {}/{} on this node; {:?} keeps it",
            o.kept,
            o.dropped,
            std::net::SocketAddr::new(o.dest.addr, o.dest.port),
            o.dest.proto,
            o.kept
        ));
    }
    match listening_sockets() {
        Ok(sockets) => {
            for e in exposures(cfg, &local, &sockets) {
                let open: Vec<String> = e.open_on.iter().map(ToString::to_string).collect();
                out.push(format!(
                    "{}/{} listens on this node and is reachable ungated at {}: service(s) {} \
                     name this port only at other addresses (name one of this node's addresses \
                     or * to cover every path)",
                    e.socket,
                    e.proto,
                    open.join(", "),
                    e.services.join(", ")
                ));
            }
        }
        Err(e) => out.push(format!("cannot read the socket tables: {e}")),
    }
    out
}

/// Listening TCP sockets and bound UDP sockets of the caller's network namespace, from the
/// kernel's socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`).
pub fn listening_sockets() -> std::io::Result<Vec<(std::net::SocketAddr, Protocol)>> {
    let mut out = Vec::new();
    for (file, proto, v6) in [
        ("/proc/net/tcp", Protocol::Tcp, false),
        ("/proc/net/tcp6", Protocol::Tcp, true),
        ("/proc/net/udp", Protocol::Udp, false),
        ("/proc/net/udp6", Protocol::Udp, true),
    ] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6/udp6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) =
                (fields.nth(1), fields.next(), fields.next())
            else {
                continue;
            };
            // TCP_LISTEN is 0A; an unconnected UDP socket is TCP_CLOSE (07).
            let wanted = match proto {
                Protocol::Tcp => "0A",
                Protocol::Udp => "07",
            };
            if state != wanted {
                continue;
            }
            if let Some(sa) = parse_proc_addr(local, v6) {
                out.push((sa, proto));
            }
        }
    }
    out.sort_by_key(|(sa, p)| (*p, sa.port(), sa.ip()));
    out.dedup();
    Ok(out)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): addresses are written as
/// native-endian 32-bit words.
fn parse_proc_addr(s: &str, v6: bool) -> Option<std::net::SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))
    } else {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))
    };
    Some(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalAddrs {
        let mut l = LocalAddrs::default();
        for a in ["10.0.5.1", "10.0.6.1", "fd00::1", "fe80::1"] {
            l.unicast.insert(a.parse().unwrap());
        }
        l.broadcast.insert("10.0.5.255".parse().unwrap());
        l
    }

    #[test]
    fn a_local_address_covers_every_local_address_and_broadcast() {
        let all = addresses("10.0.5.1".parse().unwrap(), &local());
        for a in [
            "10.0.6.1",
            "fd00::1",
            "fe80::1",
            "10.0.5.255",
            "255.255.255.255",
            "ff02::1",
        ] {
            assert!(
                all.contains(&a.parse().unwrap()),
                "{a} missing from {all:?}"
            );
        }
    }

    #[test]
    fn a_remote_address_covers_itself_and_wildcards_cover_both_families() {
        assert_eq!(
            addresses("10.9.9.9".parse().unwrap(), &local()),
            vec!["10.9.9.9".parse::<IpAddr>().unwrap()]
        );
        let any = addresses("0.0.0.0".parse().unwrap(), &local());
        assert_eq!(any.len(), 2);
        assert!(any.iter().any(IpAddr::is_ipv6));
    }

    fn config(services: &str) -> Config {
        let text =
            format!("[tls]\nca='x'\ncert='x'\nkey='x'\n[policy]\nfile='p.cedar'\n{services}");
        Config::from_text(
            std::path::Path::new("t.toml"),
            &text,
            &crate::config::Overrides::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_named_address_beats_one_spread_to_it() {
        // Two daemons on one port, each bound to one node address.
        let cfg = config(
            "[[services]]\nname='a'\ndestinations=['10.0.5.1:22/tcp']\n\
             [[services]]\nname='b'\ndestinations=['10.0.6.1:22/tcp']\n",
        );
        let (covered, overlaps) = expand(&cfg, &local());
        let owner = |a: &str| {
            covered
                .iter()
                .find(|c| c.dest.addr == a.parse::<IpAddr>().unwrap())
                .map(|c| c.service.clone())
        };
        assert_eq!(owner("10.0.5.1").as_deref(), Some("a"));
        assert_eq!(owner("10.0.6.1").as_deref(), Some("b"), "b names it");
        assert!(!overlaps.is_empty());
    }

    #[test]
    fn a_node_address_service_shadowing_a_wildcard_is_reported() {
        let cfg = config(
            "[[services]]\nname='any'\ndestinations=['*:22/tcp']\n\
             [[services]]\nname='node'\ndestinations=['10.0.5.1:22/tcp']\n",
        );
        let (_, overlaps) = expand(&cfg, &local());
        assert!(
            overlaps
                .iter()
                .any(|o| o.kept == "node" && o.dropped == "any")
        );
    }

    #[test]
    fn a_service_address_that_leaves_the_node_is_still_covered_everywhere() {
        let before = local();
        let mut now = local();
        now.unicast.remove(&"10.0.5.1".parse::<IpAddr>().unwrap());
        let now = now.after(&before, ["10.0.5.1".parse::<IpAddr>().unwrap()]);
        assert!(addresses("10.0.5.1".parse().unwrap(), &now).len() > 2);
    }

    #[test]
    fn proc_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90", false),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000000000000:0050", true),
            Some("[::]:80".parse().unwrap())
        );
    }
}
