//! Typed configuration fields: each parses and checks itself while the file is read, so an error
//! names the field it is in (`services[0].max_duration`) and says what is wrong, and validation
//! is left with what spans fields (duplicates, ownership, references).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use jit_api::duration::parse_duration;
use serde::Deserialize;

use crate::spec::{AttachMode, Protocol, ServiceDest};

/// A positive duration written as `15m`, `1h30m`, `90s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        parse_duration(&s).map(Self).map_err(|e| e.to_string())
    }
}

/// A listen address, `0.0.0.0:7443`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Listen(pub SocketAddr);

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
            .map(Self)
            .map_err(|_| format!("{s:?} is not an address:port such as 0.0.0.0:7443"))
    }
}

/// An interface to gate and how: `"eth0"` (auto: native XDP and TC on a NIC, TC only on
/// virtual devices), `"eth0:tc"`, `"eth0:xdp-generic"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Interface {
    /// The interface name.
    pub name: String,
    /// How the gate attaches to it.
    pub mode: AttachMode,
}

impl TryFrom<String> for Interface {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let (name, mode) = s.split_once(':').unwrap_or((s.as_str(), "auto"));
        crate::spec::check_interface_name(name).map_err(|e| e.to_string())?;
        let mode = mode.parse().map_err(|e| format!("attach mode {e}"))?;
        Ok(Self {
            name: name.to_string(),
            mode,
        })
    }
}

/// A protected destination (see [`parse_destination`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Destination(pub ServiceDest);

impl TryFrom<String> for Destination {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        parse_destination(&s).map(Self)
    }
}

/// A static source prefix, in its canonical form (see [`canonical_prefix`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Prefix(pub IpNet);

impl TryFrom<String> for Prefix {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR such as 10.1.0.0/24 or fd00::/64"))?;
        canonical_prefix(net).map(Self)
    }
}

/// A SPIFFE ID, `spiffe://trust-domain/path`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SpiffeId(pub String);

impl TryFrom<String> for SpiffeId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        crate::identity::check_spiffe_id(&s)?;
        Ok(Self(s))
    }
}

/// A group member: a SPIFFE ID, a prefix of one ending in `*`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Member(pub String);

impl TryFrom<String> for Member {
    type Error = String;

    fn try_from(p: String) -> Result<Self, String> {
        let base = p.strip_suffix('*').unwrap_or(&p);
        if p != "*" && !base.starts_with("spiffe://") {
            return Err(format!(
                "{p:?}: expected a SPIFFE ID (spiffe://...), a prefix ending in '*', or '*'"
            ));
        }
        Ok(Self(p))
    }
}

/// A webhook URL (`http://` or `https://`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HookUrl(pub String);

impl TryFrom<String> for HookUrl {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s.starts_with("http://") || s.starts_with("https://") {
            Ok(Self(s))
        } else {
            Err(format!("{s:?} is not an http(s) URL"))
        }
    }
}

/// What a webhook's body looks like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookFormat {
    /// The `jit.v1.Notification` message as JSON.
    #[default]
    Json,
    /// `{"text": "..."}` for a Slack incoming webhook.
    Slack,
}

/// A source prefix in the one form the kernel's trie and the ownership checks share: an
/// IPv4-mapped IPv6 prefix (`::ffff:10.0.0.0/104`) becomes the IPv4 prefix it is (`10.0.0.0/8`);
/// an IPv6 prefix that contains the whole IPv4-mapped range (`::/0`, `::/80`) is refused, since in
/// the trie it would also match every IPv4 source.
pub fn canonical_prefix(net: IpNet) -> Result<IpNet, String> {
    let net = net.trunc();
    let IpNet::V6(v6) = net else {
        return Ok(net);
    };
    if v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
            .map(|n| n.trunc())
            .map_err(|e| format!("{net}: {e}"));
    }
    let mapped = IpNet::new(
        IpAddr::V6(std::net::Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0, 0])),
        96,
    )
    .map_err(|e| e.to_string())?;
    if net.contains(&mapped) {
        return Err(format!(
            "{net} contains the IPv4-mapped range ::ffff:0:0/96 and would also match every IPv4 \
             source; name IPv6 prefixes that leave it out (e.g. 2000::/3, fc00::/7) and IPv4 \
             prefixes separately"
        ));
    }
    Ok(net)
}

/// Parses `"addr:port/proto"`; `[v6]:port/proto` for IPv6; `*:port/proto` for every address of
/// both families. An unspecified address (`0.0.0.0`, `[::]`) also means every address of both
/// families, and is returned as `0.0.0.0`.
pub fn parse_destination(s: &str) -> Result<ServiceDest, String> {
    let (hostport, proto) = s
        .rsplit_once('/')
        .ok_or_else(|| format!("{s:?}: expected address:port/proto, e.g. 10.0.0.5:5432/tcp"))?;
    let proto: Protocol = proto
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| format!("{s:?}: protocol {e}"))?;
    let sa: SocketAddr = match hostport.strip_prefix("*:") {
        Some(port) => format!("0.0.0.0:{port}").parse(),
        None => hostport.parse(),
    }
    .map_err(|_| {
        format!("{s:?}: {hostport:?} is not address:port ([addr]:port for IPv6, *:port for any)")
    })?;
    if sa.port() == 0 {
        return Err(format!("{s:?}: port 0 is not a destination port"));
    }
    let addr: IpAddr = match sa.ip().to_canonical() {
        a if a.is_unspecified() => IpAddr::from([0, 0, 0, 0]),
        a => a,
    };
    if addr.is_multicast() || addr == IpAddr::from([255, 255, 255, 255]) {
        return Err(format!(
            "{s:?}: a broadcast or multicast address is not a service address; name one of the \
             node's addresses (that covers broadcast and multicast too) or *"
        ));
    }
    Ok(ServiceDest {
        addr,
        port: sa.port(),
        proto,
    })
}
