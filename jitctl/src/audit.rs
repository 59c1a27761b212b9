//! `jitctl audit`: checks a node's audit log from its files alone, without an agent.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use jit_api::audit::{AuditFile, verify};

/// Exit code of `verify`: a record does not hold (changed, inserted, deleted, duplicated,
/// reordered, a file missing, a bad signature, a torn line).
pub(crate) const EXIT_TAMPERED: u8 = 4;
/// Exit code of `verify`: every record holds, but records after the last checkpoint are not
/// sealed yet (the agent runs, stopped without a clean shutdown, or the file was cut after its
/// last checkpoint).
pub(crate) const EXIT_UNSEALED: u8 = 5;

/// Audit log commands (they read files; no agent is needed).
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check a node's audit files: the hash chain from record to record and across rotated files,
    /// and every checkpoint's signature. Exit codes: 0 intact and sealed; 4 tampered (the first
    /// bad record is named); 5 intact, but records after the last checkpoint are not sealed; 1
    /// error.
    Verify {
        /// The files of the series (`audit-*.jsonl` and `audit.jsonl`), in any order. With
        /// `--key PUBKEY` (hex, or a file holding it, e.g. `audit-signing.key.pub`; only from the
        /// command line, never from JIT_KEY) the checkpoints must be signed by that key; without
        /// it they are checked against the key they name, which proves the log consistent but not
        /// whose it is.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Runs an audit command with the `--key` given on the command line; returns the exit code.
pub(crate) fn run(cmd: AuditCommand, key: Option<&Path>) -> anyhow::Result<u8> {
    let key = key.map(|k| k.to_string_lossy().into_owned());
    match cmd {
        AuditCommand::Verify { files } => verify_files(&files, key.as_deref()),
    }
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
    let mut read = Vec::with_capacity(files.len());
    for f in files {
        read.push(AuditFile {
            name: f.display().to_string(),
            bytes: std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        });
    }
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
            if v.first_seq > 0 {
                println!(
                    "note: the chain starts at seq {}: the files before it were not given",
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
            Ok(0)
        }
    }
}
