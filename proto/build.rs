//! Compiles guard.proto with protox (pure Rust), so no protoc install is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=guard.proto");
    let fds = protox::compile(["guard.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
