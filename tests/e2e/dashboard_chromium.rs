//! The dashboard (`GET /` on the controller) in headless Chromium (Debian's `chromium`),
//! against `gantry up` serving SmolLM2: after its script runs, the page shows the local
//! worker with its GPU and reservation, the deployment ready with its replica, and the
//! deployment's events; with API keys it asks for one instead.

#![allow(clippy::unwrap_used)]

mod common;

use common::controller::RunningController;

const MODEL: &str = "smollm2-135m-instruct";

/// The page's DOM once its script has fetched and rendered.
fn rendered(url: &str) -> String {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("chromium is missing: run scripts/setup.sh (Debian's chromium)");
    let profile = tempfile::tempdir().unwrap();
    let (code, out, err) = common::run(std::process::Command::new(chromium).args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        &format!("--user-data-dir={}", profile.path().display()),
        "--virtual-time-budget=4000",
        "--dump-dom",
        url,
    ]));
    assert_eq!(code, 0, "chromium failed: {err}");
    out
}

#[test]
fn the_dashboard_shows_gpus_deployments_and_events() {
    let up = RunningController::up(&["--threads", "1", "--context", "1K", "--gpus", "1x24GiB"]);
    let dom = rendered(&format!("http://{}/", up.http.clone().unwrap()));
    let worker = up
        .stdout()
        .iter()
        .find_map(|l| l.strip_prefix("gantry worker ")?.split_whitespace().next().map(str::to_string))
        .unwrap();
    assert!(dom.contains(&format!("data-worker=\"{worker}\"")), "the worker is shown:\n{dom}");
    assert!(dom.contains(&format!("data-gpu=\"{worker}/gpu:0\"")), "its GPU is shown:\n{dom}");
    assert!(dom.contains("free of 24.0 GiB") && dom.contains(" reserved"), "with its memory:\n{dom}");
    assert!(dom.contains(&format!("data-deployment=\"{MODEL}\"")), "the deployment is shown:\n{dom}");
    assert!(dom.contains("class=\"pill Ready\">Ready"), "ready:\n{dom}");
    assert!(dom.contains(&format!("{worker} gpu:0 layers 0-29")), "its replica's placement:\n{dom}");
    assert!(dom.contains("<td>Loaded</td>"), "and its events:\n{dom}");
    assert!(dom.contains("1 worker(s), 1 deployment(s)"), "{dom}");
}

#[test]
fn with_api_keys_the_dashboard_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-0123456789abcdef0123456789\n").unwrap();
    let up = RunningController::up(&["--threads", "1", "--context", "1K", "--api-keys", keys.to_str().unwrap()]);
    let dom = rendered(&format!("http://{}/", up.http.clone().unwrap()));
    assert!(dom.contains("this controller needs an API key"), "{dom}");
    assert!(!dom.contains(&format!("data-deployment=\"{MODEL}\"")), "no data without a key:\n{dom}");
}
