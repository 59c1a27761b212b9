//! Rebuild the program when the `bpf-linker` binary changes (cargo cannot see that dependency),
//! and tell bpf-linker how to generate code.

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` to install it"
        ),
    }
    // ALU32 (kernel 5.1+): 32-bit subregisters, fewer instructions per packet. (rustc passes the
    // CPU itself, so only features can be added here.) Misaligned loads: packet fields have no alignment, and without this LLVM reads them one
    // byte at a time; the kernel allows misaligned packet access on the architectures we run on
    // (the verifier rejects the program otherwise, it never runs misaligned on a strict one).
    println!("cargo:rustc-link-arg=--cpu-features=+alu32");
    // With `-bpf-expand-memcpy-in-order` (bpf-linker's default) LLVM expands memcpy itself but
    // leaves every memset, even of a few bytes of a map key, as a call to a byte-by-byte loop.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
