//! Continuous batching: the sequences running on one model part advance together, one forward
//! pass per step for all of them.
//!
//! Each sequence keeps its own thread (its generation loop); a step is a [`Job`] it hands to
//! the part's [`Batcher`] and waits on. Whichever waiting thread finds no runner becomes the
//! runner: it waits briefly for the sequences that are between steps (sampling, sending a
//! token) to hand theirs in, picks the step's rows, runs them as one
//! [`ModelPart::forward_batch`], and hands each thread its result; it stays the runner until its
//! own job is done. The other threads sleep until their result is filed, and a hand-in wakes
//! the runner only when it was the last one the runner waited for, so a step with `n`
//! sequences costs about `n` wake-ups, not `n²`.
//!
//! A step's rows are chosen so that no sequence waits long and memory never runs out:
//!
//! * every decoding sequence's token first (oldest sequence first), then prompt rows up to the
//!   step's token budget, oldest prompt first; a longer prompt is split into chunks over steps
//!   (chunked prefill), so a 4,000-token prompt delays the others' tokens by one chunk a step;
//! * a prompt starts only when the free KV blocks hold all of it (admission by blocks);
//! * when a decoding sequence needs a block and none is free, the youngest sequence waiting in
//!   the step is preempted: its blocks go back to the pool and its thread computes it again
//!   later (its full blocks usually still in the prefix cache), with the very same numbers;
//! * a sequence that could not fit even in an empty pool is refused with the numbers.
//!
//! The CPU runtime computes each row the same way whatever else is in the step, so a sequence's
//! tokens do not depend on its neighbours, its chunking or a preemption (tested).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::EngineError;
use crate::cpu::kv::BLOCK_TOKENS;
use crate::model::{BatchInput, BatchStep, LogitsFor, ModelPart, PartCache, StageOutput};
use crate::pipeline::TurnLock;

/// Rows (tokens) a step takes at most, by default: decoding tokens, then prompt chunks.
pub const DEFAULT_STEP_TOKENS: usize = 128;

/// How long a step's runner waits for a sequence between steps (sampling, sending its token) to
/// hand in its next step; one away longer (a slow client, a next pipeline stage) is not waited
/// for.
const AWAY: Duration = Duration::from_millis(20);
/// How long a runner with nothing that fits waits before it looks again.
const RETRY: Duration = Duration::from_millis(2);

/// What a sequence brings to a step.
#[derive(Debug, Clone)]
pub enum JobInput {
    Tokens(Vec<u32>),
    /// Hidden states, `rows × hidden`, row after row.
    Hidden(Vec<f32>),
}

impl JobInput {
    fn rows(&self, hidden: usize) -> usize {
        match self {
            JobInput::Tokens(t) => t.len(),
            JobInput::Hidden(h) => h.len() / hidden.max(1),
        }
    }

    fn slice(&self, rows: std::ops::Range<usize>, hidden: usize) -> BatchInput<'_> {
        match self {
            JobInput::Tokens(t) => BatchInput::Tokens(&t[rows]),
            JobInput::Hidden(h) => BatchInput::Hidden(&h[rows.start * hidden..rows.end * hidden]),
        }
    }
}

/// A sequence's step.
#[derive(Debug)]
pub struct Job {
    pub cache: PartCache,
    pub input: JobInput,
    pub logits_for: LogitsFor,
    /// The sequence may be preempted (its caller can compute it again from its tokens).
    pub preemptible: bool,
    /// A new sequence may take its leading blocks from the prefix cache (only the last row's
    /// logits are wanted, so rows found there need not run).
    pub reuse_prefix: bool,
}

/// How a step ended for a sequence.
#[derive(Debug)]
pub enum StepResult {
    /// The rows went through: the sequence's cache, and the part's output for them.
    Done(PartCache, Result<StageOutput, EngineError>),
    /// The sequence was preempted for want of KV blocks: its cache is empty again, and the
    /// caller computes its tokens again to go on.
    Preempted(PartCache),
}

/// Counters of a batcher since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes run.
    pub steps: u64,
    /// Rows they computed.
    pub rows: u64,
    /// Sequences preempted.
    pub preempted: u64,
    /// Pass times by sequences in the pass: index `i` counts passes of up to `2^i` sequences
    /// (more than 32: the last).
    pub speed: [StepTimes; SPEED_BUCKETS],
}

/// Buckets of [`BatchStats::speed`]: 1, 2, 4, … 64 sequences.
pub const SPEED_BUCKETS: usize = 7;

/// The time of a batcher's forward passes of one size class: passes that carried a prompt
/// chunk (prefill), and passes of one new token per sequence (decode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimes {
    pub prefill_rows: u64,
    pub prefill_nanos: u64,
    pub decode_rows: u64,
    pub decode_nanos: u64,
}

impl BatchStats {
    /// Counts a pass of `sequences` sequences and `rows` rows that took `took`; `decode`: one
    /// row per sequence.
    fn time(&mut self, sequences: usize, rows: u64, decode: bool, took: Duration) {
        let i = (gantry_core::measured::speed_bucket(sequences).trailing_zeros() as usize).min(SPEED_BUCKETS - 1);
        let t = &mut self.speed[i];
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        if decode {
            t.decode_rows += rows;
            t.decode_nanos = t.decode_nanos.saturating_add(nanos);
        } else {
            t.prefill_rows += rows;
            t.prefill_nanos = t.prefill_nanos.saturating_add(nanos);
        }
    }
}

struct Waiting {
    ticket: u64,
    /// The sequence's age: lower is older.
    seq: u64,
    job: Job,
    /// Rows done (a prompt split into chunks).
    offset: usize,
    outputs: Vec<StageOutput>,
}

impl Inner {
    /// Files a sequence's result; the sequence counts as between steps from now.
    fn finish(&mut self, ticket: u64, seq: u64, result: StepResult) {
        self.done.insert(ticket, result);
        self.outside.insert(seq, Instant::now());
    }
}

#[derive(Default)]
struct Inner {
    /// A thread runs the steps (or waits to run the next one); see the module's notes.
    runner: bool,
    waiting: Vec<Waiting>,
    done: HashMap<u64, StepResult>,
    next_ticket: u64,
    next_seq: u64,
    /// Sequences joined but not waiting on a step, and since when.
    outside: HashMap<u64, Instant>,
    stats: BatchStats,
}

/// The batcher of one model part.
pub struct Batcher {
    inner: Mutex<Inner>,
    /// Where threads wait for their results, or for the runner's place to come free.
    turn: Condvar,
    /// Where the runner waits for the sequences between steps.
    lead: Condvar,
    step_tokens: usize,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batcher({} tokens a step)", self.step_tokens)
    }
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher::new(DEFAULT_STEP_TOKENS)
    }
}

/// A sequence's place in a batcher; leaving drops it from the count the runner waits for.
#[derive(Debug)]
pub struct Member<'a> {
    batcher: &'a Batcher,
    seq: u64,
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut inner = self.batcher.lock();
        inner.outside.remove(&self.seq);
        let last_away = inner.outside.is_empty();
        drop(inner);
        if last_away {
            self.batcher.lead.notify_one();
        }
    }
}

impl Member<'_> {
    /// Runs `job` in the next steps of `part` (taking turns on its device with `device`) and
    /// waits for its result.
    pub fn step(&self, part: &ModelPart, device: &TurnLock, job: Job) -> StepResult {
        self.batcher.step(self.seq, part, device, job)
    }
}

/// One picked job of a step: its index in `waiting` and its rows.
struct Pick {
    at: usize,
    rows: usize,
}

impl Batcher {
    /// A batcher whose steps take at most `step_tokens` rows beyond one per decoding sequence.
    pub fn new(step_tokens: usize) -> Batcher {
        Batcher {
            inner: Mutex::new(Inner::default()),
            turn: Condvar::new(),
            lead: Condvar::new(),
            step_tokens: step_tokens.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new sequence, younger than every one before it.
    pub fn join(&self) -> Member<'_> {
        let mut inner = self.lock();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        inner.outside.insert(seq, Instant::now());
        Member { batcher: self, seq }
    }

    /// Counters since the batcher started.
    pub fn stats(&self) -> BatchStats {
        self.lock().stats
    }

    fn step(&self, seq: u64, part: &ModelPart, device: &TurnLock, job: Job) -> StepResult {
        let mut inner = self.lock();
        inner.next_ticket += 1;
        let ticket = inner.next_ticket;
        inner.outside.remove(&seq);
        inner.waiting.push(Waiting { ticket, seq, job, offset: 0, outputs: Vec::new() });
        if inner.outside.is_empty() {
            // The runner may be waiting for this sequence alone.
            self.lead.notify_one();
        }
        let mut runner = false;
        loop {
            if let Some(result) = inner.done.remove(&ticket) {
                inner.outside.entry(seq).or_insert_with(Instant::now);
                if runner {
                    // The threads this step woke (it filed results under this same lock) find
                    // the runner's place free; one of them takes it.
                    inner.runner = false;
                }
                return result;
            }
            if !runner {
                if inner.runner || inner.waiting.is_empty() {
                    inner = self.turn.wait(inner).unwrap_or_else(std::sync::PoisonError::into_inner);
                    continue;
                }
                (inner.runner, runner) = (true, true);
            }
            // Wait for the sequences between steps, unless they have been away too long.
            let soonest = inner.outside.values().map(Instant::elapsed).filter(|&e| e < AWAY).max();
            if let Some(away) = soonest {
                inner = self.lead.wait_timeout(inner, AWAY - away).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                continue;
            }
            let everyone_here = inner.outside.is_empty();
            inner = self.run_step(inner, part, device, everyone_here);
            self.turn.notify_all();
        }
    }

    /// Picks a step's rows, runs them with the lock released, and files the results.
    fn run_step<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        part: &ModelPart,
        device: &TurnLock,
        everyone_here: bool,
    ) -> MutexGuard<'a, Inner> {
        let hidden = part.config.hidden_size;
        inner.waiting.sort_by_key(|w| (w.seq, w.ticket));
        let picks = self.pick(&mut inner, part, everyone_here);
        if picks.is_empty() {
            // Nothing fits now: wait for blocks to come back (a sequence finishing). Picking may
            // have refused or preempted some: their threads learn it now.
            self.turn.notify_all();
            return self.lead.wait_timeout(inner, RETRY).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        // Take the picked jobs out (highest index first, so the others keep theirs).
        let mut taken: Vec<(Waiting, usize)> = Vec::with_capacity(picks.len());
        let mut picks = picks;
        picks.sort_by_key(|p| std::cmp::Reverse(p.at));
        for p in picks {
            taken.push((inner.waiting.remove(p.at), p.rows));
        }
        taken.reverse();
        drop(inner);

        let started = Instant::now();
        let results = {
            let mut steps: Vec<BatchStep<'_>> = taken
                .iter_mut()
                .map(|(w, rows)| {
                    let range = w.offset..w.offset + *rows;
                    BatchStep {
                        cache: &mut w.job.cache,
                        input: w.job.input.slice(range, hidden),
                        logits_for: w.job.logits_for,
                    }
                })
                .collect();
            // A panic in a pass (a bug) fails its sequences, not every sequence after it.
            let pass = |steps: &mut [BatchStep<'_>]| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.run(|| part.forward_batch(steps))))
                    .unwrap_or_else(|_| {
                        Err(EngineError::Numerics("the forward pass failed (a panic: see the log)".into()))
                    })
            };
            match pass(&mut steps) {
                Ok(outs) => outs.into_iter().map(Ok).collect::<Vec<_>>(),
                // One bad step fails the pass and moves no sequence: run each alone, so that
                // only its own sequence fails.
                Err(_) if steps.len() > 1 => {
                    steps.iter_mut().map(|s| pass(std::slice::from_mut(s)).map(|mut o| o.remove(0))).collect()
                }
                Err(e) => vec![Err(e)],
            }
        };

        let took = started.elapsed();
        let mut inner = self.lock();
        inner.stats.steps += 1;
        let rows = taken.iter().map(|(_, r)| *r as u64).sum::<u64>();
        inner.stats.rows += rows;
        let decode = taken.iter().all(|(_, r)| *r == 1);
        inner.stats.time(taken.len(), rows, decode, took);
        for ((mut w, rows), result) in taken.into_iter().zip(results) {
            match result {
                Err(e) => {
                    inner.finish(w.ticket, w.seq, StepResult::Done(w.job.cache, Err(e)));
                }
                Ok(out) => {
                    w.offset += rows;
                    w.outputs.push(out);
                    if w.offset < w.job.input.rows(hidden) {
                        inner.waiting.push(w);
                    } else {
                        let out = joined(std::mem::take(&mut w.outputs), w.job.logits_for);
                        inner.finish(w.ticket, w.seq, StepResult::Done(w.job.cache, out));
                    }
                }
            }
        }
        inner
    }

    /// Chooses the step's rows (see the module's notes); preempts or refuses what must be.
    fn pick(&self, inner: &mut Inner, part: &ModelPart, everyone_here: bool) -> Vec<Pick> {
        let hidden = part.config.hidden_size;
        let kv = part.kv_pool().cloned();
        let available =
            |kv: &Option<std::sync::Arc<crate::cpu::kv::KvPool>>| kv.as_ref().map_or(usize::MAX, |kv| kv.available());
        let capacity = kv.as_ref().map_or(usize::MAX, |kv| kv.max_blocks());
        let remaining = |w: &Waiting| w.job.input.rows(hidden) - w.offset;

        // New sequences take what the prefix cache holds of them (here, where no step runs and
        // no other thread takes blocks, so that what is counted free stays free).
        for w in inner.waiting.iter_mut().filter(|w| w.job.reuse_prefix && w.offset == 0) {
            w.job.reuse_prefix = false;
            if let JobInput::Tokens(t) = &w.job.input {
                w.offset = w.job.cache.reuse_prefix(t);
            }
        }

        // Refuse what cannot fit even alone in an empty pool.
        let mut i = 0;
        while i < inner.waiting.len() {
            let w = &inner.waiting[i];
            let needed = w.job.cache.blocks_held() + w.job.cache.blocks_needed(remaining(w));
            if needed > capacity {
                let w = inner.waiting.remove(i);
                let err = EngineError::KvCacheTooSmall {
                    needed,
                    capacity,
                    block_tokens: BLOCK_TOKENS,
                    positions: w.job.cache.position + remaining(&w),
                };
                inner.finish(w.ticket, w.seq, StepResult::Done(w.job.cache, Err(err)));
            } else {
                i += 1;
            }
        }

        loop {
            if inner.waiting.is_empty() {
                return Vec::new();
            }
            let mut free = available(&kv);
            let mut picks = Vec::new();
            let mut rows = 0;
            let mut short = None;
            // Decoding sequences, oldest first.
            for (at, w) in inner.waiting.iter().enumerate() {
                if remaining(w) != 1 {
                    continue;
                }
                let need = w.job.cache.blocks_needed(1);
                if need > free {
                    short = Some(at);
                    break;
                }
                free -= need;
                rows += 1;
                picks.push(Pick { at, rows: 1 });
            }
            // Prompts, oldest first, up to the budget; a prompt starts only if all of it fits.
            if short.is_none() {
                for (at, w) in inner.waiting.iter().enumerate() {
                    let left = remaining(w);
                    if left == 1 {
                        continue;
                    }
                    let budget = self.step_tokens.saturating_sub(rows);
                    if budget == 0 {
                        break;
                    }
                    let need = w.job.cache.blocks_needed(left);
                    if need > free {
                        break;
                    }
                    free -= need;
                    let take = left.min(budget);
                    rows += take;
                    picks.push(Pick { at, rows: take });
                }
            }
            let stuck = picks.is_empty() && everyone_here;
            if short.is_none() && !stuck {
                return picks;
            }
            // Out of blocks: preempt the youngest sequence here that holds some.
            let victim = inner
                .waiting
                .iter()
                .enumerate()
                .rev()
                .find(|(_, w)| w.job.preemptible && w.job.cache.blocks_held() > 0)
                .map(|(at, _)| at)
                // Only a sequence as young as the one short of a block gives way.
                .filter(|&at| stuck || short.is_none_or(|s| at >= s));
            match victim {
                Some(at) => {
                    let mut w = inner.waiting.remove(at);
                    w.job.cache.clear();
                    inner.stats.preempted += 1;
                    inner.finish(w.ticket, w.seq, StepResult::Preempted(w.job.cache));
                }
                None if short.is_some() && !picks.is_empty() => {
                    // Those that fit go now; the one short waits for blocks to come back.
                    picks.truncate(picks.iter().position(|p| Some(p.at) == short).unwrap_or(picks.len()));
                    return picks;
                }
                None if stuck || (short.is_some() && everyone_here) => {
                    // No sequence here can be preempted. If one holds blocks (a pipeline stage's,
                    // fed hidden states), the youngest of them fails so that the others go on;
                    // else the blocks are held by a sequence just ending: wait for them.
                    let Some(at) = inner.waiting.iter().rposition(|w| w.job.cache.blocks_held() > 0) else {
                        return picks;
                    };
                    let w = inner.waiting.remove(at);
                    let needed = w.job.cache.blocks_needed(remaining(&w));
                    let err = EngineError::KvCacheFull { needed, free: available(&kv), block_tokens: BLOCK_TOKENS };
                    inner.finish(w.ticket, w.seq, StepResult::Done(w.job.cache, Err(err)));
                }
                None => return picks,
            }
        }
    }
}

/// A job's output from the outputs of its chunks.
fn joined(mut outs: Vec<StageOutput>, logits_for: LogitsFor) -> Result<StageOutput, EngineError> {
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    let (mut hidden, mut logits) = (Vec::new(), Vec::new());
    for o in outs {
        match o {
            StageOutput::Hidden(h) => hidden.push(h),
            StageOutput::Logits(l) => logits.push(l),
        }
    }
    if !hidden.is_empty() {
        return Ok(StageOutput::Hidden(Tensor::cat(&hidden, 1)?));
    }
    match logits_for {
        LogitsFor::All => Ok(StageOutput::Logits(Tensor::cat(&logits, 0)?)),
        LogitsFor::Last => {
            logits.pop().map(StageOutput::Logits).ok_or_else(|| EngineError::Numerics("a step gave no output".into()))
        }
    }
}
