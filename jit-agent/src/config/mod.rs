//! The agent's configuration: one TOML file (every field below), with command-line flags that
//! override it. A bad file is refused as a whole, with the file, the field and what is wrong;
//! nothing is attached until it is valid.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

mod fields;
mod store;

use ipnet::IpNet;
use serde::Deserialize;

pub use self::fields::{
    Destination, Dur, HookFormat, HookUrl, Interface, Listen, Member, Prefix, SpiffeId,
    canonical_prefix, parse_destination,
};
pub use self::store::{Backend as StoreBackend, EtcdConfig, StoreConfig, StoreSection};
use crate::spec::{AttachMode, Mode, ServiceDest};

/// A configuration error: which file, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The field, e.g. `services[1].max_duration`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[agent]`.
    #[serde(default)]
    pub agent: AgentSection,
    /// `[tls]`.
    #[serde(default)]
    pub tls: TlsSection,
    /// `[[services]]`.
    #[serde(default)]
    pub services: Vec<ServiceSection>,
    /// `[[identities]]`.
    #[serde(default)]
    pub identities: Vec<IdentitySection>,
    /// `[policy]`.
    #[serde(default)]
    pub policy: PolicySection,
    /// `[[groups]]`.
    #[serde(default)]
    pub groups: Vec<GroupSection>,
    /// `[[webhooks]]`.
    #[serde(default)]
    pub webhooks: Vec<WebhookSection>,
    /// `[audit]`.
    #[serde(default)]
    pub audit: AuditSection,
    /// `[store]`.
    #[serde(default)]
    pub store: StoreSection,
}

/// `[audit]`: the tamper-evident audit log (see README, "The audit log").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Directory of the log's files. Default `<state_dir>/audit`.
    pub dir: Option<PathBuf>,
    /// Ed25519 signing key of the checkpoints (`jit-agent audit keygen`). Default
    /// `<state_dir>/audit-signing.key`, generated on first start when missing.
    pub signing_key: Option<PathBuf>,
    /// Rotate the current file at this size, bytes. Default 64 MiB.
    pub rotate_bytes: Option<u64>,
    /// A signed checkpoint after this many records. Default 1000.
    pub checkpoint_every_records: Option<u64>,
    /// A signed checkpoint after this long when records were written since. Default `1m`.
    pub checkpoint_every: Option<Dur>,
    /// Kernel denials are aggregated over this window before they are recorded. Default `10s`.
    pub denial_window: Option<Dur>,
    /// Who may follow the log over the API (`WatchAudit`), besides root on the local socket:
    /// SPIFFE IDs, or prefixes ending in `*`. Default: nobody else.
    #[serde(default)]
    pub readers: Vec<Member>,
    /// An HTTP collector the log's lines are POSTed to, in order, at least once (see README).
    pub sink_url: Option<HookUrl>,
    /// Lines per request to the collector at most. Default 500.
    pub sink_batch: Option<usize>,
    /// `refuse` (default): while the log cannot be written, no grant is issued (fail closed).
    /// `continue`: grants are issued and their records held until the log is writable.
    #[serde(default)]
    pub on_failure: AuditFailure,
}

/// What the agent does while the audit log cannot be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFailure {
    /// Issue no grant (fail closed).
    #[default]
    Refuse,
    /// Issue grants; hold their records until the log is writable.
    Continue,
}

/// The audit log, validated.
#[derive(Clone, Debug)]
pub struct Audit {
    /// Directory of the files.
    pub dir: PathBuf,
    /// Signing key file.
    pub signing_key: PathBuf,
    /// Rotation size.
    pub rotate_bytes: u64,
    /// Checkpoint every N records.
    pub checkpoint_every_records: u64,
    /// Checkpoint every T.
    pub checkpoint_every: Duration,
    /// Denials aggregated per window.
    pub denial_window: Duration,
    /// Who may follow the log over the API, besides root on the local socket.
    pub readers: Vec<String>,
    /// The HTTP collector, if any.
    pub sink_url: Option<String>,
    /// Lines per request to it.
    pub sink_batch: usize,
    /// Fail closed or not.
    pub on_failure: AuditFailure,
}

/// `[policy]`: the Cedar policy set that decides who may request, approve, deny, revoke and
/// break the glass, and what is granted at once.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Cedar policy file. Re-read when it changes; a set that does not validate is refused and
    /// the previous one stays in force.
    pub file: Option<PathBuf>,
    /// Cedar schema file. Default: the schema built into the agent
    /// (examples/policies/jit.cedarschema).
    pub schema: Option<PathBuf>,
}

/// `[[groups]]`: named groups of identities, for policies (`principal in Jit::Group::"sre"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// Group name.
    pub name: String,
    /// Members: SPIFFE IDs, or prefixes ending in `*`.
    #[serde(default)]
    pub members: Vec<Member>,
}

/// `[[webhooks]]`: where notifications go.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// `http://` or `https://` URL to POST to.
    pub url: HookUrl,
    /// `json` (the `jit.v1.Notification` message, default) or `slack` (`{"text": ...}`).
    #[serde(default)]
    pub format: HookFormat,
    /// Events to send: `request.pending`, `request.granted`, `request.denied`,
    /// `grant.break_glass`, `grant.revoked`. Default: all.
    #[serde(default)]
    pub events: Vec<jit_api::Event>,
    /// Only for these services. Default: all.
    #[serde(default)]
    pub services: Vec<String>,
}

/// `[agent]`: where the agent listens, keeps state and attaches the gate.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// mTLS gRPC listen address. Default `127.0.0.1:7443`.
    pub listen: Option<Listen>,
    /// Plain HTTP listen address of `/metrics`, `/healthz` and `/readyz`. Default
    /// `127.0.0.1:9464`.
    pub metrics_listen: Option<Listen>,
    /// Unix socket for node-local administration (root only). Default
    /// `/run/jit-agent/agent.sock`.
    pub unix_socket: Option<PathBuf>,
    /// Directory for the embedded store. Default `/var/lib/jit-agent`.
    pub state_dir: Option<PathBuf>,
    /// bpffs pin directory. Default `/sys/fs/bpf/jit`.
    pub pin_dir: Option<PathBuf>,
    /// Interfaces to gate: `"eth0"` (auto) or `"eth0:tc"`, `"eth0:xdp-generic"` ...
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// How long a request may wait for approval. Default `1h`.
    pub request_ttl: Option<Dur>,
    /// Capacity of the kernel grants map. Default 65536.
    pub max_grants: Option<u32>,
    /// Requests one identity may have waiting for a decision at once. Default 20.
    pub max_pending_per_identity: Option<u32>,
}

/// `[tls]`: the agent's certificate and the trust bundle for client certificates. Files are
/// re-read when they change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM bundle of CAs whose client certificates are accepted.
    pub ca: Option<PathBuf>,
    /// The agent's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    pub key: Option<PathBuf>,
    /// The trust domains the `ca` bundle may issue identities for. Empty: any (not pinned).
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// More CAs, each pinned to the trust domains it may issue for (federation).
    #[serde(default)]
    pub authorities: Vec<AuthoritySection>,
}

/// `[[tls.authorities]]`: a CA that may issue identities for the trust domains named, only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoritySection {
    /// The CA's certificate(s), PEM.
    pub ca: PathBuf,
    /// The trust domains it may issue for (at least one).
    pub trust_domains: Vec<String>,
}

/// `[[services]]`: a protected service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Name used in requests.
    pub name: String,
    /// Destinations, `"10.0.0.5:5432/tcp"`, `"[fd00::5]:443/tcp"`, `"*:22/tcp"` (any address of
    /// both families; so do `0.0.0.0` and `[::]`). See `coverage` for what each covers.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// `enforce` (default) or `audit`.
    pub mode: Option<Mode>,
    /// Longest grant; longer requests are clamped. Default `1h`.
    pub max_duration: Option<Dur>,
    /// Distinct approvals a request needs when policy does not grant it at once (at least 1;
    /// a permitting `request` policy may raise it with `@approvals("N")`). Default 1.
    pub approvals_required: Option<u32>,
    /// Whether a request must give a reason. Default true.
    pub require_reason: Option<bool>,
    /// Environment label, `resource.environment` in policies. Default `production`.
    pub environment: Option<String>,
    /// Hard cap of a break-glass grant. Default `15m`.
    pub break_glass_max: Option<Dur>,
    /// Also let the requester's own address through for the life of its grant.
    #[serde(default)]
    pub bind_requester_address: bool,
}

/// `[[identities]]`: static source bindings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    /// The identity (a SPIFFE ID).
    pub spiffe_id: SpiffeId,
    /// Source prefixes that carry it, e.g. a CI runner subnet.
    #[serde(default)]
    pub sources: Vec<Prefix>,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--unix-socket`.
    pub unix_socket: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--pin-dir`.
    pub pin_dir: Option<PathBuf>,
    /// `--interface` (replaces the file's list when given).
    pub interfaces: Vec<String>,
    /// `--store`.
    pub store: Option<StoreBackend>,
    /// `--etcd-endpoint` (replaces the file's list when given).
    pub etcd_endpoints: Vec<String>,
}

/// A validated service.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Destinations.
    pub destinations: Vec<ServiceDest>,
    /// Mode.
    pub mode: Mode,
    /// Longest grant.
    pub max_duration: Duration,
    /// Approvals needed.
    pub approvals_required: u32,
    /// Reason required.
    pub require_reason: bool,
    /// Environment label.
    pub environment: String,
    /// Break-glass cap.
    pub break_glass_max: Duration,
    /// Bind the requester's address for the grant's life.
    pub bind_requester_address: bool,
}

/// A validated webhook.
#[derive(Clone, Debug)]
pub struct Webhook {
    /// URL.
    pub url: String,
    /// Slack-compatible body instead of the JSON schema.
    pub slack: bool,
    /// Events (empty: all).
    pub events: Vec<jit_api::Event>,
    /// Services (empty: all).
    pub services: Vec<String>,
}

/// Where the agent keeps its state unless `agent.state_dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jit-agent";

/// A CA and the trust domains it may issue identities for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustAuthority {
    /// The CA certificate file (PEM, one or more certificates).
    pub ca: PathBuf,
    /// Trust domains; empty: any.
    pub trust_domains: Vec<String>,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from.
    pub file: PathBuf,
    /// mTLS listen address.
    pub listen: SocketAddr,
    /// Metrics and health listen address (plain HTTP).
    pub metrics_listen: SocketAddr,
    /// Unix socket path.
    pub unix_socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Pin directory.
    pub pin_dir: PathBuf,
    /// Interfaces and modes.
    pub interfaces: Vec<(String, AttachMode)>,
    /// Pending request TTL.
    pub request_ttl: Duration,
    /// Kernel grants capacity.
    pub max_grants: u32,
    /// Waiting requests per identity.
    pub max_pending_per_identity: u32,
    /// CA bundle.
    pub tls_ca: PathBuf,
    /// Agent certificate.
    pub tls_cert: PathBuf,
    /// Agent key.
    pub tls_key: PathBuf,
    /// The CAs client certificates may chain to, each with the trust domains it may issue for
    /// (the first is `tls.ca`; empty domains: any).
    pub tls_authorities: Vec<TrustAuthority>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Static bindings: identity → prefixes.
    pub identities: BTreeMap<String, Vec<IpNet>>,
    /// Policy file.
    pub policy_file: PathBuf,
    /// Schema file (None: built in).
    pub policy_schema: Option<PathBuf>,
    /// Groups: name → member patterns.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Webhooks.
    pub webhooks: Vec<Webhook>,
    /// The audit log.
    pub audit: Audit,
    /// Where requests, grants and ids live.
    pub store: StoreConfig,
    /// How long closed records are kept before they are pruned (`store.retention`).
    pub store_retention: std::time::Duration,
}

impl Config {
    /// Reads, parses and validates `file`, then applies `overrides`.
    pub fn load(file: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.display().to_string(),
            field: "(file)".into(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::from_text(file, &text, overrides)
    }

    /// Parses and validates the text of `file`, then applies `overrides`. Every field parses
    /// itself (see `fields`), so an error names the field it is in.
    pub fn from_text(file: &Path, text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let err = |field: String, message: String| ConfigError {
            file: file.display().to_string(),
            field,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| err("(syntax)".into(), toml_message(text, &e)))?;
        let parsed: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "(top level)".into()
            } else {
                path
            };
            err(field, toml_message(text, e.inner()))
        })?;
        Self::validate(file, parsed, overrides)
    }

    /// Checks what spans fields (duplicates, ownership, references) and fills in defaults.
    fn validate(file: &Path, f: FileConfig, overrides: &Overrides) -> Result<Self, ConfigError> {
        let name = file.display().to_string();
        let err = |field: &str, message: String| ConfigError {
            file: name.clone(),
            field: field.to_string(),
            message,
        };
        let listen = match &overrides.listen {
            Some(s) => Listen::try_from(s.clone()).map_err(|m| err("agent.listen", m))?,
            None => f
                .agent
                .listen
                .unwrap_or(Listen(SocketAddr::from(([127, 0, 0, 1], 7443)))),
        };
        let metrics_listen = match &overrides.metrics_listen {
            Some(s) => Listen::try_from(s.clone()).map_err(|m| err("agent.metrics_listen", m))?,
            None => f
                .agent
                .metrics_listen
                .unwrap_or(Listen(SocketAddr::from(([127, 0, 0, 1], 9464)))),
        };
        let interfaces = if overrides.interfaces.is_empty() {
            f.agent.interfaces
        } else {
            overrides
                .interfaces
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Interface::try_from(s.clone())
                        .map_err(|m| err(&format!("agent.interfaces[{i}]"), m))
                })
                .collect::<Result<_, _>>()?
        };
        let max_grants = f.agent.max_grants.unwrap_or(65_536);
        if max_grants == 0 {
            return Err(err("agent.max_grants", "must be at least 1".into()));
        }
        let need = |v: Option<PathBuf>, field: &str| {
            v.ok_or_else(|| {
                err(
                    field,
                    "is required (make a development set with `jit-agent certs init`)".into(),
                )
            })
        };
        let tls_ca = need(f.tls.ca, "tls.ca")?;
        let tls_cert = need(f.tls.cert, "tls.cert")?;
        let tls_key = need(f.tls.key, "tls.key")?;
        let check_domains = |field: &str, domains: &[String]| {
            for d in domains {
                crate::identity::check_spiffe_id(&format!("spiffe://{d}/x")).map_err(|_| {
                    err(
                        field,
                        format!(
                            "{d:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')"
                        ),
                    )
                })?;
            }
            Ok::<(), ConfigError>(())
        };
        check_domains("tls.trust_domains", &f.tls.trust_domains)?;
        // Pinning partners while the bundle may issue any trust domain pins nothing: a partner's
        // root left in (or cross-signed into) the bundle would mint any identity.
        if !f.tls.authorities.is_empty() && f.tls.trust_domains.is_empty() {
            return Err(err(
                "tls.trust_domains",
                "is required when tls.authorities are configured: name the trust domains the \
                 tls.ca bundle may issue for"
                    .into(),
            ));
        }
        let mut tls_authorities = vec![TrustAuthority {
            ca: tls_ca.clone(),
            trust_domains: f.tls.trust_domains.clone(),
        }];
        for (i, a) in f.tls.authorities.into_iter().enumerate() {
            let field = format!("tls.authorities[{i}].trust_domains");
            if a.trust_domains.is_empty() {
                return Err(err(
                    &field,
                    "name the trust domains this CA may issue for (at least one)".into(),
                ));
            }
            check_domains(&field, &a.trust_domains)?;
            tls_authorities.push(TrustAuthority {
                ca: a.ca,
                trust_domains: a.trust_domains,
            });
        }

        let mut services = BTreeMap::new();
        let mut seen_dests = BTreeMap::new();
        for (i, s) in f.services.into_iter().enumerate() {
            let at = |k: &str| format!("services[{i}].{k}");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(err(
                    &at("name"),
                    format!("{:?}: use letters, digits, '-', '_' or '.'", s.name),
                ));
            }
            if s.destinations.is_empty() {
                return Err(err(
                    &at("destinations"),
                    "needs at least one address:port/proto".into(),
                ));
            }
            for (j, Destination(dest)) in s.destinations.iter().enumerate() {
                if let Some(other) = seen_dests.insert(*dest, s.name.clone()) {
                    return Err(err(
                        &format!("services[{i}].destinations[{j}]"),
                        format!("{dest} is already a destination of service {other:?}"),
                    ));
                }
            }
            let approvals_required = s.approvals_required.unwrap_or(1);
            if approvals_required == 0 {
                return Err(err(
                    &at("approvals_required"),
                    "must be at least 1; grant at once with an auto_approve policy".into(),
                ));
            }
            if services.contains_key(&s.name) {
                return Err(err(&at("name"), format!("{:?} is defined twice", s.name)));
            }
            services.insert(
                s.name.clone(),
                Service {
                    name: s.name,
                    destinations: s.destinations.into_iter().map(|d| d.0).collect(),
                    mode: s.mode.unwrap_or(Mode::Enforce),
                    max_duration: s.max_duration.map_or(Duration::from_secs(3600), |d| d.0),
                    approvals_required,
                    require_reason: s.require_reason.unwrap_or(true),
                    environment: s.environment.unwrap_or_else(|| "production".into()),
                    break_glass_max: s.break_glass_max.map_or(Duration::from_secs(900), |d| d.0),
                    bind_requester_address: s.bind_requester_address,
                },
            );
        }

        let mut identities: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        let mut owner: BTreeMap<IpNet, String> = BTreeMap::new();
        for (i, id) in f.identities.into_iter().enumerate() {
            let SpiffeId(spiffe_id) = id.spiffe_id;
            for (j, Prefix(net)) in id.sources.into_iter().enumerate() {
                if let Some(other) = owner.insert(net, spiffe_id.clone())
                    && other != spiffe_id
                {
                    return Err(err(
                        &format!("identities[{i}].sources[{j}]"),
                        format!("{net} is bound to both {other} and {spiffe_id}"),
                    ));
                }
                identities.entry(spiffe_id.clone()).or_default().push(net);
            }
        }
        let policy_file = f.policy.file.ok_or_else(|| {
            err(
                "policy.file",
                "is required: a Cedar policy file (see examples/policies/policies.cedar)".into(),
            )
        })?;
        let mut groups = BTreeMap::new();
        for (i, g) in f.groups.into_iter().enumerate() {
            if g.name.is_empty() || g.name.contains('"') {
                return Err(err(
                    &format!("groups[{i}].name"),
                    format!("{:?} is not a group name", g.name),
                ));
            }
            let members = g.members.into_iter().map(|m| m.0).collect();
            if groups.insert(g.name.clone(), members).is_some() {
                return Err(err(
                    &format!("groups[{i}].name"),
                    format!("{:?} is defined twice", g.name),
                ));
            }
        }
        let mut webhooks = Vec::new();
        for (i, w) in f.webhooks.into_iter().enumerate() {
            for (j, sv) in w.services.iter().enumerate() {
                if !services.contains_key(sv) {
                    return Err(err(
                        &format!("webhooks[{i}].services[{j}]"),
                        format!("{sv:?} is not a configured service"),
                    ));
                }
            }
            webhooks.push(Webhook {
                url: w.url.0,
                slack: w.format == HookFormat::Slack,
                events: w.events,
                services: w.services,
            });
        }

        let store_retention =
            store::retention(&f.store).map_err(|(field, message)| err(field, message))?;
        let store = store::validate(file, f.store, overrides.store, &overrides.etcd_endpoints)
            .map_err(|(field, message)| err(field, message))?;
        // Fail closed: who holds an address is checked under a lock within one agent; across
        // agents sharing etcd it is not yet, so two nodes could bind one address to two
        // identities. Refused until the binding is part of the shared transaction.
        if matches!(store, StoreConfig::Etcd(_))
            && let Some((name, _)) = services.iter().find(|(_, s)| s.bind_requester_address)
        {
            return Err(err(
                "store.backend",
                format!(
                    "service {name:?} binds requester addresses, which the etcd backend does not \
                     support yet (the binding is checked within one agent only); use identity \
                     prefixes for it, or the redb backend"
                ),
            ));
        }
        let state_dir = overrides
            .state_dir
            .clone()
            .or(f.agent.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let checkpoint_every_records = f.audit.checkpoint_every_records.unwrap_or(1000);
        if checkpoint_every_records == 0 {
            return Err(err(
                "audit.checkpoint_every_records",
                "must be at least 1".into(),
            ));
        }
        let rotate_bytes = f.audit.rotate_bytes.unwrap_or(64 << 20);
        if rotate_bytes < 4096 {
            return Err(err("audit.rotate_bytes", "must be at least 4096".into()));
        }
        let audit = Audit {
            dir: f
                .audit
                .dir
                .map_or_else(|| state_dir.join("audit"), |d| resolve(file, d)),
            signing_key: f
                .audit
                .signing_key
                .map_or_else(|| state_dir.join("audit-signing.key"), |k| resolve(file, k)),
            rotate_bytes,
            checkpoint_every_records,
            checkpoint_every: f
                .audit
                .checkpoint_every
                .map_or(Duration::from_secs(60), |d| d.0),
            denial_window: f
                .audit
                .denial_window
                .map_or(Duration::from_secs(10), |d| d.0),
            readers: f.audit.readers.into_iter().map(|m| m.0).collect(),
            sink_url: f.audit.sink_url.map(|u| u.0),
            sink_batch: match f.audit.sink_batch {
                Some(0) => return Err(err("audit.sink_batch", "must be at least 1".into())),
                Some(n) => n,
                None => 500,
            },
            on_failure: f.audit.on_failure,
        };

        Ok(Self {
            file: file.to_path_buf(),
            listen: listen.0,
            metrics_listen: metrics_listen.0,
            unix_socket: overrides
                .unix_socket
                .clone()
                .or(f.agent.unix_socket)
                .unwrap_or_else(|| "/run/jit-agent/agent.sock".into()),
            state_dir,
            pin_dir: overrides
                .pin_dir
                .clone()
                .or(f.agent.pin_dir)
                .unwrap_or_else(|| crate::datapath::DEFAULT_PIN_DIR.into()),
            interfaces: interfaces.into_iter().map(|i| (i.name, i.mode)).collect(),
            request_ttl: f
                .agent
                .request_ttl
                .map_or(Duration::from_secs(3600), |d| d.0),
            max_grants,
            max_pending_per_identity: match f.agent.max_pending_per_identity {
                Some(0) => {
                    return Err(err(
                        "agent.max_pending_per_identity",
                        "must be at least 1".into(),
                    ));
                }
                Some(n) => n,
                None => 20,
            },
            tls_ca,
            tls_cert,
            tls_key,
            tls_authorities,
            services,
            identities,
            policy_file: resolve(file, policy_file),
            policy_schema: f.policy.schema.map(|p| resolve(file, p)),
            groups,
            webhooks,
            audit,
            store,
            store_retention,
        })
    }

    /// The groups `identity` belongs to.
    #[must_use]
    pub fn groups_of(&self, identity: &str) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(_, members)| matches_any(members, identity))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The identity whose static prefix holds `addr`, with that prefix: the longest match, as
    /// the kernel's trie decides.
    #[must_use]
    pub fn static_owner_of(&self, addr: IpAddr) -> Option<(&str, IpNet)> {
        let addr = addr.to_canonical();
        self.identities
            .iter()
            .flat_map(|(id, nets)| nets.iter().map(move |n| (id.as_str(), *n)))
            .filter(|(_, n)| n.contains(&addr))
            .max_by_key(|(_, n)| n.prefix_len())
    }
}

/// A path from the config file, relative to the file's directory when not absolute.
fn resolve(config_file: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        config_file.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// The message of a TOML error, with the line it is on.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    match line {
        Some(line) => format!("{} (line {line})", e.message().trim()),
        None => e.message().trim().to_string(),
    }
}

/// Whether `identity` matches any of `patterns` (exact, prefix ending in `*`, or `*`).
#[must_use]
pub fn matches_any(patterns: &[String], identity: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => identity.starts_with(prefix),
        None => p == identity,
    })
}

/// Names of services, for error messages.
#[must_use]
pub fn service_names(cfg: &Config) -> String {
    let names: BTreeSet<&str> = cfg.services.keys().map(String::as_str).collect();
    names.into_iter().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Protocol;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(Path::new("t.toml"), text, &Overrides::default())
    }

    const TLS: &str = "[tls]\nca='ca.pem'\ncert='a.pem'\nkey='a.key'\n[policy]\nfile='p.cedar'\n";

    #[test]
    fn the_etcd_backend_refuses_requester_address_binding() {
        let text = format!(
            "{TLS}[store]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n\
             [[services]]\nname = \"db\"\ndestinations = [\"10.0.0.1:5432/tcp\"]\n\
             bind_requester_address = true\n"
        );
        let e = load(&text).unwrap_err();
        assert_eq!(e.field, "store.backend", "{e}");
        assert!(e.message.contains("binds requester addresses"), "{e}");
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let c = load(&format!(
            "{TLS}[[services]]\nname='db'\ndestinations=['10.0.0.5:5432/tcp','[fd00::5]:5432/tcp']\n[[identities]]\nspiffe_id='spiffe://ex.org/ci'\nsources=['10.1.0.0/24']\n"
        ))
        .unwrap();
        let db = &c.services["db"];
        assert_eq!(db.destinations.len(), 2);
        assert_eq!(db.max_duration, Duration::from_secs(3600));
        assert_eq!(db.approvals_required, 1);
        assert_eq!(c.listen, "127.0.0.1:7443".parse().unwrap());
        assert_eq!(c.identities["spiffe://ex.org/ci"].len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[[services]]\nname='db'\ndestinations=['10.0.0.5/tcp']\n",
                "services[0].destinations[0]",
            ),
            (
                "[[services]]\nname='db'\ndestinations=['10.0.0.5:1/tcp']\nmax_duration='0s'\n",
                "services[0].max_duration",
            ),
            (
                "[[services]]\nname='db'\ndestinations=['10.0.0.5:1/tcp']\napprovals_required=0\n",
                "services[0].approvals_required",
            ),
            (
                "[[groups]]\nname='sre'\nmembers=['bob']\n",
                "groups[0].members[0]",
            ),
            ("[[webhooks]]\nurl='ftp://x'\n", "webhooks[0].url"),
            (
                "[[webhooks]]\nurl='http://x'\nevents=['request.lost']\n",
                "webhooks[0].events[0]",
            ),
            (
                "[[identities]]\nspiffe_id='spiffe://ex.org/a'\nsources=['10.0.0.300/24']\n",
                "identities[0].sources[0]",
            ),
            (
                "[[identities]]\nspiffe_id='bob'\n",
                "identities[0].spiffe_id",
            ),
            (
                "[[identities]]\nspiffe_id='spiffe://ex.org/a'\nsources=['10.0.0.0/24']\n[[identities]]\nspiffe_id='spiffe://ex.org/b'\nsources=['10.0.0.7/24']\n",
                "identities[1].sources[0]",
            ),
            ("[agent]\nlisten='nowhere'\n", "agent.listen"),
            ("[agent]\ninterfaces=['eth0:fast']\n", "agent.interfaces[0]"),
        ];
        for (text, field) in cases {
            let e = load(&format!("{TLS}{text}")).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let e = load("[agent]\nlisten='1.2.3.4:5'\n").unwrap_err();
        assert_eq!(e.field, "tls.ca");
        let e = load("[tls]\nca='ca.pem'\ncert='a.pem'\nkey='a.key'\n").unwrap_err();
        assert_eq!(e.field, "policy.file");
        let e = load(&format!("{TLS}[agent]\nbogus=1\n")).unwrap_err();
        assert!(e.message.contains("bogus"), "{e}");
    }

    #[test]
    fn source_prefixes_take_one_form() {
        let c = |s: &str| canonical_prefix(s.parse().unwrap());
        assert_eq!(c("::ffff:10.0.0.0/104"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(c("::ffff:10.1.2.3/128"), Ok("10.1.2.3/32".parse().unwrap()));
        assert_eq!(c("10.1.2.3/24"), Ok("10.1.2.0/24".parse().unwrap()));
        assert_eq!(c("fd00::1/64"), Ok("fd00::/64".parse().unwrap()));
        for wide in ["::/0", "::/64", "::/80", "::fffe:0:0/95"] {
            assert!(c(wide).is_err(), "{wide}");
        }
        // The same prefix spelled two ways under two identities is one prefix, bound twice.
        let e = load(&format!("{TLS}[[identities]]\nspiffe_id='spiffe://ex.org/a'\nsources=['10.0.0.0/8']\n[[identities]]\nspiffe_id='spiffe://ex.org/b'\nsources=['::ffff:10.0.0.0/104']\n")).unwrap_err();
        assert!(e.to_string().contains("bound to both"), "{e}");
    }

    #[test]
    fn wildcard_destinations_mean_both_families_and_group_addresses_are_refused() {
        for any in ["*:22/tcp", "0.0.0.0:22/tcp", "[::]:22/tcp"] {
            let d = parse_destination(any).expect(any);
            assert_eq!(d.addr, IpAddr::from([0, 0, 0, 0]), "{any}");
        }
        assert_eq!(
            parse_destination("[::ffff:10.0.0.5]:22/tcp")
                .expect("mapped")
                .addr,
            IpAddr::from([10, 0, 0, 5])
        );
        assert_eq!(
            parse_destination("10.0.0.5:53/UDP")
                .expect("any case")
                .proto,
            Protocol::Udp
        );
        for bad in [
            "10.0.0.5:53/icmp",
            "*:0/tcp",
            "*/tcp",
            "224.0.0.5:53/udp",
            "255.255.255.255:53/udp",
            "[ff02::1]:53/udp",
        ] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conflicting_bindings_name_both_identities() {
        let e = load(&format!("{TLS}[[identities]]\nspiffe_id='spiffe://ex.org/a'\nsources=['10.0.0.0/24']\n[[identities]]\nspiffe_id='spiffe://ex.org/b'\nsources=['10.0.0.0/24']\n")).unwrap_err();
        assert!(
            e.message.contains("spiffe://ex.org/a") && e.message.contains("spiffe://ex.org/b"),
            "{e}"
        );
    }

    #[test]
    fn patterns_match() {
        let p = vec![
            "spiffe://ex.org/sre/*".to_string(),
            "spiffe://ex.org/bob".to_string(),
        ];
        assert!(matches_any(&p, "spiffe://ex.org/sre/alice"));
        assert!(matches_any(&p, "spiffe://ex.org/bob"));
        assert!(!matches_any(&p, "spiffe://ex.org/bobby"));
        assert!(matches_any(&["*".to_string()], "anything"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The example shipped in the repository is valid and means what its comments say.
    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let c = Config::load(&path, &Overrides::default()).unwrap();
        assert_eq!(c.services["payments-db"].approvals_required, 2);
        assert_eq!(c.services["payments-db"].destinations.len(), 2);
        assert_eq!(c.interfaces, vec![("eth0".to_string(), AttachMode::Auto)]);
        assert_eq!(c.audit.on_failure, AuditFailure::Refuse);
        assert_eq!(c.audit.checkpoint_every, Duration::from_secs(60));
        assert!(
            c.identities
                .contains_key("spiffe://example.org/ci/deployer")
        );
        let o = Overrides {
            interfaces: vec!["veth0:tc".into()],
            listen: Some("127.0.0.1:9000".into()),
            ..Overrides::default()
        };
        let c = Config::load(&path, &o).unwrap();
        assert_eq!(c.interfaces, vec![("veth0".to_string(), AttachMode::Tc)]);
        assert_eq!(c.listen.port(), 9000);
    }
}
