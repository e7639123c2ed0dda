//! What goes wrong in the controller, as one enum, and the one place where it becomes a gRPC
//! status (the HTTP API maps statuses to OpenAI's errors in `http::openai`).

use thiserror::Error;
use tonic::Status;

use crate::statestore::StateStoreError;

/// A request the controller cannot carry out.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ClusterError {
    /// No deployment has this name; `known` lists those that exist.
    #[error("no deployment named `{name}`; {}", if known.is_empty() { "none exists (create one with `gantry deploy`)".to_string() } else { format!("deployed: {}", known.join(", ")) })]
    NotFound { name: String, known: Vec<String> },

    /// The request is wrong: a bad name, count, spec, or a model that cannot be sized.
    #[error("{0}")]
    Invalid(String),

    /// The state store does not answer: changes are refused, requests still served.
    #[error(
        "the state store is unreachable, so changes are refused until it answers (requests are still served on the last known state): {0}"
    )]
    StoreUnavailable(String),

    /// The state store refused the write for now (another controller holds the lock).
    #[error("{0}")]
    StoreBusy(String),

    /// The state store failed.
    #[error("the state store failed: {0}")]
    StoreFailed(String),

    /// The controller cannot do it in its set-up (a TLS worker and no certificate to dial it).
    #[error("{0}")]
    Precondition(String),

    /// It exists already and may not be replaced (a second link for a live worker).
    #[error("{0}")]
    AlreadyExists(String),

    /// The caller's credential does not allow it (a worker id bound to another credential).
    #[error("{0}")]
    PermissionDenied(String),

    /// No replica can take the request; the reason says what each replica is doing.
    #[error("{0}")]
    NoReadyReplica(String),

    /// Too many requests wait already (for a cold start); retry later.
    #[error("{0}")]
    Exhausted(String),

    /// The request's deadline passed while it waited.
    #[error("{0}")]
    DeadlineExceeded(String),

    /// A bug or an unexpected failure.
    #[error("{0}")]
    Internal(String),
}

impl From<StateStoreError> for ClusterError {
    fn from(e: StateStoreError) -> ClusterError {
        match e {
            StateStoreError::Unavailable(m) => ClusterError::StoreUnavailable(m),
            StateStoreError::Busy(m) => ClusterError::StoreBusy(m),
            StateStoreError::Backend(m) => ClusterError::StoreFailed(m),
        }
    }
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        let msg = e.to_string();
        match e {
            ClusterError::NotFound { .. } => Status::not_found(msg),
            ClusterError::Invalid(_) => Status::invalid_argument(msg),
            ClusterError::StoreUnavailable(_) | ClusterError::NoReadyReplica(_) => Status::unavailable(msg),
            ClusterError::StoreBusy(_) | ClusterError::Precondition(_) => Status::failed_precondition(msg),
            ClusterError::Exhausted(_) => Status::resource_exhausted(msg),
            ClusterError::AlreadyExists(_) => Status::already_exists(msg),
            ClusterError::PermissionDenied(_) => Status::permission_denied(msg),
            ClusterError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            ClusterError::StoreFailed(_) | ClusterError::Internal(_) => Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_what_exists() {
        let none = ClusterError::NotFound { name: "x".into(), known: vec![] };
        assert_eq!(none.to_string(), "no deployment named `x`; none exists (create one with `gantry deploy`)");
        let some = ClusterError::NotFound { name: "py".into(), known: vec!["smollm2-135m-instruct".into()] };
        let s = Status::from(some);
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::NotFound, "no deployment named `py`; deployed: smollm2-135m-instruct")
        );
    }

    #[test]
    fn store_errors_keep_their_meaning() {
        let s = Status::from(ClusterError::from(StateStoreError::Unavailable("etcd: connection refused".into())));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().ends_with("on the last known state): etcd: connection refused"), "{}", s.message());
        assert_eq!(
            Status::from(ClusterError::from(StateStoreError::Busy("b".into()))).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
