//! Compiles `proto/petal.proto` into the tonic client and server of `petal::proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system protoc.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::configure()
        // `bytes::Bytes` for bytes fields: block data is shared, not copied.
        .bytes(["."])
        .compile_protos(&["proto/petal.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/petal.proto");
    Ok(())
}
