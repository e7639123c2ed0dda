//! The committed CRD (`deploy/crds/` and the Helm chart's copy) is what the Rust types
//! generate: a test fails when one is stale, and says how to regenerate it.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use gantry_controller::operator::crd::{ModelDeployment, crd_yaml};
use kube::CustomResourceExt;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_committed_crd_files_are_what_the_types_generate() {
    let want = crd_yaml();
    for path in
        ["deploy/crds/gantry.dev_modeldeployments.yaml", "deploy/helm/gantry/crds/gantry.dev_modeldeployments.yaml"]
    {
        let got = std::fs::read_to_string(repo(path)).unwrap_or_default();
        assert!(got == want, "{path} is stale: regenerate it with `cargo run -p gantry-cli -- crd > {path}`");
    }
}

#[test]
fn the_crd_has_the_scale_subresource_printer_columns_and_validation() {
    let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "md");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    let scale = &v["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    assert!(v["subresources"]["status"].is_object());
    let columns: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Model", "Replicas", "Ready", "VRAM", "Status", "Age"]);
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["minimum"], 0.0);
    assert_eq!(spec["contextLength"]["minimum"], 1.0);
    assert_eq!(spec["placement"]["properties"]["strategy"]["enum"], serde_json::json!(["Binpack", "Spread", null]));
    assert_eq!(spec["model"]["oneOf"].as_array().unwrap().len(), 3);
}
