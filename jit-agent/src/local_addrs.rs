//! The node's own addresses: what "a service on a local address" covers. Read with
//! `getifaddrs` (every address of every interface in the agent's network namespace, both
//! families, with IPv4 subnet broadcasts), and followed over rtnetlink: any address change
//! re-reads the set.

use std::{collections::BTreeSet, net::IpAddr, os::fd::AsRawFd as _};

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

/// The addresses packets to this node may carry as their destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// Unicast addresses of every interface, both families (link-local included).
    pub unicast: BTreeSet<IpAddr>,
    /// Other destinations the node may accept: IPv4 subnet broadcast and network addresses, IPv6
    /// subnet-router anycast addresses.
    pub broadcast: BTreeSet<IpAddr>,
    /// Configured service addresses that were the node's once and are not any more: they keep
    /// counting as the node's, so a service's coverage never shrinks while the agent runs.
    pub remembered: BTreeSet<IpAddr>,
}

impl LocalAddrs {
    /// Reads the addresses of every interface of the caller's network namespace.
    pub fn read() -> std::io::Result<Self> {
        let mut out = Self::default();
        for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
            if let Some(ip) = ifa.address.as_ref().and_then(ip_of) {
                out.unicast.insert(ip);
                if let Some(net) = ifa
                    .netmask
                    .as_ref()
                    .and_then(ip_of)
                    .and_then(|mask| ipnet::IpNet::with_netmask(ip, mask).ok())
                    && net.prefix_len() + 1 < net.max_prefix_len()
                {
                    // The subnet's own address: IPv6 subnet-router anycast, and on older
                    // kernels an IPv4 broadcast.
                    out.broadcast.insert(net.network());
                }
            }
            if let Some(ip) = ifa.broadcast.as_ref().and_then(ip_of)
                && ip.is_ipv4()
                && !ip.is_unspecified()
            {
                out.broadcast.insert(ip);
            }
        }
        Ok(out)
    }

    /// Whether `addr` is (or, for a remembered service address, was) one of the node's own
    /// addresses.
    #[must_use]
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.unicast.contains(&addr) || self.remembered.contains(&addr)
    }

    /// `self` as the next set after `previous`, remembering the configured addresses in `named`
    /// that `previous` counted as the node's and `self` does not.
    #[must_use]
    pub fn after(mut self, previous: &Self, named: impl IntoIterator<Item = IpAddr>) -> Self {
        for addr in named {
            if previous.contains(addr) && !self.unicast.contains(&addr.to_canonical()) {
                self.remembered.insert(addr.to_canonical());
            }
        }
        self
    }
}

fn ip_of(sa: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = sa.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// rtnetlink multicast groups of link changes and of IPv4 and IPv6 address changes.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Calls `changed` with the address set after every change of the node's links or addresses
/// (a recreated device shows up here too), until the netlink socket fails. Blocking: run it on a thread of its own. The first call reports the
/// set as it is when the subscription is in place, so no change between a caller's first read and
/// the subscription is missed.
pub fn follow(mut changed: impl FnMut(LocalAddrs)) -> std::io::Result<()> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        sock.as_raw_fd(),
        &NetlinkAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
    )?;
    changed(LocalAddrs::read()?);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            Ok(_) => {}
            // Overrun: changes were lost, which a fresh read covers.
            Err(nix::errno::Errno::ENOBUFS) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        // Drain what else is queued, then read the whole set once.
        while let Ok(n) = recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            if n == 0 {
                break;
            }
        }
        tracing::debug!("rtnetlink: links or addresses changed");
        changed(LocalAddrs::read()?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local() {
        let addrs = LocalAddrs::read().expect("getifaddrs");
        assert!(addrs.contains("127.0.0.1".parse().unwrap()), "{addrs:?}");
        assert!(addrs.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!addrs.contains("192.0.2.77".parse().unwrap()));
    }
}
