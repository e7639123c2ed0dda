//! Running a model split into pipeline stages, within one process: a stage is one or more
//! [`Segment`]s (layer ranges, each on its own device, run one after the other) and, unless its
//! layers end the model, a [`NextStage`] to hand the hidden states to. For each sequence a
//! [`Chain`] keeps the KV caches of the stage's layers: a step runs them, then either hands on to
//! the next stage (which answers with the token its last stage sampled) or samples here. How the
//! next stage is reached (gRPC, in the worker) is not the engine's business.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use gantry_core::SamplingParams;

use crate::EngineError;
use crate::generate::TokenSource;
use crate::model::{LogitsFor, ModelPart, PartCache, StageInput, StageOutput};
use crate::sampling::{Choice, Sampler};

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
    caches: Vec<PartCache>,
    next: Option<Box<dyn NextStage + Send>>,
    sampler: Option<(Sampler, Vec<u32>)>,
    context: usize,
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
}
