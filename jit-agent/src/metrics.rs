//! Prometheus metrics (prometheus-client, OpenMetrics text). Latencies are histograms the node
//! observes as it decides; everything else is read at scrape time (the kernel's counters and map
//! fill through a read-only handle on the pinned maps, the store's counts, the kernel sync's and
//! the audit log's records), so a scrape always shows the state of that moment.
//!
//! Names (counters carry `_total` in the exposition):
//! - `jit_packets_allowed_total{service}`, `jit_packets_dropped_total{service,reason}` (service
//!   empty for packets dropped before a service was known: `unparseable`, `fragment`, ...),
//!   `jit_packets_audit_would_drop_total{service}`;
//! - `jit_kernel_events_dropped_total{cause}`: events the kernel did not report, `rate_limited`
//!   (beyond its per-CPU budget) or `ring_full` (ring-buffer losses);
//! - `jit_grants_active`, `jit_requests_pending`, `jit_map_entries{map}`,
//!   `jit_map_capacity_entries{map}`;
//! - `jit_decision_duration_seconds{outcome}`: the agent's time to decide and enforce a request;
//!   `jit_approval_wait_seconds`: from a request to the approval that granted it;
//! - `jit_audit_write_failures_total`, `jit_audit_held_records`;
//! - `jit_kernel_repairs_total`, `jit_kernel_reconciliations_total`,
//!   `jit_kernel_sync_failures_total`, `jit_store_corrupt_records`;
//! - `jit_kernel_up` (0 when the kernel's counters could not be read), `jit_store_up`,
//!   `jit_build_info{version}`.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use jit_common::counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::ConstCounter,
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    audit::AuditStats,
    datapath::{Counters, GateMaps, MapFill},
    kernel_sync::SyncStats,
};

/// Latencies the node observes.
#[derive(Debug)]
pub struct NodeMetrics {
    decision: Family<Vec<(&'static str, String)>, Histogram>,
    approval: Histogram,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self {
            // 100 µs .. ~3 s.
            decision: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
            }),
            // 1 s .. ~9 h.
            approval: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
        }
    }
}

impl NodeMetrics {
    /// A request was decided (and enforced, when granted) in `took`; `outcome` is the state it
    /// ended in (`granted`, `pending`, `denied`) or `error`.
    pub fn observe_decision(&self, outcome: &str, took: Duration) {
        self.decision
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .observe(took.as_secs_f64());
    }

    /// An approval granted a request `waited` after it was made.
    pub fn observe_approval(&self, waited: Duration) {
        self.approval.observe(waited.as_secs_f64());
    }
}

/// What a scrape reads besides the histograms. `None` where the read failed.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Live grants and waiting requests in the store.
    pub grants_active: Option<u64>,
    /// Requests waiting for a decision.
    pub requests_pending: Option<u64>,
    /// The kernel sync's record.
    pub sync: SyncStats,
    /// The audit log's record.
    pub audit: AuditStats,
    /// Store records that could not be decoded.
    pub corrupt_records: u64,
    /// Service names by kernel id.
    pub service_names: BTreeMap<u32, String>,
}

/// Reads the node's side of a snapshot.
pub type SnapshotFn = Box<dyn Fn() -> Snapshot + Send + Sync>;

/// The scrape-time collector: the node's snapshot plus the kernel's counters and map fill.
struct Scrape {
    node: SnapshotFn,
    /// A read-only handle on the pinned maps (its own file descriptors: a scrape never waits for
    /// the kernel sync's lock, nor holds it).
    maps: Option<Mutex<GateMaps>>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

/// The registry the `/metrics` endpoint encodes.
pub fn registry(
    node: &std::sync::Arc<NodeMetrics>,
    snapshot: SnapshotFn,
    maps: Option<GateMaps>,
) -> Registry {
    let mut r = Registry::default();
    r.register(
        "jit_decision_duration_seconds",
        "Time the agent took to decide a request (and enforce it when granted), by outcome",
        node.decision.clone(),
    );
    r.register(
        "jit_approval_wait_seconds",
        "Time from a request to the approval that granted it",
        node.approval.clone(),
    );
    r.register_collector(Box::new(Scrape {
        node: snapshot,
        maps: maps.map(Mutex::new),
    }));
    r
}

/// Encodes `registry` in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The same exposition in the classic Prometheus text format (0.0.4), for clients that do not
/// ask for OpenMetrics (`curl`, `promtool check metrics`, older scrapers). The two differ, for
/// what this agent exposes, in two points only: a counter family is named with its `_total`
/// suffix (OpenMetrics names the family without it and only its sample with it), and there is
/// no `# EOF` line.
#[must_use]
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Scrape {
    fn kernel(&self) -> Option<(Counters, Vec<MapFill>)> {
        let maps = self.maps.as_ref()?;
        let maps = maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match maps.counters() {
            Ok(c) => Some((c, maps.fill())),
            Err(e) => {
                tracing::warn!("metrics: reading the kernel's counters: {e}");
                None
            }
        }
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = (self.node)();
        let kernel = self.kernel();
        let name_of = |id: &u32| {
            snap.service_names
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("#{id}"))
        };
        if let Some((counters, fill)) = &kernel {
            let (mut allowed, mut dropped, mut would) = (Vec::new(), Vec::new(), Vec::new());
            for (id, per) in &counters.per_service {
                let service = name_of(id);
                for (reason, n) in per {
                    let reason_index = counter::NAMES.iter().position(|x| x == reason);
                    let labels = vec![("service", service.clone())];
                    match reason_index.map(|i| u32::try_from(i).unwrap_or(u32::MAX)) {
                        Some(counter::ALLOWED) => allowed.push((labels, *n)),
                        Some(counter::AUDIT_WOULD_DROP) => would.push((labels, *n)),
                        Some(i) if counter::is_drop(i) => {
                            let mut l = labels;
                            l.push(("reason", (*reason).to_string()));
                            dropped.push((l, *n));
                        }
                        _ => {}
                    }
                }
            }
            // Dropped before any service was known: the parser's reasons, counted globally.
            for reason in counter::UNPARSEABLE..=counter::OPAQUE {
                let name = counter::NAMES[reason as usize];
                let n = counters.global.get(name).copied().unwrap_or(0);
                dropped.push((
                    vec![("service", String::new()), ("reason", name.to_string())],
                    n,
                ));
            }
            counter_family(
                &mut e,
                "jit_packets_allowed",
                "Packets to a protected service the kernel passed under a live grant",
                &allowed,
            )?;
            counter_family(
                &mut e,
                "jit_packets_dropped",
                "Packets the kernel dropped, by service (empty: dropped before a service was \
                 known) and reason",
                &dropped,
            )?;
            counter_family(
                &mut e,
                "jit_packets_audit_would_drop",
                "Packets to an audit-mode service that would have been dropped (they passed)",
                &would,
            )?;
            let global = |i: u32| {
                counters
                    .global
                    .get(counter::NAMES[i as usize])
                    .copied()
                    .unwrap_or(0)
            };
            counter_family(
                &mut e,
                "jit_kernel_events_dropped",
                "Kernel events not reported: beyond the per-CPU budget, or lost to a full ring \
                 buffer",
                &[
                    (
                        vec![("cause", "rate_limited".into())],
                        global(counter::EVENTS_RATE_LIMITED),
                    ),
                    (
                        vec![("cause", "ring_full".into())],
                        global(counter::EVENTS_LOST),
                    ),
                ],
            )?;
            let fill_rows = |f: &dyn Fn(&MapFill) -> i64| -> Vec<(Labels, i64)> {
                fill.iter()
                    .map(|m| (vec![("map", m.name.to_string())], f(m)))
                    .collect()
            };
            gauge_family(
                &mut e,
                "jit_map_entries",
                "Entries in a kernel map",
                &fill_rows(&|m| signed(m.entries)),
            )?;
            gauge_family(
                &mut e,
                "jit_map_capacity_entries",
                "Capacity of a kernel map",
                &fill_rows(&|m| i64::from(m.max_entries)),
            )?;
        }
        gauge(
            &mut e,
            "jit_kernel_up",
            "1 when the kernel's counters and maps could be read for this scrape",
            i64::from(kernel.is_some()),
        )?;
        let store_up = snap.grants_active.is_some() && snap.requests_pending.is_some();
        gauge(
            &mut e,
            "jit_store_up",
            "1 when the store could be read for this scrape",
            i64::from(store_up),
        )?;
        if let (Some(active), Some(pending)) = (snap.grants_active, snap.requests_pending) {
            gauge(
                &mut e,
                "jit_grants_active",
                "Grants in force now",
                signed(active),
            )?;
            gauge(
                &mut e,
                "jit_requests_pending",
                "Requests waiting for a decision",
                signed(pending),
            )?;
        }
        counter(
            &mut e,
            "jit_audit_write_failures",
            "Audit records that could not be written when they happened",
            snap.audit.write_failures,
        )?;
        gauge(
            &mut e,
            "jit_audit_held_records",
            "Audit records held in memory until the log can be written",
            signed(snap.audit.held),
        )?;
        counter(
            &mut e,
            "jit_kernel_repairs",
            "Kernel entries reconciliation found out of line with the store and repaired",
            snap.sync.repairs,
        )?;
        counter(
            &mut e,
            "jit_kernel_reconciliations",
            "Reconciliations of the kernel with the store",
            snap.sync.reconciliations,
        )?;
        counter(
            &mut e,
            "jit_kernel_sync_failures",
            "Kernel writes or reconciliations that failed (retried)",
            snap.sync.failures,
        )?;
        gauge(
            &mut e,
            "jit_store_corrupt_records",
            "Store records that could not be decoded (left out, never guessed at)",
            signed(snap.corrupt_records),
        )?;
        gauge_family(
            &mut e,
            "jit_build_info",
            "The agent's version",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_with_total_and_has_no_eof() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total{k=\"v\"} 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_classic_text(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total{k=\"v\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn the_agents_exposition_is_well_formed_without_a_kernel() {
        let node = std::sync::Arc::new(NodeMetrics::default());
        node.observe_decision("granted", Duration::from_millis(3));
        node.observe_approval(Duration::from_secs(90));
        let snap = Snapshot {
            grants_active: Some(2),
            requests_pending: Some(1),
            ..Snapshot::default()
        };
        let r = registry(&node, Box::new(move || snap.clone()), None);
        let om = encode(&r).expect("encode");
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("jit_grants_active 2\n"), "{om}");
        assert!(om.contains("jit_kernel_up 0\n"), "{om}");
        assert!(
            om.contains("jit_decision_duration_seconds_count{outcome=\"granted\"} 1\n"),
            "{om}"
        );
        // No kernel: no packet figures rather than zeros.
        assert!(!om.contains("jit_packets_allowed"), "{om}");
        let classic = to_classic_text(&om);
        assert!(classic.contains("# TYPE jit_audit_write_failures_total counter\n"));
        assert!(!classic.contains("# EOF"));
    }
}
