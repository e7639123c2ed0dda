//! `select`: the decision framework as a function — a need and some GPUs in, ranked models
//! with their reasons out.
//!
//! Each catalog model is first filtered (context, gating, size limit, instruct tuning for
//! conversational tasks, the latency class's size ceiling, fitting the GPUs at bf16/fp16,
//! else q8_0, else q4_k); every failed filter is a reason in its rejection. Survivors are
//! scored 0–100 on four bounded components, weighted by latency class and task:
//!
//! | component | what it measures |
//! |---|---|
//! | quality | log-scale size: 100M → 0, 158B → 100 (MoE: geometric mean of active and total) |
//! | speed | active parameters against the latency class's comfortable size, minus 10 per extra GPU hop |
//! | task | instruct tuning, strengths the model card names (code, reasoning), context headroom for summaries |
//! | precision | 100 as published, 90 at q8_0, 70 at q4_k |
//!
//! Ties break by model id, so the ranking is deterministic.

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, CatalogEntry};
use crate::error::{Error, Result};
use crate::hardware::{Gpu, describe_gpus};
use crate::measured::{Measurement, best_for};
use crate::quant::{GgmlType, WeightDtype};
use crate::shard::{Fit, fit};
use crate::spec::ModelSpec;
use crate::units::{format_bytes, format_params, format_tokens};
use crate::vram::{ServeOptions, estimate_vram};

/// Context assumed for the memory estimate when the need names none.
pub const DEFAULT_NEED_CONTEXT: u64 = 8192;

/// What the model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Chat,
    Summarization,
    QuestionAnswering,
    CodeCompletion,
    Reasoning,
}

impl Task {
    /// Every task, with its command-line spelling.
    pub const ALL: [(Task, &'static str); 5] = [
        (Task::Chat, "chat"),
        (Task::Summarization, "summarization"),
        (Task::QuestionAnswering, "question-answering"),
        (Task::CodeCompletion, "code-completion"),
        (Task::Reasoning, "reasoning"),
    ];

    /// Parses `chat`, `summarization`, `question-answering` (or `qa`), `code-completion`
    /// (or `code`), `reasoning`.
    pub fn parse(text: &str) -> Result<Task> {
        let t = text.trim().to_ascii_lowercase().replace('_', "-");
        let alias = match t.as_str() {
            "qa" => "question-answering",
            "code" => "code-completion",
            "summarize" | "summary" => "summarization",
            other => other,
        };
        Task::ALL.iter().find(|(_, n)| *n == alias).map(|(t, _)| *t).ok_or_else(|| Error::InvalidInput {
            what: format!("task `{text}`"),
            problem: "use chat, summarization, question-answering, code-completion or reasoning".into(),
        })
    }

    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        Task::ALL.iter().find(|(t, _)| *t == self).map_or("chat", |(_, n)| n)
    }

    fn needs_instruct(self) -> bool {
        !matches!(self, Task::CodeCompletion)
    }
}

/// How fast answers must come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Latency {
    /// Voice, autocomplete: first token in well under a second, fast streaming.
    Realtime,
    /// A person waiting on a chat: a second or two is fine.
    Interactive,
    /// Offline jobs: throughput and quality over latency.
    Batch,
}

impl Latency {
    /// Parses `realtime`, `interactive`, `batch`.
    pub fn parse(text: &str) -> Result<Latency> {
        match text.trim().to_ascii_lowercase().as_str() {
            "realtime" | "real-time" => Ok(Latency::Realtime),
            "interactive" => Ok(Latency::Interactive),
            "batch" | "offline" => Ok(Latency::Batch),
            _ => Err(Error::InvalidInput {
                what: format!("latency `{text}`"),
                problem: "use realtime, interactive or batch".into(),
            }),
        }
    }

    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Latency::Realtime => "realtime",
            Latency::Interactive => "interactive",
            Latency::Batch => "batch",
        }
    }

    /// Active parameters above which a model is too slow for this class (none for batch).
    fn max_active_params(self) -> Option<u64> {
        match self {
            Latency::Realtime => Some(8_500_000_000),
            Latency::Interactive => Some(80_000_000_000),
            Latency::Batch => None,
        }
    }

    /// Up to this size speed is not a concern; it falls to 0 (log scale) at `speed_zero`.
    fn comfortable_params(self) -> (f64, f64) {
        match self {
            Latency::Realtime => (4e9, 14e9),
            Latency::Interactive => (14e9, 150e9),
            Latency::Batch => (70e9, 700e9),
        }
    }
}

/// What the user needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Need {
    pub task: Task,
    pub latency: Latency,
    /// Tokens the model must handle; also the context its memory is estimated at.
    pub min_context: Option<u64>,
    /// Leave out models whose weights need accepting terms on the Hub.
    pub no_gated: bool,
    /// Leave out models with more parameters than this.
    pub max_params: Option<u64>,
}

/// The four score components, each 0..=100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreParts {
    pub quality: u32,
    pub speed: u32,
    pub task: u32,
    pub precision: u32,
}

/// A model that fits, with its rank and reasons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: String,
    pub family: String,
    pub parameters: u64,
    pub active_parameters: u64,
    pub context: u64,
    pub instruct: bool,
    pub gated: bool,
    pub license: String,
    /// Weighted score, 0..=100.
    pub score: u32,
    pub score_parts: ScoreParts,
    /// Precision it would be served at.
    pub dtype: String,
    /// Memory it needs at that precision and the need's context (one device's worth when
    /// not split).
    pub memory_bytes: u64,
    /// GPUs it would use (0 when no GPUs were given).
    pub gpus_used: usize,
    pub reasons: Vec<String>,
    /// Decode tokens per second of one stream, when the model was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_tokens_per_sec: Option<f64>,
    /// Where the speed part comes from: `estimated` (from the size), `measured here`,
    /// `measured on <device kind>`.
    pub speed_source: String,
}

/// A model that does not suit the need, with every reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub id: String,
    pub reasons: Vec<String>,
}

/// The answer to a need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub need: Need,
    /// The hardware considered, described (`1×24.0 GiB`), or `none given`.
    pub hardware: String,
    /// Best first.
    pub candidates: Vec<Candidate>,
    pub rejected: Vec<Rejection>,
}

impl Latency {
    /// Decode tokens per second of one stream that the class wants: a reader's pace for
    /// realtime, a patient reader's for interactive, anything that finishes for batch.
    pub fn wanted_tokens_per_sec(self) -> f64 {
        match self {
            Latency::Realtime => 20.0,
            Latency::Interactive => 8.0,
            Latency::Batch => 2.0,
        }
    }
}

/// [`select`], with measured speed where a model was measured: its speed part is then the
/// measured decode rate of one stream against the latency class's wanted rate (full marks at
/// or above it), and its reasons say so, with where it was measured (`here`: this machine's
/// device kinds).
pub fn select_measured(
    need: &Need,
    gpus: &[Gpu],
    catalog: &Catalog,
    measured: &[&Measurement],
    here: &[String],
) -> Result<Selection> {
    let mut selection = select(need, gpus, catalog)?;
    for c in &mut selection.candidates {
        let of: Vec<&Measurement> =
            measured.iter().copied().filter(|m| m.is_of(&c.id) && m.decode_per_stream(1).is_some()).collect();
        let Some((m, provenance)) = best_for(&of, here) else { continue };
        let Some(rate) = m.decode_per_stream(1) else { continue };
        let wanted = need.latency.wanted_tokens_per_sec();
        c.score_parts.speed = clamp100(rate / wanted);
        c.score = weighted(need, &c.score_parts);
        c.measured_tokens_per_sec = Some(rate);
        c.speed_source = provenance.label();
        c.reasons.push(format!(
            "decodes {rate:.0} tokens/s per stream, {} ({} wants {wanted:.0})",
            provenance.label(),
            need.latency.as_str()
        ));
    }
    selection.candidates.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    Ok(selection)
}

/// Ranks the catalog's models for `need` on `gpus` (an empty list means no memory check).
pub fn select(need: &Need, gpus: &[Gpu], catalog: &Catalog) -> Result<Selection> {
    if need.min_context == Some(0) {
        return Err(Error::InvalidInput { what: "minimum context".into(), problem: "must be at least 1 token".into() });
    }
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for entry in &catalog.entries {
        let spec = entry.spec()?;
        match judge(need, gpus, entry, &spec)? {
            Ok(c) => candidates.push(c),
            Err(reasons) => rejected.push(Rejection { id: entry.id.clone(), reasons }),
        }
    }
    candidates.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    rejected.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Selection {
        need: need.clone(),
        hardware: if gpus.is_empty() { "none given".into() } else { describe_gpus(gpus) },
        candidates,
        rejected,
    })
}

/// How a model would be served on the GPUs (not where: that is `placement`): precision,
/// memory, GPUs used.
struct ServingFit {
    dtype: Option<WeightDtype>,
    dtype_name: String,
    memory_bytes: u64,
    gpus_used: usize,
    stored_need: u64,
    /// Bytes of experts kept in host memory (0: all on the GPUs).
    host_bytes: u64,
}

impl ServingFit {
    /// A fit over several devices: their bytes summed.
    fn over(dtype: Option<WeightDtype>, dtype_name: String, stages: &[crate::shard::Stage], stored_need: u64) -> Self {
        let memory_bytes = stages.iter().map(|s| s.total_bytes).sum();
        ServingFit { dtype, dtype_name, memory_bytes, gpus_used: stages.len(), stored_need, host_bytes: 0 }
    }
}

/// Filters and scores one model: `Ok(candidate)` or `Err(reasons it was rejected)`.
fn judge(
    need: &Need,
    gpus: &[Gpu],
    entry: &CatalogEntry,
    spec: &ModelSpec,
) -> Result<std::result::Result<Candidate, Vec<String>>> {
    let mut reasons = Vec::new();
    let want_ctx = need.min_context.unwrap_or(DEFAULT_NEED_CONTEXT.min(entry.context));
    if let Some(min) = need.min_context.filter(|&m| m > entry.context) {
        reasons.push(format!("context {} < {} needed", format_tokens(entry.context), format_tokens(min)));
    }
    if need.no_gated && entry.gated {
        reasons.push("gated (terms must be accepted on the Hub) and --no-gated was asked".into());
    }
    if let Some(max) = need.max_params.filter(|&m| entry.parameters > m) {
        reasons.push(format!("{} parameters > {} limit", format_params(entry.parameters), format_params(max)));
    }
    if need.task.needs_instruct() && !entry.instruct {
        reasons.push(format!("base model: not tuned to follow instructions, which {} needs", need.task.as_str()));
    }
    let active = spec.parameters.active;
    if let Some(max) = need.latency.max_active_params().filter(|&m| active > m) {
        reasons.push(format!(
            "{} active parameters is too slow for {} (at most {})",
            format_params(active),
            need.latency.as_str(),
            format_params(max)
        ));
    }
    let placement = if reasons.is_empty() { place(need, gpus, spec, want_ctx.min(entry.context))? } else { Ok(None) };
    let placement = match placement {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Err(reasons)),
        Err(why) => {
            reasons.push(why);
            return Ok(Err(reasons));
        }
    };
    Ok(Ok(score(need, gpus, entry, spec, placement, want_ctx)))
}

/// Finds the most precise dtype at which the model fits the GPUs. `Err(reason)` when it fits
/// at none (or needs more GPUs than the latency class allows).
fn place(
    need: &Need,
    gpus: &[Gpu],
    spec: &ModelSpec,
    context: u64,
) -> Result<std::result::Result<Option<ServingFit>, String>> {
    let base = ServeOptions { context: Some(context), ..ServeOptions::default() };
    let stored_need = estimate_vram(spec, &base)?.total_bytes;
    if gpus.is_empty() {
        return Ok(Ok(Some(ServingFit {
            dtype: None,
            dtype_name: spec.weights.dtype.clone(),
            memory_bytes: stored_need,
            gpus_used: 0,
            stored_need,
            host_bytes: 0,
        })));
    }
    let free: Vec<u64> = gpus.iter().map(|g| g.memory_bytes).collect();
    let q8 = WeightDtype::Ggml(GgmlType::from_name("Q8_0").expect("Q8_0 is a GGML type"));
    let q4 = WeightDtype::Ggml(GgmlType::from_name("Q4_K").expect("Q4_K is a GGML type"));
    let mut needs = Vec::new();
    // Experts in host memory are slower than any fit on the GPUs: the last resort.
    let mut on_host = None;
    for dtype in [None, Some(q8), Some(q4)] {
        // Never "quantize" weights that are already narrower than the target.
        if let Some(d) = dtype
            && spec.weights.bytes <= d.bytes_for(spec.parameters.total).unwrap_or(u64::MAX)
        {
            continue;
        }
        let options = ServeOptions { dtype, ..base.clone() };
        let est = estimate_vram(spec, &options)?;
        let name = dtype.map_or_else(|| spec.weights.dtype.clone(), |d| d.to_string());
        match fit(spec, &options, &free)? {
            Fit::OneDevice { .. } => {
                return Ok(Ok(Some(ServingFit {
                    dtype,
                    dtype_name: name,
                    memory_bytes: est.total_bytes,
                    gpus_used: 1,
                    stored_need,
                    host_bytes: 0,
                })));
            }
            Fit::ExpertsOnHost { stage, host_bytes } if need.latency != Latency::Realtime => {
                on_host = on_host.or(Some(ServingFit {
                    dtype,
                    dtype_name: name,
                    memory_bytes: stage.total_bytes,
                    gpus_used: 1,
                    stored_need,
                    host_bytes,
                }));
            }
            Fit::ExpertsOnHost { host_bytes, .. } => needs.push(format!(
                "{name} fits only with its experts ({}) in host memory, too slow for realtime",
                format_bytes(host_bytes)
            )),
            // Tensor parallelism has no pipeline hops: every latency class may use it.
            Fit::TensorParallel { ranks: stages } => {
                return Ok(Ok(Some(ServingFit::over(dtype, name, &stages, stored_need))));
            }
            Fit::Split { stages } if need.latency != Latency::Realtime => {
                return Ok(Ok(Some(ServingFit::over(dtype, name, &stages, stored_need))));
            }
            Fit::Split { stages } => {
                needs.push(format!("{name} needs {} GPUs (realtime allows one, no pipeline hops)", stages.len()));
            }
            Fit::NoFit { .. } => needs.push(format!("{name} needs {}", format_bytes(est.total_bytes))),
        }
    }
    if let Some(fit) = on_host {
        return Ok(Ok(Some(fit)));
    }
    let largest = free.iter().max().copied().unwrap_or(0);
    let mut why = format!(
        "does not fit {} at {} context: {}; largest GPU {}",
        describe_gpus(gpus),
        format_tokens(context),
        needs.join(", "),
        format_bytes(largest)
    );
    if gpus.len() > 1 {
        why.push_str(&format!(", {} in all", format_bytes(free.iter().sum())));
    }
    Ok(Err(why))
}

/// The weighted score of a candidate's parts for a need, 0..=100.
fn weighted(need: &Need, parts: &ScoreParts) -> u32 {
    let ScoreParts { quality, speed, task, precision } = *parts;
    let (mut wq, mut ws) = match need.latency {
        Latency::Realtime => (25, 45),
        Latency::Interactive => (45, 25),
        Latency::Batch => (60, 10),
    };
    if need.task == Task::Reasoning {
        let shift = ws.min(15);
        wq += shift;
        ws -= shift;
    }
    let weighted = wq * quality + ws * speed + 15 * task + 15 * precision;
    (weighted as f64 / 100.0).round() as u32
}

fn clamp100(x: f64) -> u32 {
    (x.clamp(0.0, 1.0) * 100.0).round() as u32
}

fn score(need: &Need, gpus: &[Gpu], entry: &CatalogEntry, spec: &ModelSpec, p: ServingFit, want_ctx: u64) -> Candidate {
    let total = entry.parameters as f64;
    let active = spec.parameters.active as f64;
    let effective = (total * active).sqrt();
    let quality = clamp100((effective.log10() - 8.0) / (11.2 - 8.0));

    let (easy, zero) = need.latency.comfortable_params();
    let size_speed = if active <= easy { 1.0 } else { (zero.ln() - active.ln()) / (zero.ln() - easy.ln()) };
    let hops = p.gpus_used.saturating_sub(1) as f64;
    // Experts in host memory run at the host's memory bandwidth.
    let host = if p.host_bytes > 0 { 0.3 } else { 0.0 };
    // A reasoning trace before each answer delays the answer a user is waiting for.
    let thinking = match (entry.thinks, need.latency) {
        (true, Latency::Realtime) => 0.5,
        (true, Latency::Interactive) => 0.8,
        _ => 1.0,
    };
    let speed = clamp100(size_speed * thinking - 0.1 * hops - host);

    let tag = match need.task {
        Task::CodeCompletion => Some("code"),
        Task::Reasoning => Some("reasoning"),
        _ => None,
    };
    let task = match need.task {
        Task::Chat | Task::QuestionAnswering => 100,
        Task::Summarization => clamp100(0.5 + 0.5 * ((entry.context as f64 / 8192.0).log2() / 4.0)),
        Task::CodeCompletion | Task::Reasoning => {
            if tag.is_some_and(|t| entry.is_strong_at(t)) {
                100
            } else {
                60
            }
        }
    };
    let precision = match p.dtype {
        None => 100,
        Some(d) if d.bits_per_weight() >= 8.0 => 90,
        Some(_) => 70,
    };
    let score = weighted(need, &ScoreParts { quality, speed, task, precision });

    let mut reasons = Vec::new();
    let ctx = format_tokens(want_ctx);
    if gpus.is_empty() {
        reasons.push(format!(
            "needs {} at {} with {ctx} context (no GPUs given)",
            format_bytes(p.memory_bytes),
            p.dtype_name
        ));
    } else if p.host_bytes > 0 {
        reasons.push(format!(
            "fits 1 GPU at {} with {ctx} context ({}) with its experts in host memory ({}): slower than on the GPU",
            p.dtype_name,
            format_bytes(p.memory_bytes),
            format_bytes(p.host_bytes)
        ));
    } else if p.gpus_used == 1 {
        let gpu = gpus.iter().map(|g| g.memory_bytes).filter(|&m| m >= p.memory_bytes).min().unwrap_or(0);
        reasons.push(format!(
            "fits 1×{} at {} with {ctx} context ({})",
            format_bytes(gpu),
            p.dtype_name,
            format_bytes(p.memory_bytes)
        ));
    } else {
        reasons.push(format!(
            "split over {} GPUs at {} with {ctx} context ({} in all)",
            p.gpus_used,
            p.dtype_name,
            format_bytes(p.memory_bytes)
        ));
    }
    if p.dtype.is_some() {
        reasons.push(format!("quantized to fit: {} needs {}", spec.weights.dtype, format_bytes(p.stored_need)));
    }
    reasons.push(if entry.instruct { "instruct-tuned".into() } else { "base model (fine for completion)".into() });
    let size = spec.size_class.as_str();
    let params = format_params(entry.parameters);
    let verdict = match (need.latency, spec.size_class) {
        (Latency::Realtime, crate::spec::SizeClass::Tiny | crate::spec::SizeClass::Small) => {
            format!("{size} model ({params}) suits realtime {}", need.task.as_str())
        }
        (Latency::Realtime, _) => {
            format!("{size} model ({params}): fast enough for realtime, at the edge")
        }
        (_, crate::spec::SizeClass::Large) => {
            format!("{size} model ({params}): the most capable here")
        }
        (_, crate::spec::SizeClass::Tiny) => format!("{size} model ({params}): fast but limited"),
        _ => format!("{size} model ({params})"),
    };
    reasons.push(verdict);
    if spec.parameters.active < spec.parameters.total {
        reasons.push(format!(
            "mixture of experts: {} of {} parameters active per token",
            format_params(spec.parameters.active),
            params
        ));
    }
    if entry.thinks {
        reasons.push("writes a reasoning trace before answering: later first answer token".into());
    }
    if let Some(t) = tag.filter(|t| entry.is_strong_at(t)) {
        reasons.push(format!("model card highlights {t}"));
    }
    if need.min_context.is_some() || need.task == Task::Summarization {
        reasons.push(format!("{} context", format_tokens(entry.context)));
    }
    if entry.gated {
        reasons.push("gated: accept its terms on the Hub and set HF_TOKEN".into());
    }

    Candidate {
        id: entry.id.clone(),
        family: spec.family.to_string(),
        parameters: entry.parameters,
        active_parameters: spec.parameters.active,
        context: entry.context,
        instruct: entry.instruct,
        gated: entry.gated,
        license: entry.license.clone(),
        score,
        score_parts: ScoreParts { quality, speed, task, precision },
        dtype: p.dtype_name,
        memory_bytes: p.memory_bytes,
        gpus_used: p.gpus_used,
        reasons,
        measured_tokens_per_sec: None,
        speed_source: "estimated".into(),
    }
}
