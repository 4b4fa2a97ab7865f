//! Compiles the switchyard.v1 protos with protox (pure Rust), so building needs no system
//! `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "switchyard/v1/registry.proto",
        "switchyard/v1/telemetry.proto",
        "switchyard/v1/rollouts.proto",
        "switchyard/v1/acl.proto",
        "switchyard/v1/identity.proto",
        "switchyard/v1/intentions.proto",
        "switchyard/v1/config.proto",
        "switchyard/internal/v1/raft.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::EdgeCodec")
        .compile_fds(fds)?;
    Ok(())
}
