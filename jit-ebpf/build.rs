//! Rebuild the program when the `bpf-linker` binary changes (cargo cannot see that dependency),
//! and tell bpf-linker how to generate code.

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` to install it"
        ),
    }
    // No extra CPU features: rustc passes the generic CPU (v1) and bpf-linker refuses a second
    // --cpu; ALU32 without v3's 32-bit jumps made the packet path slower (32-bit compares need
    // shifts), and misaligned loads make LLVM merge stack stores into misaligned ones the
    // verifier refuses (see docs/ARCHITECTURE.md).
    // With `-bpf-expand-memcpy-in-order` (bpf-linker's default) LLVM expands memcpy itself but
    // leaves every memset, even of a few bytes of a map key, as a call to a byte-by-byte loop.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
