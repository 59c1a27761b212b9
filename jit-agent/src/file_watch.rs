//! One watcher for the files the agent re-reads while it runs (the CA bundle, certificate and
//! key; the policy and schema). It watches the directories that hold them, since editors and
//! Kubernetes secret volumes replace a file by rename or symlink swap, which a watch on the file
//! itself would miss; debounces bursts of changes; and asks each subscriber whose directory saw a
//! change to check its files. Subscribers compare what they read themselves (modification
//! times), so an unrelated change in the same directory costs a `stat`.
//!
//! Fail safe: every subscriber is also checked once when the watch starts and every
//! [`SAFETY_EVERY`] whatever happens, since some changes raise no event in a watched directory (a
//! watched directory deleted or replaced, a symlinked directory swapped, an event queue that
//! overflowed); and when the watcher cannot be set up at all (inotify limits, a filesystem without
//! notifications), every [`FALLBACK_EVERY`] instead, which is logged. A check that panics is
//! logged and stops nothing.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify_debouncer_mini::{
    DebounceEventResult, Debouncer, new_debouncer,
    notify::{RecommendedWatcher, RecursiveMode},
};

/// How long changes must settle before subscribers are asked to check.
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often subscribers are checked when the watcher cannot run.
pub const FALLBACK_EVERY: Duration = Duration::from_secs(2);
/// How often subscribers are checked while the watcher runs, for changes that raise no event.
pub const SAFETY_EVERY: Duration = Duration::from_secs(30);

/// Files and what to do when one of them may have changed.
pub struct Subscriber {
    /// What the files are, for logs.
    pub name: &'static str,
    /// The files.
    pub files: Vec<PathBuf>,
    /// Re-reads the files if they changed (and logs what it did).
    pub check: Box<dyn Fn() + Send + Sync>,
}

impl Subscriber {
    /// The directories to watch: each file's (as an absolute path, since events name absolute
    /// paths) and, for a symlink, its target's.
    fn dirs(&self) -> BTreeSet<PathBuf> {
        let mut dirs = BTreeSet::new();
        for f in &self.files {
            dirs.insert(dir_of(
                &std::path::absolute(f).unwrap_or_else(|_| f.clone()),
            ));
            if let Ok(target) = std::fs::canonicalize(f) {
                dirs.insert(dir_of(&target));
            }
        }
        dirs
    }

    /// Runs the check; a panic in it is logged, never passed on.
    fn run_check(&self) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.check)())).is_err() {
            tracing::error!("checking {} for changes panicked", self.name);
        }
    }
}

/// Checks every subscriber every `every`, for the life of the process.
fn check_every(subscribers: Arc<Vec<Subscriber>>, every: Duration) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(every);
            for s in subscribers.iter() {
                s.run_check();
            }
        }
    });
}

/// The directory a file is in (`.` for a bare file name).
fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The running watcher; dropping it stops the watch.
pub struct FileWatch {
    _debouncer: Option<Debouncer<RecommendedWatcher>>,
}

impl FileWatch {
    /// Starts watching for `subscribers`.
    #[must_use]
    pub fn start(subscribers: Vec<Subscriber>) -> Self {
        let subscribers = Arc::new(subscribers);
        let watch = match Self::watch(Arc::clone(&subscribers)) {
            Ok(debouncer) => {
                check_every(Arc::clone(&subscribers), SAFETY_EVERY);
                Self {
                    _debouncer: Some(debouncer),
                }
            }
            Err(e) => {
                tracing::warn!(
                    "watching the certificate and policy files failed ({e}); checking them every \
                     {FALLBACK_EVERY:?} instead"
                );
                check_every(Arc::clone(&subscribers), FALLBACK_EVERY);
                Self { _debouncer: None }
            }
        };
        // Whatever changed between the first read and now.
        for s in subscribers.iter() {
            s.run_check();
        }
        watch
    }

    fn watch(
        subscribers: Arc<Vec<Subscriber>>,
    ) -> Result<Debouncer<RecommendedWatcher>, notify_debouncer_mini::notify::Error> {
        let subs = Arc::clone(&subscribers);
        let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| {
            match result {
                Ok(events) => {
                    let changed: BTreeSet<PathBuf> =
                        events.iter().map(|e| dir_of(&e.path)).collect();
                    for s in subs.iter() {
                        if s.dirs().iter().any(|d| changed.contains(d)) {
                            tracing::debug!("{} may have changed; checking", s.name);
                            s.run_check();
                        }
                    }
                }
                // Events may have been lost: check everything.
                Err(e) => {
                    tracing::warn!("file watch: {e}; checking every watched file");
                    for s in subs.iter() {
                        s.run_check();
                    }
                }
            }
        })?;
        let dirs: BTreeSet<PathBuf> = subscribers.iter().flat_map(Subscriber::dirs).collect();
        for dir in &dirs {
            // Events name absolute paths under the directory, as `dirs()` names it.
            debouncer
                .watcher()
                .watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(debouncer)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_replaced_file_is_checked_and_an_unwatched_directory_is_not() {
        let base = std::env::temp_dir().join(format!("jit-watch-{}", std::process::id()));
        let (watched, other) = (base.join("watched"), base.join("other"));
        std::fs::create_dir_all(&watched).expect("dir");
        std::fs::create_dir_all(&other).expect("dir");
        let file = watched.join("policies.cedar");
        std::fs::write(&file, "v1").expect("write");
        let checks = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&checks);
        // Named by a relative path, as a configuration may name it.
        let cwd = std::env::current_dir().expect("cwd");
        let relative = pathdiff(&file, &cwd);
        let _watch = FileWatch::start(vec![Subscriber {
            name: "policies",
            files: vec![relative],
            check: Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        }]);
        assert_eq!(checks.load(Ordering::SeqCst), 1, "one check at the start");
        std::fs::write(other.join("x"), "elsewhere").expect("write");
        std::thread::sleep(DEBOUNCE * 3);
        assert_eq!(checks.load(Ordering::SeqCst), 1, "another directory");
        // Replaced the way editors and secret volumes do it: write aside, rename over.
        let tmp = watched.join(".policies.cedar.swp");
        std::fs::write(&tmp, "v2").expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while checks.load(Ordering::SeqCst) == 1 {
            assert!(std::time::Instant::now() < deadline, "no check within 5 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    /// `path` relative to `base` (`../../tmp/...`), both absolute.
    fn pathdiff(path: &Path, base: &Path) -> PathBuf {
        let up = base.components().count().saturating_sub(1);
        let mut rel = PathBuf::new();
        for _ in 0..up {
            rel.push("..");
        }
        rel.join(path.strip_prefix("/").unwrap_or(path))
    }
}
