//! Generates the gRPC code from proto/jit/v1/jit.proto (never committed), with serde on every
//! message and a file descriptor set for server reflection. protoc comes from the
//! protoc-bin-vendored crate, so the build needs nothing installed.

use anyhow::Context as _;

/// Messages whose `state` field holds a request state, and those holding a grant state: they
/// are written as words ("pending"), not numbers.
const REQUEST_STATE_FIELDS: &[&str] = &["jit.v1.AccessRequest.state"];
const GRANT_STATE_FIELDS: &[&str] = &["jit.v1.Grant.state"];

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().context("finding the vendored protoc")?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    println!("cargo:rerun-if-changed=../proto");
    let mut builder = tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("jit_v1_descriptor.bin"))
        .message_attribute(".jit.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".jit.v1", "#[serde(default)]")
        // Oneofs; the two state enums have their own serde (words, see states.rs).
        .enum_attribute(
            ".jit.v1.RevokeRequest.target",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        .enum_attribute(
            ".jit.v1.RevokeRequest.target",
            "#[serde(rename_all = \"snake_case\")]",
        );
    for f in REQUEST_STATE_FIELDS {
        builder =
            builder.field_attribute(f, "#[serde(with = \"crate::states::request_state_field\")]");
    }
    for f in GRANT_STATE_FIELDS {
        builder =
            builder.field_attribute(f, "#[serde(with = \"crate::states::grant_state_field\")]");
    }
    builder
        .compile_protos(&["../proto/jit/v1/jit.proto"], &["../proto"])
        .context("compiling proto/jit/v1/jit.proto")?;
    Ok(())
}
