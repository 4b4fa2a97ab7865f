//! Compiles the minimal etcd v3 API subset (proto/etcd.proto) the same way
//! `switchyard-proto` compiles its protos: protox (pure Rust, no system `protoc`) and
//! tonic-prost-build. Client stubs only: this crate never serves etcd.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["etcd.proto"];
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
