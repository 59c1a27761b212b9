//! A TCP SYN flood from an `AF_PACKET` socket, for the drop-rate benchmark: one thread, pinned
//! to one CPU, sending batches of frames with `sendmmsg` until told to stop. Every frame comes
//! from a different source address (a xorshift walk over a range), with correct IPv4 and TCP
//! checksums, so the receiver's stack treats them as real connection attempts.
//!
//! No pktgen module on the machines this runs on, and `trafgen`'s TX ring gives up on the first
//! `EAGAIN` when the receiver is on another CPU: this sender retries instead.
//!
//! [`run_frames`] sends the same SYNs as XDP frames instead: the harness's `harness_flood`
//! program run through `BPF_PROG_TEST_RUN` in live-frames mode redirects them out of the
//! sender's veth, so the receiving end gets raw frames as from a NIC (no socket buffer until
//! something past native XDP needs one).

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

/// Frames per `sendmmsg`.
const BATCH: usize = 32;
/// Ethernet (14) + IPv4 (20) + TCP (20), padded to the 60-byte Ethernet minimum.
const FRAME: usize = 60;

/// What to send.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// The sending interface's index (in the sender's namespace).
    pub ifindex: i32,
    /// Destination MAC (the receiver's interface).
    pub dst_mac: [u8; 6],
    /// Source MAC (the sender's interface).
    pub src_mac: [u8; 6],
    /// Destination address and port.
    pub dst: Ipv4Addr,
    /// Destination TCP port.
    pub port: u16,
    /// Sources: `count` addresses from `base` (host order), visited in a pseudo-random order.
    pub base: u32,
    /// How many source addresses.
    pub count: u32,
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded to 16 bits above.
    #[allow(clippy::cast_possible_truncation)]
    let folded = sum as u16;
    !folded
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Writes one SYN from `src` into `frame`.
fn build(frame: &mut [u8; FRAME], spec: &Spec, src: u32, seq: u32) {
    frame.fill(0);
    frame[0..6].copy_from_slice(&spec.dst_mac);
    frame[6..12].copy_from_slice(&spec.src_mac);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    // Identification varies so no two frames are the same.
    // The low 16 bits of the sequence number: truncation intended.
    #[allow(clippy::cast_possible_truncation)]
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&src.to_be_bytes());
    ip[16..20].copy_from_slice(&spec.dst.octets());
    let c = fold(sum_words(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut frame[34..54];
    // Source port 1024..=65535 from the sequence: truncation intended.
    #[allow(clippy::cast_possible_truncation)]
    let sport = 1024 + (seq % 64_512) as u16;
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&spec.port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.to_be_bytes());
    pseudo[4..8].copy_from_slice(&spec.dst.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = fold(sum_words(&pseudo) + sum_words(tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Sends the flood as XDP frames (see the module's documentation) until `stop` is set, adding
/// every frame run to `sent`. Call on a thread inside the sender's network namespace.
pub fn run_frames(spec: &Spec, stop: &AtomicBool, sent: &AtomicU64) -> io::Result<()> {
    use aya::{
        maps::Array,
        programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
    };
    /// `#[repr(C)]` twin of the harness's `Flood`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Flood {
        base: u32,
        count: u32,
        ifindex: u32,
        pad: u32,
    }
    // SAFETY: plain integers, no padding.
    unsafe impl aya::Pod for Flood {}
    const PER_CALL: u32 = 1 << 16;
    assert!(spec.count > 0, "a flood needs at least one source");
    let mut h = jit_agent::datapath::load_harness().map_err(io::Error::other)?;
    let mut cfg: Array<_, Flood> = Array::try_from(
        h.map_mut("HARNESS_FLOOD")
            .ok_or_else(|| io::Error::other("no HARNESS_FLOOD map"))?,
    )
    .map_err(io::Error::other)?;
    cfg.set(
        0,
        Flood {
            base: spec.base,
            count: spec.count,
            ifindex: u32::try_from(spec.ifindex).map_err(io::Error::other)?,
            pad: 0,
        },
        0,
    )
    .map_err(io::Error::other)?;
    let prog: &Xdp = h
        .program(jit_agent::datapath::harness::FLOOD)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| io::Error::other("no flood program"))?;
    let mut template = [0u8; FRAME];
    build(&mut template, spec, spec.base, 1);
    while !stop.load(Ordering::Relaxed) {
        let mut o = TestRunOptions::new();
        o.data_in = Some(&template);
        o.repeat = PER_CALL;
        o.attrs = TestRunAttrs::new().xdp_live_frames(64);
        prog.test_run(o).map_err(io::Error::other)?;
        sent.fetch_add(u64::from(PER_CALL), Ordering::Relaxed);
    }
    Ok(())
}

/// Sends SYNs as fast as the socket takes them until `stop` is set, adding every frame the
/// kernel accepted to `sent`. Call on a thread inside the sender's network namespace.
pub fn run(spec: &Spec, stop: &AtomicBool, sent: &AtomicU64) -> io::Result<()> {
    assert!(spec.count > 0, "a flood needs at least one source");
    // SAFETY: plain socket call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor this function owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below make it an address.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
    addr.sll_ifindex = spec.ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&spec.dst_mac);
    let addr_len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or_default();
    let mut frames = vec![[0u8; FRAME]; BATCH];
    let mut iovs: Vec<libc::iovec> = frames
        .iter_mut()
        .map(|f| libc::iovec {
            iov_base: f.as_mut_ptr().cast(),
            iov_len: FRAME,
        })
        .collect();
    // SAFETY: a zeroed mmsghdr is valid; each is pointed at its iovec and the address below.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_name = (&raw mut addr).cast();
        m.msg_hdr.msg_namelen = addr_len;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut state: u32 = 0x9e37_79b9;
    let mut seq: u32 = 1;
    while !stop.load(Ordering::Relaxed) {
        for frame in &mut frames {
            // xorshift32: a cheap walk that is not sequential.
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            build(frame, spec, spec.base + state % spec.count, seq);
            seq = seq.wrapping_add(1);
        }
        // frames/iovs are only read by the kernel here; they are not touched until it returns.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                u32::try_from(BATCH).unwrap_or(1),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A full queue or ring on the way: try again (the receiver is busy, which is the
            // point). Anything else is a real failure.
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
            ) {
                std::thread::yield_now();
                continue;
            }
            return Err(e);
        }
        sent.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_checksums() {
        let spec = Spec {
            ifindex: 1,
            dst_mac: [2; 6],
            src_mac: [4; 6],
            dst: Ipv4Addr::new(10, 213, 0, 1),
            port: 443,
            base: 0xac10_0000,
            count: 1 << 20,
        };
        let mut f = [0u8; FRAME];
        build(&mut f, &spec, 0xac10_1234, 77);
        // A header with its checksum sums to 0xffff.
        assert_eq!(fold(sum_words(&f[14..34])), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&f[26..30]);
        pseudo[4..8].copy_from_slice(&f[30..34]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(fold(sum_words(&pseudo) + sum_words(&f[34..54])), 0);
        assert_eq!(&f[26..30], &[0xac, 0x10, 0x12, 0x34]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 443);
        assert_eq!(f[47], 0x02, "SYN");
    }
}
