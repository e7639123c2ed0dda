//! How the controller runs.

use std::time::Duration;

/// The controller's settings (from `gantry controller`'s and `gantry up`'s flags).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A worker silent for this long is lost.
    pub lease: Duration,
    /// How often workers send heartbeats.
    pub heartbeat: Duration,
    /// Safety margin on top of each replica's estimate, in percent.
    pub margin_percent: u64,
    /// How to dial workers that serve TLS (the cluster CA, and the controller's certificate).
    pub worker_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Requests relayed at once; past this, new ones are refused with RESOURCE_EXHAUSTED.
    pub max_requests: usize,
    /// How often the autoscaler samples the deployments' signals and decides.
    pub autoscale_interval: Duration,
    /// The longest a request waits for a replica to come up (a cold start) when its own
    /// deadline is later or unset.
    pub cold_start_timeout: Duration,
    /// Requests that may wait for a cold start per deployment; past this, RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
    /// How long a client may leave its stream unread before its request is cancelled.
    pub stall_timeout: Duration,
    /// How long an HTTP client may take to send a request's headers.
    pub http_header_timeout: Duration,
    /// How the router chooses among a deployment's ready replicas.
    pub routing: Routing,
    /// Every this many tokens a request delivers, a replica of its deployment on another worker
    /// computes them into its prefix cache (a `prefill_only` request), so that should the
    /// request's worker fail, it resumes there after a prefill of the tokens since, not of all
    /// of them. 0: off (a failed-over request's new replica computes all its tokens).
    pub standby_prefill: usize,
    /// The standby may be a replica serving requests (its prefills then share its worker with
    /// them); else only an idle replica is asked, and a request whose deployment has none on
    /// another worker goes without a standby until one is idle.
    pub standby_busy: bool,
}

/// Delivered tokens between standby prefills, by default (`--standby-prefill`).
pub const DEFAULT_STANDBY_PREFILL: usize = 256;

/// How the router chooses among a deployment's ready replicas (a session's request goes back
/// to its replica first either way, unless that one is overloaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Where the prompt's prefix is cached, weighed against queue and KV-cache pressure
    /// (`router::pick::score`); power of two choices for a prompt no replica holds, or a tie.
    #[default]
    Prefix,
    /// Power of two choices on load alone.
    P2c,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> Result<Routing, String> {
        match s {
            "prefix" => Ok(Routing::Prefix),
            "p2c" => Ok(Routing::P2c),
            _ => Err(format!("`{s}`: give `prefix` (where the prompt's prefix is cached) or `p2c` (load alone)")),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            lease: Duration::from_secs(6),
            heartbeat: Duration::from_secs(1),
            margin_percent: 5,
            worker_tls: None,
            max_requests: 10_000,
            autoscale_interval: Duration::from_secs(1),
            cold_start_timeout: Duration::from_secs(300),
            max_waiting: 256,
            stall_timeout: Duration::from_secs(60),
            http_header_timeout: Duration::from_secs(30),
            routing: Routing::Prefix,
            standby_prefill: DEFAULT_STANDBY_PREFILL,
            standby_busy: false,
        }
    }
}
