//! The worker's gRPC services, `gantry.v1.Worker` and `gantry.v1.StageLink`: thin handlers over
//! [`WorkerState`]; errors become statuses in `error`.

use std::sync::Arc;

use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::generate::STREAM_BUFFER;
use crate::state::WorkerState;

/// Both services over one [`WorkerState`].
#[derive(Debug, Clone)]
pub struct WorkerService {
    state: Arc<WorkerState>,
}

impl WorkerService {
    pub fn new(state: Arc<WorkerState>) -> WorkerService {
        WorkerService { state }
    }
}

type EventStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type LoadModelStream = EventStream<pb::LoadModelEvent>;
    type GenerateStream = EventStream<pb::GenerateEvent>;

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<Self::LoadModelStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = state.load(req, tx.clone()).await.map_err(Status::from);
            let event = result.map(|info| pb::LoadModelEvent { event: Some(pb::load_model_event::Event::Done(info)) });
            if let Err(e) = &event {
                warn!(error = %e.message(), "load failed");
            }
            let _ = tx.send(event).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        self.state.unload(&request.into_inner().model_id)?;
        Ok(Response::new(pb::UnloadModelResponse {}))
    }

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        // Off the async threads: a chat's template renders in a child process (see
        // `gantry_engine::chat_child`), which may take up to its deadline when the template is
        // hostile.
        let state = self.state.clone();
        let rx = tokio::task::spawn_blocking(move || state.generate(request.into_inner()))
            .await
            .map_err(|e| Status::internal(format!("the request's task failed: {e}")))??;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tokenize(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        // Off the async threads, as `generate`: a chat's template renders in a child process.
        let state = self.state.clone();
        let out = tokio::task::spawn_blocking(move || state.tokenize(&request.into_inner()))
            .await
            .map_err(|e| Status::internal(format!("the request's task failed: {e}")))??;
        Ok(Response::new(out))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.state.status()?))
    }
}

#[tonic::async_trait]
impl pb::stage_link_server::StageLink for WorkerService {
    type ForwardStream = EventStream<pb::StageReply>;

    async fn forward(
        &self,
        request: Request<tonic::Streaming<pb::StageRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let rx = self.state.forward(request.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
