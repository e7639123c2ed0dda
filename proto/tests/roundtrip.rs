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
