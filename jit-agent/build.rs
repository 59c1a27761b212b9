//! Builds the kernel program (jit-ebpf) for the BPF target with aya-build, so the agent embeds
//! exactly the program its sources describe.

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "jit-ebpf";

fn main() -> anyhow::Result<()> {
    build_ebpf()
}

fn build_ebpf() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("package {EBPF_PACKAGE} is not in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", package.manifest_path))?;

    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Lets `cargo check`/clippy run without the BPF toolchain: an empty object stands in, and
        // loading it fails loudly at run time rather than enforcing nothing.
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join(EBPF_PACKAGE), []).context("writing the stand-in object")?;
        std::fs::write(out.join("jit-harness"), []).context("writing the stand-in object")?;
    }
    // The agent's `ebpf-log` feature turns on the program's aya-log records.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_EBPF_LOG").is_some() {
        &["log"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
