//! Compiles `proto/gfs.proto` into the tonic clients and servers of `gfs::proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system protoc.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::configure()
        // `bytes::Bytes` for bytes fields: pushed data is shared, not copied.
        .bytes(["."])
        .compile_protos(&["proto/gfs.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/gfs.proto");
    Ok(())
}
