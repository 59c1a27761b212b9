//! One watcher for the files the agent re-reads while it runs (the CA bundle, certificate and
//! key; the policy and schema). It watches the directories that hold them, since editors and
//! Kubernetes secret volumes replace a file by rename or symlink swap, which a watch on the file
//! itself would miss; debounces bursts of changes; and asks each subscriber whose directory saw a
//! change to check its files. Subscribers compare what they read themselves (modification
//! times), so an unrelated change in the same directory costs a `stat`.
//!
//! Fail safe: when the watcher cannot be set up (inotify limits, a filesystem without
//! notifications), the subscribers are checked every [`FALLBACK_EVERY`] instead, and that is
//! logged.

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
    fn dirs(&self) -> BTreeSet<PathBuf> {
        self.files.iter().map(|f| dir_of(f)).collect()
    }
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
        match Self::watch(Arc::clone(&subscribers)) {
            Ok(debouncer) => Self {
                _debouncer: Some(debouncer),
            },
            Err(e) => {
                log::warn!(
                    "watching the certificate and policy files failed ({e}); checking them every \
                     {FALLBACK_EVERY:?} instead"
                );
                std::thread::spawn(move || {
                    loop {
                        std::thread::sleep(FALLBACK_EVERY);
                        for s in subscribers.iter() {
                            (s.check)();
                        }
                    }
                });
                Self { _debouncer: None }
            }
        }
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
                            log::debug!("{} may have changed; checking", s.name);
                            (s.check)();
                        }
                    }
                }
                // Events may have been lost: check everything.
                Err(e) => {
                    log::warn!("file watch: {e}; checking every watched file");
                    for s in subs.iter() {
                        (s.check)();
                    }
                }
            }
        })?;
        let dirs: BTreeSet<PathBuf> = subscribers.iter().flat_map(Subscriber::dirs).collect();
        for dir in &dirs {
            // Events name paths under the directory as given, which is how `dirs()` names them.
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
        let _watch = FileWatch::start(vec![Subscriber {
            name: "policies",
            files: vec![file.clone()],
            check: Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        }]);
        std::fs::write(other.join("x"), "elsewhere").expect("write");
        std::thread::sleep(DEBOUNCE * 3);
        assert_eq!(checks.load(Ordering::SeqCst), 0, "another directory");
        // Replaced the way editors and secret volumes do it: write aside, rename over.
        let tmp = watched.join(".policies.cedar.swp");
        std::fs::write(&tmp, "v2").expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while checks.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no check within 5 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
