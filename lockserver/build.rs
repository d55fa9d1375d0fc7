//! Compiles `proto/lockserver.proto` into the tonic client and server of `lockserver::service`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system protoc.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::configure().compile_protos(&["proto/lockserver.proto"], &["proto"])?;
    Ok(())
}
