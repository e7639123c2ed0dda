//! Running a model split into pipeline stages, within one process: a stage is one or more
//! [`Segment`]s (layer ranges, each on its own device, run one after the other) and, unless its
//! layers end the model, a [`NextStage`] to hand the hidden states to. For each sequence a
//! [`Chain`] keeps the KV caches of the stage's layers: a step runs them (in the segment's
//! batcher, together with the other sequences' steps), then either hands on to the next stage
//! (which answers with the token its last stage sampled) or samples here. How the
//! next stage is reached (gRPC, in the worker) is not the engine's business.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use gantry_core::SamplingParams;

use crate::EngineError;
use crate::batch::{Batcher, Job, JobInput, Member, StepResult};
use crate::generate::TokenSource;
use crate::model::{LogitsFor, ModelPart, PartCache, StageInput, StageOutput, with_values};
use crate::sampling::{Choice, Sampler};

/// A fair (first come, first served) lock on a compute device. The models on one device take
/// turns at their forward passes (each a batch of all their running sequences, see
/// [`crate::batch`]): run at once, their kernels would fight over the cores. A plain mutex
/// would let the caller that just released it take it straight back and starve the others.
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
    /// The turn lock of its device (models on one device take turns at their steps).
    pub turn: Arc<TurnLock>,
    /// The sequences on these layers, stepped together.
    pub batcher: Batcher,
}

impl Segment {
    /// `part` on the device whose turn lock is `turn`, batching steps of up to `step_tokens`
    /// prompt tokens.
    pub fn new(part: ModelPart, turn: Arc<TurnLock>, step_tokens: usize) -> Segment {
        Segment { part, turn, batcher: Batcher::new(step_tokens) }
    }
}

/// The stage after this one's layers, for one sequence: takes a step's hidden states and, when
/// `pick`, answers with the token the model's last stage chose.
pub trait NextStage: std::fmt::Debug {
    fn step(&mut self, tokens: &[u32], hidden: &Tensor, pick: bool) -> Result<Option<Choice>, EngineError>;
}

/// One sequence on this worker's stage: the caches of its segments, and either the stream to
/// the next stage or the sampler (the last stage).
#[derive(Debug)]
pub struct Chain<'a> {
    segments: &'a [Segment],
    /// (Dropped before `members`: a batcher that sees a sequence leave finds its blocks back.)
    caches: Vec<Option<PartCache>>,
    members: Vec<Member<'a>>,
    next: Option<Box<dyn NextStage + Send>>,
    sampler: Option<(Sampler, Vec<u32>)>,
    context: usize,
    /// The token ids fed so far (a first stage's): what a preempted sequence computes again.
    fed: Vec<u32>,
}

impl<'a> Chain<'a> {
    /// A sequence over `segments`, handing on to `next` or, without one, sampling with `params`
    /// (its draws advanced past `resumed` tokens an earlier run of the request generated).
    pub fn new(
        segments: &'a [Segment],
        next: Option<Box<dyn NextStage + Send>>,
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
        let caches = segments.iter().map(|s| Some(s.part.new_cache())).collect();
        let members = segments.iter().map(|s| s.batcher.join()).collect();
        Ok(Chain { segments, members, caches, next, sampler, context, fed: Vec::new() })
    }

    /// Runs `input` through segment `i` in its batcher's next steps. A preempted sequence
    /// (only a whole model's, fed token ids, can be) is computed again from its tokens, its
    /// full blocks from the prefix cache where they are still there.
    fn run_segment(&mut self, i: usize, input: StageInput<'_>) -> Result<StageOutput, EngineError> {
        let segment = &self.segments[i];
        let whole = self.segments.len() == 1;
        let tokens = match &input {
            StageInput::Tokens(t) => Some(*t),
            StageInput::Hidden(_) => None,
        };
        let mut job_input = match input {
            StageInput::Tokens(t) => JobInput::Tokens(t.to_vec()),
            StageInput::Hidden(h) => JobInput::Hidden(h.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?),
        };
        // Only a last stage's logits of the last row are needed: its cached prefix need not run.
        let reuse = whole && self.next.is_none();
        loop {
            let cache =
                self.caches[i].take().ok_or_else(|| EngineError::Config("a step of this sequence failed".into()))?;
            let job = Job {
                cache,
                input: std::mem::replace(&mut job_input, JobInput::Tokens(Vec::new())),
                logits_for: LogitsFor::Last,
                preemptible: whole && tokens.is_some(),
                reuse_prefix: reuse,
            };
            match self.members[i].step(&segment.part, &segment.turn, job) {
                StepResult::Done(cache, out) => {
                    self.caches[i] = Some(cache);
                    let out = out?;
                    let Some(t) = tokens else { return Ok(out) };
                    self.fed.extend_from_slice(t);
                    // A recomputed sequence's hidden states: the rows of this step's tokens.
                    return match out {
                        StageOutput::Hidden(h) if h.dim(1)? > t.len() => {
                            let n = h.dim(1)?;
                            Ok(StageOutput::Hidden(h.narrow(1, n - t.len(), t.len())?))
                        }
                        out => Ok(out),
                    };
                }
                StepResult::Preempted(cache) => {
                    self.caches[i] = Some(cache);
                    let t = tokens
                        .ok_or_else(|| EngineError::Config("a sequence fed hidden states was preempted".into()))?;
                    job_input = JobInput::Tokens(self.fed.iter().chain(t).copied().collect());
                }
            }
        }
    }

    /// Runs one step: this worker's layers, then the next stage or the sampler.
    pub fn step(&mut self, input: StageInput<'_>, tokens: &[u32], pick: bool) -> Result<Option<Choice>, EngineError> {
        let mut input = Some(input);
        let mut output = None;
        for i in 0..self.segments.len() {
            let this = match output.take() {
                Some(StageOutput::Hidden(h)) => StageInput::Hidden(h),
                // Logits end the model: no segment can follow (checked at load).
                Some(logits @ StageOutput::Logits(_)) => {
                    output = Some(logits);
                    break;
                }
                None => input.take().ok_or_else(|| EngineError::Config("no input for this stage".into()))?,
            };
            output = Some(self.run_segment(i, this)?);
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
        with_values(logits, |values| sampler.sample(values, history))?.map(Some)
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
}
