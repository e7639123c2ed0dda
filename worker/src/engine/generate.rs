//! The generation loop: prefill the prompt, then sample token by token, streaming text pieces,
//! until end-of-sequence, a stop string, the token limit, the context's end, or the caller stops.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::EngineError;
use super::detok::{Detokenizer, StopCheck, StopMatcher};
use super::model::{LogitsFor, ModelPart, PartCache, StageInput, StageOutput};
use super::sampling::{Choice, Sampler, SamplingParams};
use super::tokenizer::Tokenizer;

/// Prompt tokens processed per forward pass; bounds activation and mask memory.
pub const PREFILL_CHUNK: usize = 512;

/// Something that turns the next tokens of a sequence into the logits of the last one: a
/// whole model on one device, or (in the worker) a pipeline of stages.
pub trait LogitsSource {
    /// Processes `tokens` (appended to the sequence) and returns the logits after the last.
    fn next_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError>;
    /// Tokens the model can attend to in all.
    fn context_length(&self) -> usize;
}

/// Something that takes the next tokens of a sequence and picks the token after them: a model
/// with a sampler beside it ([`Sampled`]), or a pipeline whose last stage samples.
pub trait TokenSource {
    /// Appends `tokens` to the sequence; when `pick`, returns the token chosen to follow them
    /// (`pick` is false for all but the last chunk of a long prompt, which keeps a seeded
    /// sampler's draws the same however the prompt is chunked).
    fn feed(&mut self, tokens: &[u32], pick: bool) -> Result<Option<Choice>, EngineError>;
    /// Tokens the model can attend to in all.
    fn context_length(&self) -> usize;
}

/// A [`LogitsSource`] with the sampler and the token history it needs.
#[derive(Debug)]
pub struct Sampled<S> {
    pub source: S,
    sampler: Sampler,
    history: Vec<u32>,
}

impl<S: LogitsSource> Sampled<S> {
    pub fn new(source: S, params: &SamplingParams) -> Result<Sampled<S>, EngineError> {
        Ok(Sampled { source, sampler: Sampler::new(params.clone())?, history: Vec::new() })
    }
}

impl<S: LogitsSource> TokenSource for Sampled<S> {
    fn feed(&mut self, tokens: &[u32], pick: bool) -> Result<Option<Choice>, EngineError> {
        let logits = self.source.next_logits(tokens)?;
        self.history.extend_from_slice(tokens);
        if !pick {
            return Ok(None);
        }
        Ok(Some(self.sampler.sample(&logits, &self.history)?))
    }

    fn context_length(&self) -> usize {
        self.source.context_length()
    }
}

impl<T: LogitsSource + ?Sized> LogitsSource for &mut T {
    fn next_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        (**self).next_logits(tokens)
    }

    fn context_length(&self) -> usize {
        (**self).context_length()
    }
}

/// A whole model and one sequence's cache.
#[derive(Debug)]
pub struct Session<'a> {
    pub model: &'a ModelPart,
    pub cache: PartCache,
}

impl<'a> Session<'a> {
    pub fn new(model: &'a ModelPart) -> Session<'a> {
        Session { model, cache: model.new_cache() }
    }
}

impl LogitsSource for Session<'_> {
    fn next_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        match self.model.forward(StageInput::Tokens(tokens), &mut self.cache, LogitsFor::Last)? {
            StageOutput::Logits(l) => Ok(l.flatten_all()?.to_vec1()?),
            StageOutput::Hidden(_) => Err(EngineError::Config("this part does not end the model".into())),
        }
    }

    fn context_length(&self) -> usize {
        self.model.config.context_length
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    EndOfSequence,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    Length,
    /// The sequence reached the model's context length.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenEvent {
    /// The token; `None` for text held back until the end (an incomplete character or a
    /// partial stop string) and flushed when generation ends.
    pub token: Option<u32>,
    /// Text this token completes (may be empty while a character or stop string is pending).
    pub text: String,
    pub logprob: Option<f32>,
}

/// Timings of a generation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Prompt processing (prefill).
    pub prefill: Duration,
    /// From the start to the first generated token.
    pub first_token: Duration,
    /// Generating the tokens after the first.
    pub decode: Duration,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_sec(&self, tokens: usize) -> f64 {
        tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_sec(&self, tokens: usize) -> f64 {
        tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// What a generation produced.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    pub text: String,
    pub tokens: Vec<u32>,
    pub timings: Timings,
}

/// Generates from `prompt` ids, calling `on_token` for each token; `on_token` returning
/// `Break` stops generation (a cancelled request) after that token.
pub fn generate(
    source: &mut dyn LogitsSource,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    extra_eos: &[u32],
    on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Summary, EngineError> {
    let mut sampled = Sampled::new(source, params)?;
    generate_from(&mut sampled, tokenizer, prompt, params, extra_eos, on_token)
}

/// [`generate`] from any [`TokenSource`] (a pipeline whose last stage samples).
pub fn generate_from(
    source: &mut dyn TokenSource,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    extra_eos: &[u32],
    on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Summary, EngineError> {
    params.validate()?;
    let context = source.context_length();
    if prompt.is_empty() {
        return Err(EngineError::PromptTooLong { prompt: 0, context, detail: "the prompt is empty".into() });
    }
    if prompt.len() >= context {
        return Err(EngineError::PromptTooLong {
            prompt: prompt.len(),
            context,
            detail: "no room is left to generate".into(),
        });
    }
    let eos: Vec<u32> = tokenizer.eos.iter().chain(extra_eos).copied().collect();
    let started = Instant::now();
    let chunks = prompt.chunks(PREFILL_CHUNK).count();
    let mut next = None;
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        next = source.feed(chunk, i + 1 == chunks)?;
    }
    let mut timings = Timings { prefill: started.elapsed(), ..Timings::default() };

    let mut generated = Vec::new();
    let mut text = String::new();
    let mut detok = Detokenizer::with_context(prompt);
    let mut stops = StopMatcher::new(params.stop.clone());
    let budget = params.max_tokens.min(context - prompt.len());
    let mut decode_started = None;
    let finish = loop {
        let choice = next.take().ok_or_else(|| EngineError::Numerics("the model picked no token".into()))?;
        if generated.is_empty() {
            timings.first_token = started.elapsed();
            decode_started = Some(Instant::now());
        }
        generated.push(choice.token);
        let is_eos = !params.ignore_eos && eos.contains(&choice.token);
        let piece = if is_eos { String::new() } else { detok.push(tokenizer, choice.token)? };
        let (piece, stopped) = match stops.feed(&piece) {
            StopCheck::Continue(t) => (t, false),
            StopCheck::Stop(t) => (t, true),
        };
        text.push_str(&piece);
        let flow = on_token(&TokenEvent { token: Some(choice.token), text: piece, logprob: choice.logprob });
        if stopped {
            break FinishReason::StopString;
        }
        if is_eos {
            break FinishReason::EndOfSequence;
        }
        if flow.is_break() {
            break FinishReason::Cancelled;
        }
        if generated.len() >= budget {
            break if generated.len() >= params.max_tokens { FinishReason::Length } else { FinishReason::ContextFull };
        }
        next = source.feed(&[choice.token], true)?;
    };
    if !matches!(finish, FinishReason::StopString | FinishReason::EndOfSequence) {
        // Text held back for a possible stop string or an incomplete character.
        let mut rest = detok.finish(tokenizer)?;
        rest = format!("{}{rest}", stops.flush());
        if !rest.is_empty() {
            text.push_str(&rest);
            let _ = on_token(&TokenEvent { token: None, text: rest, logprob: None });
        }
    }
    timings.decode = decode_started.map_or(Duration::ZERO, |d| d.elapsed());
    Ok(Summary {
        prompt_tokens: prompt.len(),
        completion_tokens: generated.len(),
        finish_reason: finish,
        text,
        tokens: generated,
        timings,
    })
}
