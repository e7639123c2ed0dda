//! Sampling settings: how the next token is picked and when generation stops. One shape for
//! every layer — the gRPC API's `SamplingParams` converts to and from it (`gantry_proto`), the
//! controller checks requests and deployments' defaults with it, the engine samples with it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Most stop strings accepted (OpenAI's limit is 4; a few more cost nothing).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string accepted, in bytes: the held-back text a stream checks against them is
/// bounded by it (no stop string of a real chat is near this).
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Most alternatives reported per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most tokens a `logit_bias` may name (OpenAI's limit is 300).
pub const MAX_LOGIT_BIAS: usize = 1024;

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
    /// Divide positive logits (multiply negative ones) of tokens already in the sequence,
    /// prompt included (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`, -2 to 2; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit for each time it was generated (OpenAI's
    /// `frequency_penalty`, -2 to 2; 0 = off).
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before sampling (OpenAI's `logit_bias`, -100 to
    /// 100 each; -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
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
    /// Report this many most likely alternatives with their log-probabilities at each
    /// position (0 to 20).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// A sampling value out of range: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} {problem}")]
pub struct SamplingError {
    /// The setting's name as requests spell it (`temperature`, `top_p`, …).
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: String) -> Result<(), SamplingError> {
    Err(SamplingError { field, problem })
}

impl SamplingParams {
    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<(), SamplingError> {
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
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("must be between -2 and 2, got {v}"));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad("logit_bias", format!("names {} tokens; at most {MAX_LOGIT_BIAS}", self.logit_bias.len()));
        }
        if let Some((token, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite() || !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", format!("for token {token} must be between -100 and 100, got {b}"));
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
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return bad("stop", format!("has a string of {} bytes; at most {MAX_STOP_STRING_BYTES}", long.len()));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad("top_logprobs", format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs));
        }
        Ok(())
    }

    /// Whether any setting reads the tokens generated so far (penalties) — the sampler then
    /// keeps their counts.
    pub fn penalises_generated(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Checks that every token `logit_bias` names is in a vocabulary of `vocab` tokens.
    pub fn check_vocabulary(&self, vocab: usize) -> Result<(), SamplingError> {
        match self.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            Some((t, _)) => bad("logit_bias", format!("names token {t}, outside the model's {vocab}-token vocabulary")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn defaults_are_valid_and_greedy() {
        let p = SamplingParams::default();
        assert_eq!(p.validate(), Ok(()));
        assert_eq!((p.temperature, p.max_tokens, p.penalises_generated()), (0.0, DEFAULT_MAX_TOKENS, false));
    }

    #[test]
    fn each_bad_value_is_named_with_its_range() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(|p| p.temperature = f32::NAN), "temperature must be between 0 and 100, got NaN"),
            (params(|p| p.temperature = -1.0), "temperature must be between 0 and 100, got -1"),
            (params(|p| p.top_p = 1.5), "top_p must be in (0, 1], got 1.5"),
            (params(|p| p.top_p = 0.0), "top_p must be in (0, 1], got 0"),
            (params(|p| p.min_p = -0.1), "min_p must be in [0, 1], got -0.1"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty must be in (0, 10], got 0"),
            (params(|p| p.presence_penalty = 2.5), "presence_penalty must be between -2 and 2, got 2.5"),
            (params(|p| p.frequency_penalty = f32::INFINITY), "frequency_penalty must be between -2 and 2, got inf"),
            (
                params(|p| p.logit_bias = vec![(7, 101.0)]),
                "logit_bias for token 7 must be between -100 and 100, got 101",
            ),
            (params(|p| p.max_tokens = 0), "max_tokens must be at least 1"),
            (params(|p| p.stop = vec![String::new()]), "stop strings must not be empty"),
            (params(|p| p.stop = vec!["x".into(); 17]), "stop has 17 strings; at most 16"),
            (params(|p| p.stop = vec!["\n".into(), "y".repeat(257)]), "stop has a string of 257 bytes; at most 256"),
            (params(|p| p.top_logprobs = 21), "top_logprobs must be between 0 and 20, got 21"),
        ];
        for (p, want) in cases {
            assert_eq!(p.validate().map_err(|e| e.to_string()), Err(want.to_string()));
        }
    }

    #[test]
    fn logit_bias_tokens_must_be_in_the_vocabulary() {
        let p = params(|p| p.logit_bias = vec![(3, 1.0), (49_152, -100.0)]);
        assert_eq!(p.check_vocabulary(49_153), Ok(()));
        let e = p.check_vocabulary(49_152).unwrap_err();
        assert_eq!(e.to_string(), "logit_bias names token 49152, outside the model's 49152-token vocabulary");
    }
}
