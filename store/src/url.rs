//! Models named by an `http://` or `https://` URL: one `.gguf` file. Workers download it once
//! into the cache (`<cache>/gantry-urls/<hash of the URL>/<file name>`, written under a
//! `.part` name and renamed when complete); the controller reads only its header, with HTTP
//! range requests, to size a replica without downloading the weights.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_core::gguf::parse_gguf_prefix;
use gantry_core::spec::ModelSpec;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::hub::{DownloadProgress, HubError};

/// The first header read; grown (doubling) until the header fits.
const FIRST_READ_BYTES: u64 = 4 << 20;
/// No real GGUF header is larger.
const MAX_HEADER_BYTES: u64 = 512 << 20;

/// Whether `source` is a URL.
pub fn is_url(source: &str) -> bool {
    let s = source.trim();
    s.starts_with("http://") || s.starts_with("https://")
}

fn failed(url: &str, detail: impl Into<String>) -> HubError {
    HubError::Transfer { what: url.to_string(), detail: detail.into() }
}

/// The file a URL names: its last path segment, which must be a `.gguf` file.
pub fn file_name(url: &str) -> Result<String, HubError> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or_default();
    let ok = name.to_ascii_lowercase().ends_with(".gguf")
        && name.len() > 5
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
    if ok {
        Ok(name.to_string())
    } else {
        Err(failed(
            url,
            "a URL source must name one .gguf file (its last path segment, e.g. https://host/models/model.Q4_K_M.gguf)",
        ))
    }
}

fn client() -> Result<reqwest::Client, HubError> {
    // Every redirect, and every address a name resolves to, passes the source policy too: a
    // public URL cannot lead inside the network.
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        match crate::policy::current().check_url(attempt.url().as_str()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(format!("redirected to a URL that is not allowed: {e}")),
        }
    });
    reqwest::Client::builder()
        .redirect(redirects)
        .dns_resolver(std::sync::Arc::new(CheckedResolver))
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("gantry/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| failed("an HTTP client", e.to_string()))
}

/// Resolves names as the system does, then keeps only the addresses the source policy allows
/// for that host (a name that resolves inside the network is refused unless named).
struct CheckedResolver;

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_ascii_lowercase();
            let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let policy = crate::policy::current();
            let mut refused = None;
            let allowed: Vec<std::net::SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_address(&host, a.ip(), &format!("http://{host}/")) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| format!("{host} resolves to no address"));
                return Err(why.into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn http_error(url: &str, status: StatusCode) -> HubError {
    failed(url, format!("the server answered {status}"))
}

/// Where a URL's file is cached under `cache_dir`.
pub fn cached_path(cache_dir: &Path, url: &str) -> Result<PathBuf, HubError> {
    let name = file_name(url)?;
    let hash = Sha256::digest(url.trim().as_bytes());
    let dir: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(cache_dir.join("gantry-urls").join(dir).join(name))
}

/// The file at `url`, downloaded into `cache_dir` unless it is there already.
pub async fn download(
    url: &str,
    cache_dir: &Path,
    progress: &mut (dyn FnMut(DownloadProgress) + Send),
) -> Result<PathBuf, HubError> {
    crate::policy::current().check_url(url).map_err(|e| failed(url, e))?;
    let path = cached_path(cache_dir, url)?;
    if path.is_file() {
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(cache_dir);
    tokio::fs::create_dir_all(dir).await.map_err(|source| HubError::Io { path: dir.to_path_buf(), source })?;
    let mut response = client()?.get(url).send().await.map_err(|e| failed(url, e.to_string()))?;
    if !response.status().is_success() {
        return Err(http_error(url, response.status()));
    }
    let total = response.content_length().unwrap_or(0);
    let file = file_name(url)?;
    let part = path.with_extension("gguf.part");
    let mut out = tokio::fs::File::create(&part).await.map_err(|source| HubError::Io { path: part.clone(), source })?;
    let mut done = 0u64;
    while let Some(chunk) =
        response.chunk().await.map_err(|e| failed(url, format!("the download broke off after {done} bytes: {e}")))?
    {
        out.write_all(&chunk).await.map_err(|source| HubError::Io { path: part.clone(), source })?;
        done += chunk.len() as u64;
        progress(DownloadProgress { file: file.clone(), done, total: total.max(done) });
    }
    out.flush().await.map_err(|source| HubError::Io { path: part.clone(), source })?;
    if total > 0 && done != total {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(failed(url, format!("the server sent {done} of {total} bytes")));
    }
    tokio::fs::rename(&part, &path).await.map_err(|source| HubError::Io { path: path.clone(), source })?;
    Ok(path)
}

/// The first `want` bytes of `url` and the file's whole length, by a range request (or from
/// the start of a whole response, for servers without ranges).
async fn read_prefix(http: &reqwest::Client, url: &str, want: u64) -> Result<(Vec<u8>, u64), HubError> {
    let mut response = http
        .get(url)
        .header(RANGE, format!("bytes=0-{}", want.saturating_sub(1)))
        .send()
        .await
        .map_err(|e| failed(url, e.to_string()))?;
    let status = response.status();
    let total = match status {
        StatusCode::PARTIAL_CONTENT => response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| failed(url, "a range answer without the file's length (Content-Range: bytes a-b/LENGTH)"))?,
        StatusCode::OK => response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| failed(url, "the server gives neither ranges nor the file's length"))?,
        other => return Err(http_error(url, other)),
    };
    let mut prefix = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(url, e.to_string()))? {
        let room = (want as usize).saturating_sub(prefix.len());
        prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if prefix.len() as u64 >= want {
            break;
        }
    }
    Ok((prefix, total))
}

/// What the GGUF file at `url` is, from its header alone.
pub async fn read_remote_spec(url: &str) -> Result<ModelSpec, HubError> {
    crate::policy::current().check_url(url).map_err(|e| failed(url, e))?;
    let name = file_name(url)?;
    let http = client()?;
    let mut want = FIRST_READ_BYTES;
    loop {
        let (prefix, total) = read_prefix(&http, url, want).await?;
        match parse_gguf_prefix(&prefix, total) {
            Ok(parsed) => return ModelSpec::from_gguf(&name, &parsed).map_err(|e| failed(url, e.to_string())),
            Err(gantry_core::Error::NeedMoreBytes { needed }) if needed <= MAX_HEADER_BYTES && want < total => {
                want = needed.max(want.saturating_mul(2)).min(total).min(MAX_HEADER_BYTES);
            }
            Err(e) => return Err(failed(url, e.to_string())),
        }
    }
}
