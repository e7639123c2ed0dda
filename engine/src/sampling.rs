//! Choosing the next token: greedy, or sampled with temperature, top-k, top-p, min-p and a
//! repetition penalty, from a seeded generator so the same seed gives the same tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::EngineError;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher flattens the distribution.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `p` (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already in the sequence.
    pub repetition_penalty: f32,
    /// Seed of the sampler; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Stop before any of these strings; the text returned excludes it.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report the log-probability of each chosen token.
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: false,
        }
    }
}

/// Most stop strings accepted (OpenAI's limit is 4; a few more cost nothing).
pub const MAX_STOP_STRINGS: usize = 16;

impl SamplingParams {
    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: &str, why: String| Err(EngineError::InvalidSampling(format!("{what} {why}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad("temperature", format!("must be between 0 and 100, got {}", self.temperature));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !self.min_p.is_finite() || !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 || self.repetition_penalty > 10.0 {
            return bad("repetition_penalty", format!("must be in (0, 10], got {}", self.repetition_penalty));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad("stop", format!("has {} strings; at most {MAX_STOP_STRINGS}", self.stop.len()));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "strings must not be empty".into());
        }
        Ok(())
    }
}

/// A token chosen, with its log-probability under the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: Option<f32>,
}

/// Picks tokens from logits.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for validated `params`.
    pub fn new(params: SamplingParams) -> Result<Sampler, EngineError> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Ok(Sampler { params, rng })
    }

    /// Skips the random draws an earlier run of the same request made for its first `tokens`
    /// tokens (one per token when sampling, none when greedy), so a request resumed after a
    /// lost worker draws what the first run would have drawn next.
    pub fn resume_after(&mut self, tokens: usize) {
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

    /// Picks the next token from `logits` given the tokens of the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<Choice, EngineError> {
        if logits.is_empty() {
            return Err(EngineError::InvalidSampling("no logits to sample from".into()));
        }
        if logits.iter().any(|l| l.is_nan()) {
            return Err(EngineError::Numerics("the model produced NaN logits".into()));
        }
        let logprob = self.params.logprobs.then(|| log_softmax_at(logits));
        let p = &self.params;
        let mut scores = logits.to_vec();
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
        let token = if p.temperature == 0.0 { argmax(&scores) } else { self.sample_distribution(&scores) };
        Ok(Choice { token, logprob: logprob.map(|f| f(token)) })
    }

    fn sample_distribution(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        // Candidates sorted by score, best first (ties by id, for determinism).
        let mut cand: Vec<(u32, f32)> = scores.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        // Probabilities at the temperature.
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, s)| f64::from((s - max) / p.temperature).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|x| {
                acc += x;
                acc >= f64::from(p.top_p)
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            cand.truncate(keep);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            cand.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, x) in probs.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)[token]`, computed lazily for the chosen token.
fn log_softmax_at(logits: &[f32]) -> impl Fn(u32) -> f32 + '_ {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln() as f32 + max;
    move |t| logits.get(t as usize).map_or(f32::NEG_INFINITY, |l| l - lse)
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
    fn invalid_values_are_clear_errors() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(|p| p.temperature = f32::NAN), "temperature must be between 0 and 100, got NaN"),
            (params(|p| p.temperature = -1.0), "temperature must be between 0 and 100, got -1"),
            (params(|p| p.top_p = 1.5), "top_p must be in (0, 1], got 1.5"),
            (params(|p| p.top_p = 0.0), "top_p must be in (0, 1], got 0"),
            (params(|p| p.min_p = -0.1), "min_p must be in [0, 1]"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty must be in (0, 10]"),
            (params(|p| p.max_tokens = 0), "max_tokens must be at least 1"),
            (params(|p| p.stop = vec![String::new()]), "stop strings must not be empty"),
        ];
        for (p, want) in cases {
            let err = Sampler::new(p).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn nan_logits_are_an_error_not_a_token() {
        let mut s = Sampler::new(params(|_| {})).unwrap();
        assert!(s.sample(&[f32::NAN, 1.0], &[]).is_err());
    }
}
