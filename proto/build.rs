//! Compiles guard.proto with protox (pure Rust), so no protoc install is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=guard.proto");
    let fds = protox::compile(["guard.proto"], ["."])?;
    // The client and server exist only with the `grpc` feature; the messages always.
    let grpc_only = "#[cfg(feature = \"grpc\")]";
    tonic_prost_build::configure()
        .client_mod_attribute("soffid.otp.v1", grpc_only)
        .server_mod_attribute("soffid.otp.v1", grpc_only)
        .compile_fds(fds)?;
    Ok(())
}
