//! Kernel denials on the record: reads the kernel's event ring buffer continuously, renews the
//! kernel's per-CPU event budget every second, and writes denials to the audit log aggregated per
//! (kind, reason, source, service, port) and window, so a flood makes a few `kernel.denials`
//! records with counts, never one record per packet. Events the kernel left out (beyond its
//! budget) or lost (ring buffer full) are recorded as `kernel.events_dropped`.
//!
//! Ownership: this reader has its own handle on the pinned maps (the event ring buffer, the
//! config map for the budget and the counters); it never writes services or grants.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use jit_api::audit::Event as Audited;
use jit_common::{Event, FAMILY_V4, FAMILY_V6, counter, event_kind};

use crate::{
    audit::AuditLog,
    datapath::{DatapathError, EventReader, GateMaps, boottime_ns},
    kernel_names::KernelNames,
    model::now_ms,
};

/// Events each CPU may report per second.
pub const EVENTS_PER_SECOND: u32 = 1_000;
/// How often the ring buffer is drained.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// What one aggregated record counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    kind: u32,
    reason: u32,
    source: IpAddr,
    service_id: u32,
    dst_port: u16,
    proto: u8,
}

#[derive(Clone, Copy, Debug)]
struct Tally {
    packets: u64,
    first_ns: u64,
    last_ns: u64,
}

/// Denials seen in the current window.
#[derive(Default)]
pub struct Aggregate {
    seen: BTreeMap<Key, Tally>,
}

fn address(family: u8, bytes: [u8; 16]) -> IpAddr {
    match family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(bytes)),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

impl Aggregate {
    /// Counts one event (denials and audit-mode would-drops; first-allowed events are not
    /// denials).
    pub fn add(&mut self, e: &Event) {
        if e.kind != event_kind::DENY && e.kind != event_kind::AUDIT {
            return;
        }
        let key = Key {
            kind: e.kind,
            reason: e.reason,
            source: address(e.family, e.src_addr),
            service_id: e.service_id,
            dst_port: e.dst_port,
            proto: e.proto,
        };
        let t = self.seen.entry(key).or_insert(Tally {
            packets: 0,
            first_ns: e.timestamp_ns,
            last_ns: e.timestamp_ns,
        });
        t.packets += 1;
        t.first_ns = t.first_ns.min(e.timestamp_ns);
        t.last_ns = t.last_ns.max(e.timestamp_ns);
    }

    /// The window's records, emptied.
    pub fn take(
        &mut self,
        names: &KernelNames,
        boot_now_ns: u64,
        wall_now_ms: i64,
    ) -> Vec<Audited> {
        let wall = |ns: u64| {
            let ago_ms = i64::try_from(boot_now_ns.saturating_sub(ns) / 1_000_000).unwrap_or(0);
            wall_now_ms.saturating_sub(ago_ms)
        };
        std::mem::take(&mut self.seen)
            .into_iter()
            .map(|(k, t)| Audited::KernelDenials {
                kind: if k.kind == event_kind::AUDIT {
                    "audit".into()
                } else {
                    "deny".into()
                },
                reason: counter::NAMES
                    .get(k.reason as usize)
                    .map_or_else(|| format!("#{}", k.reason), |n| (*n).to_string()),
                source: k.source.to_string(),
                service: if k.service_id == u32::MAX {
                    String::new()
                } else {
                    names
                        .services
                        .get(&k.service_id)
                        .cloned()
                        .unwrap_or_else(|| format!("#{}", k.service_id))
                },
                dst_port: k.dst_port,
                proto: k.proto,
                packets: t.packets,
                first_unix_ms: wall(t.first_ns),
                last_unix_ms: wall(t.last_ns),
            })
            .collect()
    }

    /// Whether nothing was seen.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Reads events and records denials until the process ends. Runs on its own thread.
pub struct DenialReader {
    maps: GateMaps,
    events: EventReader,
    audit: Arc<AuditLog>,
    state_dir: PathBuf,
    window: Duration,
    dropped_before: (u64, u64),
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl DenialReader {
    /// A reader of the gate pinned under `pin_dir`, recording on `audit` every `window`.
    pub fn open(
        pin_dir: &std::path::Path,
        state_dir: PathBuf,
        audit: Arc<AuditLog>,
        window: Duration,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, DatapathError> {
        let maps = GateMaps::open(pin_dir)?;
        let events = EventReader::open(pin_dir)?;
        let mut me = Self {
            maps,
            events,
            audit,
            state_dir,
            window,
            dropped_before: (0, 0),
            stop,
        };
        me.dropped_before = me.dropped()?;
        Ok(me)
    }

    fn dropped(&self) -> Result<(u64, u64), DatapathError> {
        let c = self.maps.counters()?;
        let get = |i: u32| {
            c.global
                .get(counter::NAMES[i as usize])
                .copied()
                .unwrap_or(0)
        };
        Ok((get(counter::EVENTS_RATE_LIMITED), get(counter::EVENTS_LOST)))
    }

    /// One window: renew the budget every second, drain every 100 ms, then record.
    pub fn run_window(&mut self) -> Result<(), DatapathError> {
        let mut agg = Aggregate::default();
        let start = Instant::now();
        let mut refilled = Instant::now() - Duration::from_secs(1);
        let stopping = || self.stop.load(std::sync::atomic::Ordering::Relaxed);
        while start.elapsed() < self.window && !stopping() {
            if refilled.elapsed() >= Duration::from_secs(1) {
                self.maps.refill_event_tokens(EVENTS_PER_SECOND)?;
                refilled = Instant::now();
            }
            for e in self.events.drain() {
                agg.add(&e);
            }
            std::thread::sleep(DRAIN_EVERY);
        }
        for e in self.events.drain() {
            agg.add(&e);
        }
        self.record(&mut agg)
    }

    fn record(&mut self, agg: &mut Aggregate) -> Result<(), DatapathError> {
        let names = KernelNames::load(&self.state_dir)
            .ok()
            .flatten()
            .unwrap_or_default();
        for record in agg.take(&names, boottime_ns()?, now_ms()) {
            if let Err(e) = self.audit.record(record) {
                tracing::error!("audit: {e}");
            }
        }
        let now = self.dropped()?;
        let (rate_limited, lost) = (
            now.0.saturating_sub(self.dropped_before.0),
            now.1.saturating_sub(self.dropped_before.1),
        );
        self.dropped_before = now;
        if rate_limited + lost > 0
            && let Err(e) = self
                .audit
                .record(Audited::KernelEventsDropped { rate_limited, lost })
        {
            tracing::error!("audit: {e}");
        }
        Ok(())
    }

    /// Runs windows until asked to stop (then records the last, partial window); an error is
    /// logged and the reader goes on after a pause.
    pub fn run(mut self) {
        loop {
            if let Err(e) = self.run_window() {
                tracing::error!("reading the kernel's events: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
        }
    }
}
