//! Generates the tonic/prost code for `proto/gantry/v1/*.proto` (needs `protoc`:
//! Debian's `protobuf-compiler`), plus a descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/gantry/v1/models.proto",
        "proto/gantry/v1/worker.proto",
        "proto/gantry/v1/worker_link.proto",
        "proto/gantry/v1/controller.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Every message is serializable (`gantry get -o json`); enum fields are written by name.
    let mut config = tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("gantry_v1_descriptor.bin"))
        .type_attribute(".gantry.v1", "#[derive(serde::Serialize)]");
    for (field, enum_type) in [
        ("gantry.v1.Replica.state", "ReplicaState"),
        ("gantry.v1.PlacementPolicy.strategy", "PlacementStrategy"),
        ("gantry.v1.DeploymentEvent.kind", "deployment_event::Kind"),
        ("gantry.v1.GenerateDone.finish_reason", "FinishReason"),
        ("gantry.v1.AutoscalingPolicy.metric", "AutoscalingMetric"),
    ] {
        config =
            config.field_attribute(field, format!("#[serde(serialize_with = \"crate::enum_name::<_, {enum_type}>\")]"));
    }
    config.compile_protos(&protos, &["proto"])?;
    Ok(())
}
