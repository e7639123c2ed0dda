//! Which model sources a caller of the API may name: the operator's allow-list.
//!
//! A deployment's or a load's `source` is read by the controller and the workers, so a caller
//! who may deploy could otherwise make them read any file (`/etc/passwd`, `../../secrets`) or
//! fetch any URL inside the network (`http://169.254.169.254/…`, the cloud's metadata service).
//! The policy allows:
//! - Hugging Face Hub ids, always;
//! - local paths under the model roots (`--model-roots`), checked after `..` and symbolic links
//!   are resolved, so neither escapes a root (`any` turns the check off);
//! - URLs whose host is on `--allow-url-hosts` when that list is given, else any host outside
//!   the network: loopback, private, link-local, shared and unique-local addresses (and
//!   `localhost`) are refused unless named on the list. Downloads apply the same rule to every
//!   address a name resolves to and to every redirect.
//!
//! The operator's own command-line models (`gantry worker --model`, `gantry up --model`) are
//! not API input: their folders join the roots.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use crate::Source;

/// The operator's allow-list of model sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Folders local models must be in (canonical); `None`: any path.
    roots: Option<Vec<PathBuf>>,
    /// Hosts URL sources may name (lowercase); empty: any host outside the network.
    url_hosts: Vec<String>,
    /// The most bytes one URL download may bring.
    pub max_download_bytes: u64,
}

/// The default cap on one URL download: larger than any single GGUF file of an open model.
pub const DEFAULT_MAX_DOWNLOAD_BYTES: u64 = 256 << 30;

impl Default for SourcePolicy {
    /// Any path, any public URL host: what a process that installed no policy checks.
    fn default() -> Self {
        SourcePolicy { roots: None, url_hosts: Vec::new(), max_download_bytes: DEFAULT_MAX_DOWNLOAD_BYTES }
    }
}

impl SourcePolicy {
    /// A policy from the flags: `roots` (`["any"]` for no check) and the URL hosts.
    pub fn new(roots: &[PathBuf], url_hosts: &[String]) -> SourcePolicy {
        let any = roots.iter().any(|r| r.as_os_str() == "any");
        let roots = (!any).then(|| {
            roots
                .iter()
                .map(|r| {
                    let abs = if r.is_absolute() {
                        r.clone()
                    } else {
                        std::env::current_dir().map(|d| d.join(r)).unwrap_or_else(|_| r.clone())
                    };
                    std::fs::canonicalize(&abs).unwrap_or(abs)
                })
                .collect()
        });
        let url_hosts = url_hosts
            .iter()
            .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        SourcePolicy { roots, url_hosts, max_download_bytes: DEFAULT_MAX_DOWNLOAD_BYTES }
    }

    /// The roots, for messages (`any` when unchecked).
    pub fn describe_roots(&self) -> String {
        match &self.roots {
            None => "any".into(),
            Some(r) if r.is_empty() => "none".into(),
            Some(r) => r.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Adds a folder to the roots (an operator's own `--model` folder).
    pub fn add_root(&mut self, dir: &Path) {
        if let Some(roots) = &mut self.roots {
            roots.push(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
        }
    }

    /// Whether an API caller may name `source`; the error says which setting would allow it.
    /// An empty source is left to the caller's own validation.
    pub fn check(&self, source: &str) -> Result<(), String> {
        if source.trim().is_empty() {
            return Ok(());
        }
        match Source::parse(source) {
            Source::Hub(_) => Ok(()),
            Source::Url(u) => self.check_url(&u),
            Source::Local(p) => self.check_path(&p),
        }
    }

    /// A local path: inside a root once `..` and links are resolved (a path that does not
    /// exist is judged by its `..`-resolved form, so that probing says nothing about what
    /// exists outside the roots).
    pub fn check_path(&self, path: &Path) -> Result<(), String> {
        let Some(roots) = &self.roots else { return Ok(()) };
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| lexical(path));
        if roots.iter().any(|r| real.starts_with(r)) {
            return Ok(());
        }
        let shown = if real == path {
            String::new()
        } else {
            format!(" ({} once links and `..` are resolved)", real.display())
        };
        Err(format!(
            "model path {}{shown} is outside the model roots ({}): add its folder to --model-roots, or name a Hub id",
            path.display(),
            self.describe_roots()
        ))
    }

    /// A URL: its host allowed by name, and not inside the network unless named.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("URL {url}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("URL {url}: only http and https model URLs are fetched"));
        }
        let Some(host) = parsed.host_str().map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase()) else {
            return Err(format!("URL {url}: no host"));
        };
        self.check_host(&host, url)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check_address(&host, ip, url)?;
        }
        Ok(())
    }

    /// A host name: on the list when there is one; `localhost` only when named.
    fn check_host(&self, host: &str, url: &str) -> Result<(), String> {
        let named = self.url_hosts.iter().any(|h| h == host);
        if !self.url_hosts.is_empty() && !named {
            return Err(format!(
                "URL {url}: host {host} is not one of --allow-url-hosts ({}): add it there",
                self.url_hosts.join(", ")
            ));
        }
        if !named && (host == "localhost" || host.ends_with(".localhost")) {
            return Err(format!(
                "URL {url}: {host} is this machine: model URLs may point inside the network only to hosts named on --allow-url-hosts"
            ));
        }
        Ok(())
    }

    /// An address a URL's host is (or resolves to): outside the network unless the host is named.
    pub fn check_address(&self, host: &str, ip: IpAddr, url: &str) -> Result<(), String> {
        if let Some(kind) = internal(ip)
            && !self.url_hosts.iter().any(|h| h == host)
        {
            return Err(format!(
                "URL {url}: {host} is {kind} address{}: model URLs may point inside the network only to hosts named on --allow-url-hosts",
                if host == ip.to_string() { String::new() } else { format!(" ({ip})") },
            ));
        }
        Ok(())
    }
}

/// `path` made absolute with `..` and `.` folded, without touching the file system.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// What kind of address inside the network `ip` is (`None`: a public one).
pub fn internal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("a loopback")
            } else if v4.is_private() {
                Some("a private")
            } else if v4.is_link_local() {
                Some("a link-local")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("an unspecified")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("a shared (carrier-grade NAT)")
            } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some("a reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("a loopback")
            } else if v6.is_unspecified() {
                Some("an unspecified")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("a link-local")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("a unique-local")
            } else if v6.is_multicast() {
                Some("a reserved")
            } else {
                None
            }
        }
    }
}

/// The process's policy, installed once by the command that serves (controller, worker, up).
static POLICY: OnceLock<RwLock<SourcePolicy>> = OnceLock::new();

fn cell() -> &'static RwLock<SourcePolicy> {
    POLICY.get_or_init(|| RwLock::new(SourcePolicy::default()))
}

/// Installs the process's policy.
pub fn install(policy: SourcePolicy) {
    if let Ok(mut p) = cell().write() {
        *p = policy;
    }
}

/// The process's policy.
pub fn current() -> SourcePolicy {
    cell().read().map(|p| p.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside_the_roots_after_links_and_dots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("models");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ok.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link.gguf")).unwrap();
        let p = SourcePolicy::new(std::slice::from_ref(&root), &[]);
        assert!(p.check(root.join("ok.gguf").to_str().unwrap()).is_ok());
        let e = p.check("/etc/passwd").unwrap_err();
        assert!(e.starts_with("model path /etc/passwd is outside the model roots ("), "{e}");
        assert!(e.ends_with("): add its folder to --model-roots, or name a Hub id"), "{e}");
        let escape = root.join("../secret");
        let e = p.check(escape.to_str().unwrap()).unwrap_err();
        assert!(e.contains("once links and `..` are resolved") && e.contains("outside the model roots"), "{e}");
        let e = p.check(root.join("link.gguf").to_str().unwrap()).unwrap_err();
        assert!(e.contains("outside the model roots"), "a link out of the root: {e}");
        assert!(p.check("HuggingFaceTB/SmolLM2-135M-Instruct").is_ok(), "Hub ids are allowed");
        assert!(SourcePolicy::new(&[PathBuf::from("any")], &[]).check("/etc/passwd").is_ok());
        // A missing path is judged by its resolved form: inside a root it is left to the
        // loader's own error, outside it is refused like any other.
        assert!(p.check(root.join("missing.gguf").to_str().unwrap()).is_ok());
        let e = p.check(root.join("../../missing.gguf").to_str().unwrap()).unwrap_err();
        assert!(e.contains("outside the model roots"), "{e}");
    }

    #[test]
    fn urls_inside_the_network_need_their_host_named() {
        let open = SourcePolicy::default();
        for (url, kind) in [
            ("http://127.0.0.1:8080/m.gguf", "a loopback"),
            ("http://169.254.169.254/latest/meta-data/", "a link-local"),
            ("http://10.1.2.3/m.gguf", "a private"),
            ("http://192.168.0.9/m.gguf", "a private"),
            ("http://100.64.0.1/m.gguf", "a shared (carrier-grade NAT)"),
            ("http://[::1]/m.gguf", "a loopback"),
            ("http://[fe80::1]/m.gguf", "a link-local"),
            ("http://[fd00::1]/m.gguf", "a unique-local"),
            ("http://[::ffff:169.254.169.254]/m.gguf", "a link-local"),
            ("http://0.0.0.0/m.gguf", "an unspecified"),
        ] {
            let e = open.check(url).unwrap_err();
            assert!(e.contains(&format!("is {kind} address")), "{url}: {e}");
            assert!(e.ends_with("only to hosts named on --allow-url-hosts"), "{e}");
        }
        assert!(open.check("http://localhost:9/m.gguf").unwrap_err().contains("is this machine"));
        assert!(open.check("https://example.com/m.gguf").is_ok());
        // Named hosts are allowed, and the list then allows nothing else.
        let listed = SourcePolicy::new(&[], &["127.0.0.1".into(), "models.example.com".into()]);
        assert!(listed.check("http://127.0.0.1:8080/m.gguf").is_ok());
        assert!(listed.check("https://models.example.com/m.gguf").is_ok());
        let e = listed.check("https://example.com/m.gguf").unwrap_err();
        assert_eq!(
            e,
            "URL https://example.com/m.gguf: host example.com is not one of --allow-url-hosts (127.0.0.1, models.example.com): add it there"
        );
        // A name that resolves inside the network is refused at download time.
        let e = open
            .check_address("metadata.internal", "169.254.169.254".parse().unwrap(), "http://metadata.internal/")
            .unwrap_err();
        assert!(e.contains("metadata.internal is a link-local address (169.254.169.254)"), "{e}");
    }
}
