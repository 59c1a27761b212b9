//! The `jit-agent` command line.

mod bpf;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// JIT Gate node agent.
#[derive(Debug, Parser)]
#[command(name = "jit-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log lines as human-readable text, or as one JSON object per line (for log shippers).
    /// `RUST_LOG` sets the filter (default info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "JIT_LOG_FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the gate and serve the API until SIGTERM (the gate stays attached).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "JIT_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        overrides: RunOverrides,
    },
    /// Check a configuration file and print what it configures.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short, env = "JIT_CONFIG")]
        config: PathBuf,
    },
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Check and explain Cedar policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Operate and inspect the kernel gate (attach, detach, status, grants).
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
    /// The audit log's signing key (verify and query the log with `jitctl audit`).
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// Flags of `run` that override the file.
#[derive(Debug, clap::Args)]
pub struct RunOverrides {
    /// mTLS listen address (overrides agent.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Plain HTTP address of /metrics, /healthz and /readyz (overrides agent.metrics_listen).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Unix socket path (overrides agent.unix_socket).
    #[arg(long)]
    pub unix_socket: Option<PathBuf>,
    /// State directory (overrides agent.state_dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// bpffs pin directory (overrides agent.pin_dir).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Interface to gate, `eth0` or `eth0:tc` (repeatable; replaces agent.interfaces).
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
    /// Where requests, grants and ids live: redb (this node) or etcd (shared by many nodes;
    /// overrides store.backend).
    #[arg(long = "store", value_enum)]
    pub store: Option<crate::config::StoreBackend>,
    /// etcd client URL (repeatable; replaces store.endpoints).
    #[arg(long = "etcd-endpoint")]
    pub etcd_endpoints: Vec<String>,
}

/// `audit` commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Make a new Ed25519 key for the audit log's checkpoints (its own key, not the TLS key):
    /// the private key (hex PKCS#8, mode 0600; never overwritten) and the public key beside it
    /// (`<out>.pub`, hex), which auditors pass to `jitctl audit verify --key`.
    Keygen {
        /// Where to write the private key (`audit.signing_key` in the configuration).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `policy` commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file against the schema; prints each problem as file:line:column.
    Check {
        /// Cedar policy file.
        file: PathBuf,
        /// Cedar schema file (default: the built-in schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Show which policies decide a request, and why, for every action.
    Explain(ExplainArgs),
}

/// `policy explain` options.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Agent configuration (services, groups, policy files).
    #[arg(long, short, env = "JIT_CONFIG")]
    config: PathBuf,
    /// Who asks (a SPIFFE ID).
    #[arg(long)]
    principal: String,
    /// Service name.
    #[arg(long)]
    service: String,
    /// Duration asked for.
    #[arg(long = "for", value_name = "DURATION", default_value = "15m")]
    duration: String,
    /// Reason.
    #[arg(long, default_value = "")]
    reason: String,
    /// Ticket.
    #[arg(long, default_value = "")]
    ticket: String,
    /// Requester address.
    #[arg(long)]
    source_ip: Option<std::net::IpAddr>,
    /// Decision time, RFC 3339 (default: now).
    #[arg(long)]
    at: Option<String>,
    /// For approve/deny/revoke: the requester (default: the principal).
    #[arg(long)]
    requester: Option<String>,
    /// Approvals the request already has.
    #[arg(long, default_value_t = 0)]
    approvals: u32,
}

/// `certs` commands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a development CA, the agent's certificate and identity certificates.
    Init {
        /// Output directory.
        #[arg(long, default_value = "./jit-certs")]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "jit.local")]
        trust_domain: String,
        /// Extra host name or address of the agent (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Identity path, e.g. alice or ci/deployer (repeatable).
        #[arg(long = "identity")]
        identities: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

/// Options every `bpf` subcommand takes.
#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// bpffs directory holding the gate's maps and links.
    #[arg(long, env = "JIT_PIN_DIR", default_value = crate::datapath::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, overrides } => {
            let cfg = crate::config::Config::load(
                &config,
                &crate::config::Overrides {
                    listen: overrides.listen,
                    metrics_listen: overrides.metrics_listen,
                    unix_socket: overrides.unix_socket,
                    state_dir: overrides.state_dir,
                    pin_dir: overrides.pin_dir,
                    interfaces: overrides.interfaces,
                    store: overrides.store,
                    etcd_endpoints: overrides.etcd_endpoints,
                },
            )?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::daemon::run(cfg))
        }
        Command::CheckConfig { config } => {
            let cfg = crate::config::Config::load(&config, &crate::config::Overrides::default())?;
            crate::policy::load_files(&cfg.policy_file, cfg.policy_schema.as_deref())?;
            println!("{}: valid", config.display());
            println!("  policies {} valid", cfg.policy_file.display());
            println!("  listen {} and {}", cfg.listen, cfg.unix_socket.display());
            match &cfg.store {
                crate::config::StoreConfig::Redb => println!(
                    "  store: redb at {}",
                    cfg.state_dir.join("state.redb").display()
                ),
                crate::config::StoreConfig::Etcd(e) => println!(
                    "  store: etcd at {} under {}",
                    e.endpoints.join(", "),
                    e.prefix
                ),
            }
            println!(
                "  metrics and health on http://{} (/metrics, /healthz, /readyz)",
                cfg.metrics_listen
            );
            for (iface, mode) in &cfg.interfaces {
                println!("  gate on {iface} ({mode})");
            }
            for s in cfg.services.values() {
                println!(
                    "  service {} ({:?}): {} destination(s), max {}, {} approval(s)",
                    s.name,
                    s.mode,
                    s.destinations.len(),
                    jit_api::duration::format_duration(s.max_duration),
                    s.approvals_required
                );
            }
            for (id, nets) in &cfg.identities {
                let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
                println!("  identity {id} from {}", nets.join(", "));
            }
            for warning in crate::coverage::node_warnings(&cfg) {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        Command::Certs(CertsCommand::Init {
            dir,
            trust_domain,
            hosts,
            identities,
            days,
        }) => {
            let w = crate::certs::init(&crate::certs::CertsPlan {
                dir,
                trust_domain: trust_domain.clone(),
                hosts,
                identities: identities.clone(),
                days,
            })?;
            for f in &w.files {
                println!("wrote {}", f.display());
            }
            for id in identities {
                println!("identity spiffe://{trust_domain}/{id}");
            }
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { file, schema }) => {
            let loaded = crate::policy::load_files(&file, schema.as_deref())?;
            let _ = loaded;
            println!("{}: valid", file.display());
            Ok(())
        }
        Command::Policy(PolicyCommand::Explain(args)) => explain(&args),
        Command::Bpf(cmd) => bpf::run(cmd),
        Command::Audit(AuditCommand::Keygen { out }) => {
            let public = crate::audit::keygen(&out)?;
            println!("wrote {} (private, 0600)", out.display());
            println!(
                "wrote {} (public: {public})",
                crate::audit::public_key_path(&out).display()
            );
            Ok(())
        }
    }
}

fn explain(a: &ExplainArgs) -> anyhow::Result<()> {
    use anyhow::{Context as _, anyhow};

    let config = &a.config;

    let cfg = crate::config::Config::load(config, &crate::config::Overrides::default())?;
    let policies = crate::policy::Policies::load(&cfg.policy_file, cfg.policy_schema.as_deref())?;
    crate::identity::check_spiffe_id(&a.principal).map_err(|e| anyhow!("--principal: {e}"))?;
    let service = cfg.services.get(&a.service).ok_or_else(|| {
        anyhow!(
            "--service: {:?} is not configured (known: {})",
            a.service,
            crate::config::service_names(&cfg)
        )
    })?;
    let wanted =
        jit_api::duration::parse_duration(&a.duration).map_err(|e| anyhow!("--for {e}"))?;
    let now_ms = match &a.at {
        Some(t) => {
            let st = humantime::parse_rfc3339_weak(t).with_context(|| {
                format!("--at {t:?}: expected RFC 3339, e.g. 2026-11-30T10:00:00Z")
            })?;
            let d = st
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| anyhow!("--at is before 1970"))?;
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        }
        None => crate::model::now_ms(),
    };
    let requester = a.requester.clone().unwrap_or_else(|| a.principal.clone());
    let asked = crate::engine::clamp(service, wanted, false);
    println!(
        "{} on {} ({} environment) for {}{}, groups: {}",
        a.principal,
        service.name,
        service.environment,
        jit_api::duration::format_duration(std::time::Duration::from_secs(asked.duration_s)),
        if asked.clamped { " (clamped)" } else { "" },
        {
            let g = cfg.groups_of(&a.principal);
            if g.is_empty() {
                "(none)".to_string()
            } else {
                g.join(", ")
            }
        }
    );
    for action in crate::policy::Action::ALL {
        // The ask the engine builds for this action, and the same facts and decision.
        let question = crate::engine::Question {
            wanted,
            reason: &a.reason,
            ticket: &a.ticket,
            source_ip: a.source_ip,
            requester: if action.is_at_request() {
                &a.principal
            } else {
                &requester
            },
            approvals: a.approvals,
        };
        let ask = crate::engine::ask_for(action, service, &question);
        let v = crate::engine::decide(&policies, &cfg, action, &a.principal, service, &ask, now_ms);
        println!(
            "  {:<13} {:<5} {}",
            action.name(),
            if v.allowed { "ALLOW" } else { "DENY" },
            v.why()
        );
        for e in v.errors {
            println!("  {:<13}       error: {e}", "");
        }
    }
    if requester == a.principal {
        println!(
            "  (approve: a requester can never approve its own request, whatever the policies say)"
        );
    }
    Ok(())
}
