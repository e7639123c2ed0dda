//! The generated `gantry.v1` types encode and decode, and the reflection descriptors name the
//! services a client will look for.

use gantry_proto::v1::{Gpu, InspectRequest};
use prost::Message;

#[test]
fn inspect_request_survives_the_wire() {
    let req = InspectRequest {
        model: "meta-llama/Meta-Llama-3-70B-Instruct".into(),
        context: 8192,
        batch: 1,
        dtype: "bf16".into(),
        gpus: vec![Gpu { name: "gpu0".into(), memory_bytes: 80 << 30 }],
        gpus_linked: true,
        device_kinds: vec!["NVIDIA H100 80GB HBM3".into()],
    };
    let bytes = req.encode_to_vec();
    assert_eq!(InspectRequest::decode(bytes.as_slice()).expect("decodes"), req);
}

#[test]
fn descriptor_set_names_the_models_service() {
    let set = gantry_proto::FILE_DESCRIPTOR_SET;
    let has = |s: &str| set.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has("gantry.v1") && has("Models") && has("Inspect") && has("Select"));
}

#[test]
fn a_measurement_survives_the_wire_and_back_into_core() {
    use gantry_core::measured::{Measurement, SpeedPoint, Terms};
    use gantry_proto::convert::{measurement_from_proto, measurement_to_proto};
    let m = Measurement {
        digest: "sha256s:ab".into(),
        device_kind: "cpu:Test CPU".into(),
        model: "SmolLM2 135M Instruct".into(),
        sources: vec!["models/x.gguf".into()],
        context: 2048,
        batch: 4,
        estimated: Terms { weights: 1, kv_cache: 2, activations: 3, overhead: 4 },
        measured: Terms { weights: 5, kv_cache: 6, activations: 0, overhead: 8 },
        method: "rss".into(),
        load_ms: 9,
        threads: 2,
        speed: vec![SpeedPoint {
            batch: 4,
            prefill_tokens: 10,
            prefill_seconds: 0.5,
            decode_tokens: 11,
            decode_seconds: 0.25,
        }],
        measured_at_ms: 12,
        by: "w1".into(),
    };
    let p = measurement_to_proto(&m);
    let back = gantry_proto::v1::ModelMeasurement::decode(p.encode_to_vec().as_slice()).unwrap();
    assert_eq!(measurement_from_proto(&back), m);
    // A speed point that is not a finite, non-negative time is left out.
    let mut bad = p.clone();
    bad.speed[0].decode_seconds = f64::NAN;
    assert!(measurement_from_proto(&bad).speed.is_empty());
}
