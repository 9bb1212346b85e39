//! Generates the gRPC code with protox, a pure-Rust protobuf compiler, so that no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: the compiled build script is shared by every clone that uses the same
    // target dir, and a path baked in at compile time would point into another clone.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("junction/v1/broker.proto"),
        root.join("junction/v1/peer.proto"),
        root.join("junction/v1/groups.proto"),
        root.join("junction/v1/schemas.proto"),
    ];
    let fds = protox::compile(&files, [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut bytes = Vec::new();
    prost::Message::encode(&fds, &mut bytes)?;
    std::fs::write(out.join("junction_descriptor.bin"), &bytes)?;
    tonic_prost_build::configure()
        .bytes(".junction.v1.Message.payload")
        .bytes(".junction.v1.StoredMessage.payload")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
