//! Continuous batching on both real models: sequences stepped together give, token for token,
//! what each gives alone — beside 15 others, with their prompts split into chunks, resumed from
//! the prefix cache, or preempted and computed again under a tiny KV pool — and the pool's
//! blocks all come back.

#![allow(clippy::unwrap_used)]

mod support;

use std::ops::ControlFlow;
use std::sync::Arc;

use gantry_core::SamplingParams;
use gantry_engine::EngineError;
use gantry_engine::cpu::kv::{BLOCK_TOKENS, KvCounts};
use gantry_engine::files::ModelFiles;
use gantry_engine::generate::{FinishReason, generate_from};
use gantry_engine::model::Backend;
use gantry_engine::pipeline::{Chain, Segment, TurnLock};
use gantry_engine::tokenizer::Tokenizer;

const MODELS: [&str; 2] = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"];
const NEW_TOKENS: usize = 12;

struct Loaded {
    segment: Segment,
    tok: Tokenizer,
}

fn load(file: &str, step_tokens: usize) -> Loaded {
    load_on(file, step_tokens, &Backend::Cpu)
}

fn load_on(file: &str, step_tokens: usize, backend: &Backend) -> Loaded {
    let files = ModelFiles::open(&support::model_path(file)).unwrap();
    let part = files.load_part_on(0..files.config.num_layers, backend, &mut |_| {}).unwrap();
    Loaded { segment: Segment::new(part, Arc::new(TurnLock::default()), step_tokens), tok: files.tokenizer().unwrap() }
}

/// 16 prompts of different lengths (17 to ~150 tokens), the first four sharing a long opening.
fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    let shared = "You are a careful assistant. Answer in one short sentence, plainly, without lists. ".repeat(3);
    (0..16)
        .map(|i| {
            let text = if i < 4 {
                format!("{shared}Question {i}: what colour is the sky at noon?")
            } else {
                format!("{} Tell me about item number {i}.", "Cats sleep a lot during the day. ".repeat(1 + i % 5))
            };
            tok.encode(&text, true, false).unwrap()
        })
        .collect()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { max_tokens: n, ignore_eos: true, ..SamplingParams::default() }
}

/// Generates greedily from `prompt` as one sequence of `segment`'s batcher.
fn run(l: &Loaded, prompt: &[u32]) -> Result<Vec<u32>, EngineError> {
    run_n(l, prompt, NEW_TOKENS)
}

fn run_n(l: &Loaded, prompt: &[u32], n: usize) -> Result<Vec<u32>, EngineError> {
    let params = greedy(n);
    let mut chain = Chain::new(std::slice::from_ref(&l.segment), None, &params, 0)?;
    let s = generate_from(&mut chain, &l.tok, prompt, &[], &params, &[], &mut |_| ControlFlow::Continue(()))?;
    assert_eq!(s.finish_reason, FinishReason::Length);
    Ok(s.tokens)
}

/// Runs every prompt at once, a thread each.
fn run_all(l: &Loaded, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    run_all_n(l, prompts, NEW_TOKENS)
}

fn run_all_n(l: &Loaded, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts.iter().map(|p| scope.spawn(move || run_n(l, p, n).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn counts(l: &Loaded) -> KvCounts {
    l.segment.part.kv_pool().unwrap().counts()
}

#[test]
fn sixteen_sequences_stepped_together_give_each_its_tokens_alone() {
    for file in MODELS {
        // Steps of 32 prompt tokens: every prompt longer than that is split into chunks.
        let l = load(file, 32);
        let prompts = prompts(&l.tok);
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                // A fresh pool for each, so that no prefix is cached: every token computed.
                let fresh = load(file, 4096);
                run(&fresh, p).unwrap()
            })
            .collect();
        let before = l.segment.batcher.stats();
        let together = run_all(&l, &prompts);
        let stats = l.segment.batcher.stats();
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(t, a, "{file}: prompt {i} ({} tokens) beside 15 others", prompts[i].len());
        }
        let (steps, rows) = (stats.steps - before.steps, stats.rows - before.rows);
        eprintln!("{file}: {steps} steps, {rows} rows, {:.1} rows a step", rows as f64 / steps as f64);
        // One sequence alone takes (prompt chunks + 12) steps; together far fewer than the sum.
        let alone_steps: usize = prompts.iter().map(|p| p.len().div_ceil(32) + NEW_TOKENS - 1).sum();
        assert!((steps as usize) < alone_steps / 4, "{file}: {steps} steps for {alone_steps} sequence-steps");
        // Every row is timed in one speed bucket; passes of 9 to 16 sequences land in the 16s.
        let timed =
            |s: &gantry_engine::batch::BatchStats| s.speed.iter().map(|t| t.prefill_rows + t.decode_rows).sum::<u64>();
        assert_eq!(timed(&stats) - timed(&before), rows, "{file}");
        let (b, a) = (before.speed[4], stats.speed[4]);
        assert!(a.prefill_rows + a.decode_rows > b.prefill_rows + b.decode_rows, "{file}: {:?}", stats.speed);
        assert!(a.prefill_nanos + a.decode_nanos > b.prefill_nanos + b.decode_nanos, "{file}");
        // Every block is back: held only by the prefix cache now.
        assert_eq!(counts(&l).used, 0, "{file}");
        assert!(counts(&l).cached > 0, "{file}");
    }
}

#[test]
fn a_prompt_from_the_prefix_cache_gives_the_tokens_computed_afresh() {
    for file in MODELS {
        let l = load(file, 64);
        let kv = l.segment.part.kv_pool().unwrap().clone();
        let prompts = prompts(&l.tok);
        let cold = run(&l, &prompts[0]).unwrap();
        let (looked0, hit0) = kv.prefix_stats();
        // The same prompt again: all its full blocks but the last token's come from the cache.
        let warm = run(&l, &prompts[0]).unwrap();
        let (looked1, hit1) = kv.prefix_stats();
        assert_eq!(warm, cold, "{file}: the same prompt from the cache");
        assert_eq!(hit1 - hit0, ((prompts[0].len() - 1) / BLOCK_TOKENS) as u64, "{file}");
        assert_eq!(looked1 - looked0, hit1 - hit0, "{file}");
        // Another question after the same opening: the shared blocks come from the cache, and
        // its tokens are those of a fresh pool.
        let other = run(&l, &prompts[1]).unwrap();
        assert!(kv.prefix_stats().1 > hit1, "{file}: the shared opening was found");
        assert_eq!(other, run(&load(file, 64), &prompts[1]).unwrap(), "{file}: a shared prefix");
        // A multi-turn chat: the first turn's prompt and answer are a prefix of the second's.
        let mut second = prompts[0].clone();
        second.extend(&cold);
        second.extend(l.tok.encode(" Why is that so?", false, false).unwrap());
        let hits = kv.prefix_stats().1;
        assert_eq!(run(&l, &second).unwrap(), run(&load(file, 64), &second).unwrap(), "{file}: second turn");
        assert!(kv.prefix_stats().1 - hits >= (prompts[0].len() / BLOCK_TOKENS) as u64, "{file}: first turn reused");
    }
}

#[test]
fn a_tiny_pool_preempts_the_youngest_and_every_sequence_ends_with_its_own_tokens() {
    for file in MODELS {
        // Eight prompts with no common opening, 40 tokens each to generate: admitted by their
        // prompts' blocks, they outgrow the pool as they decode.
        let prompts: Vec<Vec<u32>> = prompts(&load(file, 16).tok).into_iter().skip(4).take(8).collect();
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| run_n(&load(file, 4096), p, 40).unwrap()).collect();
        let l = load(file, 16);
        let longest = prompts.iter().map(|p| (p.len() + 40).div_ceil(BLOCK_TOKENS)).max().unwrap();
        l.segment.part.kv_pool().unwrap().set_max_blocks(longest + 2);
        let together = run_all_n(&l, &prompts, 40);
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(t, a, "{file}: sequence {i} under a tiny pool");
        }
        let stats = l.segment.batcher.stats();
        eprintln!("{file}: {} preemptions", stats.preempted);
        assert!(stats.preempted > 0, "{file}: the pool was small enough to preempt");
        assert_eq!(counts(&l).used, 0, "{file}: every block came back");
    }
}

#[test]
fn a_prompt_longer_than_the_pool_is_refused_with_the_numbers() {
    let l = load(MODELS[0], 128);
    l.segment.part.kv_pool().unwrap().set_max_blocks(4);
    let prompt = l.tok.encode(&"Cats sleep a lot during the day. ".repeat(12), true, false).unwrap();
    assert!(prompt.len() > 4 * BLOCK_TOKENS);
    let err = run(&l, &prompt).unwrap_err();
    let blocks = prompt.len().div_ceil(BLOCK_TOKENS);
    assert_eq!(
        err.to_string(),
        format!(
            "the sequence needs {blocks} blocks of 16 positions ({} positions), more than the whole KV cache holds (4 blocks); give the model more KV memory (the worker's --parallel) or send a shorter prompt",
            prompt.len()
        )
    );
    assert_eq!(counts(&l).used, 0);
    // The pool still serves what fits.
    assert_eq!(run(&l, &prompt[..40]).unwrap().len(), NEW_TOKENS);
}

#[test]
fn a_sequence_dropped_mid_generation_gives_its_blocks_back() {
    let l = load(MODELS[0], 128);
    let prompt = prompts(&l.tok).remove(5);
    let params = greedy(40);
    let mut chain = Chain::new(std::slice::from_ref(&l.segment), None, &params, 0).unwrap();
    let mut seen = 0;
    let s = generate_from(&mut chain, &l.tok, &prompt, &[], &params, &[], &mut |_| {
        seen += 1;
        if seen == 5 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })
    .unwrap();
    assert_eq!(s.finish_reason, FinishReason::Cancelled);
    assert!(counts(&l).used > 0, "the sequence still holds its blocks");
    drop(chain);
    assert_eq!(counts(&l).used, 0);
}

#[test]
fn a_full_pool_reclaims_cached_prefixes_and_recomputes_them_exactly() {
    let l = load(MODELS[0], 128);
    let prompts = prompts(&l.tok);
    let first = run(&l, &prompts[0]).unwrap();
    let cached = counts(&l).cached;
    assert!(cached > 0);
    // A pool just big enough for one long sequence: the next prompt needs the cached room.
    let longest = prompts.iter().map(|p| (p.len() + NEW_TOKENS).div_ceil(BLOCK_TOKENS)).max().unwrap();
    l.segment.part.kv_pool().unwrap().set_max_blocks(longest);
    for p in &prompts[4..] {
        run(&l, p).unwrap();
    }
    let hits = l.segment.part.kv_pool().unwrap().prefix_stats().1;
    // The first prompt's blocks were reclaimed: it is computed again, to the same tokens.
    assert_eq!(run(&l, &prompts[0]).unwrap(), first);
    assert!(counts(&l).cached <= longest);
    let _ = hits;
}

/// The GPU path (Candle, here on the CPU standing in for a GPU) batches through the same
/// scheduler with its own paged store: sequences stepped together and a prompt from the prefix
/// cache give the tokens each gives alone; under a tiny pool the youngest are preempted, all
/// finish and every block comes back. (Candle's attention products are shaped by the chunk, so
/// a sequence recomputed in other chunks after a preemption is exact only up to rounding there:
/// `docs/src/engine.md`.)
#[test]
fn candle_stand_in_for_a_gpu_batches_pages_and_caches_prefixes() {
    let file = MODELS[0];
    let candle = Backend::Candle(candle_core::Device::Cpu);
    let l = load_on(file, 4096, &candle);
    let prompts: Vec<Vec<u32>> = prompts(&l.tok).into_iter().take(8).collect();
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| run(&load_on(file, 4096, &candle), p).unwrap()).collect();
    let together = run_all(&l, &prompts);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(t, a, "prompt {i} beside 7 others on Candle");
    }
    let stats = l.segment.batcher.stats();
    assert!(stats.rows > stats.steps, "steps held several rows: {stats:?}");
    assert_eq!(counts(&l).used, 0);
    assert!(counts(&l).cached > 0);
    // The first prompt again: its full blocks come from the prefix cache.
    let kv = l.segment.part.kv_pool().unwrap().clone();
    let hits = kv.prefix_stats().1;
    assert_eq!(run(&l, &prompts[0]).unwrap(), alone[0]);
    assert_eq!(kv.prefix_stats().1 - hits, ((prompts[0].len() - 1) / BLOCK_TOKENS) as u64);
    // A pool too small for all of them at once: the youngest are preempted and recomputed.
    // (Eight prompts with no common opening, 40 tokens each to generate: admitted by their
    // prompts' blocks, they outgrow the pool as they decode.)
    let tiny = load_on(file, 16, &candle);
    let prompts: Vec<Vec<u32>> = self::prompts(&tiny.tok).into_iter().skip(4).take(8).collect();
    let longest = prompts.iter().map(|p| (p.len() + 40).div_ceil(BLOCK_TOKENS)).max().unwrap();
    tiny.segment.part.kv_pool().unwrap().set_max_blocks(longest + 2);
    let squeezed = run_all_n(&tiny, &prompts, 40);
    assert!(squeezed.iter().all(|t| t.len() == 40));
    assert!(tiny.segment.batcher.stats().preempted > 0);
    assert_eq!(counts(&tiny).used, 0);
}
