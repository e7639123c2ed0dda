//! The Hugging Face Hub store against a stand-in Hub on loopback (`hub_stub`: the real Hub
//! cannot be reached from here): the cache layout, resuming a dropped transfer, checksums,
//! the token kept from other hosts, and the messages for gated, private and missing models.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gantry_store::hub::{Hub, HubConfig, HubError, HubRef};
use gantry_store::hub_stub::{Access, HubStub, StubFile, StubRepo};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/engine/llama")
}

/// The tiny Llama fixture as a safetensors repository, with files a server does not need.
fn llama_repo(name: &str) -> StubRepo {
    let dir = fixture_dir();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let mut files = vec![
        StubFile::new("config.json", read("config.json"), false),
        StubFile::new("generation_config.json", read("generation_config.json"), false),
        StubFile::new("tokenizer.json", read("tokenizer.json"), false),
        StubFile::new("tokenizer_config.json", read("tokenizer_config.json"), false),
        StubFile::new("model.safetensors", read("model.safetensors"), true),
    ];
    files.push(StubFile::new("README.md", b"# tiny".to_vec(), false));
    files.push(StubFile::new("pytorch_model.bin", vec![0; 1000], true));
    StubRepo::new(name, files)
}

/// A GGUF repository: one file of `size` pseudo-random bytes.
fn gguf_repo(name: &str, file: &str, size: usize) -> (StubRepo, Vec<u8>) {
    let mut data = Vec::with_capacity(size);
    let mut x: u32 = 0x1234_5678;
    data.extend_from_slice(b"GGUF");
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.push(x as u8);
    }
    (StubRepo::new(name, vec![StubFile::new(file, data.clone(), true)]), data)
}

fn hub(stub: &HubStub, cache: &Path, token: Option<&str>) -> Hub {
    Hub::new(HubConfig {
        endpoint: stub.endpoint().parse().unwrap(),
        token: token.map(str::to_string),
        cache_dir: cache.to_path_buf(),
        offline: false,
    })
    .unwrap()
}

async fn fetch(hub: &Hub, id: &str) -> Result<gantry_store::hub::Fetched, HubError> {
    hub.fetch(&HubRef::parse(id).unwrap(), &mut |_| {}).await
}

#[tokio::test]
async fn a_safetensors_model_lands_in_the_hub_cache_layout_and_loads() {
    let stub = HubStub::start(vec![llama_repo("tiny/llama")]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&stub, cache.path(), None);
    let mut events = Vec::new();
    let fetched = hub.fetch(&HubRef::parse("tiny/llama").unwrap(), &mut |p| events.push(p)).await.unwrap();

    let repo_dir = cache.path().join("models--tiny--llama");
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(fetched.commit, commit);
    assert_eq!(fetched.path, repo_dir.join("snapshots").join(&commit));
    let mut names: Vec<String> =
        std::fs::read_dir(&fetched.path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "only what serving needs: no README, no pytorch_model.bin"
    );
    // Snapshot entries are relative links into blobs/, named by SHA-256 for LFS files.
    let link = std::fs::read_link(fetched.path.join("model.safetensors")).unwrap();
    let weights = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let sha = gantry_store::hub::sha256_of(&fixture_dir().join("model.safetensors")).unwrap();
    assert_eq!(link, PathBuf::from(format!("../../blobs/{sha}")));
    assert_eq!(std::fs::read(fetched.path.join("model.safetensors")).unwrap(), weights);
    assert_eq!(fetched.downloaded_bytes as usize, names_len(&fetched.path, &names));
    assert!(events.iter().any(|e| e.file == "model.safetensors" && e.done == weights.len() as u64));

    // It reads like any local folder.
    let spec = gantry_model::read_spec(&fetched.path).unwrap();
    assert_eq!(spec.family.to_string(), "llama");

    // A second fetch finds everything cached and downloads nothing.
    let before = stub.requests().iter().filter(|r| r.path.contains("/resolve/")).count();
    let again = fetch(&hub, "tiny/llama").await.unwrap();
    assert_eq!((again.path, again.downloaded_bytes), (fetched.path, 0));
    assert_eq!(stub.requests().iter().filter(|r| r.path.contains("/resolve/")).count(), before);
}

fn names_len(dir: &Path, names: &[String]) -> usize {
    names.iter().map(|n| std::fs::read(dir.join(n)).unwrap().len()).sum()
}

#[tokio::test]
async fn a_dropped_connection_is_resumed_with_a_range_request() {
    let (repo, data) = gguf_repo("org/big-GGUF", "big-Q4_K_M.gguf", 3 << 20);
    let stub = HubStub::start(vec![repo]);
    stub.drop_connection("big-Q4_K_M.gguf", 1 << 20, 1);
    let cache = tempfile::tempdir().unwrap();
    let fetched = fetch(&hub(&stub, cache.path(), None), "org/big-GGUF").await.unwrap();
    assert_eq!(fetched.path.file_name().unwrap(), "big-Q4_K_M.gguf");
    assert_eq!(std::fs::read(&fetched.path).unwrap(), data, "the resumed file is byte for byte the original");
    assert_eq!(fetched.downloaded_bytes, data.len() as u64, "nothing was fetched twice");
    let ranges: Vec<Option<String>> =
        stub.requests().into_iter().filter(|r| r.path.ends_with(".gguf")).map(|r| r.range).collect();
    assert_eq!(ranges, [None, Some(format!("bytes={}-", 1 << 20))]);
}

#[tokio::test]
async fn an_interrupted_pull_resumes_on_the_next_run() {
    let (repo, data) = gguf_repo("org/flaky-GGUF", "m.gguf", 2 << 20);
    let stub = HubStub::start(vec![repo]);
    // Every try of the first run is cut at 256 KiB into the file: the first gets that far,
    // the four resumed ones get nothing more.
    stub.drop_connection("m.gguf", 256 << 10, 5);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&stub, cache.path(), None);
    let err = fetch(&hub, "org/flaky-GGUF").await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("org/flaky-GGUF: m.gguf: "), "{msg}");
    assert!(msg.ends_with("(gave up after 5 tries; run again to resume)"), "{msg}");
    let blobs = cache.path().join("models--org--flaky-GGUF/blobs");
    let partial = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().path()).next().unwrap();
    assert!(partial.to_string_lossy().ends_with(".incomplete"));
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert_eq!(kept, 256 << 10, "what arrived is kept");

    let fetched = fetch(&hub, "org/flaky-GGUF").await.unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), data);
    let last = stub.requests().into_iter().rfind(|r| r.path.ends_with("m.gguf")).unwrap();
    assert_eq!(last.range, Some(format!("bytes={kept}-")));
}

#[tokio::test]
async fn corrupted_bytes_fail_the_checksum_and_are_not_kept() {
    let (repo, data) = gguf_repo("org/bad-GGUF", "m.gguf", 100_000);
    let sha = repo.files[0].sha256();
    let stub = HubStub::start(vec![repo]);
    stub.corrupt("m.gguf");
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&hub(&stub, cache.path(), None), "org/bad-GGUF").await.unwrap_err();
    let HubError::Checksum { file, expected, actual } = &err else { panic!("{err}") };
    assert_eq!((file.as_str(), expected.as_str()), ("m.gguf", sha.as_str()));
    assert_ne!(actual, expected);
    assert!(err.to_string().ends_with("the download was removed, try again"));
    let blobs = cache.path().join("models--org--bad-GGUF/blobs");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0, "neither the blob nor the partial file is left");
    assert!(!cache.path().join("models--org--bad-GGUF/snapshots").exists());
    let _ = data;
}

#[tokio::test]
async fn the_token_goes_to_the_hub_and_never_to_the_cdn_it_redirects_to() {
    let (repo, data) = gguf_repo("org/gated-GGUF", "m.gguf", 200_000);
    let stub = HubStub::start(vec![repo.with_access(Access::Gated { token: "hf_granted".into() })]);
    stub.redirect_lfs_to_cdn();
    let cache = tempfile::tempdir().unwrap();
    let fetched = fetch(&hub(&stub, cache.path(), Some("hf_granted")), "org/gated-GGUF").await.unwrap();
    assert_eq!(std::fs::read(&fetched.path).unwrap(), data);
    let requests = stub.requests();
    let (cdn, hub_side): (Vec<_>, Vec<_>) = requests.iter().partition(|r| r.cdn);
    assert_eq!(cdn.len(), 1, "the file came from the CDN origin: {requests:?}");
    assert_eq!(cdn[0].authorization, None, "no token for another host");
    assert!(hub_side.iter().all(|r| r.authorization.as_deref() == Some("Bearer hf_granted")), "{hub_side:?}");
}

#[tokio::test]
async fn gated_private_and_missing_models_say_what_to_do() {
    let (gated, _) = gguf_repo("meta/gated-GGUF", "m.gguf", 1000);
    let (private, _) = gguf_repo("acme/private-GGUF", "m.gguf", 1000);
    let stub = HubStub::start(vec![
        gated.with_access(Access::Gated { token: "hf_granted".into() }),
        private.with_access(Access::Private { token: "hf_acme".into() }),
        llama_repo("tiny/llama"),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let endpoint = stub.endpoint();
    let anonymous = hub(&stub, cache.path(), None);
    let other = hub(&stub, cache.path(), Some("hf_someone_else"));

    let err = fetch(&anonymous, "meta/gated-GGUF").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "meta/gated-GGUF is gated: accept its terms on {endpoint}/meta/gated-GGUF while logged in, then set HF_TOKEN to a token of that account (or put it in the file HF_TOKEN_PATH names, default ~/.cache/huggingface/token)"
        )
    );
    let err = fetch(&other, "meta/gated-GGUF").await.unwrap_err();
    assert!(
        err.to_string().ends_with("then set HF_TOKEN to a token of that account (the token given has no access yet)"),
        "{err}"
    );

    let err = fetch(&anonymous, "acme/private-GGUF").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "acme/private-GGUF is private or does not exist on {endpoint}: check the name; a private model needs HF_TOKEN set to a token that can read it"
        )
    );

    let err = fetch(&anonymous, "nobody/nothing").await.unwrap_err();
    assert_eq!(err.to_string(), format!("no model nobody/nothing on {endpoint} (check the name)"));
    let err = fetch(&anonymous, "tiny/llama@v9").await.unwrap_err();
    assert_eq!(err.to_string(), "tiny/llama has no revision `v9`");
    let err = fetch(&anonymous, "tiny/llama:model-q8.gguf").await.unwrap_err();
    assert!(err.to_string().starts_with("tiny/llama@main has no file `model-q8.gguf`; it has config.json, "), "{err}");
    // Nothing of the refused models was written.
    assert!(!cache.path().join("models--meta--gated-GGUF/snapshots").exists());
}

#[tokio::test]
async fn several_gguf_files_take_the_usual_quantization_or_ask() {
    let (mut repo, _) = gguf_repo("org/multi-GGUF", "m-Q8_0.gguf", 1000);
    let (other, _) = gguf_repo("x/y", "m-Q4_K_M.gguf", 1200);
    repo.files.extend(other.files);
    let (mut odd, _) = gguf_repo("org/odd-GGUF", "m-IQ2_XS.gguf", 1000);
    odd.files.push(StubFile::new("m-IQ3_M.gguf", vec![1; 10], true));
    let stub = HubStub::start(vec![repo, odd]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&stub, cache.path(), None);
    let fetched = fetch(&hub, "org/multi-GGUF").await.unwrap();
    assert_eq!(fetched.path.file_name().unwrap(), "m-Q4_K_M.gguf");
    let err = fetch(&hub, "org/odd-GGUF").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "org/odd-GGUF has 2 GGUF files and none is a usual choice; name one as `org/odd-GGUF:FILE`: m-IQ2_XS.gguf, m-IQ3_M.gguf"
    );
    let picked = fetch(&hub, "org/odd-GGUF:m-IQ3_M.gguf").await.unwrap();
    assert_eq!(std::fs::read(&picked.path).unwrap(), vec![1; 10]);
}

#[tokio::test]
async fn hostile_file_names_from_the_hub_are_refused() {
    let mut repo = llama_repo("evil/repo");
    repo.extra_listing.push("../../../../escape.safetensors".into());
    let stub = HubStub::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&hub(&stub, &cache.path().join("hub"), None), "evil/repo").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the Hub answered with an unsafe file name `../../../../escape.safetensors`; refusing to write it"
    );
    assert!(!cache.path().join("escape.safetensors").exists());
}

#[tokio::test]
async fn without_the_hub_a_cached_model_is_still_served() {
    let stub = HubStub::start(vec![llama_repo("tiny/llama")]);
    let cache = tempfile::tempdir().unwrap();
    let first = fetch(&hub(&stub, cache.path(), None), "tiny/llama").await.unwrap();

    // An endpoint nothing listens on: the cached snapshot is used, with a warning.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = |offline| HubConfig {
        endpoint: format!("http://{closed}").parse().unwrap(),
        token: None,
        cache_dir: cache.path().to_path_buf(),
        offline,
    };
    let away = Hub::new(config(false)).unwrap();
    assert_eq!(fetch(&away, "tiny/llama").await.unwrap().path, first.path);
    let err = fetch(&away, "tiny/other").await.unwrap_err();
    assert!(err.to_string().starts_with(&format!("cannot reach http://{closed} (")), "{err}");
    assert!(err.to_string().ends_with("; no copy is in the cache"), "{err}");

    let offline = Hub::new(config(true)).unwrap();
    assert_eq!(fetch(&offline, "tiny/llama").await.unwrap().path, first.path);
    assert_eq!(
        fetch(&offline, "tiny/other").await.unwrap_err().to_string(),
        "tiny/other@main is not in the cache and HF_HUB_OFFLINE is set"
    );
}
