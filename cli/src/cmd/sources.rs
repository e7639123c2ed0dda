//! `--model-roots` and `--allow-url-hosts`: which model sources API callers may name (the
//! controller's deployments, the workers' loads). See `gantry_store::policy`.

use std::path::{Path, PathBuf};

use gantry_store::policy::{self, SourcePolicy};

/// The source allow-list flags, shared by `gantry controller`, `gantry worker` and `gantry up`.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Folders that model paths from API callers must be in, after `..` and links are resolved
    /// (comma-separated or repeated; `any` turns the check off) [default: ./models and the
    /// Hugging Face cache]; Hub ids are always allowed
    #[arg(long = "model-roots", env = "GANTRY_MODEL_ROOTS", value_delimiter = ',', value_name = "DIR")]
    pub model_roots: Vec<PathBuf>,
    /// Hosts that model URLs may name (comma-separated or repeated) [default: any host outside
    /// the network]; loopback, private and link-local addresses only when named here
    #[arg(long = "allow-url-hosts", env = "GANTRY_ALLOW_URL_HOSTS", value_delimiter = ',', value_name = "HOST")]
    pub allow_url_hosts: Vec<String>,
    /// The most one model URL download may bring (a larger file is refused, a longer stream cut)
    #[arg(long = "max-download", env = "GANTRY_MAX_DOWNLOAD", default_value = "256GiB", value_name = "SIZE",
          value_parser = |s: &str| gantry_core::units::parse_bytes(s).map_err(|e| e.to_string()))]
    pub max_download: u64,
}

impl SourceArgs {
    /// Installs the process's policy: the roots given (else `./models` and `hub_cache`), plus
    /// the folders of the operator's own command-line models `own`.
    pub fn install(&self, hub_cache: &Path, own: &[&str]) -> SourcePolicy {
        let roots = if self.model_roots.is_empty() {
            vec![PathBuf::from("models"), hub_cache.to_path_buf()]
        } else {
            self.model_roots.clone()
        };
        let mut p = SourcePolicy::new(&roots, &self.allow_url_hosts);
        p.max_download_bytes = self.max_download;
        for source in own {
            let path = Path::new(source);
            if path.is_dir() {
                p.add_root(path);
            } else if path.is_file() {
                p.add_root(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")));
            }
        }
        tracing::info!(roots = %p.describe_roots(), "model paths from API callers must be in these folders");
        policy::install(p.clone());
        p
    }
}

/// The Hugging Face cache folder the process would use.
pub fn hub_cache(cache_dir: Option<&Path>) -> PathBuf {
    match cache_dir {
        Some(d) => d.to_path_buf(),
        None => gantry_store::HubConfig::from_env().map(|c| c.cache_dir).unwrap_or_else(|_| PathBuf::from("models")),
    }
}
