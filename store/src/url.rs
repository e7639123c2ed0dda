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
    let policy = crate::policy::current();
    policy.check_url(url).map_err(|e| failed(url, e))?;
    let cap = policy.max_download_bytes;
    let path = cached_path(cache_dir, url)?;
    if path.is_file() {
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(cache_dir);
    tokio::fs::create_dir_all(dir).await.map_err(|source| HubError::Io { path: dir.to_path_buf(), source })?;
    let mut response = client()?.get(url).send().await.map_err(|e| failed(url, crate::hub::error_chain(&e)))?;
    if !response.status().is_success() {
        return Err(http_error(url, response.status()));
    }
    let total = response.content_length().unwrap_or(0);
    if total > cap {
        return Err(failed(
            url,
            format!("the file is {total} bytes, more than the {cap} a download may bring (--max-download)"),
        ));
    }
    let file = file_name(url)?;
    // A part file of this download's own: two loads of one URL at once each write theirs, and
    // the first to finish renames it into place (a rename replaces atomically).
    let part = path.with_extension(format!("gguf.part.{}.{}", std::process::id(), unique()));
    let result = async {
        let mut out =
            tokio::fs::File::create(&part).await.map_err(|source| HubError::Io { path: part.clone(), source })?;
        let mut done = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| failed(url, format!("the download broke off after {done} bytes: {e}")))?
        {
            done += chunk.len() as u64;
            if done > cap {
                return Err(failed(url, format!("the download passed the {cap} bytes it may bring (--max-download)")));
            }
            out.write_all(&chunk).await.map_err(|source| HubError::Io { path: part.clone(), source })?;
            progress(DownloadProgress { file: file.clone(), done, total: total.max(done) });
        }
        out.flush().await.map_err(|source| HubError::Io { path: part.clone(), source })?;
        if total > 0 && done != total {
            return Err(failed(url, format!("the server sent {done} of {total} bytes")));
        }
        tokio::fs::rename(&part, &path).await.map_err(|source| HubError::Io { path: path.clone(), source })
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    result.map(|()| path)
}

/// A number no other download of this process has used.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The first `want` bytes of `url` and the file's whole length, by a range request (or from
/// the start of a whole response, for servers without ranges).
async fn read_prefix(http: &reqwest::Client, url: &str, want: u64) -> Result<(Vec<u8>, u64), HubError> {
    let mut response = http
        .get(url)
        .header(RANGE, format!("bytes=0-{}", want.saturating_sub(1)))
        .send()
        .await
        .map_err(|e| failed(url, crate::hub::error_chain(&e)))?;
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

/// How long sizing a URL source may take in all (its header's reads).
pub const SIZING_DEADLINE: Duration = Duration::from_secs(60);

/// What the GGUF file at `url` is, from its header alone, within [`SIZING_DEADLINE`].
pub async fn read_remote_spec(url: &str) -> Result<ModelSpec, HubError> {
    read_remote_spec_within(url, SIZING_DEADLINE).await
}

/// [`read_remote_spec`] with a deadline of `deadline` for all of it.
pub async fn read_remote_spec_within(url: &str, deadline: Duration) -> Result<ModelSpec, HubError> {
    match tokio::time::timeout(deadline, read_remote_spec_now(url)).await {
        Ok(r) => r,
        Err(_) => Err(failed(url, format!("sizing it from its header took longer than {} s", deadline.as_secs_f64()))),
    }
}

async fn read_remote_spec_now(url: &str) -> Result<ModelSpec, HubError> {
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

#[cfg(test)]
mod bounded_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serves `body` (in chunks of 64 KiB, `pause` apart) to every connection, or, with
    /// `silent`, accepts connections and never answers.
    fn serve(body: Vec<u8>, pause: Duration, silent: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf);
                    if silent {
                        std::thread::sleep(Duration::from_secs(30));
                        return;
                    }
                    let head =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = stream.write_all(head.as_bytes());
                    for chunk in body.chunks(64 << 10) {
                        if stream.write_all(chunk).is_err() {
                            return;
                        }
                        std::thread::sleep(pause);
                    }
                });
            }
        });
        format!("http://{addr}/models/model.gguf")
    }

    /// Answers every request with a redirect to `location`.
    fn redirect(location: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let head = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
            }
        });
        format!("http://{addr}/models/model.gguf")
    }

    /// The bounds on URL sources, in one test (they share the process's policy): two downloads
    /// of one URL at once both end with the whole file and no part file left; a file larger
    /// than the cap is refused from its length; sizing gives up at its deadline; an allowed
    /// host redirecting to one the operator did not allow is refused, and the other host is
    /// never contacted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn downloads_are_capped_safe_together_and_sizing_has_a_deadline() {
        let mut policy = crate::policy::SourcePolicy::new(&[], &["127.0.0.1".into()]);
        crate::policy::install(policy.clone());
        let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let url = serve(body.clone(), Duration::from_millis(5), false);
        let cache = tempfile::tempdir().unwrap();
        let (mut pa, mut pb) = (|_| {}, |_| {});
        let (a, b) = tokio::join!(download(&url, cache.path(), &mut pa), download(&url, cache.path(), &mut pb));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), body, "the cached file is whole");
        let dir = a.parent().unwrap();
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "no part file left: {left:?}");

        policy.max_download_bytes = 1000;
        crate::policy::install(policy.clone());
        let other = tempfile::tempdir().unwrap();
        let e = download(&url, other.path(), &mut |_| {}).await.unwrap_err().to_string();
        assert!(
            e.contains("the file is 1048576 bytes, more than the 1000 a download may bring (--max-download)"),
            "{e}"
        );

        // 127.0.0.2 is loopback too, but not named in --allow-url-hosts: an inside address.
        let elsewhere = TcpListener::bind("127.0.0.2:0").unwrap();
        let target = format!("http://{}/models/model.gguf", elsewhere.local_addr().unwrap());
        elsewhere.set_nonblocking(true).unwrap();
        let bouncer = redirect(target.clone());
        let e = download(&bouncer, other.path(), &mut |_| {}).await.unwrap_err().to_string();
        assert!(e.contains("redirected to a URL that is not allowed"), "{e}");
        assert!(e.contains("127.0.0.2"), "{e}");
        assert!(elsewhere.accept().is_err(), "the host redirected to was contacted");

        let silent = serve(Vec::new(), Duration::ZERO, true);
        let e = read_remote_spec_within(&silent, Duration::from_millis(300)).await.unwrap_err().to_string();
        assert!(e.contains("sizing it from its header took longer than 0.3 s"), "{e}");
        crate::policy::install(crate::policy::SourcePolicy::default());
    }
}
