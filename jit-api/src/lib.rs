//! JIT Gate's API, shared by the agent and `jitctl`: the `jit.v1` gRPC contract (generated from
//! `proto/jit/v1/jit.proto` by tonic/prost, with serde on every message, so JSON output and
//! notification bodies are the messages themselves), the names of request and grant states and
//! of notification events (defined once, here), the duration syntax, and the plain-text tables
//! both command lines print.
//!
//! This crate builds with stable Rust alone: it must never depend on the eBPF toolchain, aya,
//! redb or Cedar (`cargo xtask lint` checks jitctl's dependency tree).

pub mod audit;
pub mod duration;
pub mod events;
pub mod states;
pub mod table;

/// Generated gRPC code for `jit.v1` (from proto/jit/v1/jit.proto, never committed).
pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("jit.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jit_v1_descriptor");
}

pub use events::Event;
pub use pb::{GrantState, RequestState};

/// The schema name of a webhook notification body (`pb::Notification.schema`).
pub const NOTIFICATION_SCHEMA: &str = "jit.v1.notification";
