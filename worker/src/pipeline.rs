//! Running a model split into pipeline stages.
//!
//! A worker holds one stage of a split model: one or more [`Segment`]s (layer ranges, each on
//! its own device, run one after the other in this process) and, unless its layers end the
//! model, the address of the next stage. For each sequence a [`Chain`] keeps the KV caches of
//! this worker's layers and, when there is a next stage, one `StageLink/Forward` stream to it: a
//! step runs the local layers, sends the hidden states on, and waits for the token the last
//! stage sampled. The last stage samples itself, so only token ids travel back.
//!
//! Hidden states travel as raw little-endian tensors in f32 (exact), f16 or bf16.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::engine::EngineError;
use crate::engine::generate::TokenSource;
use crate::engine::model::{LogitsFor, ModelPart, PartCache, StageInput, StageOutput};
use crate::engine::sampling::{Choice, Sampler, SamplingParams};

/// How long a stage waits for the next one to answer a step before failing the request: a
/// long prompt chunk on a slow device takes seconds, a stopped process forever.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The element type of hidden states on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl WireDtype {
    /// `f32`, `f16` or `bf16`; empty means f32.
    pub fn parse(name: &str) -> Result<WireDtype, EngineError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "f32" | "float32" => Ok(WireDtype::F32),
            "f16" | "float16" => Ok(WireDtype::F16),
            "bf16" | "bfloat16" => Ok(WireDtype::Bf16),
            other => Err(EngineError::Config(format!("wire dtype `{other}`: use f32, f16 or bf16"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "f32",
            WireDtype::F16 => "f16",
            WireDtype::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> DType {
        match self {
            WireDtype::F32 => DType::F32,
            WireDtype::F16 => DType::F16,
            WireDtype::Bf16 => DType::BF16,
        }
    }

    fn width(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
        }
    }
}

/// Hidden states `[1, t, hidden]` as a message.
pub fn encode(hidden: &Tensor, wire: WireDtype) -> Result<pb::HiddenStates, EngineError> {
    let shape: Vec<u32> = hidden.dims().iter().map(|&d| d as u32).collect();
    let flat = hidden.flatten_all()?.to_dtype(wire.dtype())?;
    let mut data = Vec::with_capacity(flat.elem_count() * wire.width());
    match wire {
        WireDtype::F32 => flat.to_vec1::<f32>()?.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
        WireDtype::F16 => flat.to_vec1::<half::f16>()?.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
        WireDtype::Bf16 => flat.to_vec1::<half::bf16>()?.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
    }
    Ok(pb::HiddenStates { dtype: wire.name().into(), shape, data })
}

/// A message's hidden states as an f32 tensor on `device`, checked against `hidden_size`
/// before anything is allocated from the sizes it claims.
pub fn decode(h: &pb::HiddenStates, hidden_size: usize, device: &Device) -> Result<Tensor, EngineError> {
    let wire = WireDtype::parse(&h.dtype)?;
    let bad = |why: String| EngineError::Config(format!("hidden states of shape {:?}: {why}", h.shape));
    let [batch, t, width] = h.shape[..] else { return Err(bad("expected [1, tokens, hidden]".into())) };
    if batch != 1 || t == 0 || width as usize != hidden_size {
        return Err(bad(format!("expected [1, tokens ≥ 1, {hidden_size}]")));
    }
    let count = t as usize * width as usize;
    if h.data.len() != count * wire.width() {
        return Err(bad(format!("{} bytes of {} data, expected {}", h.data.len(), wire.name(), count * wire.width())));
    }
    let values: Vec<f32> = match wire {
        WireDtype::F32 => h.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        WireDtype::F16 => h.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        WireDtype::Bf16 => h.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    };
    Ok(Tensor::from_vec(values, (1, t as usize, width as usize), device)?)
}

/// A fair (first come, first served) lock on a compute device. Generations on one device
/// take turns at each forward pass: without it, concurrent sequences on the CPU run their
/// matrix kernels at once and fight over the cores (measured: 4 streams of SmolLM2 on 2
/// cores gave 20% fewer tokens/s in all than running them one after the other); with it they
/// interleave token by token. A plain mutex would let the thread that just released it take
/// it straight back and starve the others.
#[derive(Debug, Default)]
pub struct TurnLock {
    /// (next ticket to hand out, ticket being served).
    tickets: Mutex<(u64, u64)>,
    turn: std::sync::Condvar,
}

impl TurnLock {
    /// Waits for this caller's turn and runs `f`.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut t = self.tickets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = t.0;
        t.0 += 1;
        while t.1 != mine {
            t = self.turn.wait(t).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(t);
        // Hand the turn on even if `f` panics.
        struct Next<'a>(&'a TurnLock);
        impl Drop for Next<'_> {
            fn drop(&mut self) {
                let mut t = self.0.tickets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                t.1 += 1;
                self.0.turn.notify_all();
            }
        }
        let _next = Next(self);
        f()
    }
}

/// A layer range on one device.
#[derive(Debug)]
pub struct Segment {
    pub part: ModelPart,
    /// The turn lock of its device.
    pub turn: Arc<TurnLock>,
}

impl Segment {
    fn forward(&self, input: StageInput<'_>, cache: &mut PartCache) -> Result<StageOutput, EngineError> {
        self.turn.run(|| self.part.forward(input, cache, LogitsFor::Last))
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

impl Downstream {
    /// Opens the stream to the stage at `address` that should start at `first_layer`.
    pub async fn open(
        channel: Channel,
        address: &str,
        open: pb::StageOpen,
        wire: WireDtype,
    ) -> Result<Downstream, EngineError> {
        let describe = format!("the next stage ({address}, from layer {})", open.first_layer);
        let (tx, rx) = mpsc::channel(2);
        let first = pb::StageRequest { message: Some(pb::stage_request::Message::Open(open)) };
        tx.send(first).await.map_err(|_| EngineError::Config("the stage stream closed at once".into()))?;
        let mut client = pb::stage_link_client::StageLinkClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let call = tokio::time::timeout(STEP_TIMEOUT, client.forward(ReceiverStream::new(rx)));
        let rx = match call.await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(stage_error(&describe, "refused the request", &s)),
            Err(_) => return Err(timeout_error(&describe)),
        };
        Ok(Downstream { runtime: tokio::runtime::Handle::current(), tx, rx, describe, wire })
    }

    /// Sends one step's hidden states and waits for the reply (from a blocking thread).
    fn step(&mut self, tokens: &[u32], hidden: &Tensor, pick: bool) -> Result<Option<Choice>, EngineError> {
        let step = pb::StageStep { tokens: tokens.to_vec(), hidden: Some(encode(hidden, self.wire)?), sample: pick };
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
                Ok(Ok(Some(reply))) => Ok(reply.token_id.map(|token| Choice { token, logprob: reply.logprob })),
                Ok(Ok(None)) => Err(gone_error(describe)),
                Ok(Err(s)) => Err(stage_error(describe, "failed", &s)),
                Err(_) => Err(timeout_error(describe)),
            }
        })
    }
}

fn stage_error(describe: &str, what: &str, s: &tonic::Status) -> EngineError {
    // A status the stage sent has no source; one with a source is the connection failing
    // (a dead process, a reset): the stage is unavailable.
    let broken = std::error::Error::source(s).is_some() || s.message().contains("transport error");
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal | tonic::Code::Unavailable if broken => {
            EngineError::Stage {
                code: tonic::Code::Unavailable as i32,
                message: format!("{describe} is unreachable or went away mid-request ({})", s.message()),
            }
        }
        code => EngineError::Stage { code: code as i32, message: format!("{describe} {what}: {}", s.message()) },
    }
}

fn gone_error(describe: &str) -> EngineError {
    EngineError::Stage {
        code: tonic::Code::Unavailable as i32,
        message: format!("{describe} closed the stream mid-request"),
    }
}

fn timeout_error(describe: &str) -> EngineError {
    EngineError::Stage {
        code: tonic::Code::DeadlineExceeded as i32,
        message: format!("{describe} did not answer within {} s", STEP_TIMEOUT.as_secs()),
    }
}

/// One sequence on this worker's stage: the caches of its segments, and either the stream to
/// the next stage or the sampler (the last stage).
#[derive(Debug)]
pub struct Chain<'a> {
    segments: &'a [Segment],
    caches: Vec<PartCache>,
    next: Option<Downstream>,
    sampler: Option<(Sampler, Vec<u32>)>,
    context: usize,
}

impl<'a> Chain<'a> {
    /// A sequence over `segments`, handing on to `next` or, without one, sampling with `params`
    /// (its draws advanced past `resumed` tokens an earlier run of the request generated).
    pub fn new(
        segments: &'a [Segment],
        next: Option<Downstream>,
        params: &SamplingParams,
        resumed: usize,
    ) -> Result<Chain<'a>, EngineError> {
        let sampler = match next {
            Some(_) => None,
            None => {
                let mut sampler = Sampler::new(params.clone())?;
                sampler.resume_after(resumed);
                Some((sampler, Vec::new()))
            }
        };
        let context = segments.first().map_or(0, |s| s.part.config.context_length);
        let caches = segments.iter().map(|s| s.part.new_cache()).collect();
        Ok(Chain { segments, caches, next, sampler, context })
    }

    /// Runs one step: this worker's layers, then the next stage or the sampler.
    pub fn step(&mut self, input: StageInput<'_>, tokens: &[u32], pick: bool) -> Result<Option<Choice>, EngineError> {
        let mut input = Some(input);
        let mut output = None;
        for (segment, cache) in self.segments.iter().zip(self.caches.iter_mut()) {
            let this = match output.take() {
                Some(StageOutput::Hidden(h)) => StageInput::Hidden(h),
                // Logits end the model: no segment can follow (checked at load).
                Some(logits @ StageOutput::Logits(_)) => {
                    output = Some(logits);
                    break;
                }
                None => input.take().ok_or_else(|| EngineError::Config("no input for this stage".into()))?,
            };
            output = Some(segment.forward(this, cache)?);
        }
        let hidden = match output {
            Some(StageOutput::Hidden(h)) => h,
            Some(StageOutput::Logits(l)) => return self.sample(&l, tokens, pick),
            None => return Err(EngineError::Config("this stage has no layers".into())),
        };
        match self.next.as_mut() {
            Some(next) => next.step(tokens, &hidden, pick),
            None => Err(EngineError::Config(format!(
                "layers end at {} of {} and no next stage is set",
                self.segments.last().map_or(0, |s| s.part.range.end),
                self.segments.last().map_or(0, |s| s.part.config.num_layers)
            ))),
        }
    }

    /// The last stage: records `tokens` and, when asked, picks the next one from `logits`.
    fn sample(&mut self, logits: &Tensor, tokens: &[u32], pick: bool) -> Result<Option<Choice>, EngineError> {
        let Some((sampler, history)) = self.sampler.as_mut() else {
            return Err(EngineError::Config("these layers end the model, yet a next stage is set".into()));
        };
        history.extend_from_slice(tokens);
        if !pick {
            return Ok(None);
        }
        Ok(Some(sampler.sample(&logits.flatten_all()?.to_vec1()?, history)?))
    }
}

impl TokenSource for Chain<'_> {
    fn feed(&mut self, tokens: &[u32], pick: bool) -> Result<Option<Choice>, EngineError> {
        self.step(StageInput::Tokens(tokens), tokens, pick)
    }

    fn context_length(&self) -> usize {
        self.context
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_taken_in_arrival_order() {
        let lock = Arc::new(TurnLock::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets = |l: &TurnLock| l.tickets.lock().unwrap().0;
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (l, o) = (lock.clone(), order.clone());
        let first = std::thread::spawn(move || {
            l.run(|| {
                o.lock().unwrap().push(1);
                held.recv().unwrap();
            });
            // Straight back for another turn: it must wait behind 2 and 3.
            l.run(|| o.lock().unwrap().push(1));
        });
        while tickets(&lock) < 1 {
            std::thread::yield_now();
        }
        let mut others = Vec::new();
        for id in [2, 3] {
            let (l, o) = (lock.clone(), order.clone());
            others.push(std::thread::spawn(move || l.run(|| o.lock().unwrap().push(id))));
            while tickets(&lock) < id {
                std::thread::yield_now();
            }
        }
        release.send(()).unwrap();
        first.join().unwrap();
        for t in others {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [1, 2, 3, 1]);
    }

    #[test]
    fn hidden_states_round_trip_in_each_wire_dtype() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let t = Tensor::from_vec(values.clone(), (1, 3, 4), &Device::Cpu).unwrap();
        for wire in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
            let msg = encode(&t, wire).unwrap();
            assert_eq!(msg.data.len(), 12 * wire.width());
            let back = decode(&msg, 4, &Device::Cpu).unwrap();
            // Quarter steps are exact in every one of these formats.
            assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), values, "{}", wire.name());
        }
    }

    #[test]
    fn hostile_hidden_states_are_refused_before_allocating() {
        let ok = pb::HiddenStates { dtype: "f32".into(), shape: vec![1, 2, 4], data: vec![0; 32] };
        assert!(decode(&ok, 4, &Device::Cpu).is_ok());
        let cases = [
            (pb::HiddenStates { shape: vec![1, 2, 8], ..ok.clone() }, "expected [1, tokens ≥ 1, 4]"),
            (pb::HiddenStates { shape: vec![1, u32::MAX, 4], ..ok.clone() }, "32 bytes of f32 data, expected"),
            (pb::HiddenStates { shape: vec![2, 4], ..ok.clone() }, "expected [1, tokens, hidden]"),
            (pb::HiddenStates { data: vec![0; 31], ..ok.clone() }, "31 bytes of f32 data, expected 32"),
            (pb::HiddenStates { dtype: "q4".into(), ..ok.clone() }, "wire dtype `q4`: use f32, f16 or bf16"),
        ];
        for (msg, want) in cases {
            let e = decode(&msg, 4, &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
