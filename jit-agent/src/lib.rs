//! JIT Gate node agent, as a library: the binaries `jit-agent` and `jitctl` and the tests use it.

pub mod api;
pub mod attach;
pub mod certs;
pub mod cli;
pub mod config;
pub mod coverage;
pub mod ctl;
pub mod daemon;
pub mod datapath;
pub mod duration;
pub mod engine;
pub mod identity;
pub mod kernel_sync;
pub mod local_addrs;
pub mod model;
pub mod node;
pub mod notify;
pub mod policy;
pub mod store;

/// Generated gRPC code for `jit.v1` (from proto/jit/v1/jit.proto, never committed).
pub mod proto {
    tonic::include_proto!("jit.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jit_v1_descriptor");
}
