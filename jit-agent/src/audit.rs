//! The audit log: append-only JSON lines (`jit.v1.audit`, see `jit_api::audit`), one series per
//! node, each line chained to the one before by its hash and sealed by Ed25519-signed checkpoints.
//!
//! Durability: every line is written and `fdatasync`ed before [`AuditLog::record`] returns, so a
//! grant's `grant.issued` line is on disk before the grant reaches the kernel. A checkpoint is
//! written every `checkpoint_every_records` lines, every `checkpoint_every` (when lines were
//! written since), at rotation and at clean shutdown.
//!
//! Rotation: when the current file (`audit.jsonl`) reaches `rotate_bytes`, a checkpoint seals
//! it, it is renamed `audit-<first seq, 20 digits>.jsonl` and never written again, and the chain
//! goes on in a new `audit.jsonl`.
//!
//! Failure: a line that cannot be written is held in memory (up to [`HELD_MAX`]; beyond that it is
//! counted as lost) and the error returned. The node refuses to issue grants while the log is
//! failing (fail closed, unless `on_failure = "continue"`); revocations and expiries still take
//! effect and their lines are written, after an `audit.resumed` line, as soon as the log is
//! writable again ([`AuditLog::flush`] runs every second).

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jit_api::audit::{Event, GENESIS, Record, SCHEMA, SigningKey, checkpoint_message, line_hash};

/// Lines a `WatchAudit` subscriber may fall behind by before it re-reads the files.
const LINES_QUEUE: usize = 4096;

/// Lines held in memory while the log cannot be written.
pub const HELD_MAX: usize = 100_000;
/// The current file's name.
pub const CURRENT: &str = "audit.jsonl";

/// Why the audit log failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A filesystem operation failed.
    #[error("audit log {path}: {action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The signing key is not usable.
    #[error("audit signing key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The existing log cannot be continued.
    #[error("audit log {path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The log is failing; lines are held until it can be written again.
    #[error("the audit log cannot be written ({0}); lines are held until it can")]
    Failing(String),
}

/// How the log is written.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// The directory of the series.
    pub dir: PathBuf,
    /// The signing key file (hex PKCS#8, as `jit-agent audit keygen` writes it).
    pub key_file: PathBuf,
    /// Rotate when the current file reaches this size.
    pub rotate_bytes: u64,
    /// A checkpoint after this many lines.
    pub checkpoint_every_records: u64,
    /// A checkpoint after this long, when lines were written since.
    pub checkpoint_every: Duration,
    /// The node's name in every line.
    pub node: String,
    /// Where the seq and hash of the last checkpoint are kept, outside the log's directory: a log
    /// that ends before it (cut back, or its current file deleted) is refused at start.
    pub anchor_file: PathBuf,
}

/// The last checkpoint written: the log must reach at least this far.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Anchor {
    seq: u64,
    hash: String,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a new signing key to `path` (mode 0600, refusing to overwrite) and its public key, hex,
/// to `path.pub`. Returns the public key.
pub fn keygen(path: &Path) -> Result<String, AuditError> {
    use std::os::unix::fs::OpenOptionsExt as _;

    let der = SigningKey::generate().map_err(|e| AuditError::Key {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let text = hex::encode(&der);
    let key = SigningKey::from_file_text(&text).map_err(|e| AuditError::Key {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("creating (it must not exist yet)", path))?;
    f.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("writing", path))?;
    let public = key.public_hex();
    let pub_path = public_key_path(path);
    std::fs::write(&pub_path, format!("{public}\n")).map_err(io("writing", &pub_path))?;
    Ok(public)
}

/// Where the public key of `key_file` is kept.
#[must_use]
pub fn public_key_path(key_file: &Path) -> PathBuf {
    let mut s = key_file.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

fn load_key(path: &Path) -> Result<SigningKey, AuditError> {
    let text = std::fs::read_to_string(path).map_err(io("reading", path))?;
    SigningKey::from_file_text(&text).map_err(|e| AuditError::Key {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The position the chain continues from.
struct Tail {
    seq: u64,
    prev: String,
    first_seq_of_current: u64,
    since_checkpoint: u64,
}

/// Reads where the chain stands; cuts a partial last line off the current file (a crash left it;
/// it was never acknowledged). Returns the tail and what recovery did.
fn resume(dir: &Path) -> Result<(Tail, String), AuditError> {
    let current = dir.join(CURRENT);
    let mut recovered = String::new();
    let mut text = match std::fs::read(&current) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io("reading", &current)(e)),
    };
    if !text.is_empty() && text.last() != Some(&b'\n') {
        let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        let cut = text.len() - keep;
        let f = OpenOptions::new()
            .write(true)
            .open(&current)
            .map_err(io("opening", &current))?;
        f.set_len(keep as u64)
            .and_then(|()| f.sync_all())
            .map_err(io("cutting a partial line off", &current))?;
        text.truncate(keep);
        recovered = format!("cut off a partial last line of {cut} bytes that a crash left");
    }
    let last_of = |text: &[u8], path: &Path| -> Result<Option<(Record, String, u64)>, AuditError> {
        let mut since = 0;
        let mut last = None;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let rec: Record = serde_json::from_slice(line).map_err(|e| AuditError::Corrupt {
                path: path.to_path_buf(),
                message: format!("a line is not an audit record ({e}); move the file aside"),
            })?;
            since = if matches!(rec.event, Event::Checkpoint { .. }) {
                0
            } else {
                since + 1
            };
            last = Some((rec, line_hash(line), since));
        }
        Ok(last)
    };
    if let Some((rec, hash, since)) = last_of(&text, &current)? {
        let first: Record = text
            .split(|b| *b == b'\n')
            .next()
            .and_then(|l| serde_json::from_slice(l).ok())
            .ok_or_else(|| AuditError::Corrupt {
                path: current.clone(),
                message: "its first line is not an audit record".into(),
            })?;
        return Ok((
            Tail {
                seq: rec.seq + 1,
                prev: hash,
                first_seq_of_current: first.seq,
                since_checkpoint: since,
            },
            recovered,
        ));
    }
    // No current lines: continue after the newest rotated file, if any.
    let newest = rotated(dir)?.into_iter().max();
    if let Some((_, path)) = newest {
        let text = std::fs::read(&path).map_err(io("reading", &path))?;
        if let Some((rec, hash, since)) = last_of(&text, &path)? {
            return Ok((
                Tail {
                    seq: rec.seq + 1,
                    prev: hash,
                    first_seq_of_current: rec.seq + 1,
                    since_checkpoint: since,
                },
                recovered,
            ));
        }
    }
    Ok((
        Tail {
            seq: 0,
            prev: GENESIS.into(),
            first_seq_of_current: 0,
            since_checkpoint: 0,
        },
        recovered,
    ))
}

/// The rotated files of the series in `dir`, with the seq they start at.
pub fn rotated(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io("listing", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(seq) = name
            .strip_prefix("audit-")
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The writer behind the lock.
struct Writer {
    opts: AuditOptions,
    key: SigningKey,
    file: File,
    size: u64,
    tail: Tail,
    last_checkpoint: Instant,
    /// A failed write could not be cut back: re-read the tail from disk before the next one.
    broken: bool,
    /// Every line written, as it is written (for `WatchAudit`).
    lines: tokio::sync::broadcast::Sender<AuditLine>,
}

/// One line written: its seq and its text (without the newline).
#[derive(Clone, Debug)]
pub struct AuditLine {
    /// Sequence number.
    pub seq: u64,
    /// The line as written.
    pub line: Arc<str>,
}

impl Writer {
    fn path(&self) -> PathBuf {
        self.opts.dir.join(CURRENT)
    }

    /// Appends one event durably, stamped now.
    fn append(&mut self, event: Event) -> Result<u64, AuditError> {
        let rec = Record {
            schema: SCHEMA.into(),
            seq: self.tail.seq,
            at_unix_ms: crate::model::now_ms(),
            node: self.opts.node.clone(),
            prev: self.tail.prev.clone(),
            event,
        };
        let seq = self.write(&rec)?;
        self.tail.since_checkpoint += 1;
        Ok(seq)
    }

    /// Appends a checkpoint signed over everything before it (its time is part of what it signs).
    fn checkpoint(&mut self) -> Result<u64, AuditError> {
        let at = crate::model::now_ms();
        let message = checkpoint_message(self.tail.seq, at, &self.opts.node, &self.tail.prev);
        let rec = Record {
            schema: SCHEMA.into(),
            seq: self.tail.seq,
            at_unix_ms: at,
            node: self.opts.node.clone(),
            prev: self.tail.prev.clone(),
            event: Event::Checkpoint {
                key: self.key.public_hex(),
                signature: self.key.sign_hex(&message),
            },
        };
        let seq = self.write(&rec)?;
        self.tail.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        // Best effort: an older anchor is weaker, never wrong.
        let anchor = Anchor {
            seq,
            hash: self.tail.prev.clone(),
        };
        if let Err(e) = write_anchor(&self.opts.anchor_file, &anchor) {
            tracing::warn!("audit: {e}");
        }
        Ok(seq)
    }

    /// Writes one line and syncs it; on failure cuts the file back to where the line started.
    fn write(&mut self, rec: &Record) -> Result<u64, AuditError> {
        let path = self.path();
        if self.broken {
            // Continue from what the disk holds (a torn line is cut off), never from memory.
            let (tail, _) = resume(&self.opts.dir)?;
            self.file = open_current(&self.opts.dir)?;
            self.size = self
                .file
                .seek(SeekFrom::End(0))
                .map_err(io("opening", &path))?;
            self.tail = tail;
            self.broken = false;
        }
        let mut bytes = serde_json::to_vec(rec).map_err(|e| AuditError::Corrupt {
            path: path.clone(),
            message: format!("a record does not serialise: {e}"),
        })?;
        bytes.push(b'\n');
        if let Err(e) = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
        {
            // Leave no partial line behind; if that fails too, re-read the tail before the next
            // write (which also cuts a torn line off).
            if self.file.set_len(self.size).is_err() || self.file.seek(SeekFrom::End(0)).is_err() {
                self.broken = true;
            }
            return Err(io("appending", &path)(e));
        }
        self.size += bytes.len() as u64;
        bytes.pop();
        self.tail.prev = line_hash(&bytes);
        self.tail.seq += 1;
        // No receiver is not an error.
        let _ = self.lines.send(AuditLine {
            seq: rec.seq,
            line: Arc::from(String::from_utf8_lossy(&bytes).as_ref()),
        });
        Ok(rec.seq)
    }

    /// Checkpoints when due by count or time; rotates when the file is full.
    fn maintain(&mut self) -> Result<(), AuditError> {
        let due = self.tail.since_checkpoint >= self.opts.checkpoint_every_records
            || (self.tail.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.opts.checkpoint_every);
        if due {
            self.checkpoint()?;
        }
        if self.size >= self.opts.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        if self.tail.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        let from = self.path();
        let to = self.opts.dir.join(format!(
            "audit-{:020}.jsonl",
            self.tail.first_seq_of_current
        ));
        std::fs::rename(&from, &to).map_err(io("rotating", &from))?;
        self.file = open_current(&self.opts.dir)?;
        self.size = 0;
        self.tail.first_seq_of_current = self.tail.seq;
        sync_dir(&self.opts.dir)
    }
}

fn open_current(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(CURRENT);
    let created = !path.exists();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(io("opening", &path))?;
    if created {
        // The new name is durable too, not only the lines written to it.
        sync_dir(dir)?;
    }
    Ok(file)
}

fn write_anchor(path: &Path, anchor: &Anchor) -> Result<(), AuditError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(anchor).map_err(|e| AuditError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut f = File::create(&tmp).map_err(io("writing", &tmp))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replacing", path))
}

fn read_anchor(path: &Path) -> Result<Option<Anchor>, AuditError> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| AuditError::Corrupt {
                path: path.to_path_buf(),
                message: format!("not an audit anchor ({e})"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", path)(e)),
    }
}

/// Checks the series already in `dir` before continuing it: it must verify against `key`, and
/// reach the anchor (the last checkpoint this node wrote). Returns a note on lines it inherits
/// unsealed (written after the last checkpoint by an earlier run).
fn check_existing(dir: &Path, key: &str, anchor: Option<&Anchor>) -> Result<String, AuditError> {
    let mut paths: Vec<PathBuf> = rotated(dir)?.into_iter().map(|(_, p)| p).collect();
    paths.push(dir.join(CURRENT));
    let mut files = Vec::new();
    for p in paths.iter().filter(|p| p.exists()) {
        files.push(jit_api::audit::AuditFile {
            name: p.display().to_string(),
            bytes: std::fs::read(p).map_err(io("reading", p))?,
        });
    }
    let refuse = |message: String| AuditError::Corrupt {
        path: dir.to_path_buf(),
        message,
    };
    let v = jit_api::audit::verify(&files, Some(key)).map_err(|t| {
        refuse(format!(
            "the existing log does not verify ({t}); it is not continued: move it aside (keep it \
             as evidence) to start a new series"
        ))
    })?;
    if let Some(a) = anchor {
        let found = files.iter().any(|f| {
            f.bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .any(|l| {
                    serde_json::from_slice::<Record>(l).is_ok_and(|r| r.seq == a.seq)
                        && line_hash(l) == a.hash
                })
        });
        if !found {
            return Err(refuse(format!(
                "the log ends before, or differs at, the last checkpoint this node wrote (seq {}): \
                 it was cut back or replaced; it is not continued",
                a.seq
            )));
        }
    }
    Ok(if v.records > 0 && v.unsealed > 0 {
        format!(
            "inherited {} record(s) (seq {}..{}) that an earlier run wrote after its last \
             checkpoint; sealed from here on",
            v.unsealed,
            v.last_seq + 1 - v.unsealed,
            v.last_seq
        )
    } else {
        String::new()
    })
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

/// Lines that could not be written yet.
#[derive(Default)]
struct Held {
    events: VecDeque<Event>,
    error: Option<String>,
    lost: u64,
}

/// The node's audit log.
pub struct AuditLog {
    writer: Mutex<Writer>,
    held: Mutex<Held>,
    public_key: String,
    /// Records that could not be written when they happened (metrics).
    write_failures: std::sync::atomic::AtomicU64,
}

/// What the audit log has been through, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records that could not be written when they happened (held, or lost beyond the limit).
    pub write_failures: u64,
    /// Records held in memory now, waiting for the log to be writable.
    pub held: u64,
    /// Whether the log is failing now (its last write failed and nothing has been written since).
    pub failing: bool,
}

impl AuditLog {
    /// Opens (or starts) the series in `opts.dir` with the key in `opts.key_file`; a missing key
    /// is generated there (and its public key written beside it). Returns the log and what
    /// recovery did on opening.
    pub fn open(opts: AuditOptions) -> Result<(Self, String), AuditError> {
        std::fs::create_dir_all(&opts.dir).map_err(io("creating", &opts.dir))?;
        let series_exists = opts.dir.join(CURRENT).exists() || !rotated(&opts.dir)?.is_empty();
        if !opts.key_file.exists() && series_exists {
            return Err(AuditError::Key {
                path: opts.key_file.clone(),
                message: format!(
                    "is missing, but a log signed with it exists in {}: restore the key, or move \
                     the log aside to start a new series",
                    opts.dir.display()
                ),
            });
        }
        if !opts.key_file.exists() {
            let public = keygen(&opts.key_file)?;
            tracing::warn!(
                "audit: generated a signing key at {} (public key {public}, also in {}); keep \
                 the public key where auditors can find it",
                opts.key_file.display(),
                public_key_path(&opts.key_file).display()
            );
        }
        let key = load_key(&opts.key_file)?;
        let (tail, mut recovered) = resume(&opts.dir)?;
        let inherited = check_existing(
            &opts.dir,
            &key.public_hex(),
            read_anchor(&opts.anchor_file)?.as_ref(),
        )?;
        if !inherited.is_empty() {
            if !recovered.is_empty() {
                recovered.push_str("; ");
            }
            recovered.push_str(&inherited);
        }
        let mut file = open_current(&opts.dir)?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(io("opening", &opts.dir))?;
        // Make sure the file is readable back (a directory of the wrong kind fails here).
        let mut probe = [0u8; 0];
        let _ = file.read(&mut probe);
        let public_key = key.public_hex();
        Ok((
            Self {
                writer: Mutex::new(Writer {
                    opts,
                    key,
                    file,
                    size,
                    tail,
                    last_checkpoint: Instant::now(),
                    broken: false,
                    lines: tokio::sync::broadcast::channel(LINES_QUEUE).0,
                }),
                held: Mutex::new(Held::default()),
                public_key,
                write_failures: std::sync::atomic::AtomicU64::new(0),
            },
            recovered,
        ))
    }

    /// The public key of the checkpoints, hex.
    #[must_use]
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes held lines, if any, after an `audit.resumed` line. Fails (keeping them) while the
    /// log is still unwritable.
    fn flush_held(&self, w: &mut Writer) -> Result<(), AuditError> {
        let mut held = self.held();
        let Some(error) = held.error.clone() else {
            return Ok(());
        };
        w.append(Event::AuditResumed {
            error,
            held: held.events.len() as u64,
            lost: held.lost,
        })
        .map_err(|e| AuditError::Failing(e.to_string()))?;
        held.error = None;
        held.lost = 0;
        while let Some(event) = held.events.pop_front() {
            if let Err(e) = w.append(event.clone()) {
                held.events.push_front(event);
                held.error = Some(e.to_string());
                return Err(AuditError::Failing(e.to_string()));
            }
        }
        Ok(())
    }

    /// Records `event` durably; returns its `seq`. When the log cannot be written, the line is
    /// held (written later, in order) and the error returned.
    pub fn record(&self, event: Event) -> Result<u64, AuditError> {
        let mut w = self.writer();
        let result = self
            .flush_held(&mut w)
            .and_then(|()| w.append(event.clone()));
        match result {
            Ok(seq) => {
                if let Err(e) = w.maintain() {
                    tracing::error!("audit: {e}");
                }
                Ok(seq)
            }
            Err(e) => {
                self.write_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut held = self.held();
                if held.error.is_none() {
                    held.error = Some(e.to_string());
                }
                if held.events.len() < HELD_MAX {
                    held.events.push_back(event);
                } else {
                    held.lost += 1;
                }
                Err(AuditError::Failing(e.to_string()))
            }
        }
    }

    /// What the log has been through (no I/O).
    pub fn stats(&self) -> AuditStats {
        let held = self.held();
        AuditStats {
            write_failures: self
                .write_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            held: held.events.len() as u64,
            failing: held.error.is_some(),
        }
    }

    /// Whether lines can be written now: writes the held lines if there are any.
    pub fn writable(&self) -> Result<(), AuditError> {
        let mut w = self.writer();
        self.flush_held(&mut w)
    }

    /// Periodic work: writes held lines, and a checkpoint when one is due by time.
    pub fn flush(&self) -> Result<(), AuditError> {
        let mut w = self.writer();
        self.flush_held(&mut w)?;
        w.maintain()
    }

    /// Seals the log (clean shutdown): `agent.stop`, then a checkpoint.
    pub fn close(&self) -> Result<(), AuditError> {
        if let Err(e) = self.record(Event::AgentStop {}) {
            let held = self.held().events.len();
            return Err(AuditError::Failing(format!(
                "{e}; {held} held record(s) are lost with this process"
            )));
        }
        let mut w = self.writer();
        w.checkpoint().map(|_| ())
    }

    /// Lines written from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<AuditLine> {
        self.writer().lines.subscribe()
    }

    /// The lines already written with `seq >= from`, read from the files, in order. A line being
    /// written at this moment (no newline yet) is left out; it arrives through [`Self::subscribe`].
    pub fn history(&self, from: u64) -> Result<Vec<AuditLine>, AuditError> {
        let dir = self.writer().opts.dir.clone();
        let mut paths: Vec<(u64, PathBuf)> = rotated(&dir)?;
        // Files that end before `from` are skipped (each starts where the one before ended).
        let start = paths
            .iter()
            .rposition(|(first, _)| *first <= from)
            .unwrap_or(0);
        paths.drain(..start);
        let mut files: Vec<PathBuf> = paths.into_iter().map(|(_, p)| p).collect();
        files.push(dir.join(CURRENT));
        let mut out = Vec::new();
        for path in files {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading", &path)(e)),
            };
            let complete = bytes
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(&bytes[..0], |end| &bytes[..end]);
            for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                #[derive(serde::Deserialize)]
                struct Seq {
                    seq: u64,
                }
                let seq = serde_json::from_slice::<Seq>(line)
                    .map_err(|e| AuditError::Corrupt {
                        path: path.clone(),
                        message: format!("a line is not an audit record ({e})"),
                    })?
                    .seq;
                if seq >= from {
                    out.push(AuditLine {
                        seq,
                        line: Arc::from(String::from_utf8_lossy(line).as_ref()),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Where the current file is.
    #[must_use]
    pub fn current_file(&self) -> PathBuf {
        self.writer().path()
    }
}

#[cfg(test)]
mod tests {
    use jit_api::audit::{AuditFile, verify};

    use super::*;

    fn opts(dir: &Path) -> AuditOptions {
        AuditOptions {
            dir: dir.join("audit"),
            key_file: dir.join("audit.key"),
            rotate_bytes: 2_000,
            checkpoint_every_records: 5,
            checkpoint_every: Duration::from_secs(3600),
            node: "n1".into(),
            anchor_file: dir.join("audit-anchor.json"),
        }
    }

    fn series(dir: &Path) -> Vec<AuditFile> {
        let mut files: Vec<PathBuf> = rotated(dir)
            .expect("list")
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        files.push(dir.join(CURRENT));
        files
            .into_iter()
            .map(|p| AuditFile {
                name: p.display().to_string(),
                bytes: std::fs::read(&p).expect("read"),
            })
            .collect()
    }

    fn event(i: u64) -> Event {
        Event::GrantEnforced {
            grant_id: format!("grant-{i}"),
            result: "written".into(),
        }
    }

    #[test]
    fn the_chain_survives_rotation_restart_and_a_torn_line() {
        let tmp = std::env::temp_dir().join(format!("jit-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("dir");
        let (log, recovered) = AuditLog::open(opts(&tmp)).expect("open");
        assert!(recovered.is_empty());
        let key = log.public_key().to_string();
        for i in 0..40 {
            log.record(event(i)).expect("record");
        }
        log.close().expect("close");
        drop(log);
        let dir = tmp.join("audit");
        assert!(rotated(&dir).expect("list").len() >= 2, "it rotated");
        let v = verify(&series(&dir), Some(&key)).expect("intact");
        assert_eq!(v.unsealed, 0);

        // A crash mid-line: the torn line is cut off on opening, and the chain goes on.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(CURRENT))
            .expect("open");
        f.write_all(b"{\"schema\":\"jit.v1.au").expect("write");
        drop(f);
        let (log, recovered) = AuditLog::open(opts(&tmp)).expect("reopen");
        assert!(recovered.contains("partial"), "{recovered}");
        log.record(event(99)).expect("record");
        log.close().expect("close");
        let v = verify(&series(&dir), Some(&key)).expect("intact after recovery");
        assert_eq!(v.first_seq, 0);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_log_cut_back_edited_or_keyless_is_not_continued() {
        let tmp = std::env::temp_dir().join(format!("jit-audit-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("dir");
        // One file and a checkpoint every 5 lines: the cuts below land inside it.
        let opts = |tmp: &Path| AuditOptions {
            rotate_bytes: 1 << 20,
            ..opts(tmp)
        };
        let (log, _) = AuditLog::open(opts(&tmp)).expect("open");
        for i in 0..12 {
            log.record(event(i)).expect("record");
        }
        log.close().expect("close");
        drop(log);
        let dir = tmp.join("audit");
        let current = dir.join(CURRENT);
        let sealed = std::fs::read(&current).expect("read");

        // Cut back to an earlier checkpoint: a valid chain, but short of the anchor.
        let text = String::from_utf8(sealed.clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        let first_cp = lines
            .iter()
            .position(|l| l.contains("\"event\":\"checkpoint\""))
            .expect("a checkpoint");
        let cut: String = lines[..=first_cp]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(lines.len() > first_cp + 1);
        std::fs::write(&current, cut).expect("cut");
        let e = AuditLog::open(opts(&tmp))
            .err()
            .expect("cut back is refused");
        assert!(e.to_string().contains("cut back"), "{e}");
        // One changed byte in the sealed part.
        std::fs::write(&current, text.replacen("grant-3", "grant-9", 1)).expect("edit");
        let e = AuditLog::open(opts(&tmp)).err().expect("edited is refused");
        assert!(e.to_string().contains("does not verify"), "{e}");
        // The current file deleted: nothing left reaches the anchor.
        std::fs::remove_file(&current).expect("delete");
        assert!(
            AuditLog::open(opts(&tmp)).is_err(),
            "a deleted current file"
        );
        // Intact again, but the key is gone: not continued with a new key.
        std::fs::write(&current, &sealed).expect("restore");
        AuditLog::open(opts(&tmp)).expect("intact reopens");
        std::fs::remove_file(tmp.join("audit.key")).expect("delete key");
        let e = AuditLog::open(opts(&tmp)).err().expect("no key");
        assert!(e.to_string().contains("is missing"), "{e}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
