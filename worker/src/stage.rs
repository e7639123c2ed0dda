//! Serving a later pipeline stage: one `StageLink/Forward` stream per sequence, each step's
//! hidden states through this worker's layers, then on to the next stage or sampled here.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use gantry_core::SamplingParams;
use gantry_engine::EngineError;
use gantry_engine::model::StageInput;
use gantry_engine::pipeline::{Chain, NextStage};
use gantry_engine::wire;
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::downstream::{self, Downstream, open_next};
use crate::error::WorkerError;
use crate::generate::{STREAM_BUFFER, checked_sampling};
use crate::load::span;
use crate::served::Served;
use crate::state::WorkerState;

/// A stage's replies, as the gRPC stream carries them.
pub type StageReplies = mpsc::Receiver<Result<pb::StageReply, Status>>;

impl WorkerState {
    /// Takes a stream the previous stage opened and serves its steps on a blocking thread.
    pub async fn forward(
        self: &Arc<Self>,
        mut inbound: tonic::Streaming<pb::StageRequest>,
    ) -> Result<StageReplies, WorkerError> {
        let open = match inbound.message().await {
            Ok(Some(pb::StageRequest { message: Some(pb::stage_request::Message::Open(open)) })) => open,
            Ok(_) => return Err(WorkerError::Invalid("a stage stream starts with `open`".into())),
            Err(s) => return Err(WorkerError::Transport(s)),
        };
        let model = self.model(&open.model_id)?;
        if open.first_layer == 0 || model.info.layer_start != open.first_layer {
            return Err(WorkerError::Precondition(format!(
                "this worker runs layers {} of `{}`; the previous stage hands on at layer {}",
                span(&(model.info.layer_start as usize..model.info.layer_end as usize)),
                model.info.model_id,
                open.first_layer
            )));
        }
        let params = checked_sampling(open.sampling.as_ref(), &model)?;
        let resumed = open.resumed_tokens as usize;
        let downstream = match &model.next {
            None => None,
            Some(next) => Some(open_next(&model, next, &params, &open.request_id, resumed).await?),
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::task::spawn_blocking(move || {
            model.running.fetch_add(1, Ordering::Relaxed);
            run_stage(&model, downstream, &params, resumed, inbound, &tx);
            model.running.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(rx)
    }
}

/// Serves one stream on the calling (blocking) thread until the previous stage closes it
/// (done, cancelled, or gone).
fn run_stage(
    model: &Served,
    downstream: Option<Downstream>,
    params: &SamplingParams,
    resumed: usize,
    mut inbound: tonic::Streaming<pb::StageRequest>,
    tx: &mpsc::Sender<Result<pb::StageReply, Status>>,
) {
    let runtime = tokio::runtime::Handle::current();
    let next = downstream.map(|d| Box::new(d) as Box<dyn NextStage + Send>);
    let mut chain = match Chain::new(&model.segments, next, params, resumed) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.blocking_send(Err(WorkerError::from(e).into()));
            return;
        }
    };
    let Some(first) = model.segments.first() else { return };
    let (hidden_size, device) = (first.part.config.hidden_size, first.part.device().clone());
    while let Ok(Some(msg)) = runtime.block_on(inbound.message()) {
        let Some(pb::stage_request::Message::Step(step)) = msg.message else {
            let _ = tx.blocking_send(Err(Status::invalid_argument("a stage stream sends `open` once, then steps")));
            return;
        };
        let reply = step
            .hidden
            .ok_or_else(|| EngineError::Config("a step without hidden states".into()))
            .and_then(|h| wire::decode(&downstream::from_message(h), hidden_size, &device))
            .and_then(|h| chain.step(StageInput::Hidden(h), &step.tokens, step.sample))
            .map(downstream::reply)
            .map_err(|e| Status::from(WorkerError::from(e)));
        let failed = reply.is_err();
        if tx.blocking_send(reply).is_err() || failed {
            return;
        }
    }
}
