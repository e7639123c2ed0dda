//! The gRPC side of a pipeline split: for one sequence, the `StageLink/Forward` stream to the
//! stage after this worker's layers, as the engine's [`NextStage`]. A step sends the hidden
//! states and waits for the token the model's last stage sampled; a failure of the next stage
//! comes back as its gRPC status, with what this stage knows of it.

use std::time::Duration;

use candle_core::Tensor;
use gantry_core::{SamplingParams, WireDtype};
use gantry_engine::EngineError;
use gantry_engine::pipeline::NextStage;
use gantry_engine::sampling::Choice;
use gantry_engine::wire::{self, HiddenStates};
use gantry_proto::convert::sampling_to_proto;
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use crate::served::{NextStage as NextStageAddress, Served};

/// How long a stage waits for the next one to answer a step before failing the request: a
/// long prompt chunk on a slow device takes seconds, a stopped process forever.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Hidden states as a message.
pub fn to_message(h: HiddenStates) -> pb::HiddenStates {
    pb::HiddenStates { dtype: h.dtype, shape: h.shape, data: h.data }
}

/// A message's hidden states, for the engine to check and decode.
pub fn from_message(h: pb::HiddenStates) -> HiddenStates {
    HiddenStates { dtype: h.dtype, shape: h.shape, data: h.data }
}

/// A chosen token as a stage reply.
pub fn reply(choice: Option<Choice>) -> pb::StageReply {
    match choice {
        None => pb::StageReply::default(),
        Some(c) => pb::StageReply {
            token_id: Some(c.token),
            logprob: c.logprob,
            top_logprobs: c
                .top
                .into_iter()
                .map(|(token_id, logprob)| pb::TopLogprob { token_id, token_bytes: Vec::new(), logprob })
                .collect(),
        },
    }
}

/// The stream to the next stage, for one sequence.
#[derive(Debug)]
pub struct Downstream {
    runtime: tokio::runtime::Handle,
    tx: mpsc::Sender<pb::StageRequest>,
    rx: tonic::Streaming<pb::StageReply>,
    /// "the next stage (ADDRESS, from layer N)", for errors.
    describe: String,
    wire: WireDtype,
}

/// Opens the stream to the stage after `model`'s layers for one sequence.
pub async fn open_next(
    model: &Served,
    next: &NextStageAddress,
    params: &SamplingParams,
    request_id: &str,
    resumed: usize,
) -> Result<Downstream, EngineError> {
    let open = pb::StageOpen {
        model_id: model.info.model_id.clone(),
        first_layer: model.info.layer_end,
        sampling: Some(sampling_to_proto(params)),
        request_id: request_id.to_string(),
        resumed_tokens: resumed as u32,
    };
    Downstream::open(next.channel.clone(), &next.address, open, next.wire, next.token.as_deref()).await
}

impl Downstream {
    /// Opens the stream to the stage at `address` that should start at `first_layer`.
    pub async fn open(
        channel: Channel,
        address: &str,
        open: pb::StageOpen,
        wire: WireDtype,
        token: Option<&str>,
    ) -> Result<Downstream, EngineError> {
        let describe = format!("the next stage ({address}, from layer {})", open.first_layer);
        let (tx, rx) = mpsc::channel(2);
        let first = pb::StageRequest { message: Some(pb::stage_request::Message::Open(open)) };
        tx.send(first).await.map_err(|_| EngineError::Config("the stage stream closed at once".into()))?;
        let mut client = pb::stage_link_client::StageLinkClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(v) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
            request.metadata_mut().insert("authorization", v);
        }
        let call = tokio::time::timeout(STEP_TIMEOUT, client.forward(request));
        let rx = match call.await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(stage_error(&describe, "refused the request", &s)),
            Err(_) => return Err(timeout_error(&describe)),
        };
        Ok(Downstream { runtime: tokio::runtime::Handle::current(), tx, rx, describe, wire })
    }
}

impl NextStage for Downstream {
    /// Sends one step's hidden states and waits for the reply (from a blocking thread).
    fn step(&mut self, tokens: &[u32], hidden: &Tensor, pick: bool) -> Result<Option<Choice>, EngineError> {
        let hidden = to_message(wire::encode(hidden, self.wire)?);
        let step = pb::StageStep { tokens: tokens.to_vec(), hidden: Some(hidden), sample: pick };
        let msg = pb::StageRequest { message: Some(pb::stage_request::Message::Step(step)) };
        let (tx, rx, describe) = (&self.tx, &mut self.rx, &self.describe);
        self.runtime.block_on(async {
            if tx.send(msg).await.is_err() {
                // The call ended; its status says why.
                return Err(match rx.message().await {
                    Err(s) => stage_error(describe, "failed", &s),
                    Ok(_) => gone_error(describe),
                });
            }
            match tokio::time::timeout(STEP_TIMEOUT, rx.message()).await {
                Ok(Ok(Some(reply))) => Ok(reply.token_id.map(|token| Choice {
                    token,
                    logprob: reply.logprob,
                    top: reply.top_logprobs.iter().map(|t| (t.token_id, t.logprob)).collect(),
                })),
                Ok(Ok(None)) => Err(gone_error(describe)),
                Ok(Err(s)) => Err(stage_error(describe, "failed", &s)),
                Err(_) => Err(timeout_error(describe)),
            }
        })
    }
}

fn stage(status: Status) -> EngineError {
    EngineError::Stage(Box::new(status))
}

fn stage_error(describe: &str, what: &str, s: &Status) -> EngineError {
    // A status the stage sent has no source; one with a source is the connection failing
    // (a dead process, a reset): the stage is unavailable.
    let broken = std::error::Error::source(s).is_some() || s.message().contains("transport error");
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal | tonic::Code::Unavailable if broken => {
            stage(Status::unavailable(format!("{describe} is unreachable or went away mid-request ({})", s.message())))
        }
        code => stage(Status::new(code, format!("{describe} {what}: {}", s.message()))),
    }
}

fn gone_error(describe: &str) -> EngineError {
    stage(Status::unavailable(format!("{describe} closed the stream mid-request")))
}

fn timeout_error(describe: &str) -> EngineError {
    stage(Status::deadline_exceeded(format!("{describe} did not answer within {} s", STEP_TIMEOUT.as_secs())))
}
