//! Compiles `proto/postern.proto` with protox (a pure-Rust protobuf compiler, so no
//! `protoc` binary is needed) and generates Rust types with prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/postern.proto");
    let descriptors = protox::compile(["proto/postern.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
