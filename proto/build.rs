//! Compiles `proto/trmx/v1/*.proto` with `protox` (pure Rust, no system `protoc`)
//! into prost messages, tonic services and pbjson serde impls (the proto3 JSON
//! mapping).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("trmx/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("trmx_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_well_known_types(true)
        // Malformed requests are the caller's error (INVALID_ARGUMENT), see src/codec.rs.
        .codec_path("crate::codec::Codec")
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;

    let descriptor_bytes = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .out_dir(&out_dir)
        .build(&[".trmx.v1"])?;
    Ok(())
}
