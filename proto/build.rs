//! Compiles the `.proto` contracts with protox (pure Rust, no protoc) and generates prost messages
//! plus, with the `grpc` feature, the tonic service code. Also writes the serialized descriptor set of the connector
//! protocol, which the Python client embeds (see `client/python/kvtier/_descriptor.py`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "kvtier/v1/connector.proto",
        "kvtier/v1/cache_service.proto",
        "kvtier/v1/router.proto",
        "kvtier/v1/transfer.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut connector = descriptors.clone();
    connector.file.retain(|f| f.name() == "kvtier/v1/connector.proto");
    // Source info (comments, spans) is not needed at run time.
    for f in &mut connector.file {
        f.source_code_info = None;
    }
    std::fs::write(out.join("connector_descriptor.bin"), connector.encode_to_vec())?;
    // Service code only with the `grpc` feature, so the messages build without tonic.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        // Hashes decode as slices of the frame buffer: no allocation per hash.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
