//! Generates the tonic/prost code for `proto/gantry/v1/*.proto` (needs `protoc`:
//! Debian's `protobuf-compiler`), plus a descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/gantry/v1/models.proto", "proto/gantry/v1/worker.proto", "proto/gantry/v1/worker_link.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("gantry_v1_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
