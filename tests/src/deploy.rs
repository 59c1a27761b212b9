//! The deployment files under `deploy/`, read as the tests need them.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The repository's `deploy/` directory.
#[must_use]
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A YAML manifest (one document per file) as JSON values.
///
/// # Panics
/// When the file cannot be read or is not YAML: the test names the file.
#[must_use]
pub fn manifest(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shipped DaemonSet.
#[must_use]
pub fn daemonset() -> Value {
    manifest(&dir().join("kubernetes/daemonset.yaml"))
}

/// The capabilities the DaemonSet's agent container adds, upper case without `CAP_` (it drops
/// every other one).
///
/// # Panics
/// When the DaemonSet has no such list.
#[must_use]
pub fn daemonset_capabilities() -> Vec<String> {
    let ds = daemonset();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add in the DaemonSet")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_string())
        .collect()
}
