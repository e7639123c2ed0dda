//! Reading OpenAI requests: every field is either done, accepted when it asks for nothing
//! (`tools: []`, `response_format: {"type": "text"}`), or refused with a 400 naming it — never
//! silently ignored; then the sampling fields as Gantry's, checked where OpenAI's ranges are
//! narrower than Gantry's.

use std::collections::HashMap;

use axum::body::Bytes;
use gantry_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What Gantry makes of a request field.
enum Field {
    /// Done as OpenAI documents it.
    Done,
    /// Accepted when its value asks for nothing (the test); refused otherwise, saying why.
    OnlyOff(fn(&Value) -> bool, &'static str),
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_empty(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty) || v.as_str() == Some("")
}

fn is_none_choice(v: &Value) -> bool {
    v.as_str() == Some("none")
}

fn is_text_format(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("text")
}

fn is_text_only(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

fn is_default_tier(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "default"))
}

fn is_one(v: &Value) -> bool {
    v.as_i64() == Some(1)
}

const NO_TOOLS: &str = "Gantry does not call tools or functions; send the conversation without them";

/// The fields an endpoint knows. Anything else is refused as OpenAI refuses an unknown one.
fn field(endpoint: Endpoint, name: &str) -> Option<Field> {
    use Field::*;
    let common = match name {
        "model" | "temperature" | "top_p" | "max_tokens" | "stop" | "seed" | "n" | "stream" | "stream_options"
        | "logprobs" | "presence_penalty" | "frequency_penalty" | "logit_bias" | "user" => Some(Done),
        _ => None,
    };
    if common.is_some() {
        return common;
    }
    match (endpoint, name) {
        (Endpoint::Chat, "messages" | "max_completion_tokens" | "top_logprobs") => Some(Done),
        (Endpoint::Chat, "tools" | "functions") => Some(OnlyOff(is_empty, NO_TOOLS)),
        (Endpoint::Chat, "tool_choice" | "function_call") => Some(OnlyOff(is_none_choice, NO_TOOLS)),
        (Endpoint::Chat, "parallel_tool_calls") => Some(OnlyOff(is_false, NO_TOOLS)),
        (Endpoint::Chat, "response_format") => Some(OnlyOff(
            is_text_format,
            "Gantry generates free text only: JSON mode and JSON schemas are not enforced; use {\"type\": \"text\"}",
        )),
        (Endpoint::Chat, "modalities") => Some(OnlyOff(is_text_only, "Gantry's models answer in text only")),
        (Endpoint::Chat, "audio") => Some(OnlyOff(|_| false, "Gantry's models answer in text only")),
        (Endpoint::Chat, "prediction") => Some(OnlyOff(|_| false, "predicted outputs are not supported")),
        (Endpoint::Chat, "web_search_options") => Some(OnlyOff(|_| false, "Gantry does not search the web")),
        (Endpoint::Chat, "reasoning_effort" | "verbosity") => {
            Some(OnlyOff(|_| false, "Gantry's models take no reasoning or verbosity setting"))
        }
        (Endpoint::Chat, "store") => Some(OnlyOff(is_false, "Gantry does not store completions")),
        (Endpoint::Chat, "metadata") => {
            Some(OnlyOff(is_empty, "Gantry does not store completions, so keeps no metadata"))
        }
        (Endpoint::Chat, "service_tier") => {
            Some(OnlyOff(is_default_tier, "Gantry has one service tier: use auto or default"))
        }
        (Endpoint::Completion, "prompt") => Some(Done),
        (Endpoint::Completion, "echo") => Some(OnlyOff(is_false, "echoing the prompt is not supported")),
        (Endpoint::Completion, "best_of") => Some(OnlyOff(is_one, "only one completion per request (best_of = 1)")),
        (Endpoint::Completion, "suffix") => Some(OnlyOff(is_empty, "insertion (a suffix) is not supported")),
        _ => None,
    }
}

/// Checks every field of a request body against what `endpoint` does. `null` is as absent.
pub fn check_fields(endpoint: Endpoint, body: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in body {
        if value.is_null() {
            continue;
        }
        match field(endpoint, name) {
            Some(Field::Done) => {}
            Some(Field::OnlyOff(off, why)) if !off(value) => {
                return Err(ApiError::unsupported(name, format!("`{name}` is not supported: {why}")));
            }
            Some(Field::OnlyOff(..)) => {}
            None => {
                return Err(ApiError::unsupported(name, format!("Unrecognized request argument supplied: {name}")));
            }
        }
    }
    Ok(())
}

/// A chat message's content: a string, or a list of parts of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `logprobs`: a boolean for chat, a count of alternatives (0 to 5) for completions.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Logprobs {
    Flag(bool),
    Count(i64),
}

/// What both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: String,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    logprobs: Option<Logprobs>,
    top_logprobs: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<HashMap<String, f64>>,
    /// The end user: the session a request belongs to, unless `X-Session-Id` names one.
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatBody {
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
}

/// A completion's prompt: one string (a list of one string is accepted too).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    pub prompt: Option<Prompt>,
    #[serde(flatten)]
    pub common: Common,
}

/// Parses a JSON body for `endpoint`: an object whose every field Gantry does, or a 400.
pub fn parse<T: for<'de> Deserialize<'de>>(endpoint: Endpoint, body: &Bytes) -> Result<T, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::invalid(None, format!("the request body is not valid: {e}"));
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::invalid(None, "the request body is not valid: expected a JSON object"));
    };
    check_fields(endpoint, fields)?;
    serde_json::from_value(value).map_err(invalid)
}

/// How many alternatives per token to report, if log-probabilities were asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsWanted {
    pub top: u32,
}

/// OpenAI's sampling fields as Gantry's, checked where OpenAI's ranges are narrower, and
/// whether log-probabilities were asked for. Unset `temperature` is 1, as OpenAI's API defines it.
pub fn sampling(endpoint: Endpoint, c: &Common) -> Result<(pb::SamplingParams, Option<LogprobsWanted>), ApiError> {
    if c.model.trim().is_empty() {
        return Err(ApiError::invalid(Some("model"), "you must provide a model parameter"));
    }
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::invalid(Some("n"), format!("n = {n}: only one choice per request (n = 1) is supported")));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature {temperature} is out of range: use 0 to 2"),
        ));
    }
    if let Some(p) = c.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid(Some("top_p"), format!("top_p {p} is out of range: use a value in (0, 1]")));
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => None,
        Some(m) if (1..=i64::from(u32::MAX)).contains(&m) => Some(m as u32),
        Some(m) => return Err(ApiError::invalid(Some("max_tokens"), format!("max_tokens {m}: use at least 1"))),
    };
    let seed = match c.seed {
        None => None,
        Some(s) if s >= 0 => Some(s as u64),
        Some(s) => return Err(ApiError::invalid(Some("seed"), format!("seed {s}: use a non-negative integer"))),
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(v)) => {
            return Err(ApiError::invalid(Some("stop"), format!("{} stop sequences: at most 4", v.len())));
        }
    };
    let penalty = |name: &'static str, v: Option<f64>| match v {
        None => Ok(None),
        Some(p) if (-2.0..=2.0).contains(&p) => Ok(Some(p as f32)),
        Some(p) => Err(ApiError::invalid(Some(name), format!("{name} {p} is out of range: use -2 to 2"))),
    };
    let presence_penalty = penalty("presence_penalty", c.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", c.frequency_penalty)?;
    let mut logit_bias = HashMap::new();
    for (token, &bias) in c.logit_bias.iter().flatten() {
        let id: u32 = token.parse().map_err(|_| {
            ApiError::invalid(Some("logit_bias"), format!("logit_bias key `{token}` is not a token id"))
        })?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::invalid(
                Some("logit_bias"),
                format!("logit_bias {bias} for token {id}: use -100 to 100"),
            ));
        }
        logit_bias.insert(id, bias as f32);
    }
    let logprobs = logprobs_wanted(endpoint, c)?;
    let params = pb::SamplingParams {
        temperature: Some(temperature as f32),
        top_p: c.top_p.map(|p| p as f32),
        seed,
        max_tokens,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        presence_penalty,
        frequency_penalty,
        logit_bias,
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.map_or(0, |l| l.top),
        ..Default::default()
    };
    Ok((params, logprobs))
}

/// Chat: `logprobs: true` and `top_logprobs` 0 to 20 (which needs `logprobs`); completions:
/// `logprobs` 0 to 5 alternatives.
fn logprobs_wanted(endpoint: Endpoint, c: &Common) -> Result<Option<LogprobsWanted>, ApiError> {
    match endpoint {
        Endpoint::Chat => {
            let on = match c.logprobs {
                None | Some(Logprobs::Flag(false)) => false,
                Some(Logprobs::Flag(true)) => true,
                Some(Logprobs::Count(_)) => {
                    return Err(ApiError::invalid(Some("logprobs"), "logprobs is true or false for chat completions"));
                }
            };
            let top = match c.top_logprobs {
                None => 0,
                Some(_) if !on => {
                    return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs set to true"));
                }
                Some(n @ 0..=20) => n as u32,
                Some(n) => {
                    return Err(ApiError::invalid(Some("top_logprobs"), format!("top_logprobs {n}: use 0 to 20")));
                }
            };
            Ok(on.then_some(LogprobsWanted { top }))
        }
        Endpoint::Completion => match c.logprobs {
            None => Ok(None),
            Some(Logprobs::Count(n @ 0..=5)) => Ok(Some(LogprobsWanted { top: n as u32 })),
            Some(Logprobs::Count(n)) => Err(ApiError::invalid(Some("logprobs"), format!("logprobs {n}: use 0 to 5"))),
            Some(Logprobs::Flag(_)) => Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs is a number of alternatives (0 to 5) for completions",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use super::*;

    fn common(v: Value) -> Common {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn openai_sampling_fields_map_and_are_checked() {
        let (p, l) =
            sampling(Endpoint::Chat, &common(json!({"model": "m", "max_tokens": 7, "stop": "\n", "seed": 3}))).unwrap();
        assert_eq!(
            (p.temperature, p.max_tokens, p.seed, p.stop.clone(), l),
            (Some(1.0), Some(7), Some(3), vec!["\n".into()], None)
        );
        let body = json!({"model": "m", "temperature": 0, "max_completion_tokens": 5, "presence_penalty": 0.5,
                          "frequency_penalty": -1, "logit_bias": {"42": -100}, "logprobs": true, "top_logprobs": 3});
        let (p, l) = sampling(Endpoint::Chat, &common(body)).unwrap();
        assert_eq!(
            (p.temperature, p.max_tokens, p.presence_penalty, p.frequency_penalty),
            (Some(0.0), Some(5), Some(0.5), Some(-1.0))
        );
        assert_eq!(
            (p.logit_bias.get(&42).copied(), p.logprobs, p.top_logprobs, l),
            (Some(-100.0), true, 3, Some(LogprobsWanted { top: 3 }))
        );
        let (p, l) = sampling(Endpoint::Completion, &common(json!({"model": "m", "logprobs": 2}))).unwrap();
        assert_eq!((p.logprobs, p.top_logprobs, l), (true, 2, Some(LogprobsWanted { top: 2 })));
        let bad = [
            (Endpoint::Chat, json!({"model": ""}), "you must provide a model parameter"),
            (Endpoint::Chat, json!({"model": "m", "n": 2}), "n = 2: only one choice"),
            (Endpoint::Chat, json!({"model": "m", "temperature": 2.5}), "temperature 2.5 is out of range"),
            (Endpoint::Chat, json!({"model": "m", "top_p": 0}), "top_p 0 is out of range"),
            (Endpoint::Chat, json!({"model": "m", "max_tokens": 0}), "max_tokens 0: use at least 1"),
            (Endpoint::Chat, json!({"model": "m", "seed": -1}), "seed -1"),
            (Endpoint::Chat, json!({"model": "m", "stop": ["a", "b", "c", "d", "e"]}), "5 stop sequences: at most 4"),
            (
                Endpoint::Chat,
                json!({"model": "m", "presence_penalty": 2.5}),
                "presence_penalty 2.5 is out of range: use -2 to 2",
            ),
            (Endpoint::Chat, json!({"model": "m", "frequency_penalty": -3}), "frequency_penalty -3 is out of range"),
            (Endpoint::Chat, json!({"model": "m", "logit_bias": {"x": 1}}), "logit_bias key `x` is not a token id"),
            (
                Endpoint::Chat,
                json!({"model": "m", "logit_bias": {"5": 101}}),
                "logit_bias 101 for token 5: use -100 to 100",
            ),
            (Endpoint::Chat, json!({"model": "m", "top_logprobs": 2}), "top_logprobs needs logprobs set to true"),
            (
                Endpoint::Chat,
                json!({"model": "m", "logprobs": true, "top_logprobs": 21}),
                "top_logprobs 21: use 0 to 20",
            ),
            (Endpoint::Completion, json!({"model": "m", "logprobs": 6}), "logprobs 6: use 0 to 5"),
        ];
        for (endpoint, body, want) in bad {
            let e = sampling(endpoint, &common(body)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(want), "{}", e.message);
        }
    }

    #[test]
    fn fields_gantry_does_not_do_are_refused_by_name_unless_they_ask_for_nothing() {
        let check = |endpoint, v: Value| check_fields(endpoint, v.as_object().unwrap());
        // Asking for nothing is fine, and null is absent.
        let fine = json!({"model": "m", "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                          "modalities": ["text"], "store": false, "service_tier": "auto", "user": "u1", "audio": null});
        assert!(check(Endpoint::Chat, fine).is_ok());
        assert!(check(Endpoint::Completion, json!({"prompt": "x", "echo": false, "best_of": 1, "suffix": ""})).is_ok());
        let refused = [
            (
                Endpoint::Chat,
                json!({"tools": [{"type": "function"}]}),
                "tools",
                "`tools` is not supported: Gantry does not call tools",
            ),
            (Endpoint::Chat, json!({"tool_choice": "auto"}), "tool_choice", "`tool_choice` is not supported"),
            (Endpoint::Chat, json!({"response_format": {"type": "json_object"}}), "response_format", "JSON mode"),
            (Endpoint::Chat, json!({"audio": {"voice": "x"}}), "audio", "text only"),
            (Endpoint::Chat, json!({"store": true}), "store", "does not store"),
            (
                Endpoint::Chat,
                json!({"frobnicate": 1}),
                "frobnicate",
                "Unrecognized request argument supplied: frobnicate",
            ),
            (Endpoint::Chat, json!({"prompt": "x"}), "prompt", "Unrecognized request argument supplied: prompt"),
            (Endpoint::Completion, json!({"echo": true}), "echo", "echoing the prompt"),
            (Endpoint::Completion, json!({"suffix": "end"}), "suffix", "insertion"),
            (
                Endpoint::Completion,
                json!({"messages": []}),
                "messages",
                "Unrecognized request argument supplied: messages",
            ),
        ];
        for (endpoint, body, param, want) in refused {
            let e = check(endpoint, body).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref(), e.code),
                (StatusCode::BAD_REQUEST, Some(param), Some("unsupported_parameter"))
            );
            assert!(e.message.contains(want), "{}", e.message);
        }
    }
}
