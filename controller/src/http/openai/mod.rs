//! The OpenAI-compatible HTTP API on the controller: `POST /v1/chat/completions` and
//! `POST /v1/completions`, streamed as server-sent events or answered whole, routed to a
//! ready replica exactly as the gRPC `Inference` service routes, with errors in OpenAI's JSON
//! shape and status codes. Every request field is done, accepted when it asks for nothing, or
//! refused by name ([`request`]); log-probabilities come back in OpenAI's shapes ([`response`]).

mod error;
mod request;
mod response;

use crate::auth::Caller;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use gantry_proto::v1 as pb;
use serde_json::json;

pub use error::ApiError;
use request::{ChatBody, Common, CompletionBody, Content, Endpoint, LogprobsWanted, Prompt};
use response::{Logprobs, SseState};

use crate::router::Router;

/// The OpenAI routes over `router`.
pub fn routes(router: Router) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(router)
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
        ApiError { status, kind: "invalid_request_error", code: None, param: None, message, retry_after: None }
    })
}

/// A request read and checked, ready to route.
struct Request {
    endpoint: Endpoint,
    common: Common,
    input: pb::generate_request::Input,
    sampling: pb::SamplingParams,
    logprobs: Option<LogprobsWanted>,
}

/// Runs a request: a stream of server-sent events or one JSON answer.
async fn run(api: Router, r: Request, headers: &HeaderMap, caller: Option<&Caller>) -> Result<Response, ApiError> {
    let Request { endpoint, common, input, sampling, logprobs } = r;
    // The caller's `X-Request-Id` (printable, bounded) names the request in every log line.
    let id_in = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(crate::router::client_id);
    let request_id = id_in("x-request-id").unwrap_or_else(Router::new_request_id);
    let model = common.model.trim().to_string();
    // A multi-turn chat's session (`X-Session-Id`, else `user`) goes back to its replica.
    let session = id_in("x-session-id").or_else(|| common.user.as_deref().and_then(crate::router::client_id));
    // Opened before answering, so an unknown model or a missing replica is a plain HTTP error.
    let events = api.open_stream(&model, input, Some(sampling), request_id.clone(), session, caller).await?;
    let id = response::id(endpoint, &request_id);
    let created = crate::clock::unix_ms() / 1000;
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        let state = SseState {
            events,
            endpoint,
            id,
            created,
            model,
            include_usage,
            logprobs,
            first: true,
            ended: false,
            gathered: Logprobs::default(),
        };
        return Ok(Sse::new(response::sse_events(state)).keep_alive(KeepAlive::default()).into_response());
    }
    let mut text = String::new();
    let mut done = None;
    let mut gathered = Logprobs::default();
    let mut events = events;
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(pb::generate_event::Event::Token(t)) => {
                gathered.add(&t);
                text.push_str(&t.text);
            }
            Some(pb::generate_event::Event::Done(d)) => done = Some(d),
            None => {}
        }
    }
    let finish = done.as_ref().map_or("stop", response::finish_reason);
    let logprobs = if logprobs.is_some() { gathered.json(endpoint) } else { serde_json::Value::Null };
    Ok(Json(json!({
        "id": id,
        "object": response::object(endpoint, false),
        "created": created,
        "model": model,
        "choices": [response::whole(endpoint, text, finish, logprobs)],
        "usage": response::usage_json(done.as_ref()),
        "system_fingerprint": null,
    }))
    .into_response())
}

async fn chat_completions(
    State(api): State<Router>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body: ChatBody = request::parse(Endpoint::Chat, &body_bytes(body)?)?;
    let (sampling, logprobs) = request::sampling(Endpoint::Chat, &body.common)?;
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
    let r = Request { endpoint: Endpoint::Chat, common: body.common, input, sampling, logprobs };
    run(api, r, &headers, caller.as_ref().map(|c| &c.0)).await
}

async fn completions(
    State(api): State<Router>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CompletionBody = request::parse(Endpoint::Completion, &body_bytes(body)?)?;
    let (sampling, logprobs) = request::sampling(Endpoint::Completion, &body.common)?;
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
    let input = pb::generate_request::Input::Prompt(prompt);
    let r = Request { endpoint: Endpoint::Completion, common: body.common, input, sampling, logprobs };
    run(api, r, &headers, caller.as_ref().map(|c| &c.0)).await
}
