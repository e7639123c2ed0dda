//! `gantry inspect`: a model's facts, its memory breakdown, and how it fits the given GPUs.

use std::path::Path;

use gantry_core::catalog::Catalog;
use gantry_core::hardware::{Gpu, describe_gpus, parse_gpus};
use gantry_core::quant::{GgmlType, WeightDtype};
use gantry_core::shard::{Fit, Stage, fit, fit_on};
use gantry_core::spec::ModelSpec;
use gantry_core::units::{format_bytes, format_count, format_params};
use gantry_core::vram::{
    CPU_OVERHEAD_BYTES, DeviceKind, FRAGMENTATION_PERCENT, GPU_OVERHEAD_BYTES, KvDtype, ServeOptions, VramEstimate,
    estimate_vram,
};
use gantry_model::read_spec;
use serde::Serialize;

use gantry_core::measured::{Calibration, Measurement, PerTerm, Terms, best_for, calibrate};

use crate::cmd::measurements;
use crate::cmd::table::Table;
use crate::error::CliError;

pub const EXAMPLES: &str = "\
Examples:
  gantry inspect models/SmolLM2-135M-Instruct.Q4_1.gguf
  gantry inspect ~/models/Llama-3.1-8B-Instruct --context 32K --gpus 1x24GiB
  gantry inspect meta-llama/Meta-Llama-3-70B-Instruct --gpus 2x80GiB
  gantry inspect meta-llama/Meta-Llama-3-70B-Instruct --gpus 4x48GiB --json";

/// Arguments of `gantry inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, its config.json, a .gguf file, or a catalog id (see `gantry select`)
    model: String,
    /// Tokens per sequence to size the KV cache for (8192, 8K, 128K) [default: the model's context]
    #[arg(long, env = "GANTRY_CONTEXT", value_parser = crate::process::parse_tokens_arg)]
    context: Option<u64>,
    /// Serve the weights at this precision: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 … [default: as stored]
    #[arg(long, env = "GANTRY_DTYPE")]
    dtype: Option<String>,
    /// Sequences served at once (each needs its own KV cache)
    #[arg(long, default_value_t = 1, env = "GANTRY_BATCH")]
    batch: u64,
    /// KV cache precision: f16, f32 or q8
    #[arg(long, default_value = "f16", env = "GANTRY_KV_DTYPE")]
    kv_dtype: String,
    /// GPUs to fit on: COUNTxSIZE groups such as 1x24GiB or 2x80GiB,4x16GiB
    #[arg(long, env = "GANTRY_GPUS")]
    gpus: Option<String>,
    /// The --gpus are linked by NVLink: a model too big for one is split tensor-parallel
    #[arg(long, requires = "gpus")]
    nvlink: bool,
    /// Estimate for serving on CPU (no CUDA context; f32 activations)
    #[arg(long)]
    cpu: bool,
    /// Print JSON (the schema is in the README)
    #[arg(long)]
    json: bool,
}

/// Loads a model from a path, or from the catalog when no such path exists.
pub fn load_model(model: &str) -> Result<ModelSpec, CliError> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(read_spec(path)?);
    }
    let catalog = Catalog::builtin()?;
    if let Ok(entry) = catalog.get(model) {
        return Ok(entry.spec()?);
    }
    let looks_like_id = !model.starts_with(['.', '/', '~'])
        && model.split('/').count() == 2
        && !model.ends_with(".gguf")
        && !model.ends_with(".json");
    if looks_like_id {
        return Err(CliError::usage(format!(
            "`{model}` is neither a path nor a model in Gantry's catalog; give the path of a model folder, \
             config.json or .gguf file, or an id that `gantry select --task chat --latency batch` lists"
        )));
    }
    // A path that does not exist: say so.
    Ok(read_spec(path)?)
}

/// The options and GPUs an `inspect` run was asked for.
struct Request {
    options: ServeOptions,
    gpus: Vec<Gpu>,
    linked: bool,
}

fn request(args: &Args) -> Result<Request, CliError> {
    let dtype = args.dtype.as_deref().map(WeightDtype::parse).transpose()?;
    let options = ServeOptions {
        context: args.context,
        batch: args.batch,
        dtype,
        kv_dtype: KvDtype::parse(&args.kv_dtype)?,
        device: if args.cpu { DeviceKind::Cpu } else { DeviceKind::Gpu },
        ..ServeOptions::default()
    };
    let gpus = args.gpus.as_deref().map(parse_gpus).transpose()?.unwrap_or_default();
    Ok(Request { options, gpus, linked: args.nvlink })
}

/// Runs `gantry inspect`.
pub fn run(args: Args) -> Result<(), CliError> {
    // Validate every flag before touching the model.
    let req = request(&args)?;
    let spec = load_model(&args.model)?;
    let estimate = estimate_vram(&spec, &req.options)?;
    let fit = if req.gpus.is_empty() {
        None
    } else {
        let free: Vec<u64> = req.gpus.iter().map(|g| g.memory_bytes).collect();
        Some(fit_on(&spec, &req.options, &free, req.linked)?)
    };
    // This machine's measurements of the model (`gantry bench`), the one to show first.
    let all = measurements::load(&measurements::path())?;
    let of = measurements::of(&all, &args.model);
    let measured = if of.is_empty() {
        None
    } else {
        let refs: Vec<&Measurement> = of.iter().collect();
        best_for(&refs, &measurements::here()).map(|(m, provenance)| Measured {
            source: provenance.label(),
            need_bytes: m.need(estimate.context, estimate.batch),
            error_percent: m.error_percent(),
            calibration: calibrate(&all, m.device_class()),
            measurement: m.clone(),
        })
    };
    // Unmeasured: the estimate corrected by what it has been off by on the models measured here.
    let calibration = calibrate(&all, req.options.device);
    let calibrated = (measured.is_none() && calibration.measurements > 0)
        .then(|| Calibrated { bytes: calibration.apply(&Terms::of(&estimate)), calibration });
    if args.json {
        let report = JsonReport {
            measured: measured.as_ref(),
            calibrated: calibrated.as_ref(),
            ..JsonReport::new(&spec, &req, &estimate, fit.as_ref())
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print!("{}", render(&spec, &req, &estimate, fit.as_ref())?);
    if let Some(m) = &measured {
        print!("{}", render_measured(m, &estimate, req.options.device));
    }
    if let Some(c) = &calibrated {
        println!(
            "\ncalibrated by {} measurement{} of this machine: {} (each term × what the estimate was off by there)",
            c.calibration.measurements,
            if c.calibration.measurements == 1 { "" } else { "s" },
            format_bytes(c.bytes)
        );
    }
    Ok(())
}

/// The estimate of an unmeasured model corrected by the calibration of its device class.
#[derive(Debug, Serialize)]
struct Calibrated {
    bytes: u64,
    calibration: Calibration,
}

/// A measurement of the model beside the estimate.
#[derive(Debug, Serialize)]
struct Measured {
    /// `measured here` or `measured on <device kind>`.
    source: String,
    /// What the measurement implies at the asked context and batch.
    need_bytes: u64,
    error_percent: PerTerm,
    /// The calibration of the device class measured on, from this machine's measurements.
    calibration: Calibration,
    measurement: Measurement,
}

fn render_measured(m: &Measured, est: &VramEstimate, on: DeviceKind) -> String {
    let x = &m.measurement;
    let mut out = format!(
        "\n{}: {} (by {}{}; at {} tokens × {} sequence{})\n",
        m.source,
        x.device_kind,
        x.by,
        if x.threads > 0 { format!(", {} threads", x.threads) } else { String::new() },
        format_count(x.context),
        x.batch,
        if x.batch == 1 { "" } else { "s" },
    );
    out.push_str(&measurements::terms_table(x, "TERM").render(2));
    let device = |d: DeviceKind| if d == DeviceKind::Cpu { "CPU" } else { "a GPU" };
    out.push_str(&format!(
        "  at {} tokens × {}: {} as measured, {} estimated for {}\n",
        format_count(est.context),
        est.batch,
        format_bytes(m.need_bytes),
        format_bytes(est.total_bytes),
        device(on),
    ));
    let speeds: Vec<String> = x
        .speed
        .iter()
        .filter_map(|p| {
            p.decode_rate()
                .map(|r| format!("{r:.0} tokens/s at {} stream{}", p.batch, if p.batch == 1 { "" } else { "s" }))
        })
        .collect();
    if !speeds.is_empty() {
        out.push_str(&format!("  decode: {}\n", speeds.join(", ")));
    }
    out
}

fn render(spec: &ModelSpec, req: &Request, est: &VramEstimate, fit: Option<&Fit>) -> Result<String, CliError> {
    let a = &spec.architecture;
    let mut out = format!("{}\n", spec.name);
    let mut facts = Table::default();
    facts.row(vec!["family".into(), format!("{} ({})", spec.family, spec.family.group())]);
    let params_how = match spec.parameters.source {
        gantry_core::spec::ParamSource::TensorShapes => "exact, summed over the tensor table",
        gantry_core::spec::ParamSource::ComputedFromConfig => "computed from config.json",
        gantry_core::spec::ParamSource::Catalog => "published figure, from the catalog",
    };
    facts.row(vec![
        "parameters".into(),
        format!(
            "{} ({}, {}), {params_how}",
            format_count(spec.parameters.total),
            format_params(spec.parameters.total),
            spec.size_class.as_str()
        ),
    ]);
    if spec.parameters.active < spec.parameters.total {
        facts.row(vec!["active".into(), format!("{} per token", format_params(spec.parameters.active))]);
    }
    let mut weights = format!(
        "{}, {} ({})",
        spec.weights.dtype,
        format_bytes(spec.weights.bytes),
        if spec.weights.exact { "exact" } else { "estimated" }
    );
    if !spec.weights.tensors_by_type.is_empty() {
        let mut by_type: Vec<_> = spec.weights.tensors_by_type.iter().collect();
        by_type.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
        let list: Vec<String> = by_type.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
        weights.push_str(&format!(": {}", list.join(", ")));
    }
    facts.row(vec!["weights".into(), weights]);
    let mut ctx = format!("{} tokens ({})", format_count(spec.context.length), spec.context.source);
    if let Some(r) = &spec.context.rope_scaling {
        ctx.push_str(&format!(", rope scaling {}", r.kind));
        if let Some(f) = r.factor {
            ctx.push_str(&format!(" ×{f}"));
        }
    }
    if let Some(w) = spec.context.sliding_window {
        ctx.push_str(&format!(
            ", {}-token sliding window on {} of {} layers",
            format_count(w),
            spec.context.sliding_layers,
            a.num_layers
        ));
    }
    facts.row(vec!["context".into(), ctx]);
    facts.row(vec![
        "tuning".into(),
        format!("{}: {}", if spec.tuning.instruct { "instruct" } else { "base" }, spec.tuning.evidence),
    ]);
    if spec.source != gantry_core::spec::SpecSource::Catalog {
        facts.row(vec!["chat template".into(), if spec.chat_template.is_some() { "yes".into() } else { "no".into() }]);
    }
    let mut shape = format!(
        "{} layers, hidden {}, {} heads ({} KV) × {}, MLP {}, vocab {}",
        a.num_layers,
        a.hidden_size,
        a.num_heads,
        a.num_kv_heads,
        a.head_dim,
        a.intermediate_size,
        format_count(a.vocab_size)
    );
    if let Some(m) = a.moe {
        shape.push_str(&format!(", {} experts ({} per token)", m.experts, m.experts_per_token));
    }
    if a.tied_embeddings {
        shape.push_str(", tied embeddings");
    }
    facts.row(vec!["shape".into(), shape]);
    out.push_str(&facts.render(2));

    let device = match req.options.device {
        DeviceKind::Gpu => "a GPU",
        DeviceKind::Cpu => "CPU",
    };
    out.push_str(&format!(
        "\nmemory for {} tokens × {} sequence{} on {device}, weights at {}\n",
        format_count(est.context),
        est.batch,
        if est.batch == 1 { "" } else { "s" },
        est.weights_dtype
    ));
    let fixed = match req.options.device {
        DeviceKind::Gpu => GPU_OVERHEAD_BYTES,
        DeviceKind::Cpu => CPU_OVERHEAD_BYTES,
    };
    let mut mem = Table::default();
    mem.row(vec!["weights".into(), format_bytes(est.weights_bytes)]);
    mem.row(vec![
        "KV cache".into(),
        format!("{}  ({} per token)", format_bytes(est.kv_cache_bytes), format_bytes(est.kv_bytes_per_token)),
    ]);
    mem.row(vec!["activations".into(), format_bytes(est.activation_bytes)]);
    mem.row(vec![
        "overhead".into(),
        format!(
            "{}  ({} runtime + {FRAGMENTATION_PERCENT}% fragmentation)",
            format_bytes(est.overhead_bytes),
            format_bytes(fixed)
        ),
    ]);
    mem.row(vec!["total".into(), format_bytes(est.total_bytes)]);
    out.push_str(&mem.render(2));

    if let Some(fit) = fit {
        out.push('\n');
        out.push_str(&render_fit(spec, req, fit)?);
    }
    Ok(out)
}

fn render_fit(spec: &ModelSpec, req: &Request, fit: &Fit) -> Result<String, CliError> {
    let gpus = &req.gpus;
    let described = describe_gpus(gpus);
    Ok(match fit {
        Fit::OneDevice { stage } => format!(
            "fits on one GPU of {described}: {} ({} of {})\n",
            gpus[stage.device].name,
            format_bytes(stage.total_bytes),
            format_bytes(stage.free_bytes)
        ),
        Fit::Split { stages } => {
            let mut out =
                format!("does not fit one GPU; split over {} of {described} as pipeline stages:\n", stages.len());
            out.push_str(&stage_table(spec, gpus, stages).render(2));
            if req.linked {
                out.push_str(&format!("  not tensor-parallel: {}\n", why_not_tensor_parallel(spec, req, gpus.len())?));
            }
            out
        }
        Fit::TensorParallel { ranks } => {
            let a = &spec.architecture;
            let mut out = format!(
                "does not fit one GPU; split tensor-parallel over {} of {described} (linked): every layer on each, \
                 {} of the {} attention heads, {} of {} KV heads, 1/{} of the MLP and vocabulary per GPU\n",
                ranks.len(),
                a.num_heads / ranks.len() as u64,
                a.num_heads,
                (a.num_kv_heads / ranks.len() as u64).max(1),
                a.num_kv_heads,
                ranks.len()
            );
            let mut t = Table::new(&["RANK", "GPU", "LAYERS", "WEIGHTS", "KV CACHE", "ACT+OVERHEAD", "TOTAL", "FREE"]);
            for (i, s) in ranks.iter().enumerate() {
                t.row(vec![
                    i.to_string(),
                    format!("{} ({})", gpus[s.device].name, s.device),
                    gantry_core::shard::layer_span(&s.layers),
                    format_bytes(s.weights_bytes),
                    format_bytes(s.kv_cache_bytes),
                    format_bytes(s.activation_bytes + s.overhead_bytes),
                    format_bytes(s.total_bytes),
                    format_bytes(s.free_bytes),
                ]);
            }
            out.push_str(&t.render(2));
            out
        }
        Fit::ExpertsOnHost { stage, host_bytes } => {
            let experts = spec.architecture.moe.map_or(0, |m| m.experts);
            format!(
                "does not fit {described} whole; fits one GPU with its routed experts in host memory:\n  \
                 {} ({} of {}): attention, routers, shared weights, embeddings, head and the KV cache\n  \
                 host memory: {} experts × {} layers ({}), run by the CPU; slower than on the GPU\n",
                gpus[stage.device].name,
                format_bytes(stage.total_bytes),
                format_bytes(stage.free_bytes),
                experts,
                spec.architecture.num_layers,
                format_bytes(*host_bytes)
            )
        }
        Fit::NoFit { reason } => {
            let mut out = format!("does not fit {described}: {reason}\n");
            if let Some(hint) = quantization_hint(spec, req)? {
                out.push_str(&format!("  {hint}\n"));
            }
            out
        }
    })
}

/// Why linked GPUs got a pipeline split: no group size divides the heads, or no group fits.
fn why_not_tensor_parallel(spec: &ModelSpec, req: &Request, gpus: usize) -> Result<String, CliError> {
    let a = &spec.architecture;
    let shape = gantry_core::tp::TpShape::of(a);
    let sizes = gantry_core::tp::sizes(&shape, gpus);
    if sizes.is_empty() {
        let reasons: Vec<String> = (2..=gpus).filter_map(|n| gantry_core::tp::check(&shape, n).err()).collect();
        return Ok(reasons.join("; "));
    }
    let largest = req.gpus.iter().map(|g| g.memory_bytes).max().unwrap_or(0);
    let mut needs = Vec::new();
    for n in sizes {
        if let Some(r) = gantry_core::shard::rank_bytes(spec, &req.options, n)? {
            needs.push(format!("{n} ranks need {} each", format_bytes(r.total())));
        }
    }
    Ok(format!("{}; the GPUs have {}", needs.join(", "), format_bytes(largest)))
}

fn stage_table(spec: &ModelSpec, gpus: &[Gpu], stages: &[Stage]) -> Table {
    let moe = spec.architecture.moe;
    let mut headers = vec!["STAGE", "GPU", "LAYERS", "WEIGHTS", "KV CACHE", "ACT+OVERHEAD", "TOTAL", "FREE"];
    if moe.is_some() {
        headers.insert(3, "EXPERTS");
    }
    let mut t = Table::new(&headers);
    for (i, s) in stages.iter().enumerate() {
        let mut role = String::new();
        if i == 0 {
            role.push_str(" +embed");
        }
        if i + 1 == stages.len() {
            role.push_str(" +head");
        }
        let mut row = vec![
            i.to_string(),
            gpus[s.device].name.clone(),
            format!("{}{role}", gantry_core::shard::layer_span(&s.layers)),
            format_bytes(s.weights_bytes),
            format_bytes(s.kv_cache_bytes),
            format_bytes(s.activation_bytes + s.overhead_bytes),
            format_bytes(s.total_bytes),
            format_bytes(s.free_bytes),
        ];
        if let Some(m) = moe {
            // Every expert of its layers: experts per layer × layers (and their bytes).
            let bytes: u64 = spec
                .weights
                .layout
                .expert_bytes
                .get(s.layers.start as usize..s.layers.end as usize)
                .map_or(0, |b| b.iter().sum());
            row.insert(3, format!("{}×{} ({})", m.experts, s.layers.end - s.layers.start, format_bytes(bytes)));
        }
        t.row(row);
    }
    t
}

/// When a model does not fit as asked, whether a quantization would make it fit.
fn quantization_hint(spec: &ModelSpec, req: &Request) -> Result<Option<String>, CliError> {
    let free: Vec<u64> = req.gpus.iter().map(|g| g.memory_bytes).collect();
    for name in ["Q8_0", "Q4_K"] {
        let Some(t) = GgmlType::from_name(name) else {
            continue;
        };
        let dtype = WeightDtype::Ggml(t);
        if spec.weights.bytes <= dtype.bytes_for(spec.parameters.total).unwrap_or(0) {
            continue;
        }
        let options = ServeOptions { dtype: Some(dtype), ..req.options.clone() };
        // A fit on the GPUs alone (experts in host memory would not be the point of quantizing).
        if !matches!(fit(spec, &options, &free)?, Fit::NoFit { .. } | Fit::ExpertsOnHost { .. }) {
            let need = estimate_vram(spec, &options)?.total_bytes;
            return Ok(Some(format!("at --dtype {} it would fit (needs {} on one device)", dtype, format_bytes(need))));
        }
    }
    Ok(None)
}

/// The `--json` output. Field names are a stable interface (see the README).
#[derive(Serialize)]
struct JsonReport<'a> {
    schema_version: u32,
    model: JsonModel<'a>,
    serve: &'a ServeOptions,
    memory: &'a VramEstimate,
    #[serde(skip_serializing_if = "Option::is_none")]
    gpus: Option<&'a [Gpu]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fit: Option<&'a Fit>,
    /// The measurement beside the estimate, when this machine holds one (`gantry bench`).
    #[serde(skip_serializing_if = "Option::is_none")]
    measured: Option<&'a Measured>,
    /// Unmeasured, with measurements of other models of its device class here: the estimate
    /// calibrated by them.
    #[serde(skip_serializing_if = "Option::is_none")]
    calibrated: Option<&'a Calibrated>,
}

#[derive(Serialize)]
struct JsonModel<'a> {
    name: &'a str,
    family: String,
    family_group: &'static str,
    class: &'a str,
    source: gantry_core::spec::SpecSource,
    parameters: &'a gantry_core::spec::Parameters,
    size_class: gantry_core::SizeClass,
    weights: JsonWeights<'a>,
    context: &'a gantry_core::spec::Context,
    instruct: bool,
    instruct_evidence: &'a str,
    /// Unknown (null) for catalog entries.
    has_chat_template: Option<bool>,
    architecture: JsonArchitecture,
    bos_token_id: Option<u64>,
    eos_token_ids: &'a [u64],
}

#[derive(Serialize)]
struct JsonWeights<'a> {
    dtype: &'a str,
    bytes: u64,
    exact: bool,
    tensors_by_type: &'a std::collections::BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct JsonArchitecture {
    layers: u64,
    hidden_size: u64,
    intermediate_size: u64,
    attention_heads: u64,
    kv_heads: u64,
    head_dim: u64,
    vocab_size: u64,
    tied_embeddings: bool,
    experts: Option<u64>,
    experts_per_token: Option<u64>,
}

impl<'a> JsonReport<'a> {
    fn new(spec: &'a ModelSpec, req: &'a Request, est: &'a VramEstimate, fit: Option<&'a Fit>) -> JsonReport<'a> {
        let a = &spec.architecture;
        JsonReport {
            schema_version: 1,
            model: JsonModel {
                name: &spec.name,
                family: spec.family.to_string(),
                family_group: spec.family.group(),
                class: &spec.class,
                source: spec.source,
                parameters: &spec.parameters,
                size_class: spec.size_class,
                weights: JsonWeights {
                    dtype: &spec.weights.dtype,
                    bytes: spec.weights.bytes,
                    exact: spec.weights.exact,
                    tensors_by_type: &spec.weights.tensors_by_type,
                },
                context: &spec.context,
                instruct: spec.tuning.instruct,
                instruct_evidence: &spec.tuning.evidence,
                has_chat_template: (spec.source != gantry_core::spec::SpecSource::Catalog)
                    .then_some(spec.chat_template.is_some()),
                architecture: JsonArchitecture {
                    layers: a.num_layers,
                    hidden_size: a.hidden_size,
                    intermediate_size: a.intermediate_size,
                    attention_heads: a.num_heads,
                    kv_heads: a.num_kv_heads,
                    head_dim: a.head_dim,
                    vocab_size: a.vocab_size,
                    tied_embeddings: a.tied_embeddings,
                    experts: a.moe.map(|m| m.experts),
                    experts_per_token: a.moe.map(|m| m.experts_per_token),
                },
                bos_token_id: spec.bos_token_id,
                eos_token_ids: &spec.eos_token_ids,
            },
            serve: &req.options,
            memory: est,
            gpus: (!req.gpus.is_empty()).then_some(req.gpus.as_slice()),
            fit,
            measured: None,
            calibrated: None,
        }
    }
}
