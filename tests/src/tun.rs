//! A tun device in a test namespace, with its queue open: what the test writes arrives at the
//! device as received packets (an L3 device: packets start at the IP header).

use std::{io::Write as _, net::Ipv4Addr, os::fd::FromRawFd as _};

use crate::{frames::Packet, netns::Netns};

/// A tun device `name` in a namespace, addressed and up.
pub struct Tun {
    file: std::fs::File,
    /// Its name.
    pub name: String,
}

impl Tun {
    /// Creates `name` in `ns` with address `cidr` (e.g. `10.77.0.1/24`) and opens its queue.
    #[must_use]
    pub fn create(ns: &Netns, name: &str, cidr: &str) -> Self {
        ns.exec_ip(&["tuntap", "add", "dev", name, "mode", "tun"]);
        ns.exec_ip(&["addr", "add", cidr, "dev", name]);
        ns.exec_ip(&["link", "set", name, "up"]);
        let dev = name.to_string();
        let file = ns.run(move || open_queue(&dev));
        Self {
            file,
            name: name.to_string(),
        }
    }

    /// Writes an IPv4/UDP packet (valid header checksum) into the device.
    pub fn send_udp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, port: u16) {
        let mut frame = Packet::udp(src.into(), dst.into(), port).build();
        let mut packet = frame.split_off(14); // no Ethernet header on a tun device
        let csum = ipv4_checksum(&packet[..20]);
        packet[10..12].copy_from_slice(&csum.to_be_bytes());
        self.file
            .write_all(&packet)
            .unwrap_or_else(|e| panic!("writing to {}: {e}", self.name));
    }
}

fn open_queue(dev: &str) -> std::fs::File {
    // SAFETY: plain open/ioctl on a fresh descriptor that the File then owns.
    unsafe {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
        let file = std::fs::File::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(dev.as_bytes()) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::TUNSETIFF, &raw mut req),
            0,
            "TUNSETIFF {dev}: {}",
            std::io::Error::last_os_error()
        );
        file
    }
}

/// The RFC 1071 checksum of an IPv4 header.
#[must_use]
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}
