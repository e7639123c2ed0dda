//! What goes wrong in a worker, as one enum, and the one place where it, the engine's errors
//! and the Hub's become gRPC statuses.

use gantry_engine::EngineError;
use gantry_store::HubError;
use thiserror::Error;
use tonic::Status;

/// A request or command the worker cannot carry out.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The request names a model this worker does not serve.
    #[error("model `{id}` is not loaded on this worker; {}", if loaded.is_empty() { "none is".to_string() } else { format!("loaded: {}", loaded.join(", ")) })]
    NotLoaded { id: String, loaded: Vec<String> },

    /// A load names a model already loaded from another source.
    #[error("model `{id}` is already loaded from {source_now}; unload it first")]
    AlreadyLoaded { id: String, source_now: String },

    /// The request is wrong (a bad value, an impossible layer range, a prompt too long …).
    #[error("{0}")]
    Invalid(String),

    /// The request is fine but this worker's state refuses it (a later pipeline stage, a
    /// model without a usable chat template …).
    #[error("{0}")]
    Precondition(String),

    /// No room: the queue is full, or the device lacks the memory a load needs.
    #[error("{0}")]
    Exhausted(String),

    /// The operator does not allow it (a model source outside `--model-roots`).
    #[error("{0}")]
    PermissionDenied(String),

    /// The caller went away, or the model was unloaded while loading.
    #[error("{0}")]
    Aborted(String),

    /// A bug or an unexpected failure (a poisoned lock, a task that died).
    #[error("{0}")]
    Internal(String),

    /// A stream from a peer failed; its status, as it came.
    #[error("{}", .0.message())]
    Transport(Status),

    #[error(transparent)]
    Engine(#[from] EngineError),

    #[error(transparent)]
    Hub(#[from] HubError),
}

impl WorkerError {
    /// A poisoned lock: a bug elsewhere, reported rather than panicked on.
    pub fn poisoned(what: &str) -> WorkerError {
        WorkerError::Internal(format!("{what} lock poisoned"))
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        let msg = e.to_string();
        match e {
            WorkerError::NotLoaded { .. } => Status::not_found(msg),
            WorkerError::AlreadyLoaded { .. } => Status::already_exists(msg),
            WorkerError::Invalid(_) => Status::invalid_argument(msg),
            WorkerError::Precondition(_) => Status::failed_precondition(msg),
            WorkerError::Exhausted(_) => Status::resource_exhausted(msg),
            WorkerError::PermissionDenied(_) => Status::permission_denied(msg),
            WorkerError::Aborted(_) => Status::aborted(msg),
            WorkerError::Internal(_) => Status::internal(msg),
            WorkerError::Transport(s) => s,
            WorkerError::Engine(e) => engine_status(e),
            WorkerError::Hub(e) => hub_status(e),
        }
    }
}

/// The gRPC status for an engine error.
fn engine_status(e: EngineError) -> Status {
    let msg = e.to_string();
    match e {
        EngineError::Files(gantry_model::FilesError::NotFound { .. }) => Status::not_found(msg),
        EngineError::InvalidSampling(_)
        | EngineError::PromptTooLong { .. }
        | EngineError::ContextExceeded { .. }
        | EngineError::Template(_) => Status::invalid_argument(msg),
        EngineError::Files(_) | EngineError::Model(_) | EngineError::MissingTensor(_) | EngineError::Config(_) => {
            Status::failed_precondition(msg)
        }
        EngineError::Unsupported(_) => Status::unimplemented(msg),
        EngineError::KvCacheFull { .. } => Status::resource_exhausted(msg),
        EngineError::KvCacheTooSmall { .. } => Status::out_of_range(msg),
        // A later stage's status, as the downstream link made it (`downstream::stage_error`).
        EngineError::Stage(inner) => match inner.downcast::<Status>() {
            Ok(status) => *status,
            Err(other) => Status::unavailable(other.to_string()),
        },
        _ => Status::internal(msg),
    }
}

/// The gRPC status for a Hub error.
fn hub_status(e: HubError) -> Status {
    let msg = e.to_string();
    match e {
        HubError::Gated { had_token: false, .. } | HubError::Unauthorized { had_token: false, .. } => {
            Status::unauthenticated(msg)
        }
        HubError::Gated { .. } | HubError::Unauthorized { .. } => Status::permission_denied(msg),
        HubError::RepoNotFound { .. } | HubError::RevisionNotFound { .. } | HubError::FileNotFound { .. } => {
            Status::not_found(msg)
        }
        HubError::BadId(_) | HubError::AmbiguousGguf { .. } => Status::invalid_argument(msg),
        HubError::NothingToServe { .. } | HubError::OfflineMiss { .. } | HubError::UnsafePath(_) => {
            Status::failed_precondition(msg)
        }
        HubError::Checksum { .. } => Status::data_loss(msg),
        HubError::Unreachable { .. } | HubError::Http { .. } | HubError::Transfer { .. } => Status::unavailable(msg),
        HubError::Io { .. } => Status::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_error_gets_its_grpc_code_and_keeps_its_message() {
        let cases: Vec<(WorkerError, tonic::Code, &str)> = vec![
            (
                WorkerError::NotLoaded { id: "m".into(), loaded: vec![] },
                tonic::Code::NotFound,
                "model `m` is not loaded on this worker; none is",
            ),
            (
                WorkerError::NotLoaded { id: "m".into(), loaded: vec!["a".into(), "b".into()] },
                tonic::Code::NotFound,
                "model `m` is not loaded on this worker; loaded: a, b",
            ),
            (WorkerError::Exhausted("full".into()), tonic::Code::ResourceExhausted, "full"),
            (
                EngineError::InvalidSampling("top_p must be in (0, 1], got 2".into()).into(),
                tonic::Code::InvalidArgument,
                "invalid sampling: top_p must be in (0, 1], got 2",
            ),
            (
                EngineError::Stage(Box::new(Status::deadline_exceeded("the next stage did not answer"))).into(),
                tonic::Code::DeadlineExceeded,
                "the next stage did not answer",
            ),
        ];
        for (e, code, msg) in cases {
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg));
        }
    }
}
