//! `gantry.v1.Models`: what a model is and needs (`Inspect`), which models suit a need
//! (`Select`), and what is deployed (`List`).

use std::path::Path;

use gantry_core::catalog::Catalog;
use gantry_core::quant::WeightDtype;
use gantry_core::select::{Latency, Need, Task, select_measured};
use gantry_core::shard::fit_on;
use gantry_core::vram::{ServeOptions, estimate_vram};
use gantry_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Services;

fn invalid(e: impl ToString) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A model for `Inspect`: a path on the controller, or a catalog id.
fn inspect_spec(model: &str) -> Result<gantry_core::ModelSpec, Status> {
    let path = Path::new(model);
    if path.exists() {
        return gantry_model::read_spec(path).map_err(invalid);
    }
    let catalog = Catalog::builtin().map_err(|e| Status::internal(e.to_string()))?;
    match catalog.get(model) {
        Ok(entry) => entry.spec().map_err(invalid),
        Err(_) => Err(Status::not_found(format!(
            "`{model}` is neither a path on the controller nor a model of Gantry's catalog"
        ))),
    }
}

fn request_gpus(gpus: &[pb::Gpu]) -> Vec<gantry_core::Gpu> {
    gpus.iter().map(|g| gantry_core::Gpu { name: g.name.clone(), memory_bytes: g.memory_bytes }).collect()
}

#[tonic::async_trait]
impl pb::models_server::Models for Services {
    async fn inspect(&self, request: Request<pb::InspectRequest>) -> Result<Response<pb::InspectResponse>, Status> {
        let r = request.into_inner();
        let spec = inspect_spec(r.model.trim())?;
        let options = ServeOptions {
            context: (r.context > 0).then_some(r.context),
            batch: r.batch.max(1),
            dtype: if r.dtype.is_empty() { None } else { Some(WeightDtype::parse(&r.dtype).map_err(invalid)?) },
            ..ServeOptions::default()
        };
        let estimate = estimate_vram(&spec, &options).map_err(invalid)?;
        // The model's measurements: by its files' digest for a path here, else by name.
        let model = r.model.trim();
        let digest = Path::new(model).exists().then(|| gantry_model::digest(Path::new(model)).ok()).flatten();
        let of = self.cluster().measurements_of(model, digest.as_deref());
        let all = self.cluster().all_measurements();
        let here = if r.device_kinds.is_empty() { self.cluster().device_kinds() } else { r.device_kinds.clone() };
        let class = self.cluster().device_class();
        let measured = (!all.is_empty()).then(|| {
            crate::cluster::measured::memory_report(
                &gantry_core::measured::Terms::of(&estimate),
                &of.iter().collect::<Vec<_>>(),
                &all,
                &here,
                estimate.context,
                estimate.batch,
                class,
            )
        });
        let gpus = if r.gpus.is_empty() { self.cluster().cluster_gpus() } else { request_gpus(&r.gpus) };
        let (stages, no_fit_reason) = if gpus.is_empty() {
            (Vec::new(), String::new())
        } else {
            let free: Vec<u64> = gpus.iter().map(|g| g.memory_bytes).collect();
            match fit_on(&spec, &options, &free, r.gpus_linked).map_err(invalid)? {
                gantry_core::Fit::NoFit { reason } => (Vec::new(), reason),
                f => (
                    f.stages()
                        .iter()
                        .map(|s| pb::Stage {
                            gpu_index: s.device as u32,
                            layer_start: s.layers.start,
                            layer_end: s.layers.end,
                            total_bytes: s.total_bytes,
                            free_bytes: s.free_bytes,
                            tensor_parallel: match &f {
                                gantry_core::Fit::TensorParallel { ranks } => ranks.len() as u32,
                                _ => 0,
                            },
                        })
                        .collect(),
                    String::new(),
                ),
            }
        };
        Ok(Response::new(pb::InspectResponse {
            model: Some(pb::ModelFacts {
                name: spec.name.clone(),
                family: spec.family.to_string(),
                family_group: spec.family.group().into(),
                parameters: spec.parameters.total,
                active_parameters: spec.parameters.active,
                size_class: spec.size_class.as_str().into(),
                weights_dtype: estimate.weights_dtype.clone(),
                weights_bytes: spec.weights.bytes,
                context_length: spec.context.length,
                instruct: spec.tuning.instruct,
                instruct_evidence: spec.tuning.evidence.clone(),
                layers: spec.architecture.num_layers,
            }),
            memory: Some(pb::MemoryEstimate {
                weights_bytes: estimate.weights_bytes,
                kv_cache_bytes: estimate.kv_cache_bytes,
                activation_bytes: estimate.activation_bytes,
                overhead_bytes: estimate.overhead_bytes,
                total_bytes: estimate.total_bytes,
                context: estimate.context,
                batch: estimate.batch,
            }),
            stages,
            no_fit_reason,
            measured,
        }))
    }

    async fn select(&self, request: Request<pb::SelectRequest>) -> Result<Response<pb::SelectResponse>, Status> {
        let r = request.into_inner();
        let need = Need {
            task: Task::parse(if r.task.is_empty() { "chat" } else { &r.task }).map_err(invalid)?,
            latency: Latency::parse(if r.latency.is_empty() { "interactive" } else { &r.latency }).map_err(invalid)?,
            min_context: (r.min_context > 0).then_some(r.min_context),
            no_gated: r.no_gated,
            max_params: (r.max_parameters > 0).then_some(r.max_parameters),
        };
        let gpus = if r.gpus.is_empty() { self.cluster().cluster_gpus() } else { request_gpus(&r.gpus) };
        let catalog = Catalog::builtin().map_err(|e| Status::internal(e.to_string()))?;
        let all = self.cluster().all_measurements();
        let here = self.cluster().device_kinds();
        let selection =
            select_measured(&need, &gpus, &catalog, &all.iter().collect::<Vec<_>>(), &here).map_err(invalid)?;
        Ok(Response::new(pb::SelectResponse {
            candidates: selection
                .candidates
                .into_iter()
                .map(|c| pb::Candidate {
                    id: c.id,
                    score: c.score,
                    parameters: c.parameters,
                    context: c.context,
                    dtype: c.dtype,
                    memory_bytes: c.memory_bytes,
                    gpus_used: c.gpus_used as u32,
                    gated: c.gated,
                    reasons: c.reasons,
                    measured_tokens_per_sec: c.measured_tokens_per_sec.unwrap_or(0.0),
                    speed_source: c.speed_source,
                })
                .collect(),
            rejected: selection.rejected.into_iter().map(|r| pb::Rejection { id: r.id, reasons: r.reasons }).collect(),
        }))
    }

    async fn record(&self, request: Request<pb::ModelMeasurement>) -> Result<Response<pb::RecordResponse>, Status> {
        let m = request.into_inner();
        if !m.digest.starts_with("sha256s:") || m.digest.len() > 128 {
            let shown: String = m.digest.chars().take(80).collect();
            return Err(invalid(format!("digest `{shown}`: expected sha256s:<hex> (gantry_model::digest)")));
        }
        if m.device_kind.trim().is_empty() {
            return Err(invalid("device_kind: give the device kind measured on (cpu:<CPU model>, or a GPU's name)"));
        }
        crate::cluster::measured::sane(&gantry_proto::convert::measurement_from_proto(&m)).map_err(invalid)?;
        if m.speed.len() > 64 {
            return Err(invalid("at most 64 speed points"));
        }
        let measurements = self.cluster().record_measurement(&m) as u32;
        Ok(Response::new(pb::RecordResponse { measurements }))
    }

    async fn list(&self, _request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse { models: self.cluster().models() }))
    }
}
