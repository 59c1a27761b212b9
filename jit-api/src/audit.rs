//! The audit log's format (`jit.v1.audit`) and its verification, shared by the agent that writes
//! it and `jitctl audit verify` that checks it.
//!
//! One JSON object per line. Every line has `schema` (`jit.v1.audit`), `seq` (0, 1, 2 ... across
//! rotated files), `at_unix_ms`, `node`, `prev` (the SHA-256, hex, of the previous line's bytes;
//! 64 zeros before the first) and `event`, plus the event's fields. A `checkpoint` line carries
//! `key` (the Ed25519 public key, hex) and `signature` (hex) over [`checkpoint_message`], which
//! binds its `seq`, `at_unix_ms`, `node` and `prev`, and through `prev` every line before it.
//!
//! What verification proves: every line follows from the one before (a changed byte, an inserted,
//! deleted, duplicated or reordered line breaks the chain at the next line), the sequence has no
//! gap across files (a missing file is a gap), every checkpoint is signed by the key, and how many
//! lines follow the last checkpoint (those are not sealed yet: a truncation there cannot be told
//! from a crash, so it is reported, never passed silently).

use std::collections::BTreeSet;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::pb;

/// The schema name every line carries.
pub const SCHEMA: &str = "jit.v1.audit";
/// `prev` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The event name of a checkpoint.
pub const CHECKPOINT: &str = "checkpoint";

/// The SHA-256 of a line's bytes (without its newline), hex.
#[must_use]
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, line))
}

/// The SHA-256 of a file's content, hex (policy and configuration files on the record).
#[must_use]
pub fn content_hash(bytes: &[u8]) -> String {
    line_hash(bytes)
}

/// What a checkpoint signs.
#[must_use]
pub fn checkpoint_message(seq: u64, at_unix_ms: i64, node: &str, prev: &str) -> Vec<u8> {
    format!("{SCHEMA} checkpoint\nseq={seq}\nat_unix_ms={at_unix_ms}\nnode={node}\nprev={prev}\n")
        .into_bytes()
}

/// A file that names the node's audit signing key, or a public key, is not one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// The audit signing key (Ed25519; its own key, never the TLS key).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// A new key, as the PKCS#8 document to keep (hex in the key file).
    pub fn generate() -> Result<Vec<u8>, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| KeyError("the system random source failed".into()))
    }

    /// The key from its key file's text (hex of a PKCS#8 document).
    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let der = hex::decode(text.trim())
            .map_err(|e| KeyError(format!("not a hex-encoded key ({e})")))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| KeyError(format!("not an Ed25519 PKCS#8 key ({e})")))?;
        Ok(Self { pair })
    }

    /// The public key, hex (what `jitctl audit verify --key` takes).
    #[must_use]
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// Signs `message`; the signature in hex.
    #[must_use]
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }
}

/// Whether `signature` (hex) is `key`'s (hex) over `message`.
#[must_use]
pub fn signature_valid(key: &str, message: &[u8], signature: &str) -> bool {
    let (Ok(key), Ok(sig)) = (hex::decode(key), hex::decode(signature)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, &sig)
        .is_ok()
}

/// The SHA-256 of a file the agent read (policy, schema, configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// The file.
    pub path: String,
    /// SHA-256 of its content, hex; empty when it could not be read.
    pub sha256: String,
}

/// One line: the header every line has, and its event.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Position in the node's log, from 0, continuous across rotated files.
    pub seq: u64,
    /// When (Unix ms).
    pub at_unix_ms: i64,
    /// The node (host name) that wrote it.
    pub node: String,
    /// SHA-256 of the previous line, hex ([`GENESIS`] before the first).
    pub prev: String,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What a line records. New kinds may be added; readers skip kinds they do not know.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum Event {
    /// The agent started.
    #[serde(rename = "agent.start")]
    AgentStart {
        /// Agent version.
        version: String,
        /// The configuration file and its digest.
        config: FileDigest,
        /// The policy (and schema) files in force and their digests.
        policies: Vec<FileDigest>,
        /// What recovery did to the log on opening it (a partial line a crash left, never
        /// acknowledged, is cut off), or empty.
        recovered: String,
    },
    /// The agent stopped cleanly (a checkpoint follows).
    #[serde(rename = "agent.stop")]
    AgentStop {},
    /// A request was made.
    #[serde(rename = "request.created")]
    RequestCreated {
        /// Who asked.
        actor: String,
        /// The request as stored (reason, ticket, source address, deciding policies).
        request: pb::AccessRequest,
    },
    /// An approver approved.
    #[serde(rename = "request.approved")]
    RequestApproved {
        /// The approver.
        actor: String,
        /// The approver's comment.
        comment: String,
        /// The request after the approval.
        request: pb::AccessRequest,
    },
    /// A request was denied.
    #[serde(rename = "request.denied")]
    RequestDenied {
        /// Who denied it.
        actor: String,
        /// Why.
        comment: String,
        /// The request.
        request: pb::AccessRequest,
    },
    /// A request expired undecided.
    #[serde(rename = "request.expired")]
    RequestExpired {
        /// The request.
        request: pb::AccessRequest,
    },
    /// A grant was issued; written before the grant reaches the kernel.
    #[serde(rename = "grant.issued")]
    GrantIssued {
        /// Who caused it (the requester for auto-approval and break-glass, else the last
        /// approver).
        actor: String,
        /// The grant.
        grant: pb::Grant,
        /// The approvers whose approvals granted it.
        approved_by: Vec<String>,
    },
    /// The result of writing a grant to the kernel.
    #[serde(rename = "grant.enforced")]
    GrantEnforced {
        /// The grant.
        grant_id: String,
        /// `written`, or why it failed (the grant was then revoked again).
        result: String,
    },
    /// A grant was revoked.
    #[serde(rename = "grant.revoked")]
    GrantRevoked {
        /// Who revoked it.
        actor: String,
        /// Why.
        reason: String,
        /// The grant.
        grant: pb::Grant,
    },
    /// A grant ran out.
    #[serde(rename = "grant.expired")]
    GrantExpired {
        /// The grant.
        grant: pb::Grant,
    },
    /// What the kernel counted under one of a grant's kernel entries, written when the entry
    /// left the kernel (the grant was revoked or expired, or a grant lasting longer took its
    /// key). A grant has one entry per bound address (or one for its identity's prefixes), so
    /// one record each; `packets: 0` is a grant that was never used.
    #[serde(rename = "grant.usage")]
    GrantUsage {
        /// The grant.
        grant_id: String,
        /// The address the entry let through, or `identity prefixes`.
        source: String,
        /// Packets allowed.
        packets: u64,
        /// The first one (Unix ms), 0 for never.
        first_seen_unix_ms: i64,
        /// The last one (Unix ms), 0 for never.
        last_seen_unix_ms: i64,
    },
    /// The policy files changed.
    #[serde(rename = "policy.reload")]
    PolicyReload {
        /// Whether the new set took effect (if not, the previous one stays).
        accepted: bool,
        /// The files and their digests.
        files: Vec<FileDigest>,
        /// Why it was refused, or empty.
        error: String,
    },
    /// Audit records that could not be written when they happened (the log was unwritable);
    /// written as soon as it was writable again, in order, just before this line's successors.
    #[serde(rename = "audit.resumed")]
    AuditResumed {
        /// What failed.
        error: String,
        /// Records kept in memory and written now.
        held: u64,
        /// Records lost because too many were held.
        lost: u64,
    },
    /// Packets the kernel dropped (or, for an audit-mode service, would have dropped), aggregated
    /// per source, service, reason and window: a flood makes a few records with counts.
    #[serde(rename = "kernel.denials")]
    KernelDenials {
        /// `deny`, or `audit` (audit mode: the packet passed).
        kind: String,
        /// The verdict reason (`no_grant`, `no_identity`, `expired`, `not_yet_valid`,
        /// `unparseable`, `fragment`, `opaque` ...).
        reason: String,
        /// Source address.
        source: String,
        /// The service's name (`#<id>` when unknown; empty when dropped before a service was
        /// known).
        service: String,
        /// Destination port.
        dst_port: u16,
        /// IP protocol number.
        proto: u8,
        /// Events the kernel reported in the window (events beyond its budget are counted in
        /// `kernel.events_dropped`).
        packets: u64,
        /// First and last packet seen in the window (Unix ms).
        first_unix_ms: i64,
        /// Last packet seen in the window (Unix ms).
        last_unix_ms: i64,
    },
    /// Kernel events that were not reported: beyond the per-CPU budget, or lost because the ring
    /// buffer was full (the packets were still judged; only their report is missing).
    #[serde(rename = "kernel.events_dropped")]
    KernelEventsDropped {
        /// Left out by the budget in the window.
        rate_limited: u64,
        /// Lost to a full ring buffer in the window.
        lost: u64,
    },
    /// A signed checkpoint over every line before it.
    #[serde(rename = "checkpoint")]
    Checkpoint {
        /// The Ed25519 public key, hex.
        key: String,
        /// The signature over [`checkpoint_message`], hex.
        signature: String,
    },
}

impl Event {
    /// The event's name, as it appears in `event`.
    #[must_use]
    pub fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_default()
    }
}

/// Where in the given files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// The first record that does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {problem}")]
pub struct Tampered {
    /// Where.
    pub place: Place,
    /// What is wrong.
    pub problem: String,
}

/// What a verification found, when nothing was tampered with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Files read, in sequence order.
    pub files: Vec<String>,
    /// Lines checked.
    pub records: u64,
    /// `seq` of the first line (0 unless earlier files were not given).
    pub first_seq: u64,
    /// `seq` of the last line.
    pub last_seq: u64,
    /// Checkpoints whose signature holds.
    pub checkpoints: u64,
    /// The key that signed them, hex.
    pub key: Option<String>,
    /// Lines after the last checkpoint: not sealed yet (a crash, or a truncation there, cannot be
    /// told apart).
    pub unsealed: u64,
    /// The node names the records carry (one, unless the host was renamed or logs were mixed).
    pub nodes: BTreeSet<String>,
}

/// One file's bytes, named.
pub struct AuditFile {
    /// The name to report.
    pub name: String,
    /// Its content.
    pub bytes: Vec<u8>,
}

/// The fields the verifier reads from a line.
#[derive(Deserialize)]
struct Head {
    schema: String,
    seq: u64,
    at_unix_ms: i64,
    node: String,
    prev: String,
    event: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    signature: Option<String>,
}

/// The lines of a file, each with its 1-based number; a last line without its newline is an
/// error (a truncated or torn record).
fn lines(file: &AuditFile) -> Result<Vec<(usize, &[u8])>, Tampered> {
    let mut out = Vec::new();
    let mut rest = file.bytes.as_slice();
    let mut n = 0;
    while !rest.is_empty() {
        n += 1;
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            return Err(Tampered {
                place: Place {
                    file: file.name.clone(),
                    line: n,
                },
                problem: "the last record is cut off (no newline): the file was truncated or torn"
                    .into(),
            });
        };
        out.push((n, &rest[..end]));
        rest = &rest[end + 1..];
    }
    Ok(out)
}

fn head(file: &str, line: usize, bytes: &[u8]) -> Result<Head, Tampered> {
    let head: Head = serde_json::from_slice(bytes).map_err(|e| Tampered {
        place: Place {
            file: file.to_string(),
            line,
        },
        problem: format!("not an audit record ({e})"),
    })?;
    if head.schema != SCHEMA {
        return Err(Tampered {
            place: Place {
                file: file.to_string(),
                line,
            },
            problem: format!("schema {:?}, expected {SCHEMA:?}", head.schema),
        });
    }
    Ok(head)
}

/// Checks `files` (in any order: they are put in sequence order by their first record) against
/// `key` (hex; when absent, the key the first checkpoint names, which proves the log consistent
/// but not whose it is). Returns the first record that does not hold.
pub fn verify(files: &[AuditFile], key: Option<&str>) -> Result<Verified, Tampered> {
    let mut ordered: Vec<(u64, &AuditFile)> = Vec::new();
    for f in files {
        let lines = lines(f)?;
        let Some((n, first)) = lines.first() else {
            continue;
        };
        ordered.push((head(&f.name, *n, first)?.seq, f));
    }
    ordered.sort_by_key(|(seq, _)| *seq);
    let mut v = Verified::default();
    let mut key = key.map(str::to_ascii_lowercase);
    let mut expected: Option<(u64, String)> = None;
    let mut seen_files = BTreeSet::new();
    for (_, f) in ordered {
        if !seen_files.insert(f.name.clone()) {
            continue;
        }
        v.files.push(f.name.clone());
        for (n, bytes) in lines(f)? {
            let place = Place {
                file: f.name.clone(),
                line: n,
            };
            let bad = |problem: String| Tampered {
                place: place.clone(),
                problem,
            };
            let h = head(&f.name, n, bytes)?;
            v.nodes.insert(h.node.clone());
            match &expected {
                None => {
                    v.first_seq = h.seq;
                    if h.seq == 0 && h.prev != GENESIS {
                        return Err(bad("the first record does not start the chain".into()));
                    }
                }
                Some((seq, prev)) => {
                    if h.seq != *seq {
                        return Err(bad(if h.seq < *seq {
                            format!(
                                "seq {} after seq {}: a record was duplicated or reordered",
                                h.seq,
                                seq - 1
                            )
                        } else {
                            format!(
                                "seq {} after seq {}: records {}..{} are missing (deleted, or \
                                 a file of the series was not given)",
                                h.seq,
                                seq - 1,
                                seq,
                                h.seq - 1
                            )
                        }));
                    }
                    if h.prev != *prev {
                        return Err(bad(format!(
                            "prev does not match the hash of record {}: that record was changed, \
                             or a record was inserted or removed before this one",
                            seq - 1
                        )));
                    }
                }
            }
            if h.event == CHECKPOINT {
                let (Some(k), Some(sig)) = (&h.key, &h.signature) else {
                    return Err(bad("a checkpoint without key or signature".into()));
                };
                // A checkpoint carries exactly these fields, so its signature covers the line.
                let fields =
                    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(bytes)
                        .map(|m| m.len())
                        .unwrap_or(0);
                if fields != 8 {
                    return Err(bad("a checkpoint with fields it should not have".into()));
                }
                let want = key.get_or_insert_with(|| k.to_ascii_lowercase());
                if k.to_ascii_lowercase() != *want {
                    return Err(bad(format!("checkpoint signed by key {k}, not by {want}")));
                }
                let message = checkpoint_message(h.seq, h.at_unix_ms, &h.node, &h.prev);
                if !signature_valid(want, &message, sig) {
                    return Err(bad("the checkpoint's signature does not hold".into()));
                }
                v.checkpoints += 1;
                v.unsealed = 0;
            } else {
                v.unsealed += 1;
            }
            v.records += 1;
            v.last_seq = h.seq;
            expected = Some((h.seq + 1, line_hash(bytes)));
        }
    }
    v.key = key;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a chain of `n` events with a checkpoint after every `every`, signed by `key`.
    fn chain(key: &SigningKey, n: u64, every: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev = GENESIS.to_string();
        let mut seq = 0;
        for i in 0..n {
            let rec = Record {
                schema: SCHEMA.into(),
                seq,
                at_unix_ms: 1_000 + i64::try_from(i).unwrap_or(0),
                node: "n1".into(),
                prev: prev.clone(),
                event: Event::RequestExpired {
                    request: pb::AccessRequest {
                        id: format!("req-{i}"),
                        ..Default::default()
                    },
                },
            };
            let line = serde_json::to_string(&rec).expect("json");
            prev = line_hash(line.as_bytes());
            out.push(line);
            seq += 1;
            if (i + 1) % every == 0 {
                let at = 5_000;
                let sig = key.sign_hex(&checkpoint_message(seq, at, "n1", &prev));
                let rec = Record {
                    schema: SCHEMA.into(),
                    seq,
                    at_unix_ms: at,
                    node: "n1".into(),
                    prev: prev.clone(),
                    event: Event::Checkpoint {
                        key: key.public_hex(),
                        signature: sig,
                    },
                };
                let line = serde_json::to_string(&rec).expect("json");
                prev = line_hash(line.as_bytes());
                out.push(line);
                seq += 1;
            }
        }
        out
    }

    fn file(name: &str, lines: &[String]) -> AuditFile {
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(l.as_bytes());
            bytes.push(b'\n');
        }
        AuditFile {
            name: name.into(),
            bytes,
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_file_text(&hex::encode(SigningKey::generate().expect("key"))).expect("key")
    }

    #[test]
    fn an_intact_log_verifies_and_every_tampering_is_named() {
        let k = key();
        let pk = k.public_hex();
        let lines = chain(&k, 6, 3); // 0..2, cp 3, 4..6, cp 7
        let ok = verify(&[file("a", &lines)], Some(&pk)).expect("intact");
        assert_eq!((ok.records, ok.checkpoints, ok.unsealed), (8, 2, 0));

        // A changed byte: the next record's prev no longer matches.
        let mut changed = lines.clone();
        changed[1] = changed[1].replace("req-1", "req-X");
        let e = verify(&[file("a", &changed)], Some(&pk)).expect_err("changed");
        assert_eq!(e.place.line, 3, "{e}");
        // Deleted, inserted, duplicated, reordered.
        let mut deleted = lines.clone();
        deleted.remove(1);
        assert!(verify(&[file("a", &deleted)], Some(&pk)).is_err());
        let mut inserted = lines.clone();
        inserted.insert(2, lines[1].clone());
        let e = verify(&[file("a", &inserted)], Some(&pk)).expect_err("duplicated");
        assert!(e.problem.contains("duplicated"), "{e}");
        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert!(verify(&[file("a", &reordered)], Some(&pk)).is_err());
        // Another key, or a forged signature.
        let other = key();
        assert!(verify(&[file("a", &lines)], Some(&other.public_hex())).is_err());
        let forged = chain(&other, 6, 3);
        let mut mixed = lines.clone();
        mixed[3] = forged[3].clone();
        assert!(verify(&[file("a", &mixed)], Some(&pk)).is_err());
        // A torn last line, and a truncation after the last checkpoint (reported as unsealed).
        let mut torn = file("a", &lines);
        torn.bytes.pop();
        assert!(verify(&[torn], Some(&pk)).is_err());
        let unsealed = verify(&[file("a", &lines[..6])], Some(&pk)).expect("a prefix");
        assert_eq!(unsealed.unsealed, 2);
    }

    #[test]
    fn a_rotated_series_chains_and_a_missing_file_is_a_gap() {
        let k = key();
        let pk = k.public_hex();
        let lines = chain(&k, 9, 3); // 12 lines
        let (a, rest) = lines.split_at(4);
        let (b, c) = rest.split_at(4);
        let files = [file("c", c), file("a", a), file("b", b)];
        let v = verify(&files, Some(&pk)).expect("series in any order");
        assert_eq!(v.files, ["a", "b", "c"]);
        assert_eq!(v.records, 12);
        let e = verify(&[file("a", a), file("c", c)], Some(&pk)).expect_err("b missing");
        assert!(e.problem.contains("missing"), "{e}");
        // Without the first file, it verifies from where it starts, and says so.
        let v = verify(&[file("b", b), file("c", c)], Some(&pk)).expect("a tail");
        assert_eq!(v.first_seq, 4);
    }
}
