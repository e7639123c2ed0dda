//! `gantry-proto`: the gRPC API of Gantry, package `gantry.v1`, generated from `proto/`.

#![allow(missing_debug_implementations, clippy::all)] // generated code

/// Package `gantry.v1`.
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// The encoded descriptors of every `gantry.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gantry_v1_descriptor");
