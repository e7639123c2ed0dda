//! The Helm chart starts `gantry` with the arguments it renders: every container of the
//! rendered chart that runs Gantry's image must have arguments the real command line accepts
//! (`gantry_cli::args::Cli`, the definition the binary parses with), for each of the value sets
//! `scripts/validate-manifests.sh` renders. A misspelt or retired flag fails here, not in a
//! cluster's crash loop.

use std::path::Path;

use clap::Parser;
use gantry_cli::args::Cli;
use serde::Deserialize as _;
use serde_yaml::Value;

use crate::common::{repo_root, run};

/// The value sets, as `scripts/validate-manifests.sh` names them.
const VALUE_SETS: [(&str, Option<&str>); 4] = [
    ("default", None),
    ("cpu", Some("deploy/examples/values-cpu.yaml")),
    ("external-etcd", Some("scripts/k8s/values-external-etcd.yaml")),
    ("options", Some("scripts/k8s/values-options.yaml")),
];

/// The chart rendered with `values`, as YAML documents.
fn render(values: Option<&str>) -> Vec<Value> {
    let root = repo_root();
    let helm = root.join(".venv-k8s/bin/helm");
    assert!(helm.is_file(), "{} is missing: run scripts/setup.sh", helm.display());
    let mut cmd = std::process::Command::new(helm);
    cmd.current_dir(&root).args(["template", "gantry", "deploy/helm/gantry", "--namespace", "gantry"]);
    if let Some(v) = values {
        cmd.args(["-f", v]);
    }
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 0, "helm template failed: {err}");
    serde_yaml::Deserializer::from_str(&out).filter_map(|d| Value::deserialize(d).ok()).collect()
}

/// Every container (init containers too) running Gantry's image: (object/container, argv).
fn gantry_containers(docs: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &doc["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default();
                // Gantry's image: its entrypoint is `gantry` (deploy/docker/Dockerfile); a
                // `command` replaces it (an init container's chown), so those are not Gantry.
                if !Path::new(image.split(':').next().unwrap_or_default()).ends_with("gantry")
                    || !c["command"].is_null()
                {
                    continue;
                }
                let strings = |v: &Value| -> Vec<String> {
                    v.as_sequence().into_iter().flatten().map(|a| a.as_str().unwrap_or_default().to_string()).collect()
                };
                let mut argv = vec!["gantry".to_string()];
                argv.extend(strings(&c["args"]));
                out.push((format!("{kind}/{name} container {}", c["name"].as_str().unwrap_or_default()), argv));
            }
        }
    }
    out
}

#[test]
fn every_gantry_container_of_the_chart_has_arguments_gantry_accepts() {
    let mut checked = Vec::new();
    for (set, values) in VALUE_SETS {
        let containers = gantry_containers(&render(values));
        let names: Vec<&str> = containers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.iter().any(|n| n.starts_with("Deployment/")), "{set}: no controller in {names:?}");
        assert!(names.iter().any(|n| n.starts_with("DaemonSet/")), "{set}: no worker in {names:?}");
        for (name, argv) in containers {
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("{set} values: {name} runs `{}`, which gantry refuses:\n{e}", argv.join(" "));
            }
            checked.push(format!("{set}: {}", argv[1]));
        }
    }
    assert!(checked.len() >= 8, "{checked:?}");
}

#[test]
fn a_misspelt_flag_in_the_chart_would_be_caught() {
    let (name, mut argv) =
        gantry_containers(&render(None)).into_iter().find(|(n, _)| n.starts_with("Deployment/")).unwrap();
    assert!(Cli::try_parse_from(&argv).is_ok(), "{name}: {argv:?}");
    let flag = argv.iter().position(|a| a.starts_with("--")).unwrap();
    argv[flag] = argv[flag].replacen("--", "--x", 1);
    let e = Cli::try_parse_from(&argv).unwrap_err().to_string();
    assert!(e.contains("unexpected argument"), "{e}");
}
