//! Models from the Hugging Face Hub: `org/name`, optionally `@revision` and `:file.gguf`.
//!
//! Files land in the Hub's own cache layout (`models--org--name/blobs`, `snapshots/<commit>`,
//! `refs/<revision>`), so a model already fetched by `huggingface_hub` is not fetched again
//! and the reverse. Downloads resume from `blobs/<id>.incomplete` after a dropped connection
//! or an interrupted run, large files are checked against the SHA-256 the Hub publishes, and
//! the token goes only to the Hub's own host — never to the CDN a download redirects to.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, HeaderMap, LOCATION, RANGE};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{info, warn};

/// Where the Hub is unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Tries per file before a download error is final (each resumes where the last stopped).
const ATTEMPTS: u32 = 5;
/// Redirects followed per request.
const MAX_REDIRECTS: usize = 5;
/// Files of a safetensors repository a model needs; weights are added by extension.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
];
/// GGUF quantizations preferred when a repository holds several and none was named.
const GGUF_PREFERENCE: &[&str] = &["q4_k_m", "q4_k_s", "q4_1", "q4_0", "q5_k_m", "q8_0"];

/// Why a Hub model could not be had.
#[derive(Debug, Error)]
pub enum HubError {
    #[error(
        "{repo} is gated: accept its terms on {page} while logged in, then set HF_TOKEN to a token of that account{}",
        if *had_token { " (the token given has no access yet)" } else { " (or put it in the file HF_TOKEN_PATH names, default ~/.cache/huggingface/token)" }
    )]
    Gated { repo: String, page: String, had_token: bool },

    #[error(
        "{repo} is private or does not exist on {endpoint}{}",
        if *had_token { ": check the name and that the token in HF_TOKEN can read it" } else { ": check the name; a private model needs HF_TOKEN set to a token that can read it" }
    )]
    Unauthorized { repo: String, endpoint: String, had_token: bool },

    #[error("no model {repo} on {endpoint} (check the name)")]
    RepoNotFound { repo: String, endpoint: String },

    #[error("{repo} has no revision `{revision}`")]
    RevisionNotFound { repo: String, revision: String },

    #[error("{repo}@{revision} has no file `{file}`{}", if available.is_empty() { String::new() } else { format!("; it has {}", available.join(", ")) })]
    FileNotFound { repo: String, revision: String, file: String, available: Vec<String> },

    #[error("{repo} has {} GGUF files and none is a usual choice; name one as `{repo}:FILE`: {}", files.len(), files.join(", "))]
    AmbiguousGguf { repo: String, files: Vec<String> },

    #[error("{repo} has neither GGUF files nor config.json with safetensors weights; Gantry cannot serve it")]
    NothingToServe { repo: String },

    #[error("`{0}` is not a Hub model id: expected `org/name`, optionally `@revision` and `:file`")]
    BadId(String),

    #[error("the Hub answered with an unsafe file name `{0}`; refusing to write it")]
    UnsafePath(String),

    #[error("{file}: SHA-256 is {actual}, the Hub says {expected}; the download was removed, try again")]
    Checksum { file: String, expected: String, actual: String },

    #[error("{what}: the Hub answered {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Http { what: String, status: u16, detail: String },

    #[error("cannot reach {endpoint} ({detail}){}", if *cached { "" } else { "; no copy is in the cache" })]
    Unreachable { endpoint: String, detail: String, cached: bool },

    #[error("{repo}@{revision} is not in the cache and HF_HUB_OFFLINE is set")]
    OfflineMiss { repo: String, revision: String },

    #[error("{what}: {detail}")]
    Transfer { what: String, detail: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io { path: path.to_path_buf(), source }
}

/// A model on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit; `main` by default.
    pub revision: String,
    /// One file to fetch (a `.gguf` of a repository with several).
    pub file: Option<String>,
}

impl HubRef {
    /// Parses `org/name[@revision][:file]`; `None` when `text` does not look like one.
    pub fn parse(text: &str) -> Option<HubRef> {
        let (rest, file) = match text.split_once(':') {
            Some((r, f)) => (r, Some(f.to_string())),
            None => (text, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) => (r, v.to_string()),
            None => (rest, "main".to_string()),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with(['.', '-'])
                && !s.contains("..")
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let rev_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !part_ok(org) || !part_ok(name) || !rev_ok || file.as_deref().is_some_and(|f| safe_relative(f).is_err()) {
            return None;
        }
        Some(HubRef { repo: repo.to_string(), revision, file })
    }

    fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.repo)?;
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

/// Rejects absolute paths, `..` and empty components in a file name the Hub gave.
fn safe_relative(name: &str) -> Result<&Path, HubError> {
    let path = Path::new(name);
    let ok = !name.is_empty()
        && !name.contains('\\')
        && path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok { Ok(path) } else { Err(HubError::UnsafePath(name.to_string())) }
}

/// Where the Hub is, the token, and the cache.
#[derive(Clone)]
pub struct HubConfig {
    pub endpoint: Url,
    pub token: Option<String>,
    pub cache_dir: PathBuf,
    /// Never ask the Hub; only the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubConfig {
    /// From the environment, as `huggingface_hub` reads it: `HF_ENDPOINT`; `HF_TOKEN`, else
    /// the file `HF_TOKEN_PATH` (default `$HF_HOME/token`); `HF_HUB_CACHE` (default
    /// `$HF_HOME/hub`, `HF_HOME` defaulting to `~/.cache/huggingface`); `HF_HUB_OFFLINE`.
    pub fn from_env() -> Result<HubConfig, HubError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint_text = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let endpoint = Url::parse(endpoint_text.trim_end_matches('/')).map_err(|e| HubError::Http {
            what: format!("HF_ENDPOINT `{endpoint_text}`"),
            status: 0,
            detail: e.to_string(),
        })?;
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            base.join("huggingface")
        });
        let token = match var("HF_TOKEN") {
            Some(t) => Some(t.trim().to_string()),
            None => {
                let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
            }
        };
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        Ok(HubConfig { endpoint, token, cache_dir, offline })
    }
}

/// Progress of a download.
#[derive(Debug, Clone)]
pub struct DownloadProgress {
    pub file: String,
    pub done: u64,
    pub total: u64,
}

/// What a fetch produced.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The GGUF file, or the snapshot folder of a safetensors model.
    pub path: PathBuf,
    pub commit: String,
    /// Bytes downloaded now (0 when everything was cached).
    pub downloaded_bytes: u64,
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
struct Lfs {
    sha256: String,
    size: Option<u64>,
}

/// A Hub client.
#[derive(Debug, Clone)]
pub struct Hub {
    config: HubConfig,
    http: reqwest::Client,
    /// Blobs being downloaded by this process: a second load of the same model waits for
    /// the first instead of writing the same file.
    in_flight: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Hub {
    /// The cache folder (Hub repositories, and files fetched by URL).
    pub fn cache_dir(&self) -> &Path {
        &self.config.cache_dir
    }

    /// The same client with `token` instead of the configured one.
    pub fn with_token(&self, token: &str) -> Hub {
        let mut hub = self.clone();
        hub.config.token = Some(token.to_string());
        hub
    }

    pub fn new(config: HubConfig) -> Result<Hub, HubError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("gantry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HubError::Transfer { what: "HTTP client".into(), detail: e.to_string() })?;
        Ok(Hub { config, http, in_flight: Arc::default() })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn page(&self, repo: &str) -> String {
        format!("{}/{repo}", self.config.endpoint.as_str().trim_end_matches('/'))
    }

    fn endpoint_name(&self) -> String {
        self.config.endpoint.as_str().trim_end_matches('/').to_string()
    }

    /// Fetches `r` into the cache (what is there already is kept), calling `progress` as
    /// bytes arrive; returns where the model is.
    pub async fn fetch(
        &self,
        r: &HubRef,
        progress: &mut (dyn FnMut(DownloadProgress) + Send),
    ) -> Result<Fetched, HubError> {
        let repo_dir = self.config.cache_dir.join(r.cache_folder());
        if self.config.offline {
            return self
                .cached(r, &repo_dir)
                .ok_or_else(|| HubError::OfflineMiss { repo: r.repo.clone(), revision: r.revision.clone() });
        }
        let info = match self.repo_info(r).await {
            Ok(info) => info,
            Err(HubError::Unreachable { endpoint, detail, .. }) => {
                return match self.cached(r, &repo_dir) {
                    Some(f) => {
                        warn!(model = %r, %endpoint, %detail, "the Hub cannot be reached; using the cached copy");
                        Ok(f)
                    }
                    None => Err(HubError::Unreachable { endpoint, detail, cached: false }),
                };
            }
            Err(e) => return Err(e),
        };
        let commit = info.sha.clone().unwrap_or_else(|| r.revision.clone());
        safe_relative(&commit)?;
        let (files, served) = self.choose_files(r, &info)?;
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let mut downloaded = 0;
        for f in &files {
            downloaded += self.fetch_file(r, &commit, f, &repo_dir, &snapshot, progress).await?;
        }
        if r.revision != commit {
            let refs = repo_dir.join("refs");
            let ref_path = refs.join(&r.revision);
            if let Some(parent) = ref_path.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            std::fs::write(&ref_path, &commit).map_err(io_err(&ref_path))?;
        }
        let path = match served {
            Some(gguf) => snapshot.join(gguf),
            None => snapshot,
        };
        Ok(Fetched { path, commit, downloaded_bytes: downloaded })
    }

    /// The cached copy of `r`, if a previous fetch completed it.
    fn cached(&self, r: &HubRef, repo_dir: &Path) -> Option<Fetched> {
        let commit = if r.revision.len() == 40 && r.revision.chars().all(|c| c.is_ascii_hexdigit()) {
            r.revision.clone()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(&r.revision)).ok()?.trim().to_string()
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let path = match &r.file {
            Some(f) => snapshot.join(f),
            None => {
                if snapshot.join("config.json").is_file() {
                    snapshot.clone()
                } else {
                    let ggufs: Vec<_> = std::fs::read_dir(&snapshot)
                        .ok()?
                        .filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                        .collect();
                    match ggufs.as_slice() {
                        [one] => one.clone(),
                        _ => return None,
                    }
                }
            }
        };
        path.exists().then_some(Fetched { path, commit, downloaded_bytes: 0 })
    }

    async fn repo_info(&self, r: &HubRef) -> Result<RepoInfo, HubError> {
        let mut url = self.config.endpoint.clone();
        url.path_segments_mut()
            .map_err(|_| HubError::BadId(r.to_string()))?
            .pop_if_empty()
            .extend(["api", "models"])
            .extend(r.repo.split('/'))
            .extend(["revision", &r.revision]);
        url.set_query(Some("blobs=true"));
        let resp = self.get(url, None).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.status_error(r, None, status, resp.headers()));
        }
        let info: RepoInfo = resp
            .json()
            .await
            .map_err(|e| HubError::Transfer { what: format!("{r}: the Hub's file list"), detail: e.to_string() })?;
        Ok(info)
    }

    /// The files to fetch, and the GGUF file served (None: the folder is).
    fn choose_files(&self, r: &HubRef, info: &RepoInfo) -> Result<(Vec<Sibling>, Option<String>), HubError> {
        for s in &info.siblings {
            safe_relative(&s.rfilename)?;
        }
        let names = || info.siblings.iter().map(|s| s.rfilename.clone()).collect::<Vec<_>>();
        if let Some(file) = &r.file {
            let Some(s) = info.siblings.iter().find(|s| &s.rfilename == file) else {
                return Err(HubError::FileNotFound {
                    repo: r.repo.clone(),
                    revision: r.revision.clone(),
                    file: file.clone(),
                    available: names(),
                });
            };
            return Ok((vec![s.clone()], Some(file.clone())));
        }
        let has = |n: &str| info.siblings.iter().any(|s| s.rfilename == n);
        let safetensors: Vec<&Sibling> = info
            .siblings
            .iter()
            .filter(|s| s.rfilename.ends_with(".safetensors") && !s.rfilename.contains('/'))
            .collect();
        if has("config.json") && !safetensors.is_empty() {
            let mut files: Vec<Sibling> =
                info.siblings.iter().filter(|s| MODEL_FILES.contains(&s.rfilename.as_str())).cloned().collect();
            files.extend(safetensors.into_iter().cloned());
            return Ok((files, None));
        }
        let ggufs: Vec<&Sibling> = info.siblings.iter().filter(|s| s.rfilename.ends_with(".gguf")).collect();
        let chosen = match ggufs.as_slice() {
            [] => return Err(HubError::NothingToServe { repo: r.repo.clone() }),
            [one] => *one,
            many => {
                let pick = GGUF_PREFERENCE.iter().find_map(|q| {
                    many.iter().find(|s| {
                        let n = s.rfilename.to_ascii_lowercase();
                        n.contains(q) && !n.contains("-of-")
                    })
                });
                match pick {
                    Some(s) => {
                        info!(model = %r, file = %s.rfilename, "several GGUF files; taking the usual choice");
                        *s
                    }
                    None => {
                        return Err(HubError::AmbiguousGguf {
                            repo: r.repo.clone(),
                            files: many.iter().map(|s| s.rfilename.clone()).collect(),
                        });
                    }
                }
            }
        };
        Ok((vec![chosen.clone()], Some(chosen.rfilename.clone())))
    }

    /// Downloads one file into the blob store and links it into the snapshot; returns the
    /// bytes transferred.
    async fn fetch_file(
        &self,
        r: &HubRef,
        commit: &str,
        f: &Sibling,
        repo_dir: &Path,
        snapshot: &Path,
        progress: &mut (dyn FnMut(DownloadProgress) + Send),
    ) -> Result<u64, HubError> {
        let rel = safe_relative(&f.rfilename)?;
        let link = snapshot.join(rel);
        if link.exists() {
            return Ok(0);
        }
        let expected_sha = f.lfs.as_ref().map(|l| l.sha256.to_ascii_lowercase());
        let size = f.lfs.as_ref().and_then(|l| l.size).or(f.size);
        let blob_id = expected_sha
            .clone()
            .or_else(|| f.blob_id.clone())
            .unwrap_or_else(|| format!("{commit}-{}", f.rfilename.replace('/', "-")));
        safe_relative(&blob_id)?;
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let blob = blobs.join(&blob_id);
        let mut transferred = 0;
        let lock = {
            let mut map = self.in_flight.lock().map_err(|_| HubError::Transfer {
                what: f.rfilename.clone(),
                detail: "download table lock poisoned".into(),
            })?;
            map.entry(blob.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if !blob.is_file() {
            let partial = blobs.join(format!("{blob_id}.incomplete"));
            let actual;
            (transferred, actual) = self.download(r, commit, &f.rfilename, &partial, size, progress).await?;
            if let Some(expected) = &expected_sha
                && &actual != expected
            {
                let _ = std::fs::remove_file(&partial);
                return Err(HubError::Checksum { file: f.rfilename.clone(), expected: expected.clone(), actual });
            }
            std::fs::rename(&partial, &blob).map_err(io_err(&blob))?;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // snapshots/<commit>/<dirs…>/<file> → ../../(../…)blobs/<id>, as huggingface_hub links.
        let depth = rel.components().count() + 1;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(&blob_id);
        link_or_copy(&target, &blob, &link)?;
        Ok(transferred)
    }

    /// Downloads `file` to `partial`, resuming what is there, retrying dropped transfers;
    /// returns the bytes transferred and the file's SHA-256 (hashed as it arrives, so a large
    /// file is not read a second time).
    async fn download(
        &self,
        r: &HubRef,
        commit: &str,
        file: &str,
        partial: &Path,
        size: Option<u64>,
        progress: &mut (dyn FnMut(DownloadProgress) + Send),
    ) -> Result<(u64, String), HubError> {
        let mut url = self.config.endpoint.clone();
        url.path_segments_mut()
            .map_err(|_| HubError::BadId(r.to_string()))?
            .pop_if_empty()
            .extend(r.repo.split('/'))
            .extend(["resolve", commit])
            .extend(file.split('/'));
        let mut transferred = 0u64;
        let mut last_error = String::new();
        let mut hashed = Hashed::default();
        for attempt in 1..=ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
            if let Some(total) = size
                && have == total
                && total > 0
            {
                return Ok((transferred, hashed.catch_up(partial, have)?.hex()));
            }
            let resp = match self.get(url.clone(), (have > 0).then_some(have)).await {
                Ok(resp) => resp,
                Err(HubError::Unreachable { detail, .. }) => {
                    warn!(model = %r, file, attempt, %detail, "download failed; retrying");
                    last_error = detail;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = resp.status();
            let (mut out, mut done) = match status {
                StatusCode::PARTIAL_CONTENT if have > 0 && range_start(resp.headers()) == Some(have) => {
                    let out = std::fs::OpenOptions::new().append(true).open(partial).map_err(io_err(partial))?;
                    info!(model = %r, file, from = have, "resuming download");
                    (out, have)
                }
                StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                    // Larger than the file: start over.
                    std::fs::remove_file(partial).map_err(io_err(partial))?;
                    continue;
                }
                s if s.is_success() => (std::fs::File::create(partial).map_err(io_err(partial))?, 0),
                _ => return Err(self.status_error(r, Some(file), status, resp.headers())),
            };
            hashed.catch_up(partial, done)?;
            let total = size.or_else(|| resp.content_length().map(|l| l + done)).unwrap_or(0);
            progress(DownloadProgress { file: file.to_string(), done, total });
            let mut resp = resp;
            let result: Result<(), String> = async {
                while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
                    out.write_all(&chunk).map_err(|e| e.to_string())?;
                    hashed.update(&chunk);
                    done += chunk.len() as u64;
                    transferred += chunk.len() as u64;
                    progress(DownloadProgress { file: file.to_string(), done, total });
                }
                Ok(())
            }
            .await;
            out.flush().map_err(io_err(partial))?;
            match result {
                Ok(()) if total == 0 || done == total => return Ok((transferred, hashed.hex())),
                Ok(()) => last_error = format!("the connection closed after {done} of {total} bytes"),
                Err(e) => last_error = e,
            }
            warn!(model = %r, file, attempt, done, total, error = %last_error, "download interrupted; resuming");
        }
        Err(HubError::Transfer {
            what: format!("{r}: {file}"),
            detail: format!("{last_error} (gave up after {ATTEMPTS} tries; run again to resume)"),
        })
    }

    /// GET with the token (on the Hub's own origin only), following redirects by hand so a
    /// redirect elsewhere never carries it.
    async fn get(&self, mut url: Url, from: Option<u64>) -> Result<reqwest::Response, HubError> {
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.http.get(url.clone());
            if let Some(token) = &self.config.token
                && url.origin() == self.config.endpoint.origin()
            {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            if let Some(from) = from {
                req = req.header(RANGE, format!("bytes={from}-"));
            }
            let resp = req.send().await.map_err(|e| HubError::Unreachable {
                endpoint: self.endpoint_name(),
                detail: error_chain(&e),
                cached: false,
            })?;
            if resp.status().is_redirection()
                && let Some(loc) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok())
            {
                url = url
                    .join(loc)
                    .map_err(|e| HubError::Transfer { what: format!("redirect to `{loc}`"), detail: e.to_string() })?;
                continue;
            }
            return Ok(resp);
        }
        Err(HubError::Transfer { what: url.to_string(), detail: format!("more than {MAX_REDIRECTS} redirects") })
    }

    /// The error for an unsuccessful answer, from its status and `X-Error-Code`.
    fn status_error(&self, r: &HubRef, file: Option<&str>, status: StatusCode, headers: &HeaderMap) -> HubError {
        let code = headers.get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("");
        let message = headers.get("x-error-message").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let had_token = self.config.token.is_some();
        let repo = r.repo.clone();
        match (status.as_u16(), code) {
            (_, "GatedRepo") | (403, _) => HubError::Gated { repo: repo.clone(), page: self.page(&repo), had_token },
            (_, "RepoNotFound") if status == StatusCode::UNAUTHORIZED => {
                HubError::Unauthorized { repo, endpoint: self.endpoint_name(), had_token }
            }
            (401, _) => HubError::Unauthorized { repo, endpoint: self.endpoint_name(), had_token },
            (_, "RevisionNotFound") => HubError::RevisionNotFound { repo, revision: r.revision.clone() },
            (404, "EntryNotFound") => HubError::FileNotFound {
                repo,
                revision: r.revision.clone(),
                file: file.unwrap_or_default().to_string(),
                available: Vec::new(),
            },
            (404, _) if file.is_none() => HubError::RepoNotFound { repo, endpoint: self.endpoint_name() },
            _ => HubError::Http {
                what: match file {
                    Some(f) => format!("{r}: {f}"),
                    None => r.to_string(),
                },
                status: status.as_u16(),
                detail: message,
            },
        }
    }
}

/// The SHA-256 of a download's first `bytes` bytes.
#[derive(Default)]
struct Hashed {
    hasher: Sha256,
    bytes: u64,
}

impl Hashed {
    fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
    }

    /// Makes this the hash of `path`'s first `upto` bytes: kept when it is already (the
    /// transfer continues), else read from the file (a partial file from an earlier run).
    fn catch_up(&mut self, path: &Path, upto: u64) -> Result<&mut Hashed, HubError> {
        if self.bytes != upto {
            let mut h = Hashed::default();
            if upto > 0 {
                let file = std::fs::File::open(path).map_err(io_err(path))?;
                std::io::copy(&mut std::io::Read::take(file, upto), &mut h.hasher).map_err(io_err(path))?;
                h.bytes = upto;
            }
            *self = h;
        }
        Ok(self)
    }

    fn hex(&self) -> String {
        hex(&self.hasher.clone().finalize())
    }
}

/// The start of a `Content-Range: bytes START-END/TOTAL` answer.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// An error with its causes (reqwest's own message hides the interesting part).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The lowercase hex SHA-256 of a file.
pub fn sha256_of(path: &Path) -> Result<String, HubError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A relative symlink (copying where links are not possible).
fn link_or_copy(target: &Path, blob: &Path, link: &Path) -> Result<(), HubError> {
    #[cfg(unix)]
    {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => warn!(link = %link.display(), error = %e, "cannot link into the snapshot; copying"),
        }
    }
    let _ = target;
    std::fs::copy(blob, link).map_err(io_err(link))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        let r = HubRef::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str(), r.file.as_deref()),
            ("HuggingFaceTB/SmolLM2-135M-Instruct", "main", None)
        );
        let r = HubRef::parse("bartowski/gemma-2-2b-it-GGUF@v1.0:gemma-2-2b-it-Q4_K_M.gguf").unwrap();
        assert_eq!((r.revision.as_str(), r.file.as_deref()), ("v1.0", Some("gemma-2-2b-it-Q4_K_M.gguf")));
        assert_eq!(r.to_string(), "bartowski/gemma-2-2b-it-GGUF@v1.0:gemma-2-2b-it-Q4_K_M.gguf");
        for not in [
            "models/x.gguf/extra",
            "./a/b",
            "/abs/path",
            "a/../b",
            "org/name:../../etc/passwd",
            "a/b/c",
            "onlyname",
            "org/na me",
        ] {
            assert_eq!(HubRef::parse(not), None, "{not}");
        }
    }

    #[test]
    fn unsafe_names_from_the_hub_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a\\b"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
        assert!(safe_relative("sub/dir/model.safetensors").is_ok());
    }
}
