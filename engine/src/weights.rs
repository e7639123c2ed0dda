//! Loading tensors by role from a GGUF file or a safetensors checkpoint.
//!
//! Model code asks for `(role, layer)` pairs — "layer 3's query projection" — and this module
//! finds the tensor under the file format's name (GGUF's `blk.3.attn_q.weight`, transformers'
//! `model.layers.3.self_attn.q_proj.weight`), memory-maps it, and returns it ready to use:
//! quantized matrices stay quantized (repacked into a format with fast CPU kernels where
//! Candle has none for the stored one), everything else becomes a dense tensor.

#![allow(unsafe_code)] // safetensors memory maps, reads into GGML blocks: see the SAFETY notes.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use gantry_core::Family;
use gantry_core::gguf::GgufFile;
use tracing::info;

use crate::EngineError;
use crate::layers::Matrix;

/// What a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    TokenEmbd,
    PosEmbd,
    OutputNorm,
    Output,
    AttnNorm,
    /// Falcon's second LayerNorm (the MLP's) in the new decoder architecture.
    AttnNorm2,
    AttnQ,
    AttnK,
    AttnV,
    AttnQkv,
    AttnOut,
    AttnQNorm,
    AttnKNorm,
    AttnPostNorm,
    FfnNorm,
    FfnGate,
    FfnUp,
    /// Gate and up projections in one matrix (Phi-3).
    FfnGateUp,
    FfnDown,
    FfnPostNorm,
    /// llama.cpp's precomputed rope frequency divisors (Llama 3 scaling).
    RopeFreqs,
    /// A mixture-of-experts layer's router `[experts, hidden]`.
    MoeRouter,
    /// The shared expert's projections and its scalar gate `[1, hidden]` (Qwen2-MoE).
    SharedGate,
    SharedUp,
    SharedDown,
    SharedExpertGate,
    /// A learned logit per query head joining the attention softmax (gpt-oss).
    AttnSinks,
}

/// `.weight` or `.bias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Weight,
    Bias,
}

impl Part {
    fn suffix(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Bias => "bias",
        }
    }
}

fn gguf_name(role: Role, layer: Option<usize>, part: Part) -> String {
    let base = match role {
        Role::TokenEmbd => "token_embd",
        Role::PosEmbd => "position_embd",
        Role::OutputNorm => "output_norm",
        Role::Output => "output",
        Role::RopeFreqs => "rope_freqs",
        Role::AttnNorm => "attn_norm",
        Role::AttnNorm2 => "attn_norm_2",
        Role::AttnQ => "attn_q",
        Role::AttnK => "attn_k",
        Role::AttnV => "attn_v",
        Role::AttnQkv => "attn_qkv",
        Role::AttnOut => "attn_output",
        Role::AttnQNorm => "attn_q_norm",
        Role::AttnKNorm => "attn_k_norm",
        Role::AttnPostNorm => "post_attention_norm",
        Role::FfnNorm => "ffn_norm",
        Role::FfnGate => "ffn_gate",
        // Phi-3's fused gate+up is stored as `ffn_up` by llama.cpp.
        Role::FfnUp | Role::FfnGateUp => "ffn_up",
        Role::FfnDown => "ffn_down",
        Role::FfnPostNorm => "post_ffw_norm",
        Role::MoeRouter => "ffn_gate_inp",
        Role::SharedGate => "ffn_gate_shexp",
        Role::SharedUp => "ffn_up_shexp",
        Role::SharedDown => "ffn_down_shexp",
        Role::SharedExpertGate => "ffn_gate_inp_shexp",
        Role::AttnSinks => "attn_sinks",
    };
    match layer {
        Some(i) => format!("blk.{i}.{base}.{}", part.suffix()),
        None => format!("{base}.{}", part.suffix()),
    }
}

/// Candidate transformers names for a role (prefixes differ between checkpoints).
fn hf_names(family: Family, role: Role, layer: Option<usize>, part: Part) -> Vec<String> {
    let s = part.suffix();
    let (prefixes, layer_dir, top): (&[&str], &str, &str) = match family {
        Family::Gpt2 => (&["transformer.", ""], "h", ""),
        Family::Falcon => (&["transformer."], "h", ""),
        _ => (&["model.", "model.language_model.", "language_model.model."], "layers", ""),
    };
    let _ = top;
    let leaf = match (family, role) {
        (_, Role::RopeFreqs) => return Vec::new(),
        (Family::Mixtral, Role::MoeRouter) => "block_sparse_moe.gate",
        (Family::GptOss, Role::MoeRouter) => "mlp.router",
        (_, Role::MoeRouter) => "mlp.gate",
        (_, Role::SharedGate) => "mlp.shared_expert.gate_proj",
        (_, Role::SharedUp) => "mlp.shared_expert.up_proj",
        (_, Role::SharedDown) => "mlp.shared_expert.down_proj",
        (_, Role::SharedExpertGate) => "mlp.shared_expert_gate",
        // A bare parameter: no `.weight` suffix.
        (_, Role::AttnSinks) if part == Part::Weight => {
            return prefixes.iter().map(|p| format!("{p}{layer_dir}.{}.self_attn.sinks", layer.unwrap_or(0))).collect();
        }
        (_, Role::AttnSinks) => return Vec::new(),
        (Family::Gpt2, Role::TokenEmbd) => "wte",
        (Family::Gpt2, Role::PosEmbd) => "wpe",
        (Family::Gpt2, Role::OutputNorm) => "ln_f",
        (Family::Gpt2, Role::AttnNorm) => "ln_1",
        (Family::Gpt2, Role::AttnQkv) => "attn.c_attn",
        (Family::Gpt2, Role::AttnOut) => "attn.c_proj",
        (Family::Gpt2, Role::FfnNorm) => "ln_2",
        (Family::Gpt2, Role::FfnUp) => "mlp.c_fc",
        (Family::Gpt2, Role::FfnDown) => "mlp.c_proj",
        (Family::Falcon, Role::TokenEmbd) => "word_embeddings",
        (Family::Falcon, Role::OutputNorm) => "ln_f",
        (Family::Falcon, Role::AttnNorm) => return falcon_attn_norm(layer, s),
        (Family::Falcon, Role::AttnNorm2) => "ln_mlp",
        (Family::Falcon, Role::AttnQkv) => "self_attention.query_key_value",
        (Family::Falcon, Role::AttnOut) => "self_attention.dense",
        (Family::Falcon, Role::FfnUp) => "mlp.dense_h_to_4h",
        (Family::Falcon, Role::FfnDown) => "mlp.dense_4h_to_h",
        (Family::Phi, Role::OutputNorm) => "final_layernorm",
        (Family::Phi, Role::AttnOut) => "self_attn.dense",
        (Family::Phi, Role::FfnUp) => "mlp.fc1",
        (Family::Phi, Role::FfnDown) => "mlp.fc2",
        (_, Role::TokenEmbd) => "embed_tokens",
        (_, Role::OutputNorm) => "norm",
        (_, Role::AttnNorm) => "input_layernorm",
        (_, Role::AttnQ) => "self_attn.q_proj",
        (_, Role::AttnK) => "self_attn.k_proj",
        (_, Role::AttnV) => "self_attn.v_proj",
        (_, Role::AttnQkv) => "self_attn.qkv_proj",
        (_, Role::AttnOut) => "self_attn.o_proj",
        (_, Role::AttnQNorm) => "self_attn.q_norm",
        (_, Role::AttnKNorm) => "self_attn.k_norm",
        (_, Role::AttnPostNorm) => "post_attention_layernorm",
        (Family::Gemma2 | Family::Gemma3, Role::FfnNorm) => "pre_feedforward_layernorm",
        (_, Role::FfnNorm) => "post_attention_layernorm",
        (_, Role::FfnPostNorm) => "post_feedforward_layernorm",
        (_, Role::FfnGate) => "mlp.gate_proj",
        (_, Role::FfnUp) => "mlp.up_proj",
        (_, Role::FfnGateUp) => "mlp.gate_up_proj",
        (_, Role::FfnDown) => "mlp.down_proj",
        (_, Role::PosEmbd) => return Vec::new(),
        (_, Role::AttnNorm2) => return Vec::new(),
        (_, Role::Output) => return vec![format!("lm_head.{s}"), format!("language_model.lm_head.{s}")],
    };
    prefixes
        .iter()
        .map(|p| match layer {
            Some(i) => format!("{p}{layer_dir}.{i}.{leaf}.{s}"),
            None => format!("{p}{leaf}.{s}"),
        })
        .collect()
}

fn falcon_attn_norm(layer: Option<usize>, s: &str) -> Vec<String> {
    let i = layer.unwrap_or(0);
    vec![format!("transformer.h.{i}.input_layernorm.{s}"), format!("transformer.h.{i}.ln_attn.{s}")]
}

/// Ggml types Candle has no fast CPU kernel for; they are repacked to Q8_0 at load.
fn needs_repack(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1)
}

/// The open weights of a model.
pub enum WeightSource {
    /// GGUF tensors are read with positioned reads straight into the engine's own buffers:
    /// the blocks are copied into Candle's storage (or Gantry's kernels) anyway, and a memory
    /// map would keep the file's pages resident on top of that copy.
    Gguf {
        path: PathBuf,
        file: GgufFile,
        handle: std::fs::File,
    },
    Safetensors {
        family: Family,
        tensors: MmapedSafetensors,
        names: HashSet<String>,
    },
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightSource::Gguf { path, .. } => write!(f, "Gguf({})", path.display()),
            WeightSource::Safetensors { names, .. } => write!(f, "Safetensors({} tensors)", names.len()),
        }
    }
}

/// Counts what the loader did, for the load log.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    /// `(from, to, tensors)` repacks.
    pub repacked: Vec<(String, String, usize)>,
    /// `(type, tensors)` run by Gantry's own kernels.
    pub kernels: Vec<(String, usize)>,
    pub tensors: usize,
    pub bytes: u64,
}

impl WeightSource {
    /// Opens a GGUF file whose header has been parsed already.
    pub fn open_gguf(path: &Path, file: GgufFile) -> Result<WeightSource, EngineError> {
        let handle = std::fs::File::open(path).map_err(|e| EngineError::Io { path: path.to_path_buf(), source: e })?;
        let len = handle.metadata().map_err(|e| EngineError::Io { path: path.to_path_buf(), source: e })?.len();
        if len < file.file_len {
            return Err(EngineError::Config(format!("{} shrank while being opened", path.display())));
        }
        Ok(WeightSource::Gguf { path: path.to_path_buf(), file, handle })
    }

    /// Opens the safetensors files of a folder (one file, or shards).
    pub fn open_safetensors(family: Family, files: &[PathBuf]) -> Result<WeightSource, EngineError> {
        // SAFETY: read-only maps of model files that Gantry never writes; a file changed under
        // a running worker is outside what any loader can guard against.
        let tensors = unsafe { MmapedSafetensors::multi(files) }?;
        let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(WeightSource::Safetensors { family, tensors, names })
    }

    fn family_name(&self, role: Role, layer: Option<usize>, part: Part) -> Vec<String> {
        match self {
            // gpt-oss's converter names the MLP's input norm `post_attention_norm` (Gemma's
            // GGUFs use that name for the norm after attention, and have an `ffn_norm`).
            WeightSource::Gguf { .. } if role == Role::FfnNorm => {
                vec![gguf_name(role, layer, part), gguf_name(Role::AttnPostNorm, layer, part)]
            }
            WeightSource::Gguf { .. } => vec![gguf_name(role, layer, part)],
            WeightSource::Safetensors { family, .. } => hf_names(*family, role, layer, part),
        }
    }

    fn find(&self, role: Role, layer: Option<usize>, part: Part) -> Option<String> {
        let candidates = self.family_name(role, layer, part);
        candidates.into_iter().find(|n| match self {
            WeightSource::Gguf { file, .. } => file.tensors.iter().any(|t| &t.name == n),
            WeightSource::Safetensors { names, .. } => names.contains(n),
        })
    }

    /// Whether the tensor exists.
    pub fn has(&self, role: Role, layer: Option<usize>, part: Part) -> bool {
        self.find(role, layer, part).is_some()
    }

    fn missing(&self, role: Role, layer: Option<usize>, part: Part) -> EngineError {
        let names = self.family_name(role, layer, part);
        EngineError::MissingTensor(names.first().cloned().unwrap_or_else(|| format!("{role:?}")))
    }

    /// Reads a GGUF tensor's bytes.
    pub(crate) fn gguf_bytes(&self, name: &str) -> Result<(Vec<u8>, &gantry_core::gguf::GgufTensor), EngineError> {
        use std::os::unix::fs::FileExt;
        let WeightSource::Gguf { file, handle, path } = self else {
            return Err(EngineError::Config("not a GGUF source".into()));
        };
        let t = file.tensors.iter().find(|t| t.name == name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        let mut bytes = vec![0u8; t.bytes as usize];
        // Bounds were checked against the file length by the GGUF parser.
        handle
            .read_exact_at(&mut bytes, file.data_offset + t.offset)
            .map_err(|e| EngineError::Io { path: path.clone(), source: e })?;
        Ok((bytes, t))
    }

    /// Loads a GGUF tensor as a `QTensor` on `device`.
    fn gguf_qtensor(&self, name: &str, device: &Device) -> Result<QTensor, EngineError> {
        if device.is_cpu() {
            // Straight into Candle's block storage: no second copy of a large tensor.
            if let Some(q) = self.gguf_qtensor_direct(name)? {
                return Ok(q);
            }
        }
        let (bytes, t) = self.gguf_bytes(name)?;
        let dtype = ggml_dtype(t.ggml_type.id).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "tensor `{name}` is {}, which Candle cannot run; use a Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K, F16, BF16 or F32 file",
                t.ggml_type
            ))
        })?;
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
        Ok(QTensor::new(storage, shape)?)
    }

    /// Reads a GGUF tensor into Candle's CPU block storage directly (`None` for types this
    /// does not cover, which take the copying path).
    fn gguf_qtensor_direct(&self, name: &str) -> Result<Option<QTensor>, EngineError> {
        use candle_core::quantized::k_quants::*;
        let WeightSource::Gguf { file, handle, path } = self else { return Ok(None) };
        let t = file.tensors.iter().find(|t| t.name == name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        let offset = file.data_offset + t.offset;
        let blocks = (t.elements / t.ggml_type.block_elements) as usize;
        let read = |buf: &mut [u8]| {
            use std::os::unix::fs::FileExt;
            handle.read_exact_at(buf, offset).map_err(|e| EngineError::Io { path: path.clone(), source: e })
        };
        let storage: Box<dyn candle_core::quantized::QuantizedType> = match t.ggml_type.name {
            "Q8_0" => Box::new(read_blocks::<BlockQ8_0>(blocks, t.bytes, read)?),
            "Q4_0" => Box::new(read_blocks::<BlockQ4_0>(blocks, t.bytes, read)?),
            "Q2_K" => Box::new(read_blocks::<BlockQ2K>(blocks, t.bytes, read)?),
            "Q3_K" => Box::new(read_blocks::<BlockQ3K>(blocks, t.bytes, read)?),
            "Q4_K" => Box::new(read_blocks::<BlockQ4K>(blocks, t.bytes, read)?),
            "Q5_K" => Box::new(read_blocks::<BlockQ5K>(blocks, t.bytes, read)?),
            "Q6_K" => Box::new(read_blocks::<BlockQ6K>(blocks, t.bytes, read)?),
            _ => return Ok(None),
        };
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        Ok(Some(QTensor::new(QStorage::Cpu(storage), shape)?))
    }

    /// A dense tensor in `dtype` (norm weights, biases, dense matrices).
    pub fn dense(
        &self,
        role: Role,
        layer: Option<usize>,
        part: Part,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor, EngineError> {
        let name = self.find(role, layer, part).ok_or_else(|| self.missing(role, layer, part))?;
        let t = match self {
            WeightSource::Gguf { .. } => self.gguf_qtensor(&name, device)?.dequantize(device)?,
            WeightSource::Safetensors { tensors, .. } => tensors.load(&name, device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// An optional dense tensor.
    pub fn dense_opt(
        &self,
        role: Role,
        layer: Option<usize>,
        part: Part,
        device: &Device,
        dtype: DType,
    ) -> Result<Option<Tensor>, EngineError> {
        if self.has(role, layer, part) { self.dense(role, layer, part, device, dtype).map(Some) } else { Ok(None) }
    }

    /// A weight matrix `[out, in]` ready for `x · Wᵀ`: quantized when stored quantized — Q4_1
    /// and Q5_0 through Gantry's kernels on CPU, other types Candle has no fast kernel for
    /// (Q5_1, Q8_1) repacked to Q8_0 — dense otherwise.
    /// `transpose` is for GPT-2's `Conv1D` matrices, stored `[in, out]` by transformers.
    pub fn matrix(
        &self,
        role: Role,
        layer: Option<usize>,
        device: &Device,
        dtype: DType,
        transpose: bool,
        stats: &mut LoadStats,
    ) -> Result<Matrix, EngineError> {
        let name = self.find(role, layer, Part::Weight).ok_or_else(|| self.missing(role, layer, Part::Weight))?;
        stats.tensors += 1;
        match self {
            WeightSource::Gguf { .. } => {
                let q = self.gguf_qtensor(&name, device)?;
                stats.bytes += q.storage_size_in_bytes() as u64;
                let from = q.dtype();
                if matches!(from, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    return Ok(QMatMul::Tensor(q.dequantize(device)?.to_dtype(dtype)?));
                }
                // On GPUs Candle's CUDA kernels take every type as stored.
                if device.is_cpu() && needs_repack(from) && q.shape().dims().last().is_some_and(|k| k % 32 == 0) {
                    let repacked = QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?;
                    note_repack(stats, from, GgmlDType::Q8_0);
                    return Ok(QMatMul::from_qtensor(repacked)?);
                }
                Ok(QMatMul::from_qtensor(q)?)
            }
            WeightSource::Safetensors { tensors, .. } => {
                let t = tensors.load(&name, device)?;
                stats.bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
                let t = if transpose { t.t()?.contiguous()? } else { t };
                Ok(QMatMul::Tensor(t.to_dtype(dtype)?))
            }
        }
    }

    /// A matrix `[out, in]` for the CPU runtime: the GGUF blocks as stored for the formats it
    /// has kernels for, dense f32 for F32/F16/BF16 (and safetensors), and for other formats
    /// (Q2_K, Q3_K …) the values requantized to Q8_0. `transpose` is for GPT-2's `Conv1D`.
    pub fn cpu_matrix(
        &self,
        role: Role,
        layer: Option<usize>,
        transpose: bool,
        stats: &mut LoadStats,
    ) -> Result<crate::cpu::kernels::QMatrix, EngineError> {
        use crate::cpu::kernels::QMatrix;
        use crate::cpu::quant::{Kind as CpuKind, quantize_q8_0};
        let name = self.find(role, layer, Part::Weight).ok_or_else(|| self.missing(role, layer, Part::Weight))?;
        stats.tensors += 1;
        let bad = |e: String| EngineError::Config(format!("tensor `{name}`: {e}"));
        let dense = |t: Tensor| -> Result<QMatrix, EngineError> {
            let t = if transpose { t.t()?.contiguous()? } else { t };
            let (rows, cols) = t.dims2()?;
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            QMatrix::from_f32(rows, cols, values).map_err(bad)
        };
        let m = match self {
            WeightSource::Gguf { file, .. } => {
                let t = file
                    .tensors
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or_else(|| EngineError::MissingTensor(name.clone()))?;
                let [k, n] = t.dims.as_slice() else {
                    return Err(bad(format!("a matrix needs 2 dimensions, it has {}", t.dims.len())));
                };
                let (rows, cols) = (*n as usize, *k as usize);
                match CpuKind::from_ggml(t.ggml_type.name) {
                    Some(kind) => {
                        let (bytes, _) = self.gguf_bytes(&name)?;
                        note_kernel_name(stats, kind.name());
                        QMatrix::from_blocks(kind, rows, cols, bytes).map_err(bad)?
                    }
                    None => {
                        let values = self.gguf_qtensor(&name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                        if matches!(t.ggml_type.name, "F16" | "BF16") || !cols.is_multiple_of(32) {
                            dense(values)?
                        } else {
                            note_repack_names(stats, t.ggml_type.name, "Q8_0");
                            let v = values.flatten_all()?.to_vec1::<f32>()?;
                            QMatrix::from_blocks(CpuKind::Q8_0, rows, cols, quantize_q8_0(&v)).map_err(bad)?
                        }
                    }
                }
            }
            WeightSource::Safetensors { tensors, .. } => dense(tensors.load(&name, &Device::Cpu)?)?,
        };
        stats.bytes += m.size_in_bytes() as u64;
        Ok(m)
    }

    /// A dense vector (a norm's weight, a bias) as f32 values, if the file has it.
    pub fn cpu_vec(&self, role: Role, layer: Option<usize>, part: Part) -> Result<Option<Vec<f32>>, EngineError> {
        match self.dense_opt(role, layer, part, &Device::Cpu, DType::F32)? {
            Some(t) => Ok(Some(t.flatten_all()?.to_vec1::<f32>()?)),
            None => Ok(None),
        }
    }

    /// The token embedding table, quantized when stored quantized.
    pub fn embedding(&self, role: Role, device: &Device, dtype: DType) -> Result<Embedding, EngineError> {
        let name = self.find(role, None, Part::Weight).ok_or_else(|| self.missing(role, None, Part::Weight))?;
        match self {
            WeightSource::Gguf { .. } => {
                let q = self.gguf_qtensor(&name, device)?;
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    Ok(Embedding::Dense(q.dequantize(device)?.to_dtype(dtype)?))
                } else {
                    Ok(Embedding::Quantized(std::sync::Arc::new(q)))
                }
            }
            WeightSource::Safetensors { tensors, .. } => {
                Ok(Embedding::Dense(tensors.load(&name, device)?.to_dtype(dtype)?))
            }
        }
    }
}

pub(crate) fn note_kernel_name(stats: &mut LoadStats, from: &str) {
    let from = from.to_string();
    match stats.kernels.iter_mut().find(|(k, _)| *k == from) {
        Some(entry) => entry.1 += 1,
        None => stats.kernels.push((from, 1)),
    }
}

fn note_repack(stats: &mut LoadStats, from: GgmlDType, to: GgmlDType) {
    note_repack_names(stats, &format!("{from:?}"), &format!("{to:?}"));
}

pub(crate) fn note_repack_names(stats: &mut LoadStats, from: &str, to: &str) {
    let (from, to) = (from.to_string(), to.to_string());
    match stats.repacked.iter_mut().find(|(f, t, _)| *f == from && *t == to) {
        Some(entry) => entry.2 += 1,
        None => stats.repacked.push((from, to, 1)),
    }
}

/// A token embedding table.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(std::sync::Arc<QTensor>),
}

impl Embedding {
    /// Looks up rows; `ids` is a `u32` tensor.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
            }
            Embedding::Quantized(q) => q.embedding(ids)?.to_dtype(dtype),
        }
    }

    /// Rows `rows` of the table (a tensor-parallel rank's share of the vocabulary).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> candle_core::Result<Embedding> {
        let keep = std::slice::from_ref(&rows);
        Ok(match self {
            Embedding::Dense(w) => Embedding::Dense(crate::tp::take_rows(w, keep)?),
            Embedding::Quantized(q) => Embedding::Quantized(std::sync::Arc::new(crate::tp::qtensor_rows(q, keep)?)),
        })
    }

    /// The table as an output head (`x · Eᵀ`) when the head is tied to it.
    pub fn as_head(&self) -> candle_core::Result<Matrix> {
        match self {
            Embedding::Dense(w) => Ok(QMatMul::Tensor(w.clone())),
            Embedding::Quantized(q) => Ok(QMatMul::from_arc(q.clone())?),
        }
    }
}

/// Reads `blocks` GGML blocks of type `T` straight into a vector of them.
fn read_blocks<T: candle_core::quantized::GgmlType + Clone>(
    blocks: usize,
    bytes: u64,
    read: impl FnOnce(&mut [u8]) -> Result<(), EngineError>,
) -> Result<Vec<T>, EngineError> {
    let size = std::mem::size_of::<T>();
    if (blocks * size) as u64 != bytes {
        return Err(EngineError::Config(format!("{bytes} bytes are not {blocks} blocks of {size}")));
    }
    let mut v = vec![T::zeros(); blocks];
    // SAFETY: Candle's GGML block types are `#[repr(C)]` structs of f16 and byte arrays with
    // no padding (their sizes equal ggml's block sizes, checked just above), for which every
    // bit pattern is valid; the vector is exclusively borrowed for the read.
    let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), blocks * size) };
    read(raw)?;
    Ok(v)
}

pub(crate) fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Logs what loading did (repacks in particular).
pub fn log_stats(stats: &LoadStats) {
    for (kind, n) in &stats.kernels {
        info!(format = %kind, tensors = n, "kept as stored, run by Gantry's CPU kernel");
    }
    for (from, to, n) in &stats.repacked {
        info!(from = %from, to = %to, tensors = n, "repacked for fast CPU kernels");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_format() {
        assert_eq!(gguf_name(Role::AttnQ, Some(3), Part::Weight), "blk.3.attn_q.weight");
        assert_eq!(gguf_name(Role::TokenEmbd, None, Part::Weight), "token_embd.weight");
        assert_eq!(gguf_name(Role::FfnGateUp, Some(0), Part::Weight), "blk.0.ffn_up.weight");
        assert!(
            hf_names(Family::Llama, Role::AttnQ, Some(3), Part::Weight)
                .contains(&"model.layers.3.self_attn.q_proj.weight".to_string())
        );
        assert!(
            hf_names(Family::Gemma2, Role::FfnNorm, Some(1), Part::Weight)
                .contains(&"model.layers.1.pre_feedforward_layernorm.weight".to_string())
        );
        assert!(
            hf_names(Family::Gpt2, Role::AttnQkv, Some(0), Part::Bias)
                .contains(&"transformer.h.0.attn.c_attn.bias".to_string())
        );
        assert_eq!(
            hf_names(Family::Falcon, Role::AttnNorm, Some(2), Part::Weight),
            vec!["transformer.h.2.input_layernorm.weight", "transformer.h.2.ln_attn.weight"]
        );
    }
}
