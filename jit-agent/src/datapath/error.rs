//! Errors of the datapath module.

use std::{io, path::PathBuf};

/// What can go wrong loading, attaching or programming the kernel gate.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The pin directory is not on a BPF filesystem and could not be put on one.
    #[error("{path} is not on a BPF filesystem (bpffs): {reason}")]
    NotBpffs {
        /// The directory.
        path: PathBuf,
        /// Why it could not be used or mounted.
        reason: String,
    },
    /// A filesystem operation on the pin directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel object could not be loaded.
    #[error("loading the kernel program: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded, attached or detached.
    #[error("{action}: {source}")]
    Program {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A pinned link could not be opened, pinned or reused.
    #[error("{action}: {reason}")]
    Link {
        /// What was being done.
        action: String,
        /// The cause.
        reason: String,
    },
    /// The gate's maps are not pinned in this directory: nothing was loaded there.
    #[error(
        "no gate is loaded under {pin_dir} (map {map} is not pinned there); run `jit-agent bpf attach` first"
    )]
    NotLoaded {
        /// The pin directory.
        pin_dir: PathBuf,
        /// The first missing map.
        map: &'static str,
    },
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A map is full: the entry was not added.
    #[error("map {map} is full ({max_entries} entries); the entry was not added")]
    MapFull {
        /// The map's name.
        map: &'static str,
        /// Its capacity.
        max_entries: u32,
    },
    /// A value is out of the range the kernel program accepts.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A source prefix is already bound to another identity.
    #[error(
        "{prefix} is already bound to identity {existing}; refusing to bind it to identity {requested}"
    )]
    IdentityConflict {
        /// The prefix.
        prefix: ipnet::IpNet,
        /// The identity holding it.
        existing: u32,
        /// The identity asked for.
        requested: u32,
    },
    /// The interface does not exist (in this network namespace).
    #[error("no network interface named {0:?}")]
    UnknownInterface(String),
    /// Nothing is attached where a detach was asked for.
    #[error("the gate is not attached to {iface} in {mode} mode (no link pinned at {path})")]
    NotAttached {
        /// Interface.
        iface: String,
        /// Attach mode.
        mode: String,
        /// Where the link pin was looked for.
        path: PathBuf,
    },
    /// The clock could not be read.
    #[error("reading CLOCK_BOOTTIME: {0}")]
    Clock(io::Error),
}

/// Shorthand for datapath results.
pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
