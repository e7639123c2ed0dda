//! The OpenAI-compatible HTTP API on the controller: `POST /v1/chat/completions` and
//! `POST /v1/completions`, streamed as server-sent events or answered whole, routed to a
//! ready replica exactly as the gRPC `Inference` service routes, with errors in OpenAI's JSON
//! shape and status codes.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::{Stream, StreamExt};
use gantry_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::api::Api;

/// The OpenAI routes over `api`.
pub fn routes(api: Api) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// The largest request body taken: room for a prompt filling a 1M-token context.
pub const MAX_BODY: usize = 8 << 20;

/// The body, or the reason it could not be read (too large: 413) in OpenAI's shape.
fn body_bytes(body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {} MiB", MAX_BODY >> 20)
        } else {
            format!("the request body could not be read: {e}")
        };
        ApiError { status, kind: "invalid_request_error", code: None, param: None, message }
    })
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> ApiError {
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found")),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key")),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "invalid_request_error", None),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None),
            Code::FailedPrecondition => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", None),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError { status, kind, code, param: None, message: s.message().to_string() }
    }
}

/// A chat message's content: a string, or a list of parts of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What both endpoints share.
#[derive(Debug, Default, Deserialize)]
struct Common {
    #[serde(default)]
    model: String,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

/// A completion's prompt: one string (a list of one string is accepted too).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Option<Prompt>,
    #[serde(flatten)]
    common: Common,
}

/// Parses a JSON body, answering OpenAI-style when it is not valid.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(None, format!("the request body is not valid: {e}")))
}

/// OpenAI's sampling fields as Gantry's, checked where OpenAI's ranges are narrower.
/// Unset `temperature` is 1, as OpenAI's API defines it.
fn sampling(c: &Common) -> Result<pb::SamplingParams, ApiError> {
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
    Ok(pb::SamplingParams {
        temperature: Some(temperature as f32),
        top_p: c.top_p.map(|p| p as f32),
        seed,
        max_tokens,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        ..Default::default()
    })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn finish_reason(done: &pb::GenerateDone) -> &'static str {
    match pb::FinishReason::try_from(done.finish_reason) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

fn usage_json(done: Option<&pb::GenerateDone>) -> Value {
    let u = done.and_then(|d| d.usage).unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Which endpoint a response is for: the object names and where the text goes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn id(self, request_id: &str) -> String {
        match self {
            Kind::Chat => format!("chatcmpl-{request_id}"),
            Kind::Completion => format!("cmpl-{request_id}"),
        }
    }

    /// A streamed choice carrying `text` (and the role, on a chat's first chunk).
    fn delta(self, text: &str, first: bool, finish: Option<&str>) -> Value {
        match self {
            Kind::Chat => {
                let delta =
                    if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        }
    }

    /// The one choice of a whole answer.
    fn whole(self, text: String, finish: &str) -> Value {
        match self {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        }
    }
}

/// Runs a request: a stream of server-sent events or one JSON answer.
async fn run(
    api: Api,
    kind: Kind,
    common: Common,
    input: pb::generate_request::Input,
    sampling: pb::SamplingParams,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // The caller's `X-Request-Id` (printable, bounded) names the request in every log line.
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map_or_else(Api::new_request_id, str::to_string);
    let model = common.model.trim().to_string();
    // Opened before answering, so an unknown model or a missing replica is a plain HTTP error.
    let events = api.open_stream(&model, input, Some(sampling), request_id.clone(), None).await?;
    let id = kind.id(&request_id);
    let created = unix_now();
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        let state = SseState { events, kind, id, created, model, include_usage, first: true, ended: false };
        let stream = sse_events(state);
        return Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response());
    }
    let mut text = String::new();
    let mut done = None;
    let mut events = events;
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(pb::generate_event::Event::Token(t)) => text.push_str(&t.text),
            Some(pb::generate_event::Event::Done(d)) => done = Some(d),
            None => {}
        }
    }
    let finish = done.as_ref().map_or("stop", finish_reason);
    Ok(Json(json!({
        "id": id,
        "object": kind.object(false),
        "created": created,
        "model": model,
        "choices": [kind.whole(text, finish)],
        "usage": usage_json(done.as_ref()),
        "system_fingerprint": null,
    }))
    .into_response())
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send + 'static>>;

/// A streamed answer being turned into server-sent events.
struct SseState {
    events: Events,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    first: bool,
    ended: bool,
}

impl SseState {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Event {
        let mut v = json!({"id": self.id, "object": self.kind.object(true), "created": self.created,
                           "model": self.model, "choices": choices, "system_fingerprint": null});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    }

    /// The events for one worker event, and whether it was the last.
    fn render(&self, ev: Result<pb::GenerateEvent, Status>) -> (Vec<Event>, bool) {
        match ev {
            Err(s) => (vec![Event::default().data(ApiError::from(s).body().to_string())], true),
            Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(t)) }) => {
                (vec![self.chunk(json!([self.kind.delta(&t.text, self.first, None)]), None)], false)
            }
            Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Done(d)) }) => {
                let finish = finish_reason(&d);
                let mut out = vec![self.chunk(json!([self.kind.delta("", self.first, Some(finish))]), None)];
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
fn sse_events(state: SseState) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
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

async fn chat_completions(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body: ChatBody = parse(&body_bytes(body)?)?;
    let sampling = sampling(&body.common)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages is empty: give at least one message"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        let role = m.role.trim().to_ascii_lowercase();
        let role = match role.as_str() {
            "system" | "user" | "assistant" => role,
            // OpenAI's newer name for system instructions.
            "developer" => "system".into(),
            other => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("unknown role `{other}`: use system, developer, user or assistant"),
                ));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(ApiError::invalid(
                        Some("messages"),
                        format!("content part of type `{}`: only text is supported", p.kind),
                    ));
                }
                parts.into_iter().map(|p| p.text).collect::<Vec<_>>().join("")
            }
        };
        messages.push(pb::ChatMessage { role, content });
    }
    let input = pb::generate_request::Input::Chat(pb::Conversation { messages });
    run(api, Kind::Chat, body.common, input, sampling, &headers).await
}

async fn completions(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CompletionBody = parse(&body_bytes(body)?)?;
    let sampling = sampling(&body.common)?;
    let prompt = match body.prompt {
        Some(Prompt::One(p)) => p,
        Some(Prompt::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(Prompt::Many(v)) => {
            return Err(ApiError::invalid(Some("prompt"), format!("{} prompts: send one prompt per request", v.len())));
        }
        None => return Err(ApiError::invalid(Some("prompt"), "prompt is missing")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "prompt is empty"));
    }
    run(api, Kind::Completion, body.common, pb::generate_request::Input::Prompt(prompt), sampling, &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> Common {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn openai_sampling_fields_map_and_are_checked() {
        let p = sampling(&common(json!({"model": "m", "max_tokens": 7, "stop": "\n", "seed": 3}))).unwrap();
        assert_eq!(
            (p.temperature, p.max_tokens, p.seed, p.stop.clone()),
            (Some(1.0), Some(7), Some(3), vec!["\n".into()])
        );
        let p = sampling(&common(json!({"model": "m", "temperature": 0, "max_completion_tokens": 5}))).unwrap();
        assert_eq!((p.temperature, p.max_tokens), (Some(0.0), Some(5)));
        let bad = [
            (json!({"model": ""}), "you must provide a model parameter"),
            (json!({"model": "m", "n": 2}), "n = 2: only one choice"),
            (json!({"model": "m", "temperature": 2.5}), "temperature 2.5 is out of range"),
            (json!({"model": "m", "top_p": 0}), "top_p 0 is out of range"),
            (json!({"model": "m", "max_tokens": 0}), "max_tokens 0: use at least 1"),
            (json!({"model": "m", "seed": -1}), "seed -1"),
            (json!({"model": "m", "stop": ["a", "b", "c", "d", "e"]}), "5 stop sequences: at most 4"),
        ];
        for (body, want) in bad {
            let e = sampling(&common(body)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(want), "{}", e.message);
        }
    }

    #[test]
    fn grpc_statuses_become_openai_errors() {
        let e = ApiError::from(Status::not_found("no deployment named `x`"));
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, Some("model_not_found")));
        assert_eq!(e.body()["error"]["message"], "no deployment named `x`");
        assert_eq!(ApiError::from(Status::resource_exhausted("full")).status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ApiError::from(Status::unavailable("none ready")).status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
