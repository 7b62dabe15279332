//! Generates the gRPC code for `proto/*.proto` with tonic + prost.
//!
//! Uses the system `protoc` (Debian `protobuf-compiler`) when one is on PATH
//! or named by `PROTOC`, else the copy shipped in the `protoc-bin-vendored`
//! crate, so a fresh machine with only the Rust toolchain can build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() && !protoc_on_path() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("podcache_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/hellorpc.proto", "proto/podcache.proto"],
            &["proto"],
        )?;
    Ok(())
}

fn protoc_on_path() -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("protoc").is_file()))
        .unwrap_or(false)
}
