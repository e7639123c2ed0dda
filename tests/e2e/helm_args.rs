//! The Helm chart starts `gantry` with the arguments it renders: every container of the
//! rendered chart that runs Gantry's image must have arguments the real command line accepts
//! (`gantry_cli::args::Cli`, the definition the binary parses with), for each of the value sets
//! `scripts/validate-manifests.sh` renders. A misspelt or retired flag fails here, not in a
//! cluster's crash loop. And the certificates the chart makes work as it wires them: etcd's
//! admit its controller to a real etcd, the controller's serve the CLI over TLS.

use std::path::Path;

use clap::Parser;
use gantry_cli::args::Cli;
use serde::Deserialize as _;
use serde_yaml::Value;

use crate::common::controller::RunningController;
use crate::common::etcd::{EtcdServer, EtcdTls};
use crate::common::{gantry, repo_root, run};

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

/// The Secret `name` of the rendered chart, its keys written as files into `dir`.
fn write_secret(docs: &[Value], name: &str, dir: &Path) {
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart renders no Secret {name}"));
    std::fs::create_dir_all(dir).unwrap();
    for (key, value) in secret["data"].as_mapping().expect("the Secret has data") {
        let (key, value) = (key.as_str().unwrap(), value.as_str().unwrap());
        let encoded = dir.join(format!("{key}.b64"));
        std::fs::write(&encoded, value).unwrap();
        let out = dir.join(key);
        let (code, _, err) = run(std::process::Command::new("openssl")
            .args(["base64", "-d", "-A", "-in"])
            .arg(&encoded)
            .arg("-out")
            .arg(&out));
        assert_eq!(code, 0, "{name}/{key} is not base64: {err}");
    }
}

/// The certificates the chart makes work as the chart wires them. etcd: a real etcd started
/// with the members' Secret and the chart's TLS flags admits the real controller given the
/// client Secret at the paths the chart passes (`--etcd-ca`, `--etcd-cert`, `--etcd-key` under
/// the mounted Secret), and refuses the same controller without its client certificate. The
/// controller: serving with the chart's `--tls-cert`/`--tls-key` from its Secret, the CLI
/// reaches it at `https://127.0.0.1` (as through `kubectl port-forward`) checking it against the
/// Secret's `ca.crt` (what the workers get), and refuses it without that CA.
#[test]
fn the_certificates_the_chart_makes_work_as_it_wires_them() {
    let docs = render(None);
    let (_, argv) = gantry_containers(&docs).into_iter().find(|(n, _)| n.starts_with("Deployment/")).unwrap();
    let (etcd_mount, tls_mount) = ("/etc/gantry/etcd-tls/", "/etc/gantry/tls/");
    for flag in ["--etcd-ca=", "--etcd-cert=", "--etcd-key="] {
        assert!(
            argv.iter().any(|a| a.starts_with(flag) && a.contains(etcd_mount)),
            "the controller's {flag}: {argv:?}"
        );
    }
    for flag in ["--tls-cert=", "--tls-key="] {
        assert!(argv.iter().any(|a| a.starts_with(flag) && a.contains(tls_mount)), "the controller's {flag}: {argv:?}");
    }
    let (_, worker) = gantry_containers(&docs).into_iter().find(|(n, _)| n.starts_with("DaemonSet/")).unwrap();
    assert!(worker.iter().any(|a| a.starts_with("--controller=https://")), "{worker:?}");
    assert!(worker.iter().any(|a| a == "--tls-ca=/etc/gantry/controller-ca/ca.crt"), "{worker:?}");
    let etcd_flags = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .map(|d| format!("{:?}", d["spec"]["template"]["spec"]["containers"][0]["command"]))
        .expect("the chart runs etcd");
    for flag in ["--client-cert-auth", "--peer-client-cert-auth", "--listen-client-urls=https://"] {
        assert!(etcd_flags.contains(flag), "etcd's {flag}: {etcd_flags}");
    }

    let dir = tempfile::tempdir().unwrap();
    let (server, client, tls) = (dir.path().join("server"), dir.path().join("client"), dir.path().join("tls"));
    write_secret(&docs, "gantry-etcd-server-tls", &server);
    write_secret(&docs, "gantry-etcd-client-tls", &client);
    write_secret(&docs, "gantry-controller-tls", &tls);
    let etcd = EtcdServer::start_tls(EtcdTls {
        cert: server.join("tls.crt"),
        key: server.join("tls.key"),
        client_ca: server.join("ca.crt"),
    });
    let url = etcd.url();
    // The chart's flags, with the Secrets' mount points here.
    let chart_flags: Vec<String> = argv
        .iter()
        .filter(|a| {
            ["--etcd-ca=", "--etcd-cert=", "--etcd-key=", "--tls-cert=", "--tls-key="].iter().any(|f| a.starts_with(f))
        })
        .map(|a| {
            a.replace(etcd_mount, &format!("{}/", client.display())).replace(tls_mount, &format!("{}/", tls.display()))
        })
        .collect();
    let mut args = vec!["--etcd".to_string(), url.clone(), "--etcd-prefix".into(), "/chart-tls/".into()];
    args.extend(chart_flags);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut controller = RunningController::start(&args);
    let https = format!("https://{}", controller.addr);
    let ca = tls.join("ca.crt");
    let (code, out, err) =
        run(gantry().args(["get", "workers", "--controller", &https, "--tls-ca", ca.to_str().unwrap()]));
    assert_eq!(code, 0, "the controller on the chart's etcd answers over TLS: {out}{err}\n{}", controller.stderr());
    let (code, _, err) = run(gantry().args(["get", "workers", "--controller", &https]));
    assert_ne!(code, 0, "a client that does not trust the chart's CA must not get through: {err}");
    controller.terminate();

    let (code, _, err) = run(gantry()
        .args(["controller", "--listen", "127.0.0.1:0", "--http", "off", "--etcd", &url])
        .args(["--etcd-ca", client.join("ca.crt").to_str().unwrap()]));
    assert_ne!(code, 0, "a controller without a client certificate must not start");
    assert!(err.contains(&format!("cannot reach etcd at {url}")), "{err}");
}
