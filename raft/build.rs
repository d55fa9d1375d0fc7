//! Compiles `proto/raft.proto` into the tonic client and server of `raft::transport`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system protoc.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::configure()
        // `bytes::Bytes` for bytes fields: entries and snapshot chunks are shared, not copied.
        .bytes(["."])
        .compile_protos(&["proto/raft.proto", "proto/kv.proto"], &["proto"])?;
    Ok(())
}
