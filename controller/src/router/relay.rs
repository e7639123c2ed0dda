//! One routed request: its relay from a replica's stream to the client, and its move to
//! another replica when the first fails mid-stream — the new one goes on after the tokens
//! already delivered (the worker replays them), so the client sees one stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gantry_proto::v1 as pb;
use gantry_proto::v1::worker_client::WorkerClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Status, Streaming};
use tracing::{info, warn};

use super::code_name;
use super::pick::{NoStandby, PrefixHint, Target};
use crate::cluster::Cluster;
use crate::config::Routing;
use crate::error::ClusterError;

/// Whether a worker's error means the replica failed (the worker died, its connection broke,
/// a pipeline stage went away) rather than that the request is wrong: then the request may go
/// on elsewhere.
fn replica_failed(e: &Status) -> bool {
    // A status the worker sent has no source; one with a source is the connection failing (a
    // killed process can also surface as hyper's `Cancelled: operation was canceled`).
    let transport = || {
        let m = e.message();
        std::error::Error::source(e).is_some()
            || ["transport", "connect", "connection", "broken pipe", "h2 protocol", "reset", "went away"]
                .iter()
                .any(|w| m.contains(w))
    };
    match e.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => transport(),
        _ => false,
    }
}

/// One routed request: what it asked for and what has been delivered, so that when its replica
/// fails mid-stream it can go on on another one from where it stopped.
pub(super) struct Relay {
    pub(super) cluster: Arc<Cluster>,
    pub(super) model: String,
    pub(super) input: pb::generate_request::Input,
    pub(super) sampling: Option<pb::SamplingParams>,
    pub(super) request_id: String,
    /// The session the request belongs to, if the client named one.
    pub(super) session: Option<String>,
    pub(super) deadline: Option<Instant>,
    /// Token ids delivered to the client.
    pub(super) sent: Vec<u32>,
    /// Whether held-back text (sent once, at the end) was delivered.
    pub(super) flushed: bool,
    /// Replicas that failed this request (worker, replica id).
    pub(super) failed: Vec<(String, String)>,
    pub(super) started: Instant,
    pub(super) last_token: Option<Instant>,
    /// The prompt's prefix-cache keys, once asked for (`None` inside: not routed by prefix).
    pub(super) hint: Option<Option<PrefixHint>>,
    /// Where its tokens are prefilled against its worker failing (`--standby-prefill`).
    pub(super) standby: Standby,
}

/// A request's standby replica: another worker's replica that prefills the request's delivered
/// tokens into its prefix cache every `ControllerConfig::standby_prefill` tokens, and where the
/// request goes on first should its own worker fail.
#[derive(Default)]
pub(super) struct Standby {
    /// The replica (worker, replica id) last sent a prefill.
    at: Option<(String, String)>,
    /// Delivered tokens it was last asked to prefill.
    warmed: usize,
    /// The prefill in flight (one at a time: a standby slower than the stream skips turns).
    running: Option<tokio::task::JoinHandle<()>>,
}

/// The longest the router waits for a prompt's token ids before routing without them.
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a standby prefill may take (a busy standby's is dropped; the next one goes on).
const STANDBY_TIMEOUT: Duration = Duration::from_secs(120);

/// Holds a request against its replica's in-flight count while it runs there, and against its
/// prefill ahead until the first token comes back.
pub(super) struct Attached {
    target: Target,
    events: Streaming<pb::GenerateEvent>,
    /// Prompt tokens the replica has yet to compute for this request (0 once its first token came).
    prefill: u64,
}

impl Attached {
    fn new(target: Target, events: Streaming<pb::GenerateEvent>, prefill: u64) -> Attached {
        target.inflight.fetch_add(1, Ordering::Relaxed);
        target.prefill.fetch_add(prefill, Ordering::Relaxed);
        Attached { target, events, prefill }
    }

    /// Its prompt is computed: no longer ahead of new requests. (Called on every token: the
    /// shared counter is touched only the first time.)
    fn prefilled(&mut self) {
        if self.prefill > 0 {
            self.target.prefill.fetch_sub(std::mem::take(&mut self.prefill), Ordering::Relaxed);
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.prefilled();
        self.target.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a relay ended.
enum Ending {
    Done,
    Cancelled,
    /// The client left its stream unread past `stall_timeout`.
    Stalled,
    Failed(Status),
}

impl Relay {
    /// Opens the request on a ready replica, past the ones that failed it, resuming after the
    /// tokens already delivered.
    pub(super) async fn attach(&mut self) -> Result<Attached, Status> {
        let mut unreachable = Vec::new();
        let mut waits = 0;
        if self.hint.is_none() {
            self.hint = Some(self.prefix_hint().await);
        }
        // A failed-over request goes on first where its tokens were prefilled.
        let standby = self.standby.at.as_ref().filter(|_| !self.sent.is_empty());
        let mut preferred = standby.and_then(|s| self.cluster.choose_standby(&self.model, s, &self.failed));
        loop {
            let hint = self.hint.as_ref().and_then(Option::as_ref);
            let chosen = match preferred.take() {
                Some(routed) => Ok(routed),
                None => self.cluster.choose(&self.model, &self.failed, self.session.as_deref(), hint),
            };
            let picked = match chosen {
                // An autoscaled deployment with no ready replica: wait while one comes up.
                Err(ClusterError::NoReadyReplica(_)) if waits < 3 && self.cluster.autoscaled(&self.model) => {
                    waits += 1;
                    let waited = Instant::now();
                    match self.cluster.wait_for_replica(&self.model, &self.failed, self.deadline).await {
                        Ok(()) => {
                            info!(request_id = %self.request_id, model = %self.model, waited_ms = waited.elapsed().as_millis() as u64, "a replica came up");
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            let routed = picked.map_err(|e| {
                let e = Status::from(e);
                if unreachable.is_empty() {
                    e
                } else {
                    Status::new(e.code(), format!("{} ({})", e.message(), unreachable.join("; ")))
                }
            })?;
            let target = routed.target;
            let mut req = Request::new(pb::GenerateRequest {
                model_id: target.model_id.clone(),
                input: Some(self.input.clone()),
                sampling: self.sampling.clone(),
                request_id: self.request_id.clone(),
                resume_tokens: self.sent.clone(),
                prefill_only: false,
            });
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Status::deadline_exceeded("the request's deadline passed while generating"));
                }
                req.set_timeout(left);
            }
            let score = routed.score.unwrap_or_default();
            // The prompt tokens the replica computes for it (the prefix it holds aside).
            let prefill = hint.zip(routed.score).map_or(0, |(h, s)| (h.prompt_tokens as u64).saturating_sub(s.cached));
            info!(
                request_id = %self.request_id,
                model = %self.model,
                worker = %target.worker,
                replica = %target.model_id,
                resume_after = self.sent.len(),
                session = self.session.as_deref().unwrap_or(""),
                by = routed.by.as_str(),
                prompt_tokens = hint.map_or(0, |h| h.prompt_tokens),
                score = score.total(),
                cached_tokens = score.cached,
                prefill_tokens = score.prefill,
                queue_tokens = score.queue,
                kv_tokens = score.kv,
                "routing"
            );
            crate::metrics::routed(&self.model, routed.by.as_str(), hint.map(|h| h.prompt_tokens), routed.score);
            self.authorize(&mut req);
            match WorkerClient::new(target.channel.clone()).generate(req).await {
                Ok(r) => return Ok(Attached::new(target, r.into_inner(), prefill)),
                Err(e) if replica_failed(&e) => {
                    warn!(request_id = %self.request_id, worker = %target.worker, error = %e.message(), "replica unreachable; trying another");
                    unreachable.push(format!(
                        "worker {} serving replica {}: {}",
                        target.worker,
                        target.model_id,
                        e.message()
                    ));
                    self.failed.push((target.worker, target.model_id));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Carries the cluster's worker token (a worker beyond loopback requires it).
    fn authorize<T>(&self, req: &mut Request<T>) {
        if let Ok(v) = format!("Bearer {}", self.cluster.worker_token()).parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }

    /// With `--standby-prefill N` (on by default), once every N delivered tokens: asks the
    /// standby replica (on a worker other than `current`'s; an idle one unless
    /// `--standby-busy`) to prefill the prompt and the tokens delivered so far into its prefix
    /// cache, in the background. Its failure, or no idle replica, costs nothing but the shorter
    /// resume it would have given.
    fn prefill_standby(&mut self, current: &Target) {
        let every = self.cluster.config().standby_prefill;
        if every == 0 || self.sent.len() < self.standby.warmed + every {
            return;
        }
        if self.standby.running.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let idle_only = !self.cluster.config().standby_busy;
        let found =
            self.cluster.standby(&self.model, &current.worker, &self.failed, self.standby.at.as_ref(), idle_only);
        // Whatever the outcome, the next look is N tokens on.
        self.standby.warmed = self.sent.len();
        let target = match found {
            Ok(target) => target,
            Err(NoStandby::Busy) => {
                crate::metrics::standby_prefill(&self.model, "busy");
                return;
            }
            Err(NoStandby::Elsewhere) => return,
        };
        self.standby.at = Some((target.worker.clone(), target.model_id.clone()));
        let mut req = Request::new(pb::GenerateRequest {
            model_id: target.model_id.clone(),
            input: Some(self.input.clone()),
            sampling: self.sampling.clone(),
            request_id: format!("{}.standby", self.request_id),
            resume_tokens: self.sent.clone(),
            prefill_only: true,
        });
        req.set_timeout(STANDBY_TIMEOUT);
        self.authorize(&mut req);
        let (request_id, model, tokens) = (self.request_id.clone(), self.model.clone(), self.sent.len());
        self.standby.running = Some(tokio::spawn(async move {
            let asked = Instant::now();
            let outcome = match WorkerClient::new(target.channel.clone()).generate(req).await {
                Ok(r) => {
                    let mut events = r.into_inner();
                    loop {
                        match events.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break Ok(()),
                            Err(e) => break Err(e),
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    crate::metrics::standby_prefill(&model, "ok");
                    tracing::debug!(request_id = %request_id, worker = %target.worker, replica = %target.model_id, tokens, took_ms = asked.elapsed().as_millis() as u64, "standby prefilled");
                }
                Err(e) => {
                    crate::metrics::standby_prefill(&model, "failed");
                    warn!(request_id = %request_id, worker = %target.worker, replica = %target.model_id, error = %e.message(), "standby prefill failed");
                }
            }
        }));
    }

    /// The prompt's prefix-cache keys, from the token ids a ready replica gives for it
    /// (`Worker/Tokenize`), when routing by prefix can choose (see [`Cluster::tokenizer_for`]);
    /// `None` when it cannot, or the replica cannot say in time (the request then goes by load).
    async fn prefix_hint(&self) -> Option<PrefixHint> {
        if self.cluster.config().routing != Routing::Prefix {
            return None;
        }
        let target = self.cluster.tokenizer_for(&self.model, &self.failed, self.session.as_deref())?;
        let mut req = Request::new(pb::GenerateRequest {
            model_id: target.model_id.clone(),
            input: Some(self.input.clone()),
            request_id: self.request_id.clone(),
            ..Default::default()
        });
        let left = self.deadline.map_or(TOKENIZE_TIMEOUT, |d| d.saturating_duration_since(Instant::now()));
        req.set_timeout(left.min(TOKENIZE_TIMEOUT));
        self.authorize(&mut req);
        let asked = Instant::now();
        let reply = WorkerClient::new(target.channel.clone()).tokenize(req).await;
        crate::metrics::tokenized(&self.model, asked.elapsed());
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(e) => {
                // An invalid request is refused by `Generate` itself, with the same words.
                if e.code() != tonic::Code::InvalidArgument {
                    warn!(request_id = %self.request_id, worker = %target.worker, error = %e.message(), "no token ids for routing by prefix; routing by load");
                }
                return None;
            }
        };
        let block = reply.kv_block_tokens as usize;
        (block > 0).then(|| PrefixHint {
            keys: gantry_core::prefix::block_keys(reply.prefix_seed, &reply.token_ids, block),
            block_tokens: reply.kv_block_tokens,
            prompt_tokens: reply.token_ids.len(),
        })
    }

    /// Forwards `at`'s events to `tx` until the request ends or its replica fails (`Ok`).
    async fn forward(
        &mut self,
        at: &mut Attached,
        tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>,
    ) -> Result<Ending, Status> {
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let deadline = tokio::time::sleep_until(self.deadline.unwrap_or(far));
        tokio::pin!(deadline);
        loop {
            let message = tokio::select! {
                () = tx.closed() => return Ok(Ending::Cancelled),
                () = &mut deadline => {
                    warn!(request_id = %self.request_id, worker = %at.target.worker, "deadline exceeded; cancelling");
                    return Ok(Ending::Failed(Status::deadline_exceeded("the request's deadline passed while generating")));
                }
                m = at.events.message() => m,
            };
            let ev = match message {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(Status::unavailable("its stream ended before the request finished")),
                Err(e) if replica_failed(&e) => return Err(e),
                Err(e) => return Ok(Ending::Failed(e)),
            };
            let done = match &ev.event {
                Some(pb::generate_event::Event::Token(t)) => match t.token_id {
                    Some(id) => {
                        at.prefilled();
                        self.sent.push(id);
                        self.prefill_standby(&at.target);
                        let now = Instant::now();
                        let first = self.last_token.is_none().then(|| now - self.started);
                        let gap = self.last_token.map(|t| now - t);
                        self.last_token = Some(now);
                        crate::metrics::token(&self.model, first, gap);
                        false
                    }
                    // Held-back text is sent once; a resumed run that reaches the same end sends it again.
                    None if self.flushed => continue,
                    None => {
                        self.flushed = true;
                        false
                    }
                },
                Some(pb::generate_event::Event::Done(_)) => true,
                None => false,
            };
            // A client that stops reading gives its relay and the worker's slot back after a bound.
            let stall = self.cluster.config().stall_timeout;
            match tokio::time::timeout(stall, tx.send(Ok(ev))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(Ending::Cancelled),
                Err(_) => {
                    warn!(
                        request_id = %self.request_id,
                        worker = %at.target.worker,
                        stall_s = stall.as_secs_f64(),
                        "the client stopped reading its stream; request cancelled"
                    );
                    return Ok(Ending::Stalled);
                }
            }
            if done {
                return Ok(Ending::Done);
            }
        }
    }

    /// Runs the request to its end, moving it to another replica whenever its replica fails.
    /// Relays the request to its end; returns the tokens delivered.
    pub(super) async fn run(mut self, mut at: Attached, tx: mpsc::Sender<Result<pb::GenerateEvent, Status>>) -> usize {
        let ending = loop {
            let lost = match self.forward(&mut at, &tx).await {
                Ok(ending) => break ending,
                Err(e) => e,
            };
            let from = at.target.clone();
            drop(at);
            self.failed.push((from.worker.clone(), from.model_id.clone()));
            match self.attach().await {
                Ok(next) => {
                    warn!(
                        request_id = %self.request_id,
                        model = %self.model,
                        from_worker = %from.worker,
                        to_worker = %next.target.worker,
                        to_replica = %next.target.model_id,
                        tokens_sent = self.sent.len(),
                        error = %lost.message(),
                        "replica failed mid-stream; resumed on another"
                    );
                    crate::metrics::migration(&self.model, "resumed");
                    at = next;
                }
                Err(e) => {
                    crate::metrics::migration(&self.model, "failed");
                    let e = if e.code() == tonic::Code::Unavailable {
                        Status::unavailable(format!(
                            "worker {} serving replica {} failed after {} tokens ({}), and no other replica could go on with the request: {}",
                            from.worker,
                            from.model_id,
                            self.sent.len(),
                            lost.message(),
                            e.message()
                        ))
                    } else {
                        e
                    };
                    warn!(request_id = %self.request_id, model = %self.model, error = %e.message(), "replica failed mid-stream; request failed");
                    break Ending::Failed(e);
                }
            }
        };
        let outcome = match ending {
            Ending::Done => "ok".to_string(),
            Ending::Cancelled => "cancelled".to_string(),
            Ending::Stalled => "client_stalled".to_string(),
            Ending::Failed(e) => {
                let name = code_name(e.code());
                let _ = tx.send(Err(e)).await;
                name
            }
        };
        crate::metrics::request_finished(&self.model, &outcome);
        self.sent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_a_failed_replica_and_a_workers_own_status_is_not() {
        assert!(replica_failed(&Status::unavailable("worker w1 is stopping")));
        assert!(replica_failed(&Status::unknown("transport error")));
        // What a killed worker's connection can surface as: hyper's cancellation, with its
        // error as the status' source.
        let mut killed = Status::cancelled("operation was canceled");
        killed.set_source(std::sync::Arc::new(std::io::Error::other("connection closed")));
        assert!(replica_failed(&killed));
        // A status the worker itself sent: the request's fault, not the replica's.
        assert!(!replica_failed(&Status::cancelled("operation was canceled")));
        assert!(!replica_failed(&Status::invalid_argument("max_tokens must be at least 1")));
        assert!(!replica_failed(&Status::internal("generation stopped: a bug")));
    }
}
