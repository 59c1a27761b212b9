//! `jitctl`: the command line for requesters, approvers and pipelines.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    duration::{format_duration, parse_duration},
    proto::{self as pb, jit_gate_client::JitGateClient},
};

/// Exit code: the request was denied.
pub const EXIT_DENIED: u8 = 2;
/// Exit code: the request was not decided in time (or expired).
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit code: any other error.
pub const EXIT_ERROR: u8 = 1;

/// jitctl: ask for, approve and revoke just-in-time access through a JIT Gate agent.
///
/// Connection settings come from flags, then the environment (JIT_AGENT, JIT_CERT, JIT_KEY,
/// JIT_CA, JIT_SOCKET), then ~/.config/jit/config.toml (keys agent, cert, key, ca, socket).
///
/// Exit codes: 0 done (granted), 1 error, 2 denied, 3 not decided in time or expired; `exec`
/// passes its command's code through.
#[derive(Debug, Parser)]
#[command(name = "jitctl", version, about, long_about)]
pub struct Cli {
    /// Agent URL, e.g. https://127.0.0.1:7443.
    #[arg(long, global = true)]
    pub agent: Option<String>,
    /// Your client certificate (PEM) with your SPIFFE ID.
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Your private key (PEM).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that signed the agent's certificate.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Talk to the agent's local Unix socket instead (root, node-local administration).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// jitctl commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask for access to a service.
    Request {
        /// Service name.
        service: String,
        /// How long, e.g. 15m (clamped to the service's maximum).
        #[arg(long = "for", value_name = "DURATION", allow_hyphen_values = true)]
        duration: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// A ticket reference (policies see it as context.ticket).
        #[arg(long, default_value = "")]
        ticket: String,
        /// Emergency access for yourself: granted at once where a break_glass policy permits
        /// it, capped hard, announced to every approver. Needs --reason.
        #[arg(long)]
        break_glass: bool,
        /// Wait until the request is decided. Exit code 0 granted, 2 denied, 3 timed out.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(
            long,
            default_value = "15m",
            value_name = "DURATION",
            allow_hyphen_values = true
        )]
        timeout: String,
    },
    /// Approve a pending request.
    Approve {
        /// Request id.
        request_id: String,
        /// Comment kept with the approval.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Deny a pending request.
    Deny {
        /// Request id.
        request_id: String,
        /// Comment kept with the denial.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Revoke a grant (or all grants of an identity or service).
    Revoke {
        /// Grant id.
        grant_id: Option<String>,
        /// Revoke every live grant of this identity.
        #[arg(long, conflicts_with_all = ["grant_id", "service"])]
        identity: Option<String>,
        /// Revoke every live grant for this service.
        #[arg(long, conflicts_with_all = ["grant_id", "identity"])]
        service: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List requests or grants.
    Ls {
        /// `requests` or `grants`.
        #[arg(value_parser = ["requests", "grants"])]
        what: String,
        /// Only pending requests.
        #[arg(long)]
        pending: bool,
        /// Only active grants.
        #[arg(long)]
        active: bool,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Follow requests as they change (one request, or every one you may see).
    Watch {
        /// Only this request.
        request_id: Option<String>,
    },
    /// Show who the agent takes you to be and what you may do.
    Whoami,
    /// Show the node's state.
    Status {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Request access, wait for it, run a command, and release the grant the moment the command
    /// exits, whatever its outcome. The command's exit code is passed through.
    Exec {
        /// Service name.
        service: String,
        /// Longest the access may last.
        #[arg(long = "for", value_name = "DURATION", allow_hyphen_values = true)]
        duration: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// A ticket reference (policies see it as context.ticket).
        #[arg(long, default_value = "")]
        ticket: String,
        /// How long to wait for approval.
        #[arg(
            long,
            default_value = "15m",
            value_name = "DURATION",
            allow_hyphen_values = true
        )]
        timeout: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// `~/.config/jit/config.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    agent: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    socket: Option<PathBuf>,
}

/// Resolved connection settings.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// Agent URL.
    pub agent: String,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client key.
    pub key: Option<PathBuf>,
    /// CA bundle.
    pub ca: Option<PathBuf>,
    /// Unix socket.
    pub socket: Option<PathBuf>,
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let file_path =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/jit/config.toml"));
    let file: FileSettings = match &file_path {
        Some(p) if p.exists() => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}", p.display()))?
        }
        _ => FileSettings::default(),
    };
    let env_path = |k: &str| std::env::var_os(k).map(PathBuf::from);
    Ok(Settings {
        agent: cli
            .agent
            .clone()
            .or_else(|| std::env::var("JIT_AGENT").ok())
            .or(file.agent)
            .unwrap_or_else(|| "https://127.0.0.1:7443".into()),
        cert: cli
            .cert
            .clone()
            .or_else(|| env_path("JIT_CERT"))
            .or(file.cert),
        key: cli.key.clone().or_else(|| env_path("JIT_KEY")).or(file.key),
        ca: cli.ca.clone().or_else(|| env_path("JIT_CA")).or(file.ca),
        socket: cli
            .socket
            .clone()
            .or_else(|| env_path("JIT_SOCKET"))
            .or(file.socket),
    })
}

fn read(path: &Path, what: &str, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "cannot read your {what} {} (set {flag} or fix the path)",
            path.display()
        )
    })
}

/// Connects to the agent.
pub async fn connect(s: &Settings) -> anyhow::Result<JitGateClient<Channel>> {
    if let Some(sock) = &s.socket {
        let sock = sock.clone();
        let channel = Endpoint::try_from("http://local.agent")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .with_context(|| {
                format!(
                    "agent unreachable on its local socket {} (is jit-agent running? are you root?)",
                    s.socket.as_deref().unwrap_or(Path::new("")).display()
                )
            })?;
        return Ok(JitGateClient::new(channel));
    }
    let (Some(cert), Some(key)) = (&s.cert, &s.key) else {
        bail!(
            "no client certificate found: pass --cert and --key, set JIT_CERT and JIT_KEY, or put \
             cert/key in ~/.config/jit/config.toml (try `jit-agent certs init` for a development set)"
        );
    };
    let ca = s.ca.as_ref().ok_or_else(|| {
        anyhow!("no CA bundle for the agent's certificate: pass --ca or set JIT_CA")
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca, "CA bundle", "JIT_CA")?))
        .identity(Identity::from_pem(
            read(cert, "certificate", "JIT_CERT")?,
            read(key, "key", "JIT_KEY")?,
        ));
    let channel = Endpoint::from_shared(s.agent.clone())
        .with_context(|| format!("{:?} is not an agent URL such as https://127.0.0.1:7443", s.agent))?
        .tls_config(tls)
        .context("setting up TLS")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "agent unreachable at {}: {} (is jit-agent running there? check --agent or JIT_AGENT)",
                s.agent,
                error_chain(&e)
            )
        })?;
    Ok(JitGateClient::new(channel))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s.push_str(": ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}

/// A status as a message that says what to do next.
fn explain(action: &str, st: &Status) -> anyhow::Error {
    let m = st.message();
    match st.code() {
        Code::Unauthenticated => anyhow!(
            "{action}: the agent did not accept your identity: {m} (check JIT_CERT/JIT_KEY and that the certificate is signed by the agent's CA and carries a SPIFFE ID)"
        ),
        Code::PermissionDenied => anyhow!("{action}: permission denied: {m}"),
        Code::InvalidArgument => anyhow!("{action}: invalid input: {m}"),
        Code::NotFound => anyhow!("{action}: not found: {m}"),
        Code::FailedPrecondition => anyhow!("{action}: cannot do that now: {m}"),
        Code::AlreadyExists => anyhow!("{action}: already done: {m}"),
        Code::ResourceExhausted => anyhow!("{action}: the gate is full: {m}"),
        Code::Unavailable => anyhow!(
            "{action}: agent unavailable: {m} (is jit-agent running? check --agent or JIT_AGENT)"
        ),
        _ => anyhow!("{action}: {m} ({:?})", st.code()),
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::RequestState::try_from(state) {
        Ok(pb::RequestState::Pending) => "pending",
        Ok(pb::RequestState::Granted) => "granted",
        Ok(pb::RequestState::Denied) => "denied",
        Ok(pb::RequestState::Expired) => "expired",
        _ => "unknown",
    }
}

fn grant_state_name(state: i32) -> &'static str {
    match pb::GrantState::try_from(state) {
        Ok(pb::GrantState::Active) => "active",
        Ok(pb::GrantState::Revoked) => "revoked",
        Ok(pb::GrantState::Expired) => "expired",
        _ => "unknown",
    }
}

fn ago(ms: i64) -> String {
    let d = crate::model::now_ms().saturating_sub(ms).max(0);
    format_duration(Duration::from_millis(u64::try_from(d).unwrap_or(0)))
}

fn left(until_ms: i64) -> String {
    let d = until_ms.saturating_sub(crate::model::now_ms());
    if d <= 0 {
        "-".into()
    } else {
        format_duration(Duration::from_millis(u64::try_from(d).unwrap_or(0)))
    }
}

fn describe(r: &pb::AccessRequest) -> String {
    let mut s = format!(
        "{}request {} for {} ({}): {}",
        if r.break_glass { "BREAK-GLASS " } else { "" },
        r.id,
        r.service,
        format_duration(Duration::from_secs(r.duration_seconds)),
        state_name(r.state)
    );
    if r.clamped {
        s.push_str(" [duration clamped to the service maximum]");
    }
    match pb::RequestState::try_from(r.state) {
        Ok(pb::RequestState::Pending) => s.push_str(&format!(
            ", {}/{} approvals",
            r.approvals.len(),
            r.approvals_required
        )),
        Ok(pb::RequestState::Granted) => s.push_str(&format!(", grant {}", r.grant_id)),
        Ok(pb::RequestState::Denied) => {
            let by = if r.denied_by.is_empty() {
                "policy"
            } else {
                &r.denied_by
            };
            s.push_str(&format!(" by {by}"));
            if !r.denial_reason.is_empty() {
                s.push_str(&format!(": {}", r.denial_reason));
            }
        }
        _ => {}
    }
    if !r.policies.is_empty() {
        s.push_str(&format!("\n  decided by: {}", r.policies.join(", ")));
    }
    s
}

/// Waits until `id` is decided or `timeout` passes. Returns the final request, or None on
/// timeout. Shows a spinner on a terminal.
async fn wait_decided(
    client: &mut JitGateClient<Channel>,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<Option<pb::AccessRequest>> {
    let mut stream = client
        .watch(pb::WatchRequest {
            request_id: id.to_string(),
        })
        .await
        .map_err(|e| explain("watching the request", &e))?
        .into_inner();
    let spin = std::io::stderr().is_terminal();
    let frames = ['|', '/', '-', '\\'];
    let mut i = 0usize;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(120));
    loop {
        tokio::select! {
            msg = stream.message() => {
                let msg = msg.map_err(|e| explain("watching the request", &e))?;
                let Some(ev) = msg else { bail!("the agent closed the watch") };
                if let Some(r) = ev.request
                    && r.state != pb::RequestState::Pending as i32 {
                    if spin { eprint!("\r\x1b[K"); }
                    return Ok(Some(r));
                }
            }
            _ = tick.tick() => {
                if spin {
                    eprint!("\r{} waiting for approval of {id} ...", frames[i % 4]);
                    i += 1;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                if spin { eprint!("\r\x1b[K"); }
                return Ok(None);
            }
        }
    }
}

/// Runs jitctl; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    // Check what can be checked here before talking to the agent.
    if let Command::Request {
        duration, timeout, ..
    }
    | Command::Exec {
        duration, timeout, ..
    } = &cli.command
    {
        parse_duration(duration).map_err(|e| anyhow!("--for {e}"))?;
        parse_duration(timeout).map_err(|e| anyhow!("--timeout {e}"))?;
    }
    let s = settings(&cli)?;
    let mut c = connect(&s).await?;
    match cli.command {
        Command::Request {
            service,
            duration,
            reason,
            ticket,
            break_glass,
            wait,
            timeout,
        } => {
            let timeout = parse_duration(&timeout).map_err(|e| anyhow!("--timeout {e}"))?;
            let r = c
                .request_access(pb::RequestAccessRequest {
                    service,
                    duration,
                    reason,
                    ticket,
                    break_glass,
                })
                .await
                .map_err(|e| explain("request", &e))?
                .into_inner();
            println!("{}", describe(&r));
            finish_request(&mut c, r, wait, timeout)
                .await
                .map(|(code, _)| code)
        }
        Command::Approve {
            request_id,
            comment,
        } => {
            let r = c
                .approve(pb::DecideRequest {
                    request_id,
                    comment,
                })
                .await
                .map_err(|e| explain("approve", &e))?
                .into_inner();
            println!("{}", describe(&r));
            Ok(0)
        }
        Command::Deny {
            request_id,
            comment,
        } => {
            let r = c
                .deny(pb::DecideRequest {
                    request_id,
                    comment,
                })
                .await
                .map_err(|e| explain("deny", &e))?
                .into_inner();
            println!("{}", describe(&r));
            Ok(0)
        }
        Command::Revoke {
            grant_id,
            identity,
            service,
            reason,
        } => {
            let target = match (grant_id, identity, service) {
                (Some(g), None, None) => pb::revoke_request::Target::GrantId(g),
                (None, Some(i), None) => pb::revoke_request::Target::Identity(i),
                (None, None, Some(s)) => pb::revoke_request::Target::Service(s),
                _ => bail!("revoke: give a grant id, --identity or --service"),
            };
            let r = c
                .revoke(pb::RevokeRequest {
                    target: Some(target),
                    reason,
                })
                .await
                .map_err(|e| explain("revoke", &e))?
                .into_inner();
            if r.revoked.is_empty() {
                println!("nothing to revoke");
            }
            for g in r.revoked {
                println!("revoked grant {} ({} on {})", g.id, g.identity, g.service);
            }
            Ok(0)
        }
        Command::Ls {
            what,
            pending,
            active,
            json,
        } => {
            if what == "requests" {
                let rs = c
                    .list_requests(pb::ListRequestsRequest {
                        pending_only: pending,
                    })
                    .await
                    .map_err(|e| explain("list requests", &e))?
                    .into_inner()
                    .requests;
                let rows: Vec<Vec<String>> = rs
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            marked(state_name(r.state), r.break_glass),
                            r.requester.clone(),
                            r.service.clone(),
                            format_duration(Duration::from_secs(r.duration_seconds)),
                            format!("{}/{}", r.approvals.len(), r.approvals_required),
                            ago(r.created_unix_ms),
                            r.reason.clone(),
                        ]
                    })
                    .collect();
                print_listing(
                    json.then(|| requests_json(&rs)),
                    "no requests",
                    &[
                        "ID",
                        "STATE",
                        "REQUESTER",
                        "SERVICE",
                        "FOR",
                        "APPROVALS",
                        "AGE",
                        "REASON",
                    ],
                    &rows,
                )?;
            } else {
                let gs = c
                    .list_grants(pb::ListGrantsRequest {
                        active_only: active,
                    })
                    .await
                    .map_err(|e| explain("list grants", &e))?
                    .into_inner()
                    .grants;
                let rows: Vec<Vec<String>> = gs
                    .iter()
                    .map(|g| {
                        vec![
                            g.id.clone(),
                            marked(grant_state_name(g.state), g.break_glass),
                            g.identity.clone(),
                            g.service.clone(),
                            if g.state == pb::GrantState::Active as i32 {
                                left(g.expires_unix_ms)
                            } else {
                                "-".into()
                            },
                            g.sources.join(","),
                        ]
                    })
                    .collect();
                print_listing(
                    json.then(|| grants_json(&gs)),
                    "no grants",
                    &["ID", "STATE", "IDENTITY", "SERVICE", "LEFT", "SOURCES"],
                    &rows,
                )?;
            }
            Ok(0)
        }
        Command::Watch { request_id } => {
            let mut stream = c
                .watch(pb::WatchRequest {
                    request_id: request_id.unwrap_or_default(),
                })
                .await
                .map_err(|e| explain("watch", &e))?
                .into_inner();
            while let Some(ev) = stream.message().await.map_err(|e| explain("watch", &e))? {
                if let Some(r) = ev.request {
                    println!(
                        "{}{} {} by {} for {} ({}), {} ago: {}",
                        if r.break_glass { "BREAK-GLASS " } else { "" },
                        r.id,
                        state_name(r.state),
                        r.requester,
                        r.service,
                        format_duration(Duration::from_secs(r.duration_seconds)),
                        ago(r.created_unix_ms),
                        if r.reason.is_empty() { "-" } else { &r.reason }
                    );
                }
            }
            Ok(0)
        }
        Command::Whoami => {
            let w = c
                .who_am_i(pb::WhoAmIRequest {})
                .await
                .map_err(|e| explain("whoami", &e))?
                .into_inner();
            println!("identity:    {}", w.identity);
            println!("may request: {}", list_or_none(&w.may_request));
            println!("groups:      {}", list_or_none(&w.groups));
            println!("may approve: {}", list_or_none(&w.may_approve));
            println!("break glass: {}", list_or_none(&w.may_break_glass));
            println!(
                "admin:       {}",
                if w.may_revoke_any { "yes" } else { "no" }
            );
            Ok(0)
        }
        Command::Status { json } => {
            let st = c
                .status(pb::StatusRequest {})
                .await
                .map_err(|e| explain("status", &e))?
                .into_inner();
            if json {
                let v = serde_json::json!({
                    "version": st.version,
                    "attachments": st.attachments,
                    "pending_requests": st.pending_requests,
                    "active_grants": st.active_grants,
                    "kernel_grants": st.kernel_grants,
                    "kernel_repairs": st.kernel_repairs,
                    "kernel_sync_failures": st.kernel_sync_failures,
                    "corrupt_records": st.corrupt_records,
                    "services": st.services.iter().map(|s| serde_json::json!({
                        "name": s.name, "mode": s.mode, "destinations": s.destinations,
                        "max_duration_seconds": s.max_duration_seconds,
                        "approvals_required": s.approvals_required,
                        "active_grants": s.active_grants,
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "agent {}: gate on {}",
                    st.version,
                    list_or_none(&st.attachments)
                );
                println!(
                    "{} pending request(s), {} active grant(s), {} in the kernel; {} kernel \
                     repair(s), {} failed kernel write(s) since start",
                    st.pending_requests,
                    st.active_grants,
                    st.kernel_grants,
                    st.kernel_repairs,
                    st.kernel_sync_failures
                );
                if !st.corrupt_records.is_empty() {
                    println!(
                        "store records that cannot be decoded (skipped): {}",
                        st.corrupt_records.join(", ")
                    );
                }
                println!();
                let rows: Vec<Vec<String>> = st
                    .services
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.mode.clone(),
                            s.destinations.join(","),
                            format_duration(Duration::from_secs(s.max_duration_seconds)),
                            s.approvals_required.to_string(),
                            s.active_grants.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::cli::render_table(
                        &[
                            "SERVICE",
                            "MODE",
                            "DESTINATIONS",
                            "MAX",
                            "APPROVALS",
                            "GRANTS"
                        ],
                        &rows
                    )
                );
            }
            Ok(0)
        }
        Command::Exec {
            service,
            duration,
            reason,
            ticket,
            timeout,
            command,
        } => {
            let timeout = parse_duration(&timeout).map_err(|e| anyhow!("--timeout {e}"))?;
            let r = c
                .request_access(pb::RequestAccessRequest {
                    service,
                    duration,
                    reason,
                    ticket,
                    break_glass: false,
                })
                .await
                .map_err(|e| explain("request", &e))?
                .into_inner();
            eprintln!("{}", describe(&r));
            let (code, grant) = finish_request(&mut c, r, true, timeout).await?;
            let Some(grant_id) = grant else {
                return Ok(code);
            };
            let status = run_child(&command).await;
            // Release at once, whatever happened to the command.
            match c
                .revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::GrantId(grant_id.clone())),
                    reason: "jitctl exec: command finished".into(),
                })
                .await
            {
                Ok(_) => eprintln!("released grant {grant_id}"),
                Err(e) if e.code() == Code::FailedPrecondition => {
                    eprintln!("grant {grant_id} had already ended");
                }
                Err(e) => eprintln!(
                    "warning: releasing grant {grant_id} failed: {}",
                    explain("revoke", &e)
                ),
            }
            status
        }
    }
}

/// Prints JSON when asked for, else a table, or `empty` when there are no rows.
fn print_listing(
    json: Option<serde_json::Value>,
    empty: &str,
    header: &[&str],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    if let Some(v) = json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if rows.is_empty() {
        println!("{empty}");
    } else {
        print!("{}", crate::cli::render_table(header, rows));
    }
    Ok(())
}

/// A state, marked when it belongs to break-glass access.
fn marked(state: &str, break_glass: bool) -> String {
    if break_glass {
        format!("{state} (break-glass)")
    } else {
        state.to_string()
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

/// Prints the outcome and maps it to an exit code; with `wait`, waits for a decision first.
/// Returns the exit code and, when granted, the grant id.
async fn finish_request(
    c: &mut JitGateClient<Channel>,
    mut r: pb::AccessRequest,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<(u8, Option<String>)> {
    if wait && r.state == pb::RequestState::Pending as i32 {
        eprintln!("waiting up to {} for approval", format_duration(timeout));
        match wait_decided(c, &r.id, timeout).await? {
            Some(done) => {
                r = done;
                println!("{}", describe(&r));
            }
            None => {
                eprintln!("timed out waiting for request {}", r.id);
                return Ok((EXIT_TIMEOUT, None));
            }
        }
    }
    Ok(match pb::RequestState::try_from(r.state) {
        Ok(pb::RequestState::Granted) => (0, Some(r.grant_id)),
        Ok(pb::RequestState::Denied) => (EXIT_DENIED, None),
        Ok(pb::RequestState::Expired) => (EXIT_TIMEOUT, None),
        _ => (0, None),
    })
}

async fn run_child(command: &[String]) -> anyhow::Result<u8> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("exec: no command given after --"))?;
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .spawn()
        .with_context(|| format!("starting {prog:?}"))?;
    // Forward Ctrl-C to the child by waiting for it; the child gets the signal from the terminal.
    let status = tokio::select! {
        s = child.wait() => s.with_context(|| format!("waiting for {prog:?}"))?,
        _ = tokio::signal::ctrl_c() => {
            let _ = child.kill().await;
            child.wait().await.with_context(|| format!("waiting for {prog:?}"))?
        }
    };
    use std::os::unix::process::ExitStatusExt as _;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(EXIT_ERROR),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(EXIT_ERROR),
        _ => EXIT_ERROR,
    })
}

fn requests_json(rs: &[pb::AccessRequest]) -> serde_json::Value {
    serde_json::Value::Array(
        rs.iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "state": state_name(r.state), "requester": r.requester,
                    "service": r.service, "duration_seconds": r.duration_seconds,
                    "reason": r.reason, "created_unix_ms": r.created_unix_ms,
                    "pending_until_unix_ms": r.pending_until_unix_ms,
                    "approvals": r.approvals.iter().map(|a| serde_json::json!({
                        "approver": a.approver, "comment": a.comment, "at_unix_ms": a.at_unix_ms
                    })).collect::<Vec<_>>(),
                    "approvals_required": r.approvals_required,
                    "denied_by": r.denied_by, "denial_reason": r.denial_reason,
                    "grant_id": r.grant_id, "clamped": r.clamped, "ticket": r.ticket,
                    "break_glass": r.break_glass, "policies": r.policies,
                })
            })
            .collect(),
    )
}

fn grants_json(gs: &[pb::Grant]) -> serde_json::Value {
    serde_json::Value::Array(
        gs.iter()
            .map(|g| {
                serde_json::json!({
                    "id": g.id, "request_id": g.request_id, "identity": g.identity,
                    "service": g.service, "state": grant_state_name(g.state),
                    "not_before_unix_ms": g.not_before_unix_ms,
                    "expires_unix_ms": g.expires_unix_ms, "revoked_by": g.revoked_by,
                    "ended_unix_ms": g.ended_unix_ms, "sources": g.sources,
                    "break_glass": g.break_glass,
                })
            })
            .collect(),
    )
}
