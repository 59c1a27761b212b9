//! JIT Gate node agent, as a library: the binary `jit-agent` and the tests use it.

pub mod cli;
pub mod datapath;
