//! The commands: each turns its arguments into one or two API calls and prints the answer.

use std::{io::IsTerminal as _, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use jit_api::{RequestState, duration::format_duration, pb};
use tonic::Code;

use crate::{
    EXIT_DENIED, EXIT_ERROR, EXIT_TIMEOUT,
    connect::{Client, explain},
    render,
};

/// A duration flag (`15m`, `1h30m`), checked before anything is sent.
fn duration_arg(s: &str) -> Result<Duration, String> {
    jit_api::duration::parse_duration(s).map_err(|e| e.to_string())
}

/// `--for`: checked here, sent as written (the agent clamps it and says so).
fn for_arg(s: &str) -> Result<String, String> {
    duration_arg(s).map(|_| s.trim().to_string())
}

/// jitctl commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Ask for access to a service.
    Request {
        #[command(flatten)]
        access: AccessArgs,
        /// Emergency access for yourself: granted at once where a break_glass policy permits
        /// it, capped hard, announced to every approver. Needs --reason.
        #[arg(long)]
        break_glass: bool,
        /// Wait until the request is decided. Exit code 0 granted, 2 denied, 3 timed out.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "15m", value_name = "DURATION", allow_hyphen_values = true, value_parser = duration_arg)]
        timeout: Duration,
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
        #[arg(required_unless_present_any = ["identity", "service"])]
        grant_id: Option<String>,
        /// Revoke every live grant of this identity (and end its pending requests).
        #[arg(long, conflicts_with_all = ["grant_id", "service"])]
        identity: Option<String>,
        /// Revoke every live grant for this service (and end its pending requests).
        #[arg(long, conflicts_with_all = ["grant_id", "identity"])]
        service: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List requests or grants.
    Ls {
        /// What to list.
        #[arg(value_enum)]
        what: Listing,
        /// Only pending requests.
        #[arg(long)]
        pending: bool,
        /// Only active grants.
        #[arg(long)]
        active: bool,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this identity (the requester, or the grant's holder).
        #[arg(long)]
        identity: Option<String>,
        /// JSON for scripts (the API's messages, states as words).
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
        #[command(flatten)]
        access: AccessArgs,
        /// How long to wait for approval.
        #[arg(long, default_value = "15m", value_name = "DURATION", allow_hyphen_values = true, value_parser = duration_arg)]
        timeout: Duration,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// What is asked for: by `request` and `exec`.
#[derive(Debug, clap::Args)]
pub(crate) struct AccessArgs {
    /// Service name.
    service: String,
    /// How long, e.g. 15m (clamped to the service's maximum).
    #[arg(long = "for", value_name = "DURATION", allow_hyphen_values = true, value_parser = for_arg)]
    duration: String,
    /// Why.
    #[arg(long, default_value = "")]
    reason: String,
    /// A ticket reference (policies see it as context.ticket).
    #[arg(long, default_value = "")]
    ticket: String,
}

/// Pages `ls` follows at most (at the server's default of 100 a page: 1 000 000 records).
const MAX_PAGES: usize = 10_000;

/// Follows the server's pages: every page, bounded (a token that does not move on, or
/// [`MAX_PAGES`], ends the listing; the second says so).
#[derive(Default)]
struct Pager {
    /// The token of the page to fetch next (empty: the first).
    token: String,
    fetched: usize,
}

impl Pager {
    /// Takes a page's `next_page_token`; whether to fetch another page.
    fn advance(&mut self, next: String) -> bool {
        self.fetched += 1;
        if next.is_empty() || next == self.token {
            return false;
        }
        if self.fetched >= MAX_PAGES {
            eprintln!("note: stopped after {MAX_PAGES} pages; narrow the listing");
            return false;
        }
        self.token = next;
        true
    }
}

/// What `ls` lists.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Listing {
    /// Access requests.
    Requests,
    /// Grants.
    Grants,
}

/// Runs a command against the agent; returns the process exit code.
pub(crate) async fn run(c: &mut Client, command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Request {
            access,
            break_glass,
            wait,
            timeout,
        } => {
            let r = request(c, access, break_glass).await?;
            println!("{}", render::describe(&r));
            finish_request(c, r, wait, timeout)
                .await
                .map(|(code, _)| code)
        }
        Command::Approve {
            request_id,
            comment,
        } => decide(c, true, request_id, comment).await,
        Command::Deny {
            request_id,
            comment,
        } => decide(c, false, request_id, comment).await,
        Command::Revoke {
            grant_id,
            identity,
            service,
            reason,
        } => revoke(c, grant_id, identity, service, reason).await,
        Command::Ls {
            what,
            pending,
            active,
            service,
            identity,
            json,
        } => {
            let (service, identity) = (service.unwrap_or_default(), identity.unwrap_or_default());
            let out = match what {
                Listing::Requests => {
                    let mut all = Vec::new();
                    let mut pages = Pager::default();
                    loop {
                        let page = c
                            .list_requests(pb::ListRequestsRequest {
                                pending_only: pending,
                                page_size: 0,
                                page_token: pages.token.clone(),
                                service: service.clone(),
                                identity: identity.clone(),
                            })
                            .await
                            .map_err(|e| explain("list requests", &e))?
                            .into_inner();
                        all.extend(page.requests);
                        if !pages.advance(page.next_page_token) {
                            break;
                        }
                    }
                    render::requests(&all, json)?
                }
                Listing::Grants => {
                    let mut all = Vec::new();
                    let mut pages = Pager::default();
                    loop {
                        let page = c
                            .list_grants(pb::ListGrantsRequest {
                                active_only: active,
                                page_size: 0,
                                page_token: pages.token.clone(),
                                service: service.clone(),
                                identity: identity.clone(),
                            })
                            .await
                            .map_err(|e| explain("list grants", &e))?
                            .into_inner();
                        all.extend(page.grants);
                        if !pages.advance(page.next_page_token) {
                            break;
                        }
                    }
                    render::grants(&all, json)?
                }
            };
            println!("{out}");
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
                    println!("{}", render::watch_line(&r));
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
            println!("{}", render::who_am_i(&w));
            Ok(0)
        }
        Command::Status { json } => {
            let st = c
                .status(pb::StatusRequest {})
                .await
                .map_err(|e| explain("status", &e))?
                .into_inner();
            println!("{}", render::status(&st, json)?);
            Ok(0)
        }
        Command::Exec {
            access,
            timeout,
            command,
        } => {
            let r = request(c, access, false).await?;
            eprintln!("{}", render::describe(&r));
            let (code, grant) = finish_request(c, r, true, timeout).await?;
            let Some(grant_id) = grant else {
                return Ok(code);
            };
            let status = run_child(&command).await;
            release(c, &grant_id).await;
            status
        }
    }
}

async fn request(
    c: &mut Client,
    a: AccessArgs,
    break_glass: bool,
) -> anyhow::Result<pb::AccessRequest> {
    Ok(c.request_access(pb::RequestAccessRequest {
        service: a.service,
        duration: a.duration,
        reason: a.reason,
        ticket: a.ticket,
        break_glass,
    })
    .await
    .map_err(|e| explain("request", &e))?
    .into_inner())
}

/// Approves (`approve`) or denies a pending request and prints where it stands.
async fn decide(
    c: &mut Client,
    approve: bool,
    request_id: String,
    comment: String,
) -> anyhow::Result<u8> {
    let m = pb::DecideRequest {
        request_id,
        comment,
    };
    let r = if approve {
        c.approve(m).await.map_err(|e| explain("approve", &e))?
    } else {
        c.deny(m).await.map_err(|e| explain("deny", &e))?
    }
    .into_inner();
    println!("{}", render::describe(&r));
    Ok(0)
}

async fn revoke(
    c: &mut Client,
    grant_id: Option<String>,
    identity: Option<String>,
    service: Option<String>,
    reason: String,
) -> anyhow::Result<u8> {
    use pb::revoke_request::Target;
    let target = match (grant_id, identity, service) {
        (Some(g), None, None) => Target::GrantId(g),
        (None, Some(i), None) => Target::Identity(i),
        (None, None, Some(s)) => Target::Service(s),
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

/// Releases the grant `exec` held, whatever happened to the command.
async fn release(c: &mut Client, grant_id: &str) {
    match c
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::GrantId(grant_id.to_string())),
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
}

/// Waits until `id` is decided or `timeout` passes. Returns the final request, or None on
/// timeout. Shows a spinner on a terminal.
async fn wait_decided(
    client: &mut Client,
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
                    && r.state != RequestState::Pending as i32 {
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

/// Prints the outcome and maps it to an exit code; with `wait`, waits for a decision first.
/// Returns the exit code and, when granted, the grant id.
async fn finish_request(
    c: &mut Client,
    mut r: pb::AccessRequest,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<(u8, Option<String>)> {
    if wait && r.state == RequestState::Pending as i32 {
        eprintln!("waiting up to {} for approval", format_duration(timeout));
        match wait_decided(c, &r.id, timeout).await? {
            Some(done) => {
                r = done;
                println!("{}", render::describe(&r));
            }
            None => {
                eprintln!("timed out waiting for request {}", r.id);
                return Ok((EXIT_TIMEOUT, None));
            }
        }
    }
    Ok(match RequestState::try_from(r.state) {
        Ok(RequestState::Granted) => (0, Some(r.grant_id)),
        Ok(RequestState::Denied) => (EXIT_DENIED, None),
        Ok(RequestState::Expired) => (EXIT_TIMEOUT, None),
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
