//! JIT Gate node agent, as a library: the `jit-agent` binary and the tests use it. The API
//! contract lives in jit-api; jitctl is its own crate.

pub mod api;
pub mod attach;
pub mod audit;
pub mod audit_sink;
pub mod certs;
pub mod cli;
pub mod config;
pub mod coverage;
pub mod daemon;
pub mod datapath;
pub mod denials;
pub mod engine;
pub mod file_watch;
pub mod identity;
pub mod kernel_names;
pub mod kernel_sync;
pub mod local_addrs;
pub mod logging;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod node;
pub mod notify;
pub mod ops_listener;
pub mod policy;
pub mod spec;
pub mod store;
