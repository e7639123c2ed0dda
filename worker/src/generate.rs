//! Serving a generation: check the request, build its prompt (a conversation through the
//! model's chat template), take a slot or a place in the queue, then run the engine's loop on a
//! blocking thread, streaming each token; a cancelled stream stops it at the next token.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gantry_core::SamplingParams;
use gantry_engine::chat::Message;
use gantry_engine::generate::{FinishReason, TokenEvent, generate_from};
use gantry_engine::pipeline::Chain;
use gantry_proto::convert::sampling_from_proto;
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{info, warn};

use crate::downstream::{Downstream, open_next};
use crate::error::WorkerError;
use crate::load::span;
use crate::served::Served;
use crate::state::WorkerState;

/// Tokens buffered between a generation and a slow client (small, so that a cancelled
/// stream is noticed after at most this many tokens plus one).
pub(crate) const STREAM_BUFFER: usize = 8;

/// A generation's events, as the gRPC stream carries them.
pub type GenerateEvents = mpsc::Receiver<Result<pb::GenerateEvent, Status>>;

impl WorkerState {
    /// The token ids `req`'s input becomes, as [`WorkerState::generate`] would process them
    /// (at most the context's worth), with the model's prefix-cache keying: for a router
    /// looking for the replica that holds the prompt's prefix.
    pub fn tokenize(&self, req: &pb::GenerateRequest) -> Result<pb::TokenizeResponse, WorkerError> {
        let model = self.first_stage(&req.model_id)?;
        let mut token_ids = build_prompt(&model, req.input.as_ref())?;
        // Past the context nothing is served (`generate` refuses such a prompt): the ids that
        // can be cached are enough, and a huge prompt's reply stays small.
        token_ids.truncate(model.info.context_length as usize);
        let (kv_block_tokens, prefix_seed) = model.prefix_keying();
        Ok(pb::TokenizeResponse { token_ids, kv_block_tokens, prefix_seed })
    }

    /// Model `id`, which must hold the first layers (requests go to the first stage).
    fn first_stage(&self, id: &str) -> Result<Arc<Served>, WorkerError> {
        let model = self.model(id)?;
        if model.info.layer_start != 0 {
            return Err(WorkerError::Precondition(format!(
                "this worker runs layers {} of `{}`, a later pipeline stage; send requests to the stage holding layer 0",
                span(&(model.info.layer_start as usize..model.info.layer_end as usize)),
                model.info.model_id
            )));
        }
        Ok(model)
    }

    /// Checks a request and starts it (or queues it); the stream yields its tokens.
    pub fn generate(self: &Arc<Self>, req: pb::GenerateRequest) -> Result<GenerateEvents, WorkerError> {
        let model = self.first_stage(&req.model_id)?;
        let params = checked_sampling(req.sampling.as_ref(), &model)?;
        let prompt = build_prompt(&model, req.input.as_ref())?;
        let context = model.info.context_length as usize;
        if prompt.len() >= context {
            return Err(WorkerError::Invalid(format!(
                "the prompt is {} tokens; model `{}` has a context of {context} tokens, so at most {} prompt tokens fit",
                prompt.len(),
                model.info.model_id,
                context - 1
            )));
        }
        if params.max_tokens > context {
            return Err(WorkerError::Invalid(format!(
                "max_tokens {} is more than model `{}` can hold: its context is {context} tokens, prompt included",
                params.max_tokens, model.info.model_id
            )));
        }
        let resumed = req.resume_tokens;
        check_resumed(&resumed, &model, prompt.len(), &params)?;
        let prefill_only = req.prefill_only;
        if prefill_only {
            if model.next.is_some() {
                return Err(WorkerError::Precondition(format!(
                    "prefill_only: this worker holds only the first pipeline stage of `{}`, whose prefix cache alone would not resume a request",
                    model.info.model_id
                )));
            }
            if model.prefix_keying().0 == 0 {
                return Err(WorkerError::Precondition(format!(
                    "prefill_only: model `{}` keeps no prefix cache on its device",
                    model.info.model_id
                )));
            }
        }

        // A free slot now, else a place in the queue, else refused.
        let permit = match model.slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let cap = self.options.queue;
                let taken =
                    self.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < cap).then_some(w + 1));
                if taken.is_err() {
                    return Err(WorkerError::Exhausted(format!(
                        "the worker's queue is full: {cap} requests waiting, {} running on `{}`; retry later",
                        model.running.load(Ordering::Relaxed),
                        model.info.model_id
                    )));
                }
                model.queued.fetch_add(1, Ordering::Relaxed);
                None
            }
        };

        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.clone();
        let request_id = req.request_id.clone();
        tokio::spawn(async move {
            let permit = match permit {
                Some(p) => Ok(p),
                None => {
                    let got = tokio::select! {
                        p = model.slots.clone().acquire_owned() => p.map_err(|_| ()),
                        () = tx.closed() => Err(()),
                    };
                    state.waiting.fetch_sub(1, Ordering::AcqRel);
                    model.queued.fetch_sub(1, Ordering::Relaxed);
                    got
                }
            };
            let Ok(permit) = permit else { return };
            model.running.fetch_add(1, Ordering::Relaxed);
            let downstream = match &model.next {
                None => Ok(None),
                Some(next) => open_next(&model, next, &params, &request_id, resumed.len()).await.map(Some),
            };
            let (run_model, run_state, run_tx, run_id) = (model.clone(), state.clone(), tx.clone(), request_id.clone());
            let outcome = match downstream {
                Ok(downstream) => {
                    tokio::task::spawn_blocking(move || {
                        let run = Run { prompt: &prompt, resumed: &resumed, params: &params, request_id: &run_id };
                        if prefill_only {
                            return run_prefill(&run_model, &run);
                        }
                        run_generation(&run_state, &run_model, downstream, &run, &run_tx)
                    })
                    .await
                }
                Err(e) => Ok(Err(WorkerError::from(e))),
            };
            drop(permit);
            model.running.fetch_sub(1, Ordering::Relaxed);
            let event = match outcome {
                Ok(Ok(done)) => Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Done(done)) }),
                Ok(Err(e)) => Err(Status::from(e)),
                Err(e) => Err(Status::internal(format!("generation stopped: {e}"))),
            };
            if let Err(e) = &event {
                warn!(request_id = %request_id, model = %model.info.model_id, error = %e.message(), "generation failed");
            }
            // A client that stopped reading does not hold this task either.
            let _ = tokio::time::timeout(state.options.stall_timeout, tx.send(event)).await;
        });
        Ok(rx)
    }
}

/// A request's sampling settings with the defaults, checked, and the tokens a logit bias
/// names checked against the model's vocabulary.
pub(crate) fn checked_sampling(p: Option<&pb::SamplingParams>, model: &Served) -> Result<SamplingParams, WorkerError> {
    let params = sampling_from_proto(p);
    params.validate().map_err(|e| WorkerError::Invalid(format!("invalid sampling: {e}")))?;
    params.check_vocabulary(model.vocab_size()).map_err(|e| WorkerError::Invalid(format!("invalid sampling: {e}")))?;
    Ok(params)
}

/// Tokens to resume after must be the model's, and leave room to generate.
fn check_resumed(resumed: &[u32], model: &Served, prompt: usize, params: &SamplingParams) -> Result<(), WorkerError> {
    let vocab = model.vocab_size();
    if let Some(bad) = resumed.iter().find(|&&t| t as usize >= vocab) {
        return Err(WorkerError::Invalid(format!(
            "resume token {bad} is not in the vocabulary of `{}` ({vocab} tokens)",
            model.info.model_id
        )));
    }
    let context = model.info.context_length as usize;
    let budget = params.max_tokens.min(context.saturating_sub(prompt));
    if resumed.len() > budget {
        return Err(WorkerError::Invalid(format!(
            "{} tokens to resume after, but the request can generate at most {budget} (max_tokens {}, {} of the {context}-token context left after the prompt)",
            resumed.len(),
            params.max_tokens,
            context.saturating_sub(prompt)
        )));
    }
    Ok(())
}

/// One request's inputs, as the generation thread needs them.
struct Run<'a> {
    prompt: &'a [u32],
    /// Tokens an earlier run generated (a resumed request).
    resumed: &'a [u32],
    params: &'a SamplingParams,
    request_id: &'a str,
}

/// A token as the stream carries it: its text, and with `logprobs` its bytes, log-probability
/// and the best alternatives (their bytes from the tokenizer).
fn token_chunk(model: &Served, ev: &TokenEvent, params: &SamplingParams) -> pb::TokenChunk {
    let bytes_of = |t: u32| if params.logprobs { model.tokenizer.token_bytes(t) } else { Vec::new() };
    pb::TokenChunk {
        text: ev.text.clone(),
        token_id: ev.token,
        logprob: ev.logprob,
        token_bytes: ev.token.map(bytes_of).unwrap_or_default(),
        top_logprobs: ev
            .top
            .iter()
            .map(|&(token_id, logprob)| pb::TopLogprob { token_id, token_bytes: bytes_of(token_id), logprob })
            .collect(),
        end_of_sequence: ev.end_of_sequence,
    }
}

/// Whether an event reached the client's stream.
enum Sent {
    Yes,
    /// The client went away.
    Closed,
    /// The client left its stream unread past the stall bound.
    Stalled,
}

/// Sends `event` from a blocking thread, waiting at most `stall` for room in the stream.
fn send_within(
    tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>,
    event: Result<pb::GenerateEvent, Status>,
    stall: std::time::Duration,
) -> Sent {
    match tx.try_send(event) {
        Ok(()) => Sent::Yes,
        Err(mpsc::error::TrySendError::Closed(_)) => Sent::Closed,
        Err(mpsc::error::TrySendError::Full(event)) => {
            match tokio::runtime::Handle::current().block_on(tokio::time::timeout(stall, tx.send(event))) {
                Ok(Ok(())) => Sent::Yes,
                Ok(Err(_)) => Sent::Closed,
                Err(_) => Sent::Stalled,
            }
        }
    }
}

/// Runs one generation on the calling (blocking) thread, sending tokens to `tx`.
fn run_generation(
    state: &WorkerState,
    model: &Served,
    downstream: Option<Downstream>,
    run: &Run<'_>,
    tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>,
) -> Result<pb::GenerateDone, WorkerError> {
    let Run { prompt, resumed, params, request_id } = *run;
    let next = downstream.map(|d| Box::new(d) as Box<dyn gantry_engine::pipeline::NextStage + Send>);
    let mut chain = Chain::new(&model.segments, next, params, resumed.len())?;
    let summary = generate_from(&mut chain, &model.tokenizer, prompt, resumed, params, &model.extra_eos, &mut |ev| {
        if ev.token.is_some() {
            model.tokens.fetch_add(1, Ordering::Relaxed);
            model.meter.add(1);
            state.meter.add(1);
        }
        let chunk = token_chunk(model, ev, params);
        let event = Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(chunk)) });
        match send_within(tx, event, state.options.stall_timeout) {
            Sent::Yes => ControlFlow::Continue(()),
            Sent::Closed => ControlFlow::Break(()),
            Sent::Stalled => {
                warn!(
                    request_id,
                    model = %model.info.model_id,
                    stall_s = state.options.stall_timeout.as_secs_f64(),
                    "the client stopped reading its stream; generation cancelled and its slot given back"
                );
                ControlFlow::Break(())
            }
        }
    })?;
    let t = summary.timings;
    let new_tokens = summary.completion_tokens - resumed.len().min(summary.completion_tokens);
    info!(
        request_id,
        model = %model.info.model_id,
        prompt_tokens = summary.prompt_tokens,
        completion_tokens = summary.completion_tokens,
        resumed_after = resumed.len(),
        finish = ?summary.finish_reason,
        decode_tokens_per_sec = format!("{:.1}", t.decode_tokens_per_sec(new_tokens)),
        "generated"
    );
    Ok(pb::GenerateDone {
        finish_reason: finish_reason(summary.finish_reason) as i32,
        usage: Some(pb::Usage {
            prompt_tokens: summary.prompt_tokens as u32,
            completion_tokens: summary.completion_tokens as u32,
        }),
        time_to_first_token_ms: t.first_token.as_secs_f64() * 1000.0,
        decode_tokens_per_sec: t.decode_tokens_per_sec(new_tokens),
    })
}

/// A `prefill_only` request: the prompt and the resumed tokens computed into the model's prefix
/// cache (what it holds of them already is not computed again), nothing generated.
fn run_prefill(model: &Served, run: &Run<'_>) -> Result<pb::GenerateDone, WorkerError> {
    let started = std::time::Instant::now();
    let mut chain = Chain::new(&model.segments, None, run.params, run.resumed.len())?;
    let all: Vec<u32> = run.prompt.iter().chain(run.resumed).copied().collect();
    gantry_engine::generate::TokenSource::feed(&mut chain, &all, false)?;
    // Dropping the sequence leaves its full blocks in the prefix cache.
    drop(chain);
    info!(
        request_id = run.request_id,
        model = %model.info.model_id,
        prompt_tokens = run.prompt.len(),
        resumed_after = run.resumed.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "prefilled into the prefix cache"
    );
    Ok(pb::GenerateDone {
        finish_reason: pb::FinishReason::Length as i32,
        usage: Some(pb::Usage { prompt_tokens: run.prompt.len() as u32, completion_tokens: run.resumed.len() as u32 }),
        time_to_first_token_ms: 0.0,
        decode_tokens_per_sec: 0.0,
    })
}

fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::EndOfSequence => pb::FinishReason::EndOfSequence,
        FinishReason::StopString => pb::FinishReason::StopString,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ContextFull => pb::FinishReason::ContextFull,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The roles a conversation's messages may have (chat templates know these).
const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The prompt's token ids: plain text as is, a conversation through the chat template.
fn build_prompt(model: &Served, input: Option<&pb::generate_request::Input>) -> Result<Vec<u32>, WorkerError> {
    let text = match input {
        None => return Err(WorkerError::Invalid("the request has neither a prompt nor a chat".into())),
        Some(pb::generate_request::Input::Prompt(p)) => p.clone(),
        Some(pb::generate_request::Input::Chat(c)) => {
            if c.messages.is_empty() {
                return Err(WorkerError::Invalid("the chat has no messages".into()));
            }
            if let Some((i, m)) = c.messages.iter().enumerate().find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str())) {
                return Err(WorkerError::Invalid(format!(
                    "message #{} has unknown role `{}`: use {}",
                    i + 1,
                    m.role.escape_debug(),
                    CHAT_ROLES.join(", ")
                )));
            }
            let template = model.template.as_ref().map_err(|e| {
                WorkerError::Precondition(format!("model `{}` has no usable chat template: {e}", model.info.model_id))
            })?;
            let messages: Vec<Message> = c.messages.iter().map(|m| Message::new(&m.role, &m.content)).collect();
            template.render(&messages, true, &Default::default())?
        }
    };
    if text.is_empty() {
        return Err(WorkerError::Invalid("the prompt is empty".into()));
    }
    Ok(model.tokenizer.encode(&text, true, true)?)
}
