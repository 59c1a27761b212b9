//! `jitctl audit`: checks a node's audit log from its files alone, without an agent.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use jit_api::{
    audit::{AuditFile, Event, Record, verify},
    table::render as render_table,
};

/// Exit code of `verify`: a record does not hold (changed, inserted, deleted, duplicated,
/// reordered, a file missing, a bad signature, a torn line).
pub(crate) const EXIT_TAMPERED: u8 = 4;
/// Exit code of `verify` (and `who`): every record holds, but the log is not whole: records after
/// the last checkpoint are not sealed yet (the agent runs, stopped without a clean shutdown, or
/// the file was cut after its last checkpoint), nothing is signed, or it does not start at seq 0
/// (earlier files were not given, or were removed).
pub(crate) const EXIT_UNSEALED: u8 = 5;

/// Audit log commands (`verify` and `who` read files, no agent needed; `watch` follows an agent).
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Follow a node's audit log from the agent: the lines already written from `--from` on,
    /// then each new one, exactly as written (one JSON line each; pipe them into a file and
    /// `verify` it). Resume with `--from <last seq + 1>`: no gap, no duplicate. Needs root on the
    /// local socket, or an identity in `audit.readers`.
    Watch {
        /// The first sequence number wanted.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many lines (default: follow until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Check a node's audit files: the hash chain from record to record and across rotated files,
    /// and every checkpoint's signature. Exit codes: 0 intact, sealed and whole; 4 tampered (the
    /// first bad record is named); 5 intact but not whole (records after the last checkpoint not
    /// sealed, nothing signed, or the chain does not start at seq 0); 1 error.
    Verify {
        /// The files of the series (`audit-*.jsonl` and `audit.jsonl`), in any order. With
        /// `--key PUBKEY` (hex, or a file holding it, e.g. `audit-signing.key.pub`; only from the
        /// command line, never from JIT_KEY) the checkpoints must be signed by that key; without
        /// it they are checked against the key they name, which proves the log consistent but not
        /// whose it is.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Who held access to what, when, approved by whom: answered from the audit files alone
    /// (verified first: a tampered log is refused with exit code 4; an answer from a log that is
    /// not whole exits 5, as `verify`). Every grant the kernel enforced whose time overlaps the
    /// window (or holds `--at`), with how it ended.
    Who {
        /// The files of the series (`audit-*.jsonl` and `audit.jsonl`), in any order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Only grants of this service.
        #[arg(long)]
        service: Option<String>,
        /// Only grants held by this identity (SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
        /// Grants in force at this instant (RFC 3339, e.g. 2026-11-30T10:00:00Z).
        #[arg(long, conflicts_with_all = ["since", "until"])]
        at: Option<String>,
        /// Grants in force at any time from this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Grants in force at any time until this instant (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an audit command with the `--key` given on the command line; returns the exit code.
pub(crate) fn run(cmd: AuditCommand, key: Option<&Path>) -> anyhow::Result<u8> {
    let key = key.map(|k| k.to_string_lossy().into_owned());
    match cmd {
        AuditCommand::Watch { .. } => bail!("audit watch talks to an agent"),
        AuditCommand::Verify { files } => verify_files(&files, key.as_deref()),
        AuditCommand::Who {
            files,
            service,
            identity,
            at,
            since,
            until,
            json,
        } => {
            let (from, to) = match (at, since, until) {
                (Some(at), ..) => {
                    let t = instant("--at", &at)?;
                    (t, t)
                }
                (None, since, until) => (
                    since
                        .map(|s| instant("--since", &s))
                        .transpose()?
                        .unwrap_or(i64::MIN),
                    until
                        .map(|u| instant("--until", &u))
                        .transpose()?
                        .unwrap_or(i64::MAX),
                ),
            };
            who(
                &files,
                key.as_deref(),
                &Filter {
                    service,
                    identity,
                    from,
                    to,
                },
                json,
            )
        }
    }
}

/// `audit watch`: prints the lines as the agent sends them.
pub(crate) async fn watch(
    c: &mut crate::connect::Client,
    from: u64,
    count: Option<u64>,
) -> anyhow::Result<u8> {
    use std::io::Write as _;

    let mut stream = c
        .watch_audit(jit_api::pb::WatchAuditRequest { from_seq: from })
        .await
        .map_err(|e| crate::connect::explain("audit watch", &e))?
        .into_inner();
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    while count.is_none_or(|n| seen < n) {
        let Some(l) = stream
            .message()
            .await
            .map_err(|e| crate::connect::explain("audit watch", &e))?
        else {
            bail!("the agent closed the audit stream (resume with --from <last seq + 1>)");
        };
        writeln!(out, "{}", l.line)?;
        out.flush()?;
        seen += 1;
    }
    Ok(0)
}

/// An RFC 3339 instant as Unix ms.
fn instant(flag: &str, text: &str) -> anyhow::Result<i64> {
    let t = humantime::parse_rfc3339_weak(text).map_err(|e| {
        anyhow!("{flag} {text:?}: {e}; expected RFC 3339, e.g. 2026-11-30T10:00:00Z")
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("{flag} is before 1970"))?;
    Ok(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which grants `who` reports.
struct Filter {
    service: Option<String>,
    identity: Option<String>,
    /// Window start, Unix ms (inclusive).
    from: i64,
    /// Window end, Unix ms (inclusive).
    to: i64,
}

/// A grant as the log tells it.
#[derive(Debug, serde::Serialize)]
struct Held {
    grant_id: String,
    identity: String,
    service: String,
    from_unix_ms: i64,
    /// When it stopped (expiry, revocation, or the kernel refusing it).
    until_unix_ms: i64,
    /// `active` (no end on the record), `expired`, `revoked by X: why`, or `refused: why`.
    ended: String,
    approved_by: Vec<String>,
    break_glass: bool,
    sources: Vec<String>,
    request_id: String,
    /// The kernel took it (`grant.enforced written`); only such grants gave access.
    #[serde(skip)]
    enforced: bool,
    /// What the kernel counted under it, from its `grant.usage` records (added up over its
    /// entries); `None` when the log has none (the grant was still in the kernel when the log
    /// ends, or the agent stopped uncleanly before recording it).
    usage: Option<Usage>,
}

/// Packets the kernel allowed under a grant, by the log.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Usage {
    packets: u64,
    /// Unix ms, 0 for never.
    first_seen_unix_ms: i64,
    /// Unix ms, 0 for never.
    last_seen_unix_ms: i64,
}

impl Usage {
    fn add(self, packets: u64, first: i64, last: i64) -> Self {
        Self {
            packets: self.packets.saturating_add(packets),
            first_seen_unix_ms: match (self.first_seen_unix_ms, first) {
                (0, x) | (x, 0) => x,
                (a, b) => a.min(b),
            },
            last_seen_unix_ms: self.last_seen_unix_ms.max(last),
        }
    }
}

fn read_files(files: &[PathBuf]) -> anyhow::Result<Vec<AuditFile>> {
    files
        .iter()
        .map(|f| {
            Ok(AuditFile {
                name: f.display().to_string(),
                bytes: std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
            })
        })
        .collect()
}

fn who(files: &[PathBuf], key: Option<&str>, filter: &Filter, json: bool) -> anyhow::Result<u8> {
    let key = key.map(read_key).transpose()?;
    let mut read = read_files(files)?;
    // A file given twice is read once (as `verify` reads it).
    let mut names = std::collections::BTreeSet::new();
    read.retain(|f| names.insert(f.name.clone()));
    let verified = match verify(&read, key.as_deref()) {
        Ok(v) => v,
        Err(t) => {
            println!("TAMPERED: {t}; not answering from this log");
            return Ok(EXIT_TAMPERED);
        }
    };
    let mut held: Vec<Held> = Vec::new();
    // Records in sequence order (verify checked there is one chain).
    let mut records: Vec<Record> = Vec::new();
    for f in &read {
        for line in f.bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // Kinds this jitctl does not know are skipped; the chain was checked above.
            if let Ok(r) = serde_json::from_slice::<Record>(line) {
                records.push(r);
            }
        }
    }
    records.sort_by_key(|r| r.seq);
    for r in records {
        match r.event {
            Event::GrantIssued {
                grant, approved_by, ..
            } => held.push(Held {
                grant_id: grant.id,
                identity: grant.identity,
                service: grant.service,
                from_unix_ms: grant.not_before_unix_ms,
                until_unix_ms: grant.expires_unix_ms,
                ended: "active".into(),
                approved_by,
                break_glass: grant.break_glass,
                sources: grant.sources,
                request_id: grant.request_id,
                enforced: false,
                usage: None,
            }),
            Event::GrantUsage {
                grant_id,
                packets,
                first_seen_unix_ms,
                last_seen_unix_ms,
                ..
            } => {
                if let Some(h) = held.iter_mut().find(|h| h.grant_id == grant_id) {
                    h.usage = Some(h.usage.unwrap_or_default().add(
                        packets,
                        first_seen_unix_ms,
                        last_seen_unix_ms,
                    ));
                }
            }
            Event::GrantEnforced { grant_id, result } if result == "written" => {
                if let Some(h) = held.iter_mut().find(|h| h.grant_id == grant_id) {
                    h.enforced = true;
                }
            }
            Event::GrantEnforced { grant_id, result } => {
                if let Some(h) = held.iter_mut().find(|h| h.grant_id == grant_id) {
                    h.until_unix_ms = h.from_unix_ms;
                    h.ended = format!("refused: {result}");
                }
            }
            Event::GrantRevoked {
                actor,
                reason,
                grant,
            } => {
                if let Some(h) = held.iter_mut().find(|h| h.grant_id == grant.id)
                    && !h.ended.starts_with("refused")
                {
                    h.until_unix_ms = h.until_unix_ms.min(grant.ended_unix_ms.max(h.from_unix_ms));
                    h.ended = format!("revoked by {actor}: {reason}");
                }
            }
            Event::GrantExpired { grant } => {
                if let Some(h) = held.iter_mut().find(|h| h.grant_id == grant.id) {
                    h.ended = "expired".into();
                }
            }
            _ => {}
        }
    }
    held.retain(|h| {
        filter.service.as_ref().is_none_or(|s| *s == h.service)
            && filter.identity.as_ref().is_none_or(|i| *i == h.identity)
            && h.from_unix_ms <= filter.to
            && h.until_unix_ms >= filter.from
            && h.enforced
            && !h.ended.starts_with("refused")
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&held)?);
    } else if held.is_empty() {
        println!("nobody held such access, by this log");
    } else {
        let time = |ms: i64| {
            u64::try_from(ms)
                .ok()
                .map(|ms| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                    )
                    .to_string()
                })
                .unwrap_or_else(|| "-".into())
        };
        let rows: Vec<Vec<String>> = held
            .iter()
            .map(|h| {
                vec![
                    h.identity.clone(),
                    h.service.clone(),
                    h.grant_id.clone(),
                    time(h.from_unix_ms),
                    time(h.until_unix_ms),
                    h.ended.clone(),
                    if h.break_glass {
                        "BREAK-GLASS".into()
                    } else if h.approved_by.is_empty() {
                        "policy".into()
                    } else {
                        h.approved_by.join(",")
                    },
                    h.sources.join(","),
                    match h.usage {
                        None => "unknown".into(),
                        Some(u) if u.packets == 0 => "no".into(),
                        Some(u) => format!(
                            "{} packet(s), {} .. {}",
                            u.packets,
                            time(u.first_seen_unix_ms),
                            time(u.last_seen_unix_ms)
                        ),
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(
                &[
                    "IDENTITY",
                    "SERVICE",
                    "GRANT",
                    "FROM",
                    "UNTIL",
                    "ENDED",
                    "APPROVED BY",
                    "SOURCES",
                    "USED"
                ],
                &rows
            )
        );
    }
    let mut whole = true;
    if verified.unsealed > 0 || verified.checkpoints == 0 {
        eprintln!(
            "note: {} record(s) after the last checkpoint are not sealed yet",
            verified.unsealed
        );
        whole = false;
    }
    if verified.first_seq > 0 {
        eprintln!(
            "note: the log starts at seq {}: what came before is not in these files",
            verified.first_seq
        );
        whole = false;
    }
    if key.is_none() {
        eprintln!(
            "note: checked against the key the log names ({}); pass --key to prove whose it is",
            verified.key.as_deref().unwrap_or("none")
        );
    }
    Ok(if whole { 0 } else { EXIT_UNSEALED })
}

/// A key given as hex or as a file holding hex.
fn read_key(given: &str) -> anyhow::Result<String> {
    let text = if Path::new(given).exists() {
        std::fs::read_to_string(given).with_context(|| format!("reading the key file {given}"))?
    } else {
        given.to_string()
    };
    let key = text.trim().to_ascii_lowercase();
    if key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("--key: {given:?} is neither a public key (64 hex digits) nor a file holding one");
    }
    Ok(key)
}

fn verify_files(files: &[PathBuf], key: Option<&str>) -> anyhow::Result<u8> {
    let key = key.map(read_key).transpose()?;
    let read = read_files(files)?;
    match verify(&read, key.as_deref()) {
        Err(t) => {
            println!("TAMPERED: {t}");
            Ok(EXIT_TAMPERED)
        }
        Ok(v) => {
            println!(
                "intact: {} record(s) in {} file(s), seq {}..{}, {} signed checkpoint(s)",
                v.records,
                v.files.len(),
                v.first_seq,
                v.last_seq,
                v.checkpoints
            );
            match (&v.key, key.is_some()) {
                (Some(k), true) => println!("signed by the given key {k}"),
                (Some(k), false) => println!(
                    "signed by key {k} (pass --key with the node's public key to prove whose it is)"
                ),
                (None, _) => println!("no checkpoint: nothing in these files is signed"),
            }
            println!(
                "node(s): {}",
                v.nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            if v.first_seq > 0 {
                println!(
                    "INCOMPLETE: the chain starts at seq {}: the files before it were not given \
                     (or were removed)",
                    v.first_seq
                );
            }
            if v.unsealed > 0 || v.checkpoints == 0 {
                println!(
                    "NOT SEALED: {} record(s) after the last checkpoint (the agent is running, \
                     stopped without a clean shutdown, or the log was cut after its last \
                     checkpoint)",
                    v.unsealed
                );
                return Ok(EXIT_UNSEALED);
            }
            Ok(if v.first_seq > 0 { EXIT_UNSEALED } else { 0 })
        }
    }
}
