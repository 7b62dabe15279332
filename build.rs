//! Generates the gRPC code for `proto/*.proto` with tonic + prost.
//!
//! Uses the system `protoc` (Debian `protobuf-compiler`) when one is on PATH
//! or named by `PROTOC`, else the copy shipped in the `protoc-bin-vendored`
//! crate, so a fresh machine with only the Rust toolchain can build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // podcache's own services: server and client, with descriptors for
    // server reflection.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("podcache_descriptor.bin"))
        .compile_with_config(
            prost_config()?,
            &["proto/hellorpc.proto", "proto/podcache.proto"],
            &["proto"],
        )?;
    // etcd's API and Kubernetes' Pod encoding: clients and messages only.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(
            prost_config()?,
            &["proto/etcd/rpc.proto", "proto/k8s/pod.proto"],
            &["proto"],
        )?;
    Ok(())
}

fn prost_config() -> Result<prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() && !protoc_on_path() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    Ok(config)
}

fn protoc_on_path() -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("protoc").is_file()))
        .unwrap_or(false)
}
