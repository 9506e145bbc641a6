//! Compiles the `.proto` contracts with protox (pure Rust, no protoc) and generates prost messages
//! plus the tonic service code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["kvtier/v1/connector.proto", "kvtier/v1/cache_service.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Hashes decode as slices of the frame buffer: no allocation per hash.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
