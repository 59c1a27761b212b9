//! `jit-agent bpf ...`: attach, detach and inspect the kernel gate.

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use jit_api::table;

use super::PinArgs;
use crate::datapath::{
    self, Attachment, Counters, Gate, GateMaps, GrantEntry, LoadOptions, MapFill,
};
use crate::{kernel_names::KernelNames, spec::AttachMode};

/// Kernel gate commands.
#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// Load the gate and attach it to an interface; the link is pinned, so it stays attached
    /// after this command exits. Attaching where a link is already pinned swaps in the newly
    /// loaded program without a gap.
    Attach {
        /// Interface to gate (its ingress).
        #[arg(long)]
        iface: String,
        /// auto (native XDP and TC on a NIC, TC only on veth and other virtual devices),
        /// xdp (native where the driver supports it, generic otherwise), xdp-generic,
        /// xdp-native or tc.
        #[arg(long, default_value = "auto")]
        mode: AttachMode,
        /// Capacity of the grants map, used when the map is first created.
        #[arg(long, default_value_t = 65_536)]
        max_grants: u32,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Detach the gate from an interface (the only way enforcement stops there).
    Detach {
        /// Interface to release.
        #[arg(long)]
        iface: String,
        /// The hook to detach: xdp (any XDP mode), tc, or auto (whichever the gate has there).
        #[arg(long, default_value = "auto")]
        mode: AttachMode,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Show attachments, map fill and counters by reason.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinArgs,
        #[command(flatten)]
        names: NamesArgs,
    },
    /// Show the grants the kernel holds now.
    Grants {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinArgs,
        #[command(flatten)]
        names: NamesArgs,
    },
}

/// Where the names of the kernel's numeric ids are found.
#[derive(Debug, clap::Args)]
pub struct NamesArgs {
    /// The agent's state directory, where it records the names behind the kernel's service and
    /// identity ids (shown next to the ids when found).
    #[arg(long, env = "JIT_STATE_DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    state_dir: std::path::PathBuf,
}

impl NamesArgs {
    /// The recorded names; none (with a note on stderr) when they cannot be read.
    fn load(&self) -> KernelNames {
        match KernelNames::load(&self.state_dir) {
            Ok(Some(n)) => n,
            Ok(None) => {
                eprintln!(
                    "note: no names recorded in {} (is the agent's state there? --state-dir); \
                     showing ids only",
                    self.state_dir.display()
                );
                KernelNames::default()
            }
            Err(e) => {
                eprintln!("note: {e}; showing ids only");
                KernelNames::default()
            }
        }
    }
}

/// Runs one `bpf` command.
pub(crate) fn run(cmd: BpfCommand) -> anyhow::Result<()> {
    match cmd {
        BpfCommand::Attach {
            iface,
            mode,
            max_grants,
            pin,
        } => {
            // Refuse a bad interface before anything is loaded or pinned.
            datapath::check_interface(&iface)?;
            let mut gate = Gate::load(&LoadOptions {
                pin_dir: pin.pin_dir.clone(),
                max_grants,
            })
            .with_context(|| format!("loading the gate under {}", pin.pin_dir.display()))?;
            let path = gate.attach(&iface, mode)?;
            println!(
                "attached to {iface} ({mode}); link pinned at {}",
                path.display()
            );
            Ok(())
        }
        BpfCommand::Detach { iface, mode, pin } => {
            datapath::detach(&pin.pin_dir, &iface, mode)?;
            println!("detached from {iface} ({mode})");
            Ok(())
        }
        BpfCommand::Status { json, pin, names } => status(&pin, &names.load(), json),
        BpfCommand::Grants { json, pin, names } => grants(&pin, &names.load(), json),
    }
}

#[derive(Serialize)]
struct Status {
    pin_dir: String,
    attachments: Vec<Attachment>,
    maps: Vec<MapFill>,
    counters: Counters,
    /// The names of the service ids the counters are keyed by (those recorded).
    service_names: std::collections::BTreeMap<u32, String>,
}

fn status(pin: &PinArgs, names: &KernelNames, json: bool) -> anyhow::Result<()> {
    let maps = GateMaps::open(&pin.pin_dir)?;
    let counters = maps.counters()?;
    let status = Status {
        pin_dir: pin.pin_dir.display().to_string(),
        attachments: datapath::attachments(&pin.pin_dir)?,
        maps: maps.fill(),
        service_names: counters
            .per_service
            .keys()
            .filter_map(|id| Some((*id, names.services.get(id)?.clone())))
            .collect(),
        counters,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("pin directory: {}\n", status.pin_dir);
    let rows: Vec<Vec<String>> = status
        .attachments
        .iter()
        .map(|a| {
            vec![
                a.interface.clone(),
                a.hook.clone(),
                opt(a.link_id),
                opt(a.program_id),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("attachments: none (the gate enforces nothing until attached)\n");
    } else {
        println!(
            "{}",
            table::render(&["INTERFACE", "HOOK", "LINK", "PROGRAM"], &rows)
        );
    }
    let rows: Vec<Vec<String>> = status
        .maps
        .iter()
        .map(|m| {
            vec![
                m.name.to_string(),
                m.entries.to_string(),
                m.max_entries.to_string(),
            ]
        })
        .collect();
    println!("{}", table::render(&["MAP", "ENTRIES", "CAPACITY"], &rows));
    // In the kernel's order (verdicts first), not alphabetical.
    let rows: Vec<Vec<String>> = jit_common::counter::NAMES
        .iter()
        .map(|k| {
            let v = status.counters.global.get(k).copied().unwrap_or(0);
            vec![(*k).to_string(), v.to_string()]
        })
        .collect();
    print!("{}", table::render(&["COUNTER", "PACKETS"], &rows));
    if !status.counters.per_service.is_empty() {
        let rows: Vec<Vec<String>> = status
            .counters
            .per_service
            .iter()
            .flat_map(|(id, per)| {
                let service = names.service(*id);
                per.iter()
                    .map(move |(k, v)| vec![service.clone(), (*k).to_string(), v.to_string()])
            })
            .collect();
        print!(
            "\n{}",
            table::render(&["SERVICE", "VERDICT", "PACKETS"], &rows)
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct GrantRow {
    #[serde(flatten)]
    grant: GrantEntry,
    /// The service's name, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<String>,
    /// The identity's SPIFFE ID, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_name: Option<String>,
    /// Nanoseconds until expiry, 0 when expired.
    remaining_ns: u64,
    /// `live`, `expired` or `pending` (not yet valid).
    state: &'static str,
}

fn grants(pin: &PinArgs, names: &KernelNames, json: bool) -> anyhow::Result<()> {
    let maps = GateMaps::open(&pin.pin_dir)?;
    let now = datapath::boottime_ns()?;
    let rows: Vec<GrantRow> = maps
        .grants()?
        .into_iter()
        .map(|g| GrantRow {
            remaining_ns: g.expires_at_ns.saturating_sub(now),
            state: if now < g.not_before_ns {
                "pending"
            } else if now >= g.expires_at_ns {
                "expired"
            } else {
                "live"
            },
            service_name: names.services.get(&g.service_id).cloned(),
            identity_name: names.identities.get(&g.identity_id).cloned(),
            grant: g,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no grants in the kernel");
        return Ok(());
    }
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.grant.grant_id.to_string(),
                names.identity(r.grant.identity_id),
                match r.grant.scope {
                    datapath::GrantScope::Host(addr) => addr.to_string(),
                    datapath::GrantScope::Identity => "identity prefixes".to_string(),
                },
                names.service(r.grant.service_id),
                r.state.to_string(),
                human(Duration::from_nanos(r.remaining_ns)),
                if r.grant.usage.used() {
                    format!("{} pkts", r.grant.usage.packets)
                } else {
                    "no".to_string()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "GRANT",
                "IDENTITY",
                "SOURCE",
                "SERVICE",
                "STATE",
                "REMAINING",
                "USED"
            ],
            &table_rows
        )
    );
    Ok(())
}

fn opt(v: Option<u32>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{:01}s", s, d.subsec_millis() / 100)
    }
}
