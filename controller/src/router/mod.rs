//! The router: takes an inference request, picks a ready replica ([`pick`]), opens the
//! worker's stream and relays its events ([`relay`]), moving the request to another replica
//! when its replica fails mid-stream. It knows nothing of models: the workers run them.

pub mod pick;
pub mod prefix;
mod relay;
pub mod tenants;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::Stream;
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::cluster::Cluster;
use relay::{Relay, Standby};

/// A stream of events to a client.
pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Events to a client: a request is relayed by a task of its own that keeps at most this many
/// ahead of the client.
const RELAY_BUFFER: usize = 16;

/// Routes requests to the cluster's replicas.
#[derive(Debug, Clone)]
pub struct Router {
    cluster: Arc<Cluster>,
    /// One permit per request relayed (`ControllerConfig::max_requests`).
    relays: Arc<tokio::sync::Semaphore>,
    /// Each API key's streams and tokens, against its limits.
    tenants: Arc<tenants::Tenants>,
}

impl Router {
    pub fn new(cluster: Arc<Cluster>) -> Router {
        let relays = Arc::new(tokio::sync::Semaphore::new(cluster.config().max_requests));
        Router { cluster, relays, tenants: Arc::default() }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// The request's own id, or a fresh one when it brings none.
pub fn request_id(given: &str) -> String {
    if given.trim().is_empty() {
        format!("c{:x}-{}", std::process::id(), REQUEST_SEQ.fetch_add(1, Ordering::Relaxed))
    } else {
        given.trim().to_string()
    }
}

/// An id a client gives over HTTP or in metadata (`X-Request-Id`, `X-Session-Id`, OpenAI's
/// `user`), trimmed: printable, at most 128 bytes; anything else is none.
pub fn client_id(given: &str) -> Option<String> {
    let s = given.trim();
    (!s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic())).then(|| s.to_string())
}

/// The `grpc-timeout` a client set, as a duration.
pub fn deadline_of<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A status code as a metric label: `invalid_argument`, `unavailable` …
pub fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

impl Router {
    /// A fresh request id, as the gRPC API gives requests that bring none.
    pub fn new_request_id() -> String {
        request_id("")
    }

    /// Starts a generation on a ready replica of `model` (the OpenAI HTTP API's way in):
    /// the worker's events as they come; dropping the stream cancels it.
    pub async fn open_stream(
        &self,
        model: &str,
        input: pb::generate_request::Input,
        sampling: Option<pb::SamplingParams>,
        request_id: String,
        session: Option<String>,
        caller: Option<&Caller>,
    ) -> Result<EventStream<pb::GenerateEvent>, Status> {
        self.route(model, input, sampling, request_id, session, None, caller).await.map(Response::into_inner)
    }

    /// Starts a request on a replica and relays its events; a replica that fails mid-stream
    /// hands the request to another, which goes on after the tokens already sent. A request of
    /// a `session` goes where the session's last one went, unless that replica is overloaded.
    #[allow(clippy::too_many_arguments)]
    pub async fn route(
        &self,
        model: &str,
        input: pb::generate_request::Input,
        sampling: Option<pb::SamplingParams>,
        request_id: String,
        session: Option<String>,
        deadline: Option<Duration>,
        caller: Option<&Caller>,
    ) -> Result<Response<EventStream<pb::GenerateEvent>>, Status> {
        if model.trim().is_empty() {
            return Err(Status::invalid_argument("the request names no model; `Models/List` shows what is deployed"));
        }
        // The caller's own limits first: a tenant over them waits without taking a slot.
        let max = self.cluster.config().max_requests;
        let tenant = self.tenants.admit(caller, self.relays.available_permits(), max).inspect_err(|_| {
            let label = if self.cluster.get(model).is_ok() { model } else { "(unknown)" };
            crate::metrics::request_finished(label, "resource_exhausted");
        })?;
        let Ok(permit) = self.relays.clone().try_acquire_owned() else {
            let label = if self.cluster.get(model).is_ok() { model } else { "(unknown)" };
            crate::metrics::request_finished(label, "resource_exhausted");
            let limit = self.cluster.config().max_requests;
            return Err(Status::resource_exhausted(format!(
                "the controller is relaying {limit} requests, its limit (--max-requests); retry later"
            )));
        };
        // The deployment's defaults fill what the request leaves unset.
        let sampling = match self.cluster.spec(model) {
            Some(spec) => spec.sampling.apply(sampling),
            None => sampling,
        };
        let mut relay = Relay {
            cluster: self.cluster.clone(),
            model: model.to_string(),
            input,
            sampling,
            request_id,
            session,
            deadline: deadline.map(|d| Instant::now() + d),
            sent: Vec::new(),
            flushed: false,
            failed: Vec::new(),
            started: Instant::now(),
            last_token: None,
            hint: None,
            standby: Standby::default(),
        };
        let attached = relay.attach().await.inspect_err(|e| {
            // Names that are not deployments are not labels (anyone could make up millions).
            let label = if e.code() == tonic::Code::NotFound { "(unknown)" } else { model };
            crate::metrics::request_finished(label, &code_name(e.code()));
        })?;
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        tokio::spawn(async move {
            let sent = relay.run(attached, tx).await;
            if let Some(t) = &tenant {
                t.charge(sent);
            }
            drop(tenant);
            drop(permit);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
