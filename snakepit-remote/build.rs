//! Generates the `snakepit.v1.Agent` code from `proto/` with protox (a pure-Rust protobuf
//! compiler): no `protoc` is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("proto");
    let file = root.join("snakepit/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
