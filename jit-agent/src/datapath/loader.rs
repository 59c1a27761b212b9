//! Loading the kernel program, attaching it to interfaces and detaching it.
//!
//! Maps are pinned by name under the pin directory, and each attachment is a BPF link pinned at
//! `<pin dir>/links/<interface>.<xdp|tc>`: enforcement outlives the agent process, and a restarted
//! agent swaps its freshly loaded program into the existing link instead of detaching first, so
//! the gate never opens in between. Only [`detach`] removes an attachment.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use jit_common::{LAYOUT_VERSION, map_names, program_names};

use super::{
    bpffs,
    error::{DatapathError, Result},
    maps::maps_dir,
};
use crate::spec::AttachMode;

/// The kernel object, built from `jit-ebpf` by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/jit-ebpf"));

/// Programs that measure and test the gate (`jit-ebpf/src/bin/jit-harness.rs`): an empty XDP
/// program, the reference gate, the source rotator, a packet generator, and two TCX neighbours.
static HARNESS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/jit-harness"));

/// Programs of the harness object, by name.
pub mod harness {
    /// XDP, passes everything.
    pub const EMPTY: &str = "harness_empty";
    /// XDP, the least a correct gate does.
    pub const REFERENCE: &str = "harness_reference";
    /// XDP, rotates the IPv4 source, then tail-calls `HARNESS_NEXT[0]`.
    pub const ROTATE: &str = "harness_rotate";
    /// XDP, a live-frames packet generator: random source, checksums mended, redirected out of
    /// `HARNESS_FLOOD[0].ifindex`.
    pub const FLOOD: &str = "harness_flood";
    /// TC, counts in `HARNESS_SEEN[0]`, returns "ok".
    pub const TC_OK: &str = "harness_tc_ok";
    /// TC, counts in `HARNESS_SEEN[1]`, returns "next".
    pub const TC_NEXT: &str = "harness_tc_next";
}

/// Loads the harness programs (not pinned, not attached), for benchmarks and tests.
pub fn load_harness() -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new().load(HARNESS_OBJECT)?;
    for name in [
        harness::EMPTY,
        harness::REFERENCE,
        harness::ROTATE,
        harness::FLOOD,
    ] {
        load_program::<Xdp>(&mut ebpf, name)?;
    }
    for name in [harness::TC_OK, harness::TC_NEXT] {
        load_program::<SchedClassifier>(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

/// What an interface's frames start with, which decides the entry point the gate can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An Ethernet header (veth, physical NICs, bridges, tap): XDP or TC.
    Ethernet,
    /// The IP header (tun, WireGuard, IP-in-IP, GRE, SIT): TC only, protocol from the skb.
    L3,
}

/// `ARPHRD_*` device types and how the gate sees them.
fn device_kind_of(arphrd: u16) -> Option<DeviceKind> {
    match arphrd {
        // ETHER, LOOPBACK (which carries a zeroed Ethernet header)
        1 | 772 => Some(DeviceKind::Ethernet),
        // NONE (tun, WireGuard), RAWIP, TUNNEL (ipip), TUNNEL6, SIT
        65534 | 519 | 768 | 769 | 776 => Some(DeviceKind::L3),
        // Everything else, GRE (778, 823) included: an NBMA GRE device hands programs its packets
        // from the outer header, so where the inner IP header starts is not known.
        _ => None,
    }
}

/// The kind of `iface` (in the caller's network namespace), or an error naming its device type
/// when the gate cannot parse its packets.
pub fn device_kind(iface: &str) -> Result<DeviceKind> {
    check_interface(iface)?;
    let arphrd = arphrd_of(iface).map_err(|source| DatapathError::Io {
        action: "reading the device type of",
        path: PathBuf::from(iface),
        source,
    })?;
    device_kind_of(arphrd).ok_or_else(|| DatapathError::Invalid {
        field: "interface",
        reason: format!(
            "{iface} is a device of type {arphrd} (ARPHRD), whose packets the gate cannot parse; \
             it gates Ethernet devices and L3 devices (tun, WireGuard, IP-in-IP, SIT); GRE \
             devices are refused (their packets may start at the outer header)"
        ),
    })
}

/// `SIOCGIFHWADDR`: the hardware address family of `iface` is its `ARPHRD_*` type.
fn arphrd_of(iface: &str) -> std::io::Result<u16> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (checked to be <= 15 bytes).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR fills the hwaddr member.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Removes maps pinned by other layout versions (see [`LAYOUT_VERSION`]): the maps of a previous
/// release, once the program using this layout has been swapped into every pinned link. Returns
/// what it removed.
pub fn remove_stale_layouts(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let current = format!("v{LAYOUT_VERSION}");
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => {
            return Err(DatapathError::Io {
                action: "listing",
                path: pin_dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| DatapathError::Io {
            action: "listing",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let old_map = name.starts_with("JIT_");
        let old_layout = name.len() > 1
            && name.starts_with('v')
            && name[1..].bytes().all(|b| b.is_ascii_digit())
            && name != current;
        if !(old_map || old_layout) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|source| DatapathError::Io {
            action: "removing the stale pin",
            path: path.clone(),
            source,
        })?;
        removed.push(path);
    }
    Ok(removed)
}

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/jit";

impl AttachMode {
    /// The suffix of the link's pin file: all XDP modes share one, as an interface has one XDP slot.
    const fn pin_suffix(self) -> &'static str {
        match self {
            Self::Xdp | Self::XdpGeneric | Self::XdpNative => "xdp",
            Self::Tc => "tc",
            // Resolved to one of the above before any link is made or looked for (see
            // `Gate::attach`, `detach`); no link is ever pinned under this name.
            Self::Auto => "auto",
        }
    }
}

/// Drivers whose devices are virtual (no wire, no DMA ring): native XDP on them saves nothing
/// over TC, and on veth it costs the peer's TSO.
const VIRTUAL_DRIVERS: &[&str] = &[
    "veth",
    "bridge",
    "bonding",
    "team",
    "macvlan",
    "ipvlan",
    "vxlan",
    "geneve",
    "tun",
    "dummy",
    "vrf",
    "802.1Q VLAN Support",
    "openvswitch",
    "netkit",
];

/// The driver of `iface` and the bus it sits on (empty for virtual devices), from
/// `ETHTOOL_GDRVINFO` in the caller's network namespace.
fn driver_info(iface: &str) -> std::io::Result<(String, String)> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    fn text(b: &[u8]) -> String {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    }
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid `DrvInfo` and `ifreq`.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= req.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a `DrvInfo` that outlives the
    // call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((text(&info.driver), text(&info.bus_info)))
}

/// The hooks `auto` attaches on a device of `kind` whose driver reports `(driver, bus)`
/// (`None`: it reports nothing), in order:
///
/// - an Ethernet device on a bus (a NIC, physical or a VM's: virtio_net, ena, gve ...) whose
///   driver is not a virtual one: native XDP, which sheds floods before any socket buffer
///   exists, **and** TC, which sees every packet that enters the stack on that device,
///   including those native XDP never sees (re-injected into its receive path: IPsec tunnel
///   mode's decrypted packets, `bpf_redirect` to ingress, `tc mirred ingress`). A packet must
///   pass both.
/// - anything else (veth, bridges, bonds, VLANs, tunnels, L3 devices): TC only. Native XDP on a
///   veth turns off the peer's TSO; generic XDP copies packets that are not linear.
#[must_use]
pub fn auto_hooks(kind: DeviceKind, driver: Option<(&str, &str)>) -> &'static [AttachMode] {
    match (kind, driver) {
        (DeviceKind::Ethernet, Some((driver, bus)))
            if !bus.is_empty() && !VIRTUAL_DRIVERS.contains(&driver) =>
        {
            &[AttachMode::XdpNative, AttachMode::Tc]
        }
        _ => &[AttachMode::Tc],
    }
}

/// [`auto_hooks`] for `iface` (in the caller's network namespace).
pub fn auto_hooks_of(iface: &str) -> Result<&'static [AttachMode]> {
    let kind = device_kind(iface)?;
    let info = driver_info(iface).ok();
    Ok(auto_hooks(
        kind,
        info.as_ref().map(|(d, b)| (d.as_str(), b.as_str())),
    ))
}

/// Capacity choices made at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Directory on bpffs for maps and links.
    pub pin_dir: PathBuf,
    /// Capacity of the grants map. Only takes effect when the map is created; an existing pinned
    /// map keeps its size.
    pub max_grants: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            max_grants: 65_536,
        }
    }
}

/// The loaded kernel program: its two entry points and its (pinned) maps.
pub struct Gate {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Gate {
    /// Forwards the program's aya-log records (the `ebpf-log` feature) to the agent's log, on
    /// the current tokio runtime, for as long as the runtime runs.
    #[cfg(feature = "ebpf-log")]
    pub fn forward_logs(&mut self) -> Result<()> {
        let logger =
            aya_log::EbpfLogger::init(&mut self.ebpf).map_err(|e| DatapathError::Invalid {
                field: "ebpf-log",
                reason: format!("starting the program's logger: {e}"),
            })?;
        // SAFETY: the logger owns its ring buffer's fd for its whole life and always reports
        // that same fd; the AsyncFd owns the logger.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| DatapathError::Io {
            action: "polling",
            path: PathBuf::from("aya-log ring buffer"),
            source: e.into(),
        })?;
        tokio::spawn(async move {
            loop {
                match logger.readable_mut().await {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::error!("reading the program's log records stopped: {e}");
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Loads the program, reusing maps already pinned under the pin directory (so a restart keeps
    /// every service, identity and grant) and pinning the rest. Mounts bpffs when needed.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        if opts.max_grants == 0 {
            return Err(DatapathError::Invalid {
                field: "max_grants",
                reason: "must be at least 1".into(),
            });
        }
        let pin_dir = bpffs::ensure_pin_dir(&opts.pin_dir)?;
        let maps = maps_dir(&pin_dir);
        std::fs::create_dir_all(&maps).map_err(|source| DatapathError::Io {
            action: "creating",
            path: maps.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps)
            .map_max_entries(map_names::GRANTS, opts.max_grants)
            .load(PROGRAM_OBJECT)?;
        load_program::<Xdp>(&mut ebpf, program_names::XDP)?;
        load_program::<SchedClassifier>(&mut ebpf, program_names::TC)?;
        load_program::<SchedClassifier>(&mut ebpf, program_names::TC_L3)?;
        Ok(Self { ebpf, pin_dir })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The XDP entry point, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(program_names::XDP)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("the object always has the XDP entry point; load checked it")
    }

    /// The TC entry point, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc(&self) -> &SchedClassifier {
        self.ebpf
            .program(program_names::TC)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .expect("the object always has the TC entry point; load checked it")
    }

    /// The TC entry point for `kind` of device.
    fn tc_program_name(kind: DeviceKind) -> &'static str {
        match kind {
            DeviceKind::Ethernet => program_names::TC,
            DeviceKind::L3 => program_names::TC_L3,
        }
    }

    /// Attaches to `iface` (in the caller's network namespace) and pins the link. When a link is
    /// already pinned for this interface and hook, the loaded program replaces the old one inside
    /// it atomically. TC links go first in the TCX chain. XDP is refused on devices whose frames
    /// do not start with an Ethernet header, and any device the gate cannot parse is refused.
    ///
    /// `auto` attaches in the mode [`auto_mode`] picks (TC when native XDP fails), then removes
    /// a link of the gate's own in the other hook of that interface (one made by an agent whose
    /// configuration said otherwise), after the new one is in place: never a gap.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<PathBuf> {
        if mode == AttachMode::Auto {
            return self.attach_auto(iface, false);
        }
        let kind = device_kind(iface)?;
        if kind == DeviceKind::L3 && mode != AttachMode::Tc {
            return Err(DatapathError::Invalid {
                field: "attach mode",
                reason: format!(
                    "{iface} is an L3 device (its packets start at the IP header, as on tun, \
                     WireGuard and IP tunnels); XDP cannot gate it: use --mode tc"
                ),
            });
        }
        let pin_path = link_pin_path(&self.pin_dir, iface, mode);
        let links_dir = pin_path.parent().unwrap_or(&self.pin_dir).to_path_buf();
        std::fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Io {
            action: "creating",
            path: links_dir.clone(),
            source,
        })?;
        // Where the new link is pinned: beside a pinned link that cannot be updated, first.
        let mut pin_at = pin_path.clone();
        let beside = PathBuf::from(format!("{}.new", pin_path.display()));
        if beside.exists() {
            // An agent stopped between pinning a new link and moving it over the old pin: that
            // link gates the device; it takes the old pin's place.
            if self.replace_in_link(iface, mode, kind, &beside).is_ok() {
                std::fs::rename(&beside, &pin_path).map_err(|source| DatapathError::Io {
                    action: "moving the new link's pin over the old one",
                    path: pin_path.clone(),
                    source,
                })?;
                return Ok(pin_path);
            }
            std::fs::remove_file(&beside).map_err(|source| DatapathError::Io {
                action: "removing a leftover pin",
                path: beside.clone(),
                source,
            })?;
        }
        if pin_path.exists() {
            match self.replace_in_link(iface, mode, kind, &pin_path) {
                Ok(()) => return Ok(pin_path),
                Err(e) => {
                    // Most likely a link whose interface went away (it enforces nothing). Its
                    // pin is replaced only once a new link is attached: a link that still gates
                    // the device is never given up for nothing (fail closed).
                    tracing::warn!("{e}; attaching a new link in its place");
                    pin_at = beside;
                }
            }
        }
        let fd_link = match mode {
            AttachMode::Auto => {
                return Err(DatapathError::Invalid {
                    field: "attach mode",
                    reason: "auto is resolved to a mode before a link is made".into(),
                });
            }
            AttachMode::Tc => {
                let prog = self.program_mut::<SchedClassifier>(Self::tc_program_name(kind))?;
                // First in the chain: a program before the gate that ends the chain ("ok")
                // would blind it.
                let id = prog
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|e| attach_error(iface, mode, e))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| attach_error(iface, mode, e))?;
                FdLink::try_from(link).map_err(|e| DatapathError::Link {
                    action: format!("pinning the tc link on {iface}"),
                    reason: format!("{e} (TCX links need kernel 6.6 or later)"),
                })?
            }
            AttachMode::Xdp | AttachMode::XdpGeneric | AttachMode::XdpNative => {
                let xdp_mode = match mode {
                    AttachMode::XdpGeneric => XdpMode::Skb,
                    AttachMode::XdpNative => XdpMode::Driver,
                    _ => XdpMode::Default,
                };
                let prog = self.program_mut::<Xdp>(program_names::XDP)?;
                let id = prog
                    .attach(iface, xdp_mode)
                    .map_err(|e| attach_error(iface, mode, e))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| attach_error(iface, mode, e))?;
                FdLink::try_from(link).map_err(|e| DatapathError::Link {
                    action: format!("pinning the xdp link on {iface}"),
                    reason: format!("{e} (XDP links need kernel 5.9 or later)"),
                })?
            }
        };
        fd_link.pin(&pin_at).map_err(|e| DatapathError::Link {
            action: format!("pinning {}", pin_at.display()),
            reason: error_chain(&e),
        })?;
        if pin_at != pin_path {
            // Over the old pin in one step: the old link goes with its last reference.
            std::fs::rename(&pin_at, &pin_path).map_err(|source| DatapathError::Io {
                action: "moving the new link's pin over the old one",
                path: pin_path.clone(),
                source,
            })?;
        }
        Ok(pin_path)
    }

    /// Attaches to `iface` afresh, dropping the pin of a link whose device was deleted and
    /// created again (such a link is attached to nothing; updating it would enforce nothing).
    pub fn reattach(&mut self, iface: &str, mode: AttachMode) -> Result<PathBuf> {
        check_interface_name(iface)?;
        if mode == AttachMode::Auto {
            return self.attach_auto(iface, true);
        }
        let pin_path = link_pin_path(&self.pin_dir, iface, mode);
        if pin_path.exists() {
            std::fs::remove_file(&pin_path).map_err(|source| DatapathError::Io {
                action: "removing the pin of a link to a deleted device",
                path: pin_path.clone(),
                source,
            })?;
        }
        self.attach(iface, mode)
    }

    /// `auto`: the hooks of [`auto_hooks_of`]. Native XDP that fails to attach (a driver
    /// without it, an MTU it cannot take) is left out; TC that fails (kernels before 6.6 have
    /// no TCX) is replaced by generic XDP when nothing else gates the device. An XDP link of the
    /// gate's own that `auto` does not want any more (an earlier configuration) is detached
    /// after TC is in place; failing that is logged, never undoes the attachment. Returns the
    /// TC link's pin (the XDP link's when TC could not be attached).
    fn attach_auto(&mut self, iface: &str, afresh: bool) -> Result<PathBuf> {
        let hooks = auto_hooks_of(iface)?;
        let attach = |gate: &mut Self, mode| {
            if afresh {
                gate.reattach(iface, mode)
            } else {
                gate.attach(iface, mode)
            }
        };
        let mut xdp = None;
        if hooks.contains(&AttachMode::XdpNative) {
            match attach(self, AttachMode::XdpNative) {
                Ok(pin) => xdp = Some(pin),
                Err(e) => tracing::info!("{iface}: native XDP failed ({e}); gating it in TC only"),
            }
        }
        let tc = match attach(self, AttachMode::Tc) {
            Ok(pin) => pin,
            Err(e) => {
                if let Some(pin) = xdp {
                    tracing::warn!(
                        "{iface}: TC failed ({e}); gated by native XDP only, which does not see \
                         packets re-injected into the device's receive path (IPsec tunnel mode)"
                    );
                    return Ok(pin);
                }
                if device_kind(iface)? == DeviceKind::L3 {
                    return Err(e);
                }
                tracing::warn!("{iface}: TC failed ({e}); attaching generic XDP instead");
                return attach(self, AttachMode::XdpGeneric);
            }
        };
        if xdp.is_none() && link_pin_path(&self.pin_dir, iface, AttachMode::Xdp).exists() {
            tracing::info!("{iface}: gated in TC; detaching the gate's XDP link");
            if let Err(e) = detach(&self.pin_dir, iface, AttachMode::Xdp) {
                tracing::warn!(
                    "{iface}: detaching the gate's XDP link: {e} (both hooks gate the device)"
                );
            }
        }
        Ok(tc)
    }

    fn replace_in_link(
        &mut self,
        iface: &str,
        mode: AttachMode,
        kind: DeviceKind,
        pin_path: &Path,
    ) -> Result<()> {
        let link_error = |e: &dyn fmt::Display| DatapathError::Link {
            action: format!("reusing the pinned link {}", pin_path.display()),
            reason: e.to_string(),
        };
        let fd_link = FdLink::from(PinnedLink::from_pin(pin_path).map_err(|e| link_error(&e))?);
        match mode {
            AttachMode::Tc => {
                let link = SchedClassifierLink::try_from(fd_link).map_err(|e| link_error(&e))?;
                let prog = self.program_mut::<SchedClassifier>(Self::tc_program_name(kind))?;
                // The program keeps a handle on the link; dropping it only closes that handle,
                // the pin keeps the link attached.
                prog.attach_to_link(link)
                    .map_err(|e| attach_error(iface, mode, e))?;
            }
            _ => {
                let link = XdpLink::try_from(fd_link).map_err(|e| link_error(&e))?;
                let prog = self.program_mut::<Xdp>(program_names::XDP)?;
                prog.attach_to_link(link)
                    .map_err(|e| attach_error(iface, mode, e))?;
            }
        }
        Ok(())
    }

    fn program_mut<P>(&mut self, name: &str) -> Result<&mut P>
    where
        for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut P>::try_from(p).ok())
            .ok_or_else(|| DatapathError::Link {
                action: format!("finding program {name}"),
                reason: "not in the kernel object".into(),
            })
    }
}

fn load_program<P>(ebpf: &mut Ebpf, name: &str) -> Result<()>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: LoadableProgram,
{
    let program = ebpf.program_mut(name).ok_or_else(|| DatapathError::Link {
        action: format!("finding program {name}"),
        reason: "not in the kernel object (was it built with AYA_BUILD_SKIP=1?)".into(),
    })?;
    let program: &mut P = program
        .try_into()
        .map_err(|source| DatapathError::Program {
            action: format!("program {name} has an unexpected type"),
            source,
        })?;
    program
        .load_program()
        .map_err(|source| DatapathError::Program {
            action: format!("loading program {name} into the kernel"),
            source,
        })
}

/// The `load` method both entry points have.
trait LoadableProgram {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl LoadableProgram for Xdp {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl LoadableProgram for SchedClassifier {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

fn attach_error(
    iface: &str,
    mode: AttachMode,
    source: aya::programs::ProgramError,
) -> DatapathError {
    if let aya::programs::ProgramError::UnknownInterface { name } = &source {
        return DatapathError::UnknownInterface(name.clone());
    }
    DatapathError::Program {
        action: format!("attaching to {iface} in {mode} mode"),
        source,
    }
}

/// The index of `iface` in the caller's network namespace, `None` when it does not exist.
#[must_use]
pub fn interface_index(iface: &str) -> Option<u32> {
    let c = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Checks that `iface` is a valid interface name that exists in the caller's network namespace.
pub fn check_interface(iface: &str) -> Result<()> {
    check_interface_name(iface)?;
    let c = std::ffi::CString::new(iface).map_err(|_| DatapathError::Invalid {
        field: "interface",
        reason: format!("{iface:?} contains a NUL byte"),
    })?;
    // SAFETY: a valid C string.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        return Err(DatapathError::UnknownInterface(iface.to_string()));
    }
    Ok(())
}

/// [`crate::spec::check_interface_name`], as a datapath error.
fn check_interface_name(iface: &str) -> Result<()> {
    crate::spec::check_interface_name(iface).map_err(|e| DatapathError::Invalid {
        field: "interface",
        reason: e.to_string(),
    })
}

/// An error with its causes, for errors whose `Display` leaves the OS error out.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Where the link of `iface` and `mode` is pinned: `<pin dir>/links/<xdp|tc>/<iface>`. bpffs
/// refuses names with a dot, which interface names may have (`eth0.100`); a dot is written as
/// `:`, which interface names never contain.
pub fn link_pin_path(pin_dir: &Path, iface: &str, mode: AttachMode) -> PathBuf {
    pin_dir
        .join("links")
        .join(mode.pin_suffix())
        .join(iface.replace('.', ":"))
}

/// Detaches the gate from `iface`: the link is detached in the kernel (`BPF_LINK_DETACH`, so it
/// stops even while a running agent still holds a handle on it) and its pin removed. This is the
/// only way enforcement stops. Returns an error when nothing is attached there.
///
/// `auto` detaches whichever of the gate's links the interface has (both, if it has two).
pub fn detach(pin_dir: &Path, iface: &str, mode: AttachMode) -> Result<()> {
    check_interface_name(iface)?;
    if mode == AttachMode::Auto {
        let present: Vec<AttachMode> = [AttachMode::Xdp, AttachMode::Tc]
            .into_iter()
            .filter(|m| link_pin_path(pin_dir, iface, *m).exists())
            .collect();
        if present.is_empty() {
            return Err(DatapathError::NotAttached {
                iface: iface.to_string(),
                mode: "any".to_string(),
                path: pin_dir.join("links"),
            });
        }
        for m in present {
            detach(pin_dir, iface, m)?;
        }
        return Ok(());
    }
    let path = link_pin_path(pin_dir, iface, mode);
    if !path.exists() {
        return Err(DatapathError::NotAttached {
            iface: iface.to_string(),
            mode: mode.to_string(),
            path,
        });
    }
    match link_detach(&path) {
        Ok(()) => {}
        // A link whose interface is gone is detached already.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
        Err(source) => {
            return Err(DatapathError::Io {
                action: "detaching the link pinned at",
                path,
                source,
            });
        }
    }
    std::fs::remove_file(&path).map_err(|source| DatapathError::Io {
        action: "removing",
        path,
        source,
    })
}

/// `BPF_OBJ_GET` on `path`, then `BPF_LINK_DETACH` on the link. aya 0.14 does not expose the
/// forced detach, so this speaks the two commands directly, with the kernel's `bpf_attr` as
/// aya's generated bindings declare it.
fn link_detach(path: &Path) -> std::io::Result<()> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};

    use aya_obj::generated::{bpf_attr, bpf_cmd};

    let bpf = |cmd: bpf_cmd, attr: &mut bpf_attr| {
        // SAFETY: `attr` is a whole, initialised bpf_attr that outlives the call; every pointer
        // in it points at memory alive until the caller returns.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                std::ptr::from_mut(attr),
                size_of::<bpf_attr>(),
            )
        }
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: bpf_attr is a plain C union; all zeroes is its "no options" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The BPF_OBJ_GET member of the union: the path, NUL-terminated, alive until the end.
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr);
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|e| std::io::Error::other(e.to_string()))?;
    // SAFETY: the kernel just returned this fd to us; OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_detach.link_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr) < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One pinned attachment.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    /// Interface name.
    pub interface: String,
    /// `xdp` or `tc`.
    pub hook: String,
    /// Kernel link id, when the link could be opened.
    pub link_id: Option<u32>,
    /// Kernel program id running in the link.
    pub program_id: Option<u32>,
    /// Where it is pinned.
    pub pin: PathBuf,
}

/// Lists the pinned attachments under `pin_dir`.
pub fn attachments(pin_dir: &Path) -> Result<Vec<Attachment>> {
    let mut out = Vec::new();
    for hook in ["xdp", "tc"] {
        let dir = pin_dir.join("links").join(hook);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DatapathError::Io {
                    action: "listing",
                    path: dir,
                    source,
                });
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| DatapathError::Io {
                action: "listing",
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A pin name never holds a '.' (an interface's is written as ':'): a link pinned
            // beside another while it takes its place, not an interface of its own.
            if name.contains('.') {
                continue;
            }
            let iface = name.replace(':', ".");
            let info = PinnedLink::from_pin(entry.path())
                .ok()
                .and_then(|l| FdLink::from(l).info().ok());
            out.push(Attachment {
                interface: iface,
                hook: hook.to_string(),
                link_id: info.as_ref().map(aya::programs::links::LinkInfo::id),
                program_id: info
                    .as_ref()
                    .map(aya::programs::links::LinkInfo::program_id),
                pin: entry.path(),
            });
        }
    }
    out.sort_by(|a, b| (&a.interface, &a.hook).cmp(&(&b.interface, &b.hook)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gates_nics_with_xdp_and_tc_and_everything_else_with_tc() {
        let both: &[AttachMode] = &[AttachMode::XdpNative, AttachMode::Tc];
        let tc: &[AttachMode] = &[AttachMode::Tc];
        let eth = DeviceKind::Ethernet;
        assert_eq!(auto_hooks(eth, Some(("ixgbe", "0000:03:00.0"))), both);
        assert_eq!(auto_hooks(eth, Some(("virtio_net", "virtio0"))), both);
        for virtual_driver in VIRTUAL_DRIVERS {
            assert_eq!(
                auto_hooks(eth, Some((virtual_driver, "x"))),
                tc,
                "{virtual_driver}"
            );
        }
        assert_eq!(auto_hooks(eth, Some(("veth", ""))), tc);
        assert_eq!(
            auto_hooks(eth, Some(("somedriver", ""))),
            tc,
            "no bus: virtual"
        );
        assert_eq!(auto_hooks(eth, None), tc, "no driver information");
        assert_eq!(
            auto_hooks(DeviceKind::L3, Some(("ixgbe", "0000:03:00.0"))),
            tc
        );
    }

    /// The helpers aya-log's records use (ring buffer reserve, submit, discard); the gate's own
    /// events use `bpf_ringbuf_output` only.
    const LOG_HELPERS: [i32; 3] = [131, 132, 133];

    fn helper_calls(object: &[u8]) -> (Vec<String>, Vec<i32>) {
        let obj = aya_obj::Object::parse(object).expect("the embedded program parses");
        let calls = obj
            .functions
            .values()
            .flat_map(|f| f.instructions.iter())
            // BPF_JMP | BPF_CALL with src_reg 0: a helper call, its number in imm.
            .filter(|i| i.code == 0x85 && i.src_reg() == 0)
            .map(|i| i.imm)
            .collect();
        (obj.maps.keys().cloned().collect(), calls)
    }

    /// Zero cost when off: the shipped object has no log map and no log helper call.
    #[cfg(not(feature = "ebpf-log"))]
    #[test]
    fn the_shipped_program_has_no_log_calls() {
        let (maps, calls) = helper_calls(PROGRAM_OBJECT);
        assert!(maps.iter().any(|m| m == "JIT_GRANTS"), "{maps:?}");
        assert!(!maps.iter().any(|m| m.starts_with("AYA_LOG")), "{maps:?}");
        assert!(
            !calls.iter().any(|c| LOG_HELPERS.contains(c)),
            "log helper calls in the shipped program: {calls:?}"
        );
    }

    /// With the feature on, the program does log (so the check above can fail).
    #[cfg(feature = "ebpf-log")]
    #[test]
    fn the_logging_program_has_its_log_calls() {
        let (maps, calls) = helper_calls(PROGRAM_OBJECT);
        assert!(maps.iter().any(|m| m == "AYA_LOGS"), "{maps:?}");
        assert!(calls.iter().any(|c| LOG_HELPERS.contains(c)), "{calls:?}");
    }

    #[test]
    fn device_types_the_gate_cannot_parse_are_refused() {
        assert_eq!(device_kind_of(1), Some(DeviceKind::Ethernet));
        assert_eq!(device_kind_of(65534), Some(DeviceKind::L3));
        for refused in [778, 823, 512, 280, 24, 0xffff] {
            assert_eq!(device_kind_of(refused), None, "ARPHRD {refused}");
        }
    }

    #[test]
    fn link_pins_avoid_dots_and_share_one_xdp_slot() {
        let dir = Path::new("/sys/fs/bpf/jit");
        assert_eq!(
            link_pin_path(dir, "eth0.100", AttachMode::XdpGeneric),
            Path::new("/sys/fs/bpf/jit/links/xdp/eth0:100")
        );
        assert_eq!(
            link_pin_path(dir, "eth0", AttachMode::Xdp),
            link_pin_path(dir, "eth0", AttachMode::XdpNative)
        );
        assert_eq!(
            link_pin_path(dir, "eth0", AttachMode::Tc),
            Path::new("/sys/fs/bpf/jit/links/tc/eth0")
        );
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for bad in [
            "",
            ".",
            "..",
            "../../JIT_GRANTS",
            "a:b",
            "a b",
            "sixteen-chars-xx",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
            assert!(detach(Path::new("/sys/fs/bpf/jit"), bad, AttachMode::Xdp).is_err());
        }
        for good in ["eth0", "eth0.100", "veth-a_b", "fifteen-chars-x"] {
            assert!(check_interface_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn detach_without_a_link_names_what_is_missing() {
        let err = detach(Path::new("/nonexistent-jit"), "eth9", AttachMode::Tc)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eth9") && err.contains("tc"), "{err}");
    }
}
