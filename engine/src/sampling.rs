//! Choosing the next token: greedy, or sampled with temperature, top-k, top-p and min-p, after
//! a logit bias and the repetition, presence and frequency penalties, from a seeded generator
//! so the same seed gives the same tokens. The settings are `gantry_core::SamplingParams`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use gantry_core::SamplingParams;

use crate::EngineError;

/// A token chosen, with its log-probability under the model's distribution (the raw logits,
/// before bias, penalties and temperature) and the most likely alternatives when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

impl Choice {
    /// A choice with nothing but its token.
    pub fn plain(token: u32) -> Choice {
        Choice { token, logprob: None, top: Vec::new() }
    }
}

/// Picks tokens from logits.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens an earlier run of the request generated (they count as generated).
    resumed: usize,
    /// Where the generated tokens start in the history, fixed at the first pick.
    generated_from: Option<usize>,
}

impl Sampler {
    /// A sampler for validated `params`.
    pub fn new(params: SamplingParams) -> Result<Sampler, EngineError> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Ok(Sampler { params, rng, resumed: 0, generated_from: None })
    }

    /// Skips the random draws an earlier run of the same request made for its first `tokens`
    /// tokens (one per token when sampling, none when greedy), so a request resumed after a
    /// lost worker draws what the first run would have drawn next; those tokens (the last
    /// `tokens` of the history at the first pick) count as generated for the penalties.
    pub fn resume_after(&mut self, tokens: usize) {
        self.resumed = tokens;
        if self.params.temperature != 0.0 {
            for _ in 0..tokens {
                let _: f64 = self.rng.random();
            }
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens of the sequence so far (prompt,
    /// then generated).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<Choice, EngineError> {
        if logits.is_empty() {
            return Err(EngineError::InvalidSampling("no logits to sample from".into()));
        }
        if logits.iter().any(|l| l.is_nan()) {
            return Err(EngineError::Numerics("the model produced NaN logits".into()));
        }
        let generated_from = *self.generated_from.get_or_insert(history.len().saturating_sub(self.resumed));
        let p = &self.params;
        let (logprob_of, top) = if p.logprobs || p.top_logprobs > 0 {
            let lse = log_sum_exp(logits);
            (Some(lse), top_logprobs(logits, lse, p.top_logprobs))
        } else {
            (None, Vec::new())
        };
        // The scores: the logits themselves unless a bias or a penalty changes them (a copy of
        // a 262,144-token vocabulary's logits per token is a megabyte).
        let adjusted = !p.logit_bias.is_empty() || p.repetition_penalty != 1.0 || p.penalises_generated();
        let owned;
        let scores: &[f32] = if adjusted {
            let mut scores = logits.to_vec();
            for &(t, bias) in &p.logit_bias {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s += bias;
                }
            }
            if p.repetition_penalty != 1.0 {
                let mut seen = vec![false; scores.len()];
                for &t in history {
                    if let Some(s) = seen.get_mut(t as usize) {
                        *s = true;
                    }
                }
                for (score, _) in scores.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                    *score = if *score > 0.0 { *score / p.repetition_penalty } else { *score * p.repetition_penalty };
                }
            }
            if p.penalises_generated() {
                let mut counts = std::collections::HashMap::<u32, u32>::new();
                for &t in history.get(generated_from..).unwrap_or_default() {
                    *counts.entry(t).or_default() += 1;
                }
                for (t, c) in counts {
                    if let Some(s) = scores.get_mut(t as usize) {
                        *s -= p.presence_penalty + c as f32 * p.frequency_penalty;
                    }
                }
            }
            owned = scores;
            &owned
        } else {
            logits
        };
        let (greedy, want_logprob) = (p.temperature == 0.0, p.logprobs);
        let token = if greedy { argmax(scores) } else { self.sample_distribution(scores) };
        let logprob = logprob_of.filter(|_| want_logprob).map(|lse| logits[token as usize] - lse);
        Ok(Choice { token, logprob, top })
    }

    /// A draw from the scores at the temperature, after top-k, top-p and min-p.
    ///
    /// The weights `e^((s − max) / T)` are computed for every candidate by [`weights`] (a
    /// branch-free `f32` exponential the compiler vectorises; the same bits on every CPU); only
    /// top-p needs candidates in order, and it ranks only the fewest best that can hold its
    /// share. Before, every token was ranked by a comparison sort and weighed by `f64::exp`:
    /// 5 ms a token for Gemma 3's 262,144-token vocabulary, longer than a 16-sequence decoding
    /// step spends on each (see `bench/sampling.rs`).
    fn sample_distribution(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let Some(max) = scores.iter().copied().max_by(f32::total_cmp) else { return 0 };
        if !max.is_finite() {
            // An infinite logit (only a model's) is certain; its weight would not be a number.
            return ranked(scores, 1)[0].0;
        }
        // Candidates and their weights: the best `top_k` ranked, or every token in id order.
        let ranked_already = p.top_k > 0 && p.top_k < scores.len();
        let (mut cand, mut w): (Vec<u32>, Vec<f32>) = if ranked_already {
            let best = ranked(scores, p.top_k);
            let s: Vec<f32> = best.iter().map(|c| c.1).collect();
            (best.into_iter().map(|c| c.0).collect(), weights(&s, max, p.temperature))
        } else {
            ((0..scores.len() as u32).collect(), weights(scores, max, p.temperature))
        };
        if p.top_p < 1.0 {
            let total = sum(&w);
            let share = f64::from(p.top_p) * total;
            // The smallest set of best tokens whose weights reach the share: all of it lies
            // among the tokens weighing at least `floor`, once those reach the share.
            let mut floor = if ranked_already { 0.0 } else { 1e-3 };
            let head: Vec<(u32, f32)> = loop {
                let (mut head, mut sum) = (Vec::new(), 0f64);
                for (&c, &x) in cand.iter().zip(&w) {
                    if x >= floor {
                        head.push((c, x));
                        sum += f64::from(x);
                    }
                }
                if sum >= share || floor == 0.0 {
                    break head;
                }
                floor = if floor > 1e-30 { floor * 1e-3 } else { 0.0 };
            };
            // Best first, by weight (ties by id).
            let head = rank(head, 0);
            let mut acc = 0.0;
            let keep = head
                .iter()
                .position(|&(_, x)| {
                    acc += f64::from(x) / total;
                    acc >= f64::from(p.top_p)
                })
                .map_or(head.len(), |i| i + 1);
            (cand, w) = head[..keep].iter().copied().unzip();
        }
        if p.min_p > 0.0 {
            // The best token weighs 1, so it stays.
            (cand, w) = cand.iter().zip(&w).filter(|&(_, &x)| x >= p.min_p).map(|(&c, &x)| (c, x)).unzip();
        }
        // The draw: a point in the candidates' total weight, found block by block, then
        // within its block.
        let blocks: Vec<f64> = w.chunks(DRAW_BLOCK).map(sum).collect();
        let mut r = self.rng.random::<f64>() * blocks.iter().sum::<f64>();
        for (b, &block) in blocks.iter().enumerate() {
            if r > block {
                r -= block;
                continue;
            }
            let at = b * DRAW_BLOCK;
            let mut last = None;
            for (&c, &x) in cand[at..].iter().zip(&w[at..]).take(DRAW_BLOCK) {
                if x > 0.0 {
                    last = Some(c);
                    r -= f64::from(x);
                    if r <= 0.0 {
                        return c;
                    }
                }
            }
            if let Some(c) = last {
                return c; // rounding left a sliver of the block
            }
        }
        // Rounding left a sliver of the whole: the last candidate with any weight.
        cand.iter().zip(&w).rev().find(|(_, x)| **x > 0.0).map_or(cand[0], |(&c, _)| c)
    }
}

/// Candidates per block of a draw (see `sample_distribution`).
const DRAW_BLOCK: usize = 1024;

/// The sum of `w` in `f64`, in eight interleaved partial sums added at the end in order: the
/// same bits on every CPU, and eight independent chains instead of one (a sum of a 262,144-token
/// vocabulary's weights in one chain waited on every addition).
fn sum(w: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f64::from(x);
        }
    }
    for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += f64::from(x);
    }
    lanes.iter().sum()
}

/// `e^((s − max) / t)` of each score, in `f32`: `2^k · p(r)` with `k` the nearest integer to
/// `x / ln 2`, `r = x − k ln 2` (in two parts, so it is exact to the last bits) and `p` the
/// degree-7 Taylor polynomial of `e^r` on `|r| ≤ ln 2 / 2` (relative error under 2e-7); 0 below
/// `x = −87`, where `f32` ends. Plain IEEE operations and no branches: the compiler vectorises
/// the loop, and every CPU gets the same bits.
fn weights(scores: &[f32], max: f32, t: f32) -> Vec<f32> {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355/512, near ln 2 with 9 bits: k × LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5 × 2^23: adding it rounds to an integer
    scores
        .iter()
        .map(|&s| {
            let x = ((s - max) / t).max(-87.0);
            let shifted = x * LOG2E + ROUND;
            let k = shifted - ROUND;
            let r = (x - k * LN2_HI) - k * LN2_LO;
            let p = 1.0
                + r * (1.0
                    + r * (0.5
                        + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
            // `shifted`'s bits are ROUND's plus k (its last place is 1): 2^k built from them.
            let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
            let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
            if x > -87.0 { p * scale } else { 0.0 }
        })
        .collect()
}

/// The candidates best first — by score, ties by id, a total order, so the list is the same
/// however it is found — and only the best `top_k` when that is set.
///
/// A whole vocabulary is ranked by a stable radix sort on the scores' bits (three passes over
/// the candidates, in id order, so equal scores keep id order) instead of comparisons (a
/// 49,152-token vocabulary sorted by comparisons took milliseconds a token, longer than a
/// decoding step); with `top_k`, the best `top_k` are selected first and only they are sorted.
pub fn ranked(scores: &[f32], top_k: usize) -> Vec<(u32, f32)> {
    rank(scores.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect(), top_k)
}

/// [`ranked`] of candidates given as (token, key), in token order.
fn rank(mut cand: Vec<(u32, f32)>, top_k: usize) -> Vec<(u32, f32)> {
    let best_first = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if top_k > 0 && top_k < cand.len() {
        cand.select_nth_unstable_by(top_k - 1, best_first);
        cand.truncate(top_k);
        cand.sort_unstable_by(best_first);
        return cand;
    }
    // A key whose ascending unsigned order is the scores' descending `total_cmp` order.
    let key = |s: f32| {
        let b = s.to_bits();
        !(if b >> 31 == 1 { !b } else { b | 0x8000_0000 })
    };
    const BITS: u32 = 11;
    let mut other = vec![(0u32, 0f32); cand.len()];
    for shift in [0, BITS, 2 * BITS] {
        let digit = |s: f32| ((key(s) >> shift) & ((1 << BITS) - 1)) as usize;
        let mut start = [0usize; 1 << BITS];
        for &(_, s) in &cand {
            start[digit(s)] += 1;
        }
        if start.contains(&cand.len()) {
            continue; // every candidate has this digit: the pass would move nothing
        }
        let mut at = 0;
        for slot in start.iter_mut() {
            (*slot, at) = (at, at + *slot);
        }
        for &c in &cand {
            let d = digit(c.1);
            other[start[d]] = c;
            start[d] += 1;
        }
        std::mem::swap(&mut cand, &mut other);
    }
    cand
}

fn argmax(xs: &[f32]) -> u32 {
    // The largest value, over sixteen lanes (the compiler vectorises it), then the first place
    // that holds it: the first of the largest, as one pass comparing one by one would give.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l = if x > *l { x } else { *l };
    }
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    xs.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// `log Σ exp(logits)`, in f64 for the sum.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln() as f32 + max
}

/// The `n` largest logits as (token, log-probability), best first (ties by token id).
fn top_logprobs(logits: &[f32], lse: f32, n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == n && best.last().is_some_and(|&(_, worst)| l <= worst) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (i as u32, l));
        best.truncate(n);
    }
    best.into_iter().map(|(t, l)| (t, l - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(params(|_| {})).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[]).unwrap().token, 1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.5;
                p.seed = Some(seed);
            }))
            .unwrap();
            (0..40).map(|_| s.sample(&logits, &[]).unwrap().token).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, 0.0];
        for p in [params(|p| (p.temperature, p.top_k) = (2.0, 1)), params(|p| (p.temperature, p.top_p) = (2.0, 1e-6))] {
            let mut s = Sampler::new(p).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]).unwrap().token, 1);
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // With min_p 0.5 only tokens at least half as likely as the best survive.
        let logits = [5.0, 4.9, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(params(|p| (p.temperature, p.min_p) = (1.0, 0.5))).unwrap();
        for _ in 0..100 {
            assert!(s.sample(&logits, &[]).unwrap().token <= 1);
        }
    }

    #[test]
    fn repetition_penalty_steers_away_from_seen_tokens() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0)).unwrap();
        assert_eq!(s.sample(&[3.0, 2.0], &[0]).unwrap().token, 1, "3/2 < 2");
        assert_eq!(s.sample(&[3.0, 2.0], &[]).unwrap().token, 0);
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let mut s = Sampler::new(params(|p| p.logprobs = true)).unwrap();
        let c = s.sample(&[0.0, 0.0], &[]).unwrap();
        assert!((c.logprob.unwrap() - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn invalid_values_are_refused_with_the_setting_named() {
        let err = Sampler::new(params(|p| p.temperature = -1.0)).unwrap_err().to_string();
        assert_eq!(err, "invalid sampling: temperature must be between 0 and 100, got -1");
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens_even_when_greedy() {
        let mut s = Sampler::new(params(|p| p.logit_bias = vec![(1, -100.0)])).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 2.9], &[]).unwrap().token, 2, "token 1 is banned");
        let mut s = Sampler::new(params(|p| (p.temperature, p.logit_bias) = (1.0, vec![(0, 100.0)]))).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.1, 3.0, 2.9], &[]).unwrap().token, 0, "token 0 is all but forced");
        }
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        // The prompt (5, 5, 5) holds token 1 nowhere; generated so far: 1, 1.
        let logits = [0.0, 3.0, 1.5];
        let history = [5, 5, 5];
        // Presence 1: token 1 loses 1 once it has appeared, whatever the count.
        let mut s = Sampler::new(params(|p| p.presence_penalty = 1.0)).unwrap();
        assert_eq!(s.sample(&logits, &history).unwrap().token, 1, "nothing generated yet");
        assert_eq!(s.sample(&logits, &[5, 5, 5, 1]).unwrap().token, 1, "3 - 1 = 2 > 1.5");
        assert_eq!(s.sample(&logits, &[5, 5, 5, 1, 1]).unwrap().token, 1, "still 2: presence counts once");
        // Frequency 0.8: each appearance costs 0.8, so two put it under token 2.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.8)).unwrap();
        assert_eq!(s.sample(&logits, &history).unwrap().token, 1);
        assert_eq!(s.sample(&logits, &[5, 5, 5, 1]).unwrap().token, 1, "3 - 0.8 = 2.2");
        assert_eq!(s.sample(&logits, &[5, 5, 5, 1, 1]).unwrap().token, 2, "3 - 1.6 = 1.4 < 1.5");
        // Prompt tokens never count: token 1 in the prompt only.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 2.0)).unwrap();
        assert_eq!(s.sample(&logits, &[1, 1, 1, 1]).unwrap().token, 1);
        // Resumed tokens count as generated: the last two of the history at the first pick.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.8)).unwrap();
        s.resume_after(2);
        assert_eq!(s.sample(&logits, &[5, 5, 5, 1, 1]).unwrap().token, 2);
    }

    #[test]
    fn top_logprobs_are_the_best_tokens_in_order_with_log_softmax_values() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.0];
        let mut s = Sampler::new(params(|p| (p.logprobs, p.top_logprobs) = (true, 3))).unwrap();
        let c = s.sample(&logits, &[]).unwrap();
        let lse = logits.iter().map(|l: &f32| f64::from(*l).exp()).sum::<f64>().ln() as f32;
        let tokens: Vec<u32> = c.top.iter().map(|t| t.0).collect();
        assert_eq!(tokens, [1, 3, 4], "best first, ties by id");
        for (t, lp) in &c.top {
            assert!((lp - (logits[*t as usize] - lse)).abs() < 1e-6);
        }
        assert_eq!((c.token, c.logprob), (1, Some(c.top[0].1)));
        // Without logprobs nothing is computed.
        let mut s = Sampler::new(params(|_| {})).unwrap();
        let c = s.sample(&logits, &[]).unwrap();
        assert_eq!((c.logprob, c.top.len()), (None, 0));
    }

    #[test]
    fn ranking_is_the_comparison_sort_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let by_sort = |scores: &[f32], top_k: usize| {
            let mut cand: Vec<(u32, f32)> = scores.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if top_k > 0 && top_k < cand.len() {
                cand.truncate(top_k);
            }
            cand
        };
        for case in 0..200 {
            let n = [1, 2, 7, 300, 5000, 49_152][case % 6];
            // Few distinct values (ties), special values, and a wide spread.
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..10) {
                    0 => [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE][rng.random_range(0..5)],
                    1..=3 => rng.random_range(-3..3) as f32 * 0.5,
                    _ => rng.random_range(-40.0f32..25.0),
                })
                .collect();
            for top_k in [0, 1, 40, n / 2, n, n + 1] {
                let (a, b) = (ranked(&scores, top_k), by_sort(&scores, top_k));
                let bits = |v: &[(u32, f32)]| v.iter().map(|&(i, s)| (i, s.to_bits())).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "case {case}, n {n}, top_k {top_k}");
            }
        }
    }

    #[test]
    fn weights_are_the_exponential_to_two_parts_in_ten_million() {
        assert_eq!(weights(&[3.5], 3.5, 0.7), [1.0], "the best weighs exactly 1");
        assert_eq!(weights(&[-100.0, -1e30], 0.0, 1.0), [0.0, 0.0], "past f32's end");
        let xs: Vec<f32> = (0..=870_000).map(|i| -(i as f32) / 10_000.0).collect();
        for (x, w) in xs.iter().zip(weights(&xs, 0.0, 1.0)) {
            let exact = f64::from(*x).exp();
            if *x > -87.0 {
                assert!(((f64::from(w) - exact) / exact).abs() < 2e-7, "e^{x}: {w} against {exact}");
            }
        }
    }

    #[test]
    fn sampled_tokens_follow_the_softmax_after_top_p_and_min_p() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, -3.0];
        let softmax = |kept: usize| {
            let e: Vec<f64> = logits[..kept].iter().map(|&l| f64::from(l).exp()).collect();
            let total: f64 = e.iter().sum();
            e.into_iter().map(|x| x / total).collect::<Vec<_>>()
        };
        // Probabilities of the five: 0.636, 0.234, 0.086, 0.032, 0.004. Top-p 0.8 keeps the
        // first two (0.87); min-p 0.1 those within a tenth of the best (the first three).
        for (p, kept) in [
            (params(|p| p.temperature = 1.0), 5),
            (params(|p| (p.temperature, p.top_p) = (1.0, 0.8)), 2),
            (params(|p| (p.temperature, p.min_p) = (1.0, 0.1)), 3),
        ] {
            let mut s = Sampler::new(p).unwrap();
            let mut count = [0usize; 5];
            let n = 40_000;
            for _ in 0..n {
                count[s.sample(&logits, &[]).unwrap().token as usize] += 1;
            }
            let want = softmax(kept);
            for (t, &c) in count.iter().enumerate() {
                let expected = want.get(t).copied().unwrap_or(0.0);
                let got = c as f64 / n as f64;
                assert!((got - expected).abs() < 0.01, "token {t}: {got} against {expected} (kept {kept})");
            }
        }
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_smallest_best_set() {
        // A Gemma-sized vocabulary with a model's kind of spread: few tokens far ahead.
        let mut rng = StdRng::seed_from_u64(9);
        let scores: Vec<f32> = (0..262_144)
            .map(|_| {
                let u: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                if rng.random::<f32>() < 0.001 { 18.0 + 4.0 * u } else { 5.0 * u }
            })
            .collect();
        for top_p in [0.5f32, 0.95, 0.9999] {
            // The set by ranking every token by its weight.
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w = weights(&scores, max, 0.8);
            let all = rank(w.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect(), 0);
            let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
            let mut acc = 0.0;
            let keep = all
                .iter()
                .position(|&(_, x)| {
                    acc += f64::from(x) / total;
                    acc >= f64::from(top_p)
                })
                .map_or(all.len(), |i| i + 1);
            let set: std::collections::HashSet<u32> = all[..keep].iter().map(|c| c.0).collect();
            let mut s = Sampler::new(params(|p| (p.temperature, p.top_p) = (0.8, top_p))).unwrap();
            let drawn: std::collections::HashSet<u32> =
                (0..400).map(|_| s.sample(&scores, &[]).unwrap().token).collect();
            assert!(drawn.is_subset(&set), "top_p {top_p}: drew outside the {keep} best");
            if keep > 1 {
                assert!(drawn.len() > 1, "top_p {top_p}: one token only of {keep}");
            }
        }
    }

    #[test]
    fn argmax_is_the_first_of_the_largest() {
        let one_by_one = |xs: &[f32]| {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut rng = StdRng::seed_from_u64(3);
        for n in [1, 2, 15, 16, 17, 100, 49_152] {
            for _ in 0..20 {
                let xs: Vec<f32> = (0..n)
                    .map(|_| match rng.random_range(0..6) {
                        0 => [0.0, -0.0, f32::NEG_INFINITY][rng.random_range(0..3)],
                        1 => rng.random_range(-2..3) as f32,
                        _ => rng.random_range(-30.0f32..30.0),
                    })
                    .collect();
                assert_eq!(argmax(&xs), one_by_one(&xs), "{n} values");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[-0.0, 0.0, 0.0]), 0);
    }

    #[test]
    fn nan_logits_are_an_error_not_a_token() {
        let mut s = Sampler::new(params(|_| {})).unwrap();
        assert!(s.sample(&[f32::NAN, 1.0], &[]).is_err());
    }
}
