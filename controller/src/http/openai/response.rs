//! OpenAI's answers: a whole completion, or a stream of server-sent chunks, each with its
//! log-probabilities when asked for — chat's `logprobs.content` entries, or the completions
//! API's `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists.

use std::convert::Infallible;

use axum::response::sse::Event;
use futures_util::{Stream, StreamExt};
use gantry_proto::v1 as pb;
use serde_json::{Value, json};
use tonic::Status;

use super::error::ApiError;
use super::request::{Endpoint, LogprobsWanted};

/// A token's bytes as OpenAI writes a token: its text, or, for bytes that are not whole UTF-8
/// characters, `bytes:\xNN…` (its `bytes` list has them exactly).
fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("bytes:{}", bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()),
    }
}

/// One token's chat `logprobs.content` entry.
fn chat_entry(t: &pb::TokenChunk) -> Value {
    let top: Vec<Value> = t
        .top_logprobs
        .iter()
        .map(|a| json!({"token": token_text(&a.token_bytes), "logprob": a.logprob, "bytes": a.token_bytes}))
        .collect();
    json!({"token": token_text(&t.token_bytes), "logprob": t.logprob, "bytes": t.token_bytes, "top_logprobs": top})
}

/// Log-probabilities gathered over a whole answer (or one chunk's worth).
#[derive(Debug, Default)]
pub struct Logprobs {
    /// Chat: the `content` entries.
    entries: Vec<Value>,
    /// Completions: the parallel lists.
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top: Vec<Value>,
    offsets: Vec<usize>,
    /// Text length so far (completions' `text_offset`).
    offset: usize,
}

impl Logprobs {
    /// Takes a token's chunk. Held-back text (no token) only advances the offset; an
    /// end-of-sequence token is no part of the answer, as in OpenAI's API.
    pub fn add(&mut self, t: &pb::TokenChunk) {
        if t.token_id.is_some() && !t.end_of_sequence {
            self.entries.push(chat_entry(t));
            self.tokens.push(token_text(&t.token_bytes));
            self.token_logprobs.push(t.logprob);
            let top: serde_json::Map<String, Value> =
                t.top_logprobs.iter().map(|a| (token_text(&a.token_bytes), json!(a.logprob))).collect();
            self.top.push(Value::Object(top));
            self.offsets.push(self.offset);
        }
        self.offset += t.text.len();
    }

    /// The `logprobs` object of a choice for `endpoint`.
    pub fn json(&self, endpoint: Endpoint) -> Value {
        match endpoint {
            Endpoint::Chat => json!({"content": self.entries, "refusal": null}),
            Endpoint::Completion => json!({
                "tokens": self.tokens,
                "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top,
                "text_offset": self.offsets,
            }),
        }
    }

    /// Starts afresh for the next chunk, keeping the text offset.
    fn next_chunk(&mut self) {
        let offset = self.offset;
        *self = Logprobs { offset, ..Logprobs::default() };
    }
}

pub fn finish_reason(done: &pb::GenerateDone) -> &'static str {
    match pb::FinishReason::try_from(done.finish_reason) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

pub fn usage_json(done: Option<&pb::GenerateDone>) -> Value {
    let u = done.and_then(|d| d.usage).unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The object name of a response or a chunk.
pub fn object(endpoint: Endpoint, chunk: bool) -> &'static str {
    match (endpoint, chunk) {
        (Endpoint::Chat, false) => "chat.completion",
        (Endpoint::Chat, true) => "chat.completion.chunk",
        (Endpoint::Completion, _) => "text_completion",
    }
}

/// A response's id.
pub fn id(endpoint: Endpoint, request_id: &str) -> String {
    match endpoint {
        Endpoint::Chat => format!("chatcmpl-{request_id}"),
        Endpoint::Completion => format!("cmpl-{request_id}"),
    }
}

/// A streamed choice carrying `text` (and the role, on a chat's first chunk).
fn delta(endpoint: Endpoint, text: &str, first: bool, finish: Option<&str>, logprobs: Value) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let delta = if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
        Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
    }
}

/// The one choice of a whole answer.
pub fn whole(endpoint: Endpoint, text: String, finish: &str, logprobs: Value) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": logprobs,
            "finish_reason": finish,
        }),
        Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
    }
}

pub type Events = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send + 'static>>;

/// A streamed answer being turned into server-sent events.
pub struct SseState {
    pub events: Events,
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub logprobs: Option<LogprobsWanted>,
    pub first: bool,
    pub ended: bool,
    pub gathered: Logprobs,
}

impl SseState {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Event {
        let mut v = json!({"id": self.id, "object": object(self.endpoint, true), "created": self.created,
                           "model": self.model, "choices": choices, "system_fingerprint": null});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    }

    /// The events for one worker event, and whether it was the last.
    fn render(&mut self, ev: Result<pb::GenerateEvent, Status>) -> (Vec<Event>, bool) {
        match ev {
            Err(s) => (vec![Event::default().data(ApiError::from(s).body().to_string())], true),
            Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(t)) }) => {
                let logprobs = match self.logprobs {
                    Some(_) if t.token_id.is_some() && !t.end_of_sequence => {
                        self.gathered.add(&t);
                        let v = self.gathered.json(self.endpoint);
                        self.gathered.next_chunk();
                        v
                    }
                    _ => {
                        self.gathered.offset += t.text.len();
                        Value::Null
                    }
                };
                (vec![self.chunk(json!([delta(self.endpoint, &t.text, self.first, None, logprobs)]), None)], false)
            }
            Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Done(d)) }) => {
                let finish = finish_reason(&d);
                let last = delta(self.endpoint, "", self.first, Some(finish), Value::Null);
                let mut out = vec![self.chunk(json!([last]), None)];
                if self.include_usage {
                    out.push(self.chunk(json!([]), Some(usage_json(Some(&d)))));
                }
                out.push(Event::default().data("[DONE]"));
                (out, true)
            }
            Ok(_) => (Vec::new(), false),
        }
    }
}

/// The worker's events as OpenAI chunks, then (when asked) a usage chunk, then `[DONE]`. A
/// failure mid-stream is sent as an `error` object and ends the stream.
pub fn sse_events(state: SseState) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        let ev = st.events.next().await?;
        let (out, last) = st.render(ev);
        st.first = false;
        st.ended = last;
        Some((futures_util::stream::iter(out.into_iter().map(Ok)), st))
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: u32, text: &str, bytes: &[u8], lp: f32, top: &[(u32, &[u8], f32)]) -> pb::TokenChunk {
        pb::TokenChunk {
            text: text.into(),
            token_id: Some(id),
            logprob: Some(lp),
            token_bytes: bytes.to_vec(),
            top_logprobs: top
                .iter()
                .map(|&(t, b, l)| pb::TopLogprob { token_id: t, token_bytes: b.to_vec(), logprob: l })
                .collect(),
            end_of_sequence: false,
        }
    }

    #[test]
    fn logprobs_take_openais_two_shapes() {
        let mut l = Logprobs::default();
        l.add(&chunk(1, " Paris", b" Paris", -0.25, &[(1, b" Paris", -0.25), (2, b" Lyon", -2.0)]));
        // A token holding half of a character: no text yet, bytes exact.
        l.add(&chunk(3, "", &[0xe2, 0x80], -1.5, &[]));
        l.add(&pb::TokenChunk { text: "\u{2019}".into(), ..Default::default() });
        // The end-of-sequence token is no part of the answer.
        l.add(&pb::TokenChunk { token_id: Some(2), logprob: Some(-0.1), end_of_sequence: true, ..Default::default() });
        let chat = l.json(Endpoint::Chat);
        assert_eq!(
            chat["content"][0],
            json!({"token": " Paris", "logprob": -0.25, "bytes": [32, 80, 97, 114, 105, 115],
            "top_logprobs": [{"token": " Paris", "logprob": -0.25, "bytes": [32, 80, 97, 114, 105, 115]},
                             {"token": " Lyon", "logprob": -2.0, "bytes": [32, 76, 121, 111, 110]}]})
        );
        assert_eq!(chat["content"][1]["token"], "bytes:\\xe2\\x80");
        assert_eq!(chat["content"].as_array().unwrap().len(), 2, "held-back text is not a token");
        let legacy = l.json(Endpoint::Completion);
        assert_eq!(legacy["tokens"], json!([" Paris", "bytes:\\xe2\\x80"]));
        assert_eq!(legacy["token_logprobs"], json!([-0.25, -1.5]));
        assert_eq!(legacy["top_logprobs"], json!([{" Paris": -0.25, " Lyon": -2.0}, {}]));
        assert_eq!(legacy["text_offset"], json!([0, 6]));
    }
}
