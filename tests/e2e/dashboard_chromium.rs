//! The dashboard (`GET /` on the controller) in headless Chromium (Debian's `chromium`),
//! against `gantry up` serving SmolLM2: after its script runs, the page shows the local
//! worker with its GPU and reservation, the deployment ready with its replica, and the
//! deployment's events; with API keys it asks for one instead. The checks read the rendered
//! elements only — the page's own script holds the same sentences, so the DOM dump is taken
//! without `<script>` and `<style>` — and are shown to fail on the page when its script cannot
//! reach the API (`the_checks_fail_on_a_page_whose_script_got_no_data`).

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::controller::RunningController;

const MODEL: &str = "smollm2-135m-instruct";

/// `html` without its `<script>` and `<style>` elements: what the page shows, not the code
/// that would show it.
fn elements_only(html: &str) -> String {
    let mut out = html.to_string();
    for tag in ["script", "style"] {
        while let Some(start) = out.find(&format!("<{tag}")) {
            let close = format!("</{tag}>");
            let end = out[start..].find(&close).map_or(out.len(), |e| start + e + close.len());
            out.replace_range(start..end, "");
        }
    }
    out
}

/// The text of the element with `id` in `dom` (elements without nested markup).
fn text_of(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = at + dom[at..].find('>')? + 1;
    let end = start + dom[start..].find('<')?;
    Some(dom[start..end].to_string())
}

/// What a user of the API-key page sees: the status says a key is needed and the key form is
/// shown (its script sets `display: flex`; the stylesheet hides it).
fn asks_for_a_key(dom: &str) -> Result<(), String> {
    let status = text_of(dom, "status").ok_or("no status element")?;
    if status != "this controller needs an API key" {
        return Err(format!("the status says {status:?}"));
    }
    if !dom.contains("<form id=\"key\" style=\"display: flex;\">") {
        return Err("the key form is not shown".into());
    }
    Ok(())
}

/// The page's DOM once its script has fetched and rendered, scripts and styles left out.
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
    elements_only(&out)
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
    let reserved = dom.find(" reserved · ").map(|at| &dom[..at]).unwrap_or_default();
    assert!(reserved.ends_with("MiB") || reserved.ends_with("GiB"), "its reservation, as an amount:\n{dom}");
    assert!(dom.contains("free of 24.0 GiB"), "with its memory:\n{dom}");
    assert!(dom.contains(&format!("data-deployment=\"{MODEL}\"")), "the deployment is shown:\n{dom}");
    assert!(dom.contains("class=\"pill Ready\">Ready"), "ready:\n{dom}");
    assert!(dom.contains(&format!("{worker} gpu:0 layers 0-29")), "its replica's placement:\n{dom}");
    assert!(dom.contains("<td>Loaded</td>"), "and its events:\n{dom}");
    let status = text_of(&dom, "status").unwrap();
    assert!(status.starts_with("1 worker(s), 1 deployment(s) · updated "), "{status}");
}

#[test]
fn with_api_keys_the_dashboard_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-0123456789abcdef0123456789\n").unwrap();
    let up = RunningController::up(&["--threads", "1", "--context", "1K", "--api-keys", keys.to_str().unwrap()]);
    let dom = rendered(&format!("http://{}/", up.http.clone().unwrap()));
    assert_eq!(asks_for_a_key(&dom), Ok(()), "{dom}");
    assert!(!dom.contains(&format!("data-deployment=\"{MODEL}\"")), "no data without a key:\n{dom}");
}

#[test]
fn the_checks_fail_on_a_page_whose_script_got_no_data() {
    // The page itself, opened from a file: its script runs, but `/api/v1/cluster` is not
    // there. The page's source holds "this controller needs an API key" (in its script), yet
    // the rendered page does not say it, and the check must say so.
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("dashboard.html");
    std::fs::write(&page, include_str!("../../controller/src/http/dashboard.html")).unwrap();
    assert!(include_str!("../../controller/src/http/dashboard.html").contains("this controller needs an API key"));
    let dom = rendered(&format!("file://{}", page.display()));
    let verdict = asks_for_a_key(&dom);
    assert!(
        verdict.as_ref().is_err_and(|e| e.starts_with("the status says \"cannot reach the controller")),
        "{verdict:?}\n{dom}"
    );
    assert!(!dom.contains("this controller needs an API key"), "scripts are left out of what is checked:\n{dom}");
}
