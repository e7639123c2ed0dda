//! `gantry-proto`: the gRPC API of Gantry, package `gantry.v1`, generated from `proto/`.

#![allow(missing_debug_implementations, clippy::all)] // generated code

pub mod auth;
pub mod convert;
pub mod serve;

/// Package `gantry.v1`.
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// The encoded descriptors of every `gantry.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gantry_v1_descriptor");

/// Writes an enum field (an `i32` on the wire) by its name, `REPLICA_STATE_READY` → `READY`.
fn enum_name<S, E>(value: &i32, serializer: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
    E: TryFrom<i32> + EnumName,
{
    match E::try_from(*value) {
        Ok(e) => serializer.serialize_str(e.short_name()),
        Err(_) => serializer.serialize_i32(*value),
    }
}

/// The name of an enum value without its type's prefix.
trait EnumName {
    fn short_name(&self) -> &'static str;
}

macro_rules! enum_names {
    ($($t:ty => $prefix:literal),* $(,)?) => {$(
        impl EnumName for $t {
            fn short_name(&self) -> &'static str {
                let name = self.as_str_name();
                name.strip_prefix($prefix).unwrap_or(name)
            }
        }
    )*};
}

enum_names! {
    v1::ReplicaState => "REPLICA_STATE_",
    v1::PlacementStrategy => "PLACEMENT_STRATEGY_",
    v1::deployment_event::Kind => "KIND_",
    v1::FinishReason => "FINISH_REASON_",
    v1::AutoscalingMetric => "AUTOSCALING_METRIC_",
}

/// A replica state as people read it: `Pending`, `Loading`, `Ready`, `Failed` (the CLI, the
/// operator's status and the dashboard say the same).
pub fn replica_state_name(state: i32) -> &'static str {
    match v1::ReplicaState::try_from(state) {
        Ok(v1::ReplicaState::Pending) => "Pending",
        Ok(v1::ReplicaState::Loading) => "Loading",
        Ok(v1::ReplicaState::Ready) => "Ready",
        Ok(v1::ReplicaState::Failed) => "Failed",
        _ => "Unknown",
    }
}
