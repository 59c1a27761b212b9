//! Crafted Ethernet frames for verdict tests.

use std::net::IpAddr;

/// 802.1Q customer tag.
pub const TPID_8021Q: u16 = 0x8100;
/// 802.1ad service tag.
pub const TPID_8021AD: u16 = 0x88A8;

/// An IPv6 extension header to put before the L4 header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options, `extra` 8-byte units beyond the first 8 bytes.
    HopByHop(u8),
    /// Routing header, `extra` 8-byte units beyond the first 8.
    Routing(u8),
    /// Destination options, `extra` 8-byte units beyond the first 8.
    DestOpts(u8),
    /// Fragment header with this offset (in 8-byte units) and more-fragments flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header with this payload-length field (4-byte units less 2).
    Ah(u8),
    /// Encapsulating security payload: everything after it is opaque.
    Esp,
}

impl Ext {
    const fn number(self) -> u8 {
        match self {
            Self::HopByHop(_) => 0,
            Self::Routing(_) => 43,
            Self::DestOpts(_) => 60,
            Self::Fragment { .. } => 44,
            Self::Ah(_) => 51,
            Self::Esp => 50,
        }
    }
}

/// A packet to build: Ethernet, VLAN tags, IPv4 or IPv6, then TCP or UDP (or another protocol
/// with an empty L4 header).
#[derive(Clone, Debug)]
pub struct Packet {
    /// TPIDs of the VLAN tags, outermost first.
    pub vlans: Vec<u16>,
    /// Source address (its family decides IPv4 or IPv6).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol of the L4 header.
    pub proto: u8,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IPv4 options, in 4-byte words (0-10).
    pub ipv4_option_words: u8,
    /// IPv4 flags and fragment offset field.
    pub ipv4_frag: u16,
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<Ext>,
    /// Bytes after the L4 header.
    pub payload: Vec<u8>,
}

impl Packet {
    /// A TCP SYN-sized packet from `src` to `dst:dport`.
    #[must_use]
    pub fn tcp(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self {
            vlans: Vec::new(),
            src,
            dst,
            proto: 6,
            sport: 40_000,
            dport,
            ipv4_option_words: 0,
            ipv4_frag: 0,
            ipv6_ext: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A UDP packet from `src` to `dst:dport`.
    #[must_use]
    pub fn udp(src: IpAddr, dst: IpAddr, dport: u16) -> Self {
        Self {
            proto: 17,
            payload: vec![0xab; 8],
            ..Self::tcp(src, dst, dport)
        }
    }

    /// Builds the frame.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // destination MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // source MAC
        for tpid in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x64]); // TCI: VLAN 100
        }
        let l4 = self.l4();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 5 + self.ipv4_option_words;
                let total = usize::from(ihl) * 4 + l4.len();
                f.push(0x40 | ihl);
                f.push(0);
                f.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]); // id
                f.extend_from_slice(&self.ipv4_frag.to_be_bytes());
                f.push(64);
                f.push(self.proto);
                f.extend_from_slice(&[0, 0]); // checksum (not checked by the gate)
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                // Options: NOPs ending in an end-of-list.
                for _ in 0..self.ipv4_option_words {
                    f.extend_from_slice(&[1, 1, 1, 1]);
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86DDu16.to_be_bytes());
                let mut ext = Vec::new();
                for (i, e) in self.ipv6_ext.iter().enumerate() {
                    let next = self.ipv6_ext.get(i + 1).map_or(self.proto, |n| n.number());
                    match *e {
                        Ext::HopByHop(extra) | Ext::Routing(extra) | Ext::DestOpts(extra) => {
                            ext.push(next);
                            ext.push(extra);
                            ext.resize(ext.len() + 6 + usize::from(extra) * 8, 0);
                        }
                        Ext::Fragment { offset, more } => {
                            ext.push(next);
                            ext.push(0);
                            ext.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                            ext.extend_from_slice(&[0, 0, 0, 1]);
                        }
                        Ext::Ah(len) => {
                            ext.push(next);
                            ext.push(len);
                            ext.resize(ext.len() + (usize::from(len) + 2) * 4 - 2, 0);
                        }
                        Ext::Esp => {
                            ext.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
                        }
                    }
                }
                let first = self.ipv6_ext.first().map_or(self.proto, |e| e.number());
                let payload_len = ext.len() + l4.len();
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&u16::try_from(payload_len).unwrap_or(u16::MAX).to_be_bytes());
                f.push(first);
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be of one family"),
        }
        f.extend_from_slice(&l4);
        f
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            6 => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                l4.push(5 << 4); // data offset
                l4.push(0x02); // SYN
                l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
            }
            17 => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                let len = 8 + self.payload.len();
                l4.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

/// An ARP request frame (non-IP).
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.resize(42, 0);
    f
}
