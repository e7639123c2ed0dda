//! Measured truth with the real SmolLM2: `gantry bench` measures the model on this machine and
//! records it, `inspect` and `select` show it; a real worker (`gantry up`) measures what it
//! loads and serves, and the controller shows it beside the estimate (`get models -o json`,
//! `Models/Inspect`).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;

use crate::common::controller::RunningController;
use crate::common::{self, gantry, run};

fn json(cmd: &mut std::process::Command) -> serde_json::Value {
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("invalid JSON ({e}): {out}"))
}

#[test]
fn gantry_bench_measures_smollm2_and_inspect_and_select_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("measurements.json");
    let model = common::smollm2();
    let bench = |streams: &str| {
        json(
            gantry()
                .args(["bench", model.to_str().unwrap(), "--threads", "1", "--streams", streams])
                .args(["--prompt-tokens", "48", "--tokens", "12", "--context", "1024", "--json"])
                .env("GANTRY_MEASUREMENTS", &file),
        )
    };
    let r = bench("2");
    let digest = gantry_model::digest(&model).unwrap();
    assert_eq!(r["digest"], digest.as_str());
    assert!(r["device_kind"].as_str().unwrap().starts_with("cpu:"), "{r}");
    let (est, meas) = (&r["estimated"], &r["measured"]);
    // The weights as resident: the engine's own layout, within a factor of two of the file's.
    let (ew, mw) = (est["weights"].as_u64().unwrap(), meas["weights"].as_u64().unwrap());
    assert!(mw > ew / 2 && mw < ew * 2, "weights measured {mw}, estimated {ew}");
    // The paged KV pool reserved for 1,024 tokens × 2 streams: 30 layers × 3 KV heads × 64 × 2
    // (K and V) × 2 bytes per token.
    assert_eq!(meas["kv_cache"].as_u64().unwrap(), 30 * 3 * 64 * 2 * 2 * 1024 * 2);
    assert!(meas["activations"].as_u64().unwrap() > 0, "it served, so its peak is known: {r}");
    assert!(r["error_percent"]["weights"].is_number(), "{r}");
    // One stream, then two; every prompt computed (none from another's cache).
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.iter().map(|x| x["streams"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    for x in runs {
        assert!(x["prompt_tokens"].as_u64().unwrap() >= 48 * x["streams"].as_u64().unwrap(), "{x}");
        assert_eq!(x["generated_tokens"].as_u64().unwrap(), 12 * x["streams"].as_u64().unwrap(), "{x}");
        assert!(x["decode_tokens_per_sec"].as_f64().unwrap() > 0.0, "{x}");
    }
    // The engine timed its passes per batch size: one and two sequences at once.
    let speed = r["measurement"]["speed"].as_array().unwrap();
    let batches: Vec<u64> = speed.iter().map(|p| p["batch"].as_u64().unwrap()).collect();
    assert!(batches.contains(&1) && batches.contains(&2), "{batches:?}");
    assert_eq!(r["recorded_in"][0], file.display().to_string());

    // A second run folds into the same record (one model, one device kind).
    bench("1");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved.as_array().unwrap().len(), 1, "{saved}");

    // inspect shows it beside the estimate; by path the digest finds it.
    let i =
        json(gantry().args(["inspect", model.to_str().unwrap(), "--cpu", "--json"]).env("GANTRY_MEASUREMENTS", &file));
    assert_eq!(i["measured"]["source"], "measured here");
    assert_eq!(i["measured"]["measurement"]["digest"], digest.as_str());
    assert!(i["measured"]["need_bytes"].as_u64().unwrap() > 0);
    let (code, text, _) =
        run(gantry().args(["inspect", model.to_str().unwrap(), "--cpu"]).env("GANTRY_MEASUREMENTS", &file));
    assert_eq!(code, 0);
    assert!(text.contains("measured here: cpu:") && text.contains("as measured,"), "{text}");
    // Another model, unmeasured: its estimate calibrated by this one's measurement.
    let other = json(
        gantry()
            .args(["inspect", "HuggingFaceTB/SmolLM2-360M-Instruct", "--cpu", "--json"])
            .env("GANTRY_MEASUREMENTS", &file),
    );
    assert!(other.get("measured").is_none(), "{other}");
    assert_eq!(other["calibrated"]["calibration"]["measurements"], 1);
    let (est_total, calibrated) =
        (other["memory"]["total_bytes"].as_u64().unwrap(), other["calibrated"]["bytes"].as_u64().unwrap());
    assert!(calibrated > 0 && calibrated != est_total, "{other}");
    // Without the file it is estimated only.
    let i = json(gantry().args(["inspect", model.to_str().unwrap(), "--json"]));
    assert!(i.get("measured").is_none(), "{i}");

    // select ranks the catalog's SmolLM2 135M by its measured speed.
    let s = json(
        gantry()
            .args(["select", "--task", "chat", "--latency", "batch", "--all", "--json"])
            .env("GANTRY_MEASUREMENTS", &file),
    );
    let c = s["candidates"].as_array().unwrap();
    let smol = c.iter().find(|c| c["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    assert_eq!(smol["speed_source"], "measured here");
    assert!(smol["measured_tokens_per_sec"].as_f64().unwrap() > 0.0);
    let other = c.iter().find(|c| c["id"] == "HuggingFaceTB/SmolLM2-360M-Instruct").unwrap();
    assert_eq!(other["speed_source"], "estimated");
}

#[test]
fn a_real_worker_measures_what_it_loads_and_serves_and_the_controller_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let up = RunningController::up(&["--store", store.to_str().unwrap(), "--threads", "1", "--context", "2048"]);
    let model = common::smollm2();
    let digest = gantry_model::digest(&model).unwrap();
    let (code, _, err) =
        run(gantry().args(["chat", "Name a primary color.", "--max-tokens", "8", "--controller", &up.url()]));
    assert_eq!(code, 0, "{err}");
    // A heartbeat after the chat brings the speed figures.
    let started = Instant::now();
    let m = loop {
        let v = json(gantry().args(["get", "models", "-o", "json", "--controller", &up.url()]));
        let m = v[0].clone();
        let served = m["memory"]["measurement"]["speed"].as_array().is_some_and(|s| !s.is_empty());
        if served || started.elapsed() > Duration::from_secs(20) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(m["digest"], digest.as_str(), "{m}");
    let memory = &m["memory"];
    assert_eq!(memory["source"], "measured here", "{m}");
    let measured = &memory["measurement"]["measured"];
    assert!(measured["weights"].as_u64().unwrap() > 10 << 20, "{m}");
    assert!(measured["kv_cache"].as_u64().unwrap() > 0, "{m}");
    assert!(memory["error_percent"]["weights"].is_number(), "{m}");
    assert!(memory["calibration"]["weights"].is_number(), "{m}");
    assert!(memory["measurement"]["speed"][0]["decode_tokens"].as_u64().unwrap() > 0, "{m}");
    let (code, table, _) = run(gantry().args(["get", "models", "--controller", &up.url()]));
    assert_eq!(code, 0);
    assert!(table.contains("MEMORY") && table.contains("(measured here; estimated "), "{table}");

    // gantry bench records on the controller too.
    let r = json(
        gantry()
            .args(["bench", model.to_str().unwrap(), "--threads", "1", "--streams", "1", "--prompt-tokens", "16"])
            .args(["--tokens", "4", "--context", "256", "--no-record", "--json", "--controller", &up.url()]),
    );
    assert_eq!(r["recorded_in"], serde_json::json!([format!("the controller at {}", up.url())]), "{r}");

    // Models/Inspect of the file finds the measurement by its digest; Models/Record refuses
    // what is not a measurement.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (measured, refused) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(up.url()).unwrap().connect().await.unwrap();
        let mut models = pb::models_client::ModelsClient::new(channel);
        let req = pb::InspectRequest { model: model.display().to_string(), context: 2048, ..Default::default() };
        let measured = models.inspect(req).await.unwrap().into_inner().measured.unwrap();
        let bad = pb::ModelMeasurement { digest: "md5:0".into(), device_kind: "cpu:x".into(), ..Default::default() };
        (measured, models.record(bad).await.unwrap_err())
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().starts_with("digest `md5:0`: expected sha256s:<hex>"), "{}", refused.message());
    assert_eq!(measured.source, "measured here");
    assert_eq!(measured.measurement.unwrap().digest, digest);
    assert!(measured.measured_need_bytes > 0);
}
