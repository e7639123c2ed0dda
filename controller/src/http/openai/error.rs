//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the one
//! place where the router's statuses become HTTP ones.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tonic::{Code, Status};

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) code: Option<&'static str>,
    pub(super) param: Option<String>,
    pub(super) message: String,
    /// Seconds to wait before retrying (a tenant's limit), sent as `Retry-After`.
    pub(super) retry_after: Option<String>,
}

impl ApiError {
    /// A 400 about `param` (when one field is at fault).
    pub(super) fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_string),
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 for a field Gantry does not do (rather than ignoring it).
    pub(super) fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { code: Some("unsupported_parameter"), ..ApiError::invalid(Some(param), message) }
    }

    pub(super) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(v) = self.retry_after.as_deref().and_then(|v| v.parse().ok()) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        response
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
        let retry_after = s.metadata().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        ApiError { status, kind, code, param: None, message: s.message().to_string(), retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_become_openai_errors() {
        let e = ApiError::from(Status::not_found("no deployment named `x`"));
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, Some("model_not_found")));
        assert_eq!(e.body()["error"]["message"], "no deployment named `x`");
        assert_eq!(ApiError::from(Status::resource_exhausted("full")).status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ApiError::from(Status::unavailable("none ready")).status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
