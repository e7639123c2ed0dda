//! `gantry-store`: where a model's files come from — a local folder or file, the URL of a GGUF
//! file, or the Hugging Face Hub — fetched once into a cache ([`resolve`]). Reading the files
//! once they are here is `gantry-model`'s.

pub mod hub;
#[cfg(any(test, feature = "test-support"))]
pub mod hub_stub;
pub mod policy;
pub mod url;

use std::path::{Path, PathBuf};

pub use hub::{DownloadProgress, Hub, HubConfig, HubError, HubRef};

/// A model source as users write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Hub(HubRef),
    /// An `http(s)://` URL of one `.gguf` file.
    Url(String),
}

impl Source {
    /// A path that exists is local; otherwise `org/name[@rev][:file]` is a Hub id unless
    /// `org` is a local folder (then it is a missing local path, reported as such).
    pub fn parse(text: &str) -> Source {
        if url::is_url(text) {
            return Source::Url(text.trim().to_string());
        }
        let path = Path::new(text);
        if path.exists() {
            return Source::Local(path.to_path_buf());
        }
        match HubRef::parse(text) {
            Some(r) if !r.repo.split('/').next().is_some_and(|org| Path::new(org).is_dir()) => Source::Hub(r),
            _ => Source::Local(path.to_path_buf()),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local(p) => write!(f, "{}", p.display()),
            Source::Hub(r) => write!(f, "{r}"),
            Source::Url(u) => write!(f, "{u}"),
        }
    }
}

/// Where `source`'s files are on this machine, fetching them from the Hub first if needed.
pub async fn resolve(
    source: &Source,
    hub: &Hub,
    progress: &mut (dyn FnMut(DownloadProgress) + Send),
) -> Result<PathBuf, HubError> {
    match source {
        Source::Local(p) => Ok(p.clone()),
        Source::Hub(r) => Ok(hub.fetch(r, progress).await?.path),
        Source::Url(u) => url::download(u, hub.cache_dir(), progress).await,
    }
}
