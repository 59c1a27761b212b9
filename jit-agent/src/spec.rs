//! What the gate is asked to protect and how, as plain values: transport protocols, destinations,
//! enforcement modes, attach modes. Configuration and the command line parse them; the datapath
//! turns them into map entries and links. Nothing here touches the kernel.

use std::{fmt, net::IpAddr, str::FromStr};

/// A word that names none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}; expected {expected}")]
pub struct UnknownWord {
    /// What was given.
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

/// An enum whose values are written as words: the words are defined once, in the invocation,
/// and give `Display`, `FromStr` and serde.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident, $expected:literal { $($(#[$vmeta:meta])* $variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The value's word.
            #[must_use]
            pub const fn word(self) -> &'static str {
                match self {
                    $(Self::$variant => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($word => Ok(Self::$variant),)+
                    _ => Err(UnknownWord { value: s.to_string(), expected: $expected }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.word())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

word_enum! {
    /// A transport protocol the gate can protect.
    Protocol, "tcp or udp" {
        /// TCP.
        Tcp => "tcp",
        /// UDP.
        Udp => "udp",
    }
}

word_enum! {
    /// How a service treats packets without a live grant.
    Mode, "enforce or audit" {
        /// Drop them.
        Enforce => "enforce",
        /// Count and report them, then pass them.
        Audit => "audit",
    }
}

word_enum! {
    /// Where and how the gate is attached.
    AttachMode, "auto, xdp, xdp-generic, xdp-native or tc" {
        /// The default: on an Ethernet NIC (a device on a bus, physical or a VM's), native XDP
        /// (sheds floods before any socket buffer exists) and TC (sees the packets native XDP
        /// never does: re-injected into the device's receive path, as IPsec tunnel mode's
        /// decrypted ones); on veth, bridges, bonds, VLANs, tunnels and other virtual devices,
        /// TC only (native XDP on a veth turns off its peer's TSO, which cut granted TCP
        /// throughput to under 0.2x in `cargo xtask bench`; generic XDP copies packets that are not
        /// linear). Native XDP that fails is left out; TC that fails (no TCX before kernel 6.6)
        /// gives way to generic XDP.
        Auto => "auto",
        /// XDP, native where the driver supports it, generic otherwise.
        Xdp => "xdp",
        /// XDP in generic (skb) mode only.
        XdpGeneric => "xdp-generic",
        /// XDP in native (driver) mode only; fails where the driver has no XDP support.
        XdpNative => "xdp-native",
        /// TC ingress (TCX on kernels ≥ 6.6).
        Tc => "tc",
    }
}

/// A protected destination. An unspecified address (`0.0.0.0` or `::`) matches every destination
/// address of that family arriving on an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceDest {
    /// Destination address, or unspecified for any.
    pub addr: IpAddr,
    /// Destination port, 1-65535.
    pub port: u16,
    /// Transport protocol.
    pub proto: Protocol,
}

impl fmt::Display for ServiceDest {
    /// `10.0.0.5:5432/tcp`, `[fd00::5]:443/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            std::net::SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

/// A name the kernel would refuse for a network interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid interface name")]
pub struct BadInterfaceName(pub String);

/// Checks that `iface` is a well-formed interface name (it may not exist yet). Besides matching
/// the kernel, this keeps link pin paths inside the pin directory.
pub fn check_interface_name(iface: &str) -> Result<(), BadInterfaceName> {
    // The kernel's rules (dev_valid_name): 1-15 bytes, not "." or "..", no '/', ':' or space.
    if iface.is_empty()
        || iface.len() > 15
        || iface == "."
        || iface == ".."
        || iface.contains(['/', ':'])
        || iface.chars().any(char::is_whitespace)
    {
        return Err(BadInterfaceName(iface.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_unknown_ones_say_what_is_expected() {
        for mode in [
            AttachMode::Auto,
            AttachMode::Xdp,
            AttachMode::XdpGeneric,
            AttachMode::XdpNative,
            AttachMode::Tc,
        ] {
            assert_eq!(mode.to_string().parse::<AttachMode>().ok(), Some(mode));
        }
        let err = "xdp-offload".parse::<AttachMode>().unwrap_err().to_string();
        assert!(err.contains("xdp-offload") && err.contains("tc"), "{err}");
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("TCP".parse::<Protocol>().is_err(), "words are lowercase");
        assert_eq!(Mode::Audit.to_string(), "audit");
        let d = ServiceDest {
            addr: "fd00::5".parse().expect("addr"),
            port: 443,
            proto: Protocol::Tcp,
        };
        assert_eq!(d.to_string(), "[fd00::5]:443/tcp");
    }
}
