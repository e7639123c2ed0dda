//! `gantry.v1.Deployments` and `gantry.v1.Cluster`: desired state in, views and changes out.

use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::Services;
use crate::auth::{Permission, require};
use crate::router::EventStream;
use crate::spec::DeploymentSpec;

#[tonic::async_trait]
impl pb::deployments_server::Deployments for Services {
    type WatchStream = EventStream<pb::DeploymentEvent>;

    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::Deployment>, Status> {
        require(&request, Permission::Write, "Deployments/Apply")?;
        let r = request.into_inner();
        let name = r.name.trim();
        let mut spec = DeploymentSpec::from_proto(r.spec)?;
        // The autoscaler owns the count of an autoscaled deployment: applying it again keeps
        // the current count, within the new bounds.
        if let Some(policy) = &spec.autoscaling
            && let Some(current) = self.cluster().spec(name).filter(|c| c.autoscaling.is_some())
        {
            spec.replicas = policy.clamp(current.replicas);
        }
        Ok(Response::new(self.cluster().apply(name, spec).await?))
    }

    async fn get(&self, request: Request<pb::GetDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        require(&request, Permission::Read, "Deployments/Get")?;
        Ok(Response::new(self.cluster().get(&request.into_inner().name)?))
    }

    async fn list(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        require(&request, Permission::Read, "Deployments/List")?;
        Ok(Response::new(pb::ListDeploymentsResponse { deployments: self.cluster().list() }))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Result<Response<pb::Deployment>, Status> {
        require(&request, Permission::Write, "Deployments/Scale")?;
        let r = request.into_inner();
        Ok(Response::new(self.cluster().scale(&r.name, r.replicas).await?))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteDeploymentRequest>,
    ) -> Result<Response<pb::DeleteDeploymentResponse>, Status> {
        require(&request, Permission::Write, "Deployments/Delete")?;
        self.cluster().delete(&request.into_inner().name).await?;
        Ok(Response::new(pb::DeleteDeploymentResponse {}))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchDeploymentsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        require(&request, Permission::Read, "Deployments/Watch")?;
        let (current, mut rx) = self.cluster().watch();
        let mut closing = self.cluster().closing();
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            for d in current {
                let e = pb::DeploymentEvent { kind: pb::deployment_event::Kind::Existing as i32, deployment: Some(d) };
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    () = async { let _ = closing.wait_for(|c| *c).await; } => {
                        let _ = tx.send(Err(Status::unavailable("the controller is stopping; watch again"))).await;
                        return;
                    }
                };
                let msg = match next {
                    Ok(e) => Ok(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!("the watch fell {n} changes behind; watch again")))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Services {
    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Ok(Response::new(pb::ListWorkersResponse { workers: self.cluster().workers() }))
    }
}
