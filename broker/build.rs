//! Build steps:
//! - `sqlx::migrate!` embeds the migrations at compile time; tell cargo to rebuild when a new
//!   migration file appears (it notices edits to existing files on its own, not new ones).
//! - The gRPC services (federation, admin) are generated from `proto/` with tonic, using the
//!   `protoc` shipped in the `protoc-bin-vendored` crate, so no system protoc is needed. The
//!   encoded file descriptor set is kept for server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-changed=../proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Passed through the builder rather than the PROTOC variable: `set_var` is unsafe in
    // edition 2024 and the workspace forbids unsafe code.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("micromsg_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "../proto/micromsg/federation/v1/federation.proto",
                "../proto/micromsg/admin/v1/admin.proto",
            ],
            &["../proto"],
        )?;
    Ok(())
}
