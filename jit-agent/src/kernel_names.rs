//! The names behind the kernel's numeric ids. The kernel knows services and identities by number;
//! the kernel sync records each number's name as it allocates or uses it, in
//! `<state_dir>/kernel-names.json`, so `jit-agent bpf status` and `bpf grants` can show names
//! next to the ids. Advisory: the gate never reads it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The file's name in the state directory.
pub const FILE: &str = "kernel-names.json";

/// Why the names could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    /// Reading or writing the file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold names.
    #[error("{path} is not a names file: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
}

/// Numeric ids and their names.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelNames {
    /// Service id → service name.
    pub services: BTreeMap<u32, String>,
    /// Identity id → SPIFFE ID.
    pub identities: BTreeMap<u32, String>,
}

impl KernelNames {
    /// The names recorded in `state_dir`; `None` when there is no file yet.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, NamesError> {
        let path = state_dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(NamesError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| NamesError::Format { path, source })
    }

    /// Writes the names to `state_dir` (atomically: a reader sees the old file or the new one).
    pub fn save(&self, state_dir: &Path) -> Result<(), NamesError> {
        let path = state_dir.join(FILE);
        let tmp = state_dir.join(format!("{FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|source| NamesError::Format {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, text).map_err(|source| NamesError::Io {
            action: "writing",
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| NamesError::Io {
            action: "replacing",
            path,
            source,
        })
    }

    /// `id (name)`, or the id alone when its name is unknown.
    #[must_use]
    pub fn service(&self, id: u32) -> String {
        labelled(id, self.services.get(&id))
    }

    /// `id (name)`, or the id alone when its name is unknown.
    #[must_use]
    pub fn identity(&self, id: u32) -> String {
        labelled(id, self.identities.get(&id))
    }
}

fn labelled(id: u32, name: Option<&String>) -> String {
    name.map_or_else(|| id.to_string(), |n| format!("{id} ({n})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_missing_file_is_none() {
        let dir = std::env::temp_dir().join(format!("jit-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(KernelNames::load(&dir).expect("load"), None);
        let mut n = KernelNames::default();
        n.services.insert(3, "db".into());
        n.identities.insert(7, "spiffe://ex.org/ci".into());
        n.save(&dir).expect("save");
        let back = KernelNames::load(&dir).expect("load").expect("some");
        assert_eq!(back, n);
        assert_eq!(back.service(3), "3 (db)");
        assert_eq!(back.identity(8), "8");
        std::fs::write(dir.join(FILE), "not json").expect("write");
        assert!(KernelNames::load(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
