// The library target only lets jit-agent build-depend on this crate (aya-template shape).
#![no_std]
