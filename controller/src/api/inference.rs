//! `gantry.v1.Inference`: generation and chat, routed to a ready replica.

use gantry_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Services;
use crate::auth::Caller;
use crate::router::{EventStream, client_id, deadline_of, request_id};

/// The session a gRPC request names in its `x-session-id` metadata.
fn session_of<T>(request: &Request<T>) -> Option<String> {
    request.metadata().get("x-session-id").and_then(|v| v.to_str().ok()).and_then(client_id)
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Services {
    type GenerateStream = EventStream<pb::GenerateEvent>;
    type ChatStream = EventStream<pb::GenerateEvent>;

    async fn generate(&self, request: Request<pb::InferenceRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = deadline_of(&request);
        let session = session_of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        let id = request_id(&r.request_id);
        let input = pb::generate_request::Input::Prompt(r.prompt);
        self.router.route(&r.model, input, r.sampling, id, session, deadline, caller.as_ref()).await
    }

    async fn chat(&self, request: Request<pb::ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = deadline_of(&request);
        let session = session_of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        if r.messages.is_empty() {
            return Err(Status::invalid_argument("the chat has no messages"));
        }
        let id = request_id(&r.request_id);
        let chat = pb::Conversation { messages: r.messages };
        self.router
            .route(
                &r.model,
                pb::generate_request::Input::Chat(chat),
                r.sampling,
                id,
                session,
                deadline,
                caller.as_ref(),
            )
            .await
    }
}
