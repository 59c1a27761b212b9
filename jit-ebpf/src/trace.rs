//! What happened to one packet, through aya-log: built only with the `log` feature, which is off
//! by default, so the shipped object carries no log calls and no log map (`cargo xtask lint`
//! checks the object). With the feature on, the agent forwards these records to its own log.

use aya_ebpf::EbpfContext;

use crate::{parse::Parsed, verdict::Verdict};

/// The parse result in numbers, taken before the decision consumes it.
#[derive(Clone, Copy)]
pub(crate) struct Summary {
    /// 0 not IP, 1 no ports, 2 TCP/UDP flow, 3 unclassified.
    kind: u8,
    family: u8,
    proto: u8,
    dst_port: u16,
    reason: u32,
}

impl Summary {
    #[inline(always)]
    pub(crate) fn of(p: &Parsed) -> Self {
        match p {
            Parsed::NotIp => Self::new(0, 0, 0, 0, 0),
            Parsed::NoPorts => Self::new(1, 0, 0, 0, 0),
            Parsed::Flow(f) => Self::new(2, f.family, f.proto, f.dst_port, 0),
            Parsed::Unclassified {
                reason,
                family,
                proto,
                ..
            } => Self::new(3, *family, *proto, 0, *reason),
        }
    }

    const fn new(kind: u8, family: u8, proto: u8, dst_port: u16, reason: u32) -> Self {
        Self {
            kind,
            family,
            proto,
            dst_port,
            reason,
        }
    }
}

/// Logs one packet's parse summary and verdict at debug level.
#[inline(always)]
pub(crate) fn packet<C: EbpfContext>(ctx: &C, hook: &str, s: Summary, v: Verdict) {
    let pass = u8::from(v == Verdict::Pass);
    aya_log_ebpf::debug!(
        ctx,
        "{}: kind={} family={} proto={} dport={} reason={} pass={}",
        hook,
        s.kind,
        s.family,
        s.proto,
        s.dst_port,
        s.reason,
        pass
    );
}
