//! Reading a mixture-of-experts layer's expert matrices, in every layout they are stored in:
//! one tensor per expert (Mixtral and Qwen MoE in `transformers`, old Mixtral GGUFs), one 3-D
//! tensor per layer (llama.cpp's `ffn_*_exps`; gpt-oss's `gate_up_proj`, stored `[in, out]`
//! with gate and up columns interleaved), and gpt-oss's MXFP4 blocks (`*_blocks` and
//! `*_scales` in safetensors, GGML type 39 in GGUF).
//!
//! Every expert comes out as a [`Raw`] matrix `[out, in]`, which each runtime turns into its
//! own kind of matrix. MXFP4 stays MXFP4 on the CPU runtime (its kernels run it: 17 bytes per
//! 32 weights) and becomes Q8_0 with the same values on Candle (34 bytes), never f32.

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use gantry_core::Family;
use gantry_core::quant::GgmlType;

use crate::EngineError;
use crate::weights::{LoadStats, WeightSource};

/// One of an expert's three projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertMat {
    Gate,
    Up,
    Down,
}

impl ExpertMat {
    fn gguf(self) -> &'static str {
        match self {
            ExpertMat::Gate => "gate",
            ExpertMat::Up => "up",
            ExpertMat::Down => "down",
        }
    }
}

/// One expert's matrix `[rows = out, cols = in]` as read.
#[derive(Debug)]
pub enum Raw {
    Dense {
        rows: usize,
        cols: usize,
        values: Vec<f32>,
    },
    /// GGML blocks as stored, row after row.
    Blocks {
        ggml: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    },
}

/// The FP4 (E2M1) values of MXFP4's codes.
const FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// An E8M0 scale byte as a power of two (`255` is NaN in the format; read as the largest).
fn e8m0(scale: u8) -> f32 {
    f32::from_bits(u32::from(scale.clamp(1, 254)) << 23)
}

/// Decodes GGML's MXFP4 blocks (17 bytes: the scale, then 16 bytes whose low nibbles are values
/// 0–15 and high nibbles 16–31).
pub fn mxfp4_gguf(bytes: &[u8], out: &mut Vec<f32>) {
    for block in bytes.chunks_exact(17) {
        let d = e8m0(block[0]);
        let qs = &block[1..];
        out.extend(qs.iter().map(|&q| FP4[usize::from(q & 0x0f)] * d));
        out.extend(qs.iter().map(|&q| FP4[usize::from(q >> 4)] * d));
    }
}

/// Decodes gpt-oss's safetensors MXFP4: per 32 values, 16 bytes in `blocks` whose low nibble is
/// the even value and high nibble the odd one, and one scale byte in `scales`.
pub fn mxfp4_hf(blocks: &[u8], scales: &[u8], out: &mut Vec<f32>) {
    for (group, &s) in blocks.chunks_exact(16).zip(scales) {
        let d = e8m0(s);
        for &q in group {
            out.push(FP4[usize::from(q & 0x0f)] * d);
            out.push(FP4[usize::from(q >> 4)] * d);
        }
    }
}

/// One MXFP4 block's 16 code bytes from transformers' order (byte `j`: values `2j`, `2j+1`) to
/// GGML's (byte `j`: values `j`, `j+16`).
fn hf_to_ggml_mxfp4(hf: &[u8]) -> [u8; 16] {
    let code = |i: usize| if i.is_multiple_of(2) { hf[i / 2] & 0x0f } else { hf[i / 2] >> 4 };
    std::array::from_fn(|j| code(j) | (code(j + 16) << 4))
}

/// MXFP4 blocks as Q8_0 blocks holding the very same values (the doubled FP4 values as the
/// codes, the scale as the f16 block scale), for Candle, which has no MXFP4 kernels: exact
/// whenever the scale is a normal or subnormal f16 (2^-24 to 2^15), else rounded.
fn mxfp4_to_q8_0(bytes: &[u8]) -> Vec<u8> {
    use crate::cpu::quant::{MXFP4_VALUES, e8m0_half};
    let mut out = Vec::with_capacity(bytes.len() / 17 * 34);
    for block in bytes.chunks_exact(17) {
        let d = e8m0_half(block[0]);
        let h = half::f16::from_f32(d);
        if h.to_f32() == d {
            out.extend(h.to_le_bytes());
            let qs = &block[1..];
            out.extend(qs.iter().map(|&q| MXFP4_VALUES[usize::from(q & 0x0f)] as u8));
            out.extend(qs.iter().map(|&q| MXFP4_VALUES[usize::from(q >> 4)] as u8));
        } else {
            let mut v = Vec::with_capacity(32);
            mxfp4_gguf(block, &mut v);
            out.extend(crate::cpu::quant::quantize_q8_0(&v));
        }
    }
    out
}

impl Raw {
    fn dims(&self) -> (usize, usize) {
        match self {
            Raw::Dense { rows, cols, .. } | Raw::Blocks { rows, cols, .. } => (*rows, *cols),
        }
    }

    /// The values, decoded.
    fn values(self) -> Result<Vec<f32>, EngineError> {
        match self {
            Raw::Dense { values, .. } => Ok(values),
            Raw::Blocks { ggml, rows, cols, bytes } if ggml.name == "MXFP4" => {
                let mut v = Vec::with_capacity(rows * cols);
                mxfp4_gguf(&bytes, &mut v);
                Ok(v)
            }
            Raw::Blocks { ggml, rows, cols, bytes } => {
                let t = qtensor(ggml, rows, cols, bytes, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// As a Candle matrix on `device`: GGML blocks Candle runs stay quantized, MXFP4 becomes
    /// Q8_0 (the same values), the rest dense.
    pub fn into_candle(self, device: &Device, dtype: DType, stats: &mut LoadStats) -> Result<QMatMul, EngineError> {
        let (rows, cols) = self.dims();
        if let Raw::Blocks { ggml, bytes, .. } = &self
            && ggml.name == "MXFP4"
        {
            let q8 = GgmlType::from_name("Q8_0").ok_or_else(|| EngineError::Config("no Q8_0 GGML type".into()))?;
            stats_note_q8(stats);
            return Ok(QMatMul::from_qtensor(qtensor(q8, rows, cols, mxfp4_to_q8_0(bytes), device)?)?);
        }
        if let Raw::Blocks { ggml, bytes, .. } = &self
            && ggml.name != "MXFP4"
            && crate::weights::ggml_dtype(ggml.id).is_some()
            && !matches!(ggml.name, "F32" | "F16" | "BF16")
        {
            return Ok(QMatMul::from_qtensor(qtensor(*ggml, rows, cols, bytes.clone(), device)?)?);
        }
        let t = Tensor::from_vec(self.values()?, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        Ok(QMatMul::Tensor(t))
    }

    /// As a CPU-runtime matrix: blocks its kernels run (MXFP4 included) stay as stored, dense
    /// values in f32, other formats requantized to Q8_0.
    pub fn into_cpu(self, stats: &mut LoadStats) -> Result<crate::cpu::kernels::QMatrix, EngineError> {
        use crate::cpu::kernels::QMatrix;
        use crate::cpu::quant::{Kind, quantize_q8_0};
        let (rows, cols) = self.dims();
        let bad = |e: String| EngineError::Config(format!("expert matrix [{rows}, {cols}]: {e}"));
        let m = match self {
            Raw::Blocks { ggml, bytes, .. } if Kind::from_ggml(ggml.name).is_some() => {
                let kind = Kind::from_ggml(ggml.name).expect("checked");
                crate::weights::note_kernel_name(stats, kind.name());
                QMatrix::from_blocks(kind, rows, cols, bytes).map_err(bad)?
            }
            Raw::Blocks { ggml, .. } if !matches!(ggml.name, "F16" | "BF16") => {
                let from = ggml.name;
                let v = self.values()?;
                if cols.is_multiple_of(32) {
                    crate::weights::note_repack_names(stats, from, "Q8_0");
                    QMatrix::from_blocks(Kind::Q8_0, rows, cols, quantize_q8_0(&v)).map_err(bad)?
                } else {
                    QMatrix::from_f32(rows, cols, v).map_err(bad)?
                }
            }
            raw => QMatrix::from_f32(rows, cols, raw.values()?).map_err(bad)?,
        };
        stats.tensors += 1;
        stats.bytes += m.size_in_bytes() as u64;
        Ok(m)
    }
}

/// Counts an MXFP4 matrix given to Candle as Q8_0.
fn stats_note_q8(stats: &mut LoadStats) {
    crate::weights::note_repack_names(stats, "MXFP4", "Q8_0");
}

fn qtensor(ggml: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>, device: &Device) -> Result<QTensor, EngineError> {
    let dtype = crate::weights::ggml_dtype(ggml.id)
        .ok_or_else(|| EngineError::Unsupported(format!("expert weights in {}, which Candle cannot run", ggml.name)))?;
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Folder prefixes of `transformers` checkpoints.
const HF_PREFIXES: [&str; 3] = ["model.", "model.language_model.", "language_model.model."];

impl WeightSource {
    fn tensor_names(&self, candidates: &[String]) -> Option<String> {
        candidates.iter().find(|n| self.contains(n)).cloned()
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf { file, .. } => file.tensors.iter().any(|t| t.name == name),
            WeightSource::Safetensors { names, .. } => names.contains(name),
        }
    }

    fn hf_layer_names(&self, layer: usize, leaf: &str) -> Vec<String> {
        HF_PREFIXES.iter().map(|p| format!("{p}layers.{layer}.{leaf}")).collect()
    }

    fn load_f32(&self, name: &str) -> Result<Tensor, EngineError> {
        match self {
            WeightSource::Safetensors { tensors, .. } => Ok(tensors.load(name, &Device::Cpu)?.to_dtype(DType::F32)?),
            WeightSource::Gguf { .. } => {
                let (bytes, t) = self.gguf_bytes(name)?;
                let dims: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
                let raw = Raw::Blocks { ggml: t.ggml_type, rows: 1, cols: t.elements as usize, bytes };
                Ok(Tensor::from_vec(raw.values()?, dims, &Device::Cpu)?)
            }
        }
    }

    fn load_u8(&self, name: &str) -> Result<(Vec<usize>, Vec<u8>), EngineError> {
        let WeightSource::Safetensors { tensors, .. } = self else {
            return Err(EngineError::Config(format!("`{name}`: MXFP4 blocks come from safetensors")));
        };
        let t = tensors.load(name, &Device::Cpu)?;
        if t.dtype() != DType::U8 {
            return Err(EngineError::Config(format!("`{name}` is {:?}, not the u8 MXFP4 blocks", t.dtype())));
        }
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<u8>()?))
    }

    /// Every expert's `which` matrix in layer `layer`, `[out, in]`.
    pub fn experts(&self, layer: usize, which: ExpertMat, experts: usize) -> Result<Vec<Raw>, EngineError> {
        let bad = |name: &str, e: String| EngineError::Config(format!("tensor `{name}`: {e}"));
        match self {
            WeightSource::Gguf { file, .. } => {
                let fused = format!("blk.{layer}.ffn_{}_exps.weight", which.gguf());
                if let Some(t) = file.tensors.iter().find(|t| t.name == fused) {
                    let [cols, rows, n] = t.dims.as_slice() else {
                        return Err(bad(&fused, format!("has {} dimensions, not 3", t.dims.len())));
                    };
                    if *n as usize != experts {
                        return Err(bad(&fused, format!("holds {n} experts, the model has {experts}")));
                    }
                    let (bytes, t) = self.gguf_bytes(&fused)?;
                    let per = bytes.len() / experts;
                    return Ok(bytes
                        .chunks_exact(per)
                        .map(|b| Raw::Blocks {
                            ggml: t.ggml_type,
                            rows: *rows as usize,
                            cols: *cols as usize,
                            bytes: b.to_vec(),
                        })
                        .collect());
                }
                // Early Mixtral GGUFs: one tensor per expert.
                (0..experts)
                    .map(|e| {
                        let name = format!("blk.{layer}.ffn_{}.{e}.weight", which.gguf());
                        let (bytes, t) = self.gguf_bytes(&name)?;
                        let [cols, rows] = t.dims.as_slice() else {
                            return Err(bad(&name, format!("has {} dimensions, not 2", t.dims.len())));
                        };
                        Ok(Raw::Blocks { ggml: t.ggml_type, rows: *rows as usize, cols: *cols as usize, bytes })
                    })
                    .collect()
            }
            WeightSource::Safetensors { family, .. } if *family == Family::GptOss => {
                self.gpt_oss_experts(layer, which, experts)
            }
            WeightSource::Safetensors { family, .. } => {
                let leaf = |e: usize| match (*family, which) {
                    (Family::Mixtral, ExpertMat::Gate) => format!("block_sparse_moe.experts.{e}.w1.weight"),
                    (Family::Mixtral, ExpertMat::Up) => format!("block_sparse_moe.experts.{e}.w3.weight"),
                    (Family::Mixtral, ExpertMat::Down) => format!("block_sparse_moe.experts.{e}.w2.weight"),
                    (_, m) => format!("mlp.experts.{e}.{}_proj.weight", m.gguf()),
                };
                (0..experts)
                    .map(|e| {
                        let names = self.hf_layer_names(layer, &leaf(e));
                        let name =
                            self.tensor_names(&names).ok_or_else(|| EngineError::MissingTensor(names[0].clone()))?;
                        let t = self.load_f32(&name)?;
                        let (rows, cols) = t.dims2().map_err(|e| bad(&name, e.to_string()))?;
                        Ok(Raw::Dense { rows, cols, values: t.flatten_all()?.to_vec1::<f32>()? })
                    })
                    .collect()
            }
        }
    }

    /// gpt-oss's experts: `gate_up_proj` `[E, in, 2·out]` (gate and up columns interleaved) and
    /// `down_proj` `[E, in, out]`, or their MXFP4 `_blocks` `[E, out, in/32, 16]` and `_scales`
    /// (kept as MXFP4: repacked into GGML's blocks, the same values).
    fn gpt_oss_experts(&self, layer: usize, which: ExpertMat, experts: usize) -> Result<Vec<Raw>, EngineError> {
        let stem = if which == ExpertMat::Down { "mlp.experts.down_proj" } else { "mlp.experts.gate_up_proj" };
        let bad = |name: &str, e: String| EngineError::Config(format!("tensor `{name}`: {e}"));
        // Gate rows are the even output features, up rows the odd ones.
        let keep = |out: usize| -> Vec<usize> {
            match which {
                ExpertMat::Down => (0..out).collect(),
                _ => (usize::from(which == ExpertMat::Up)..out).step_by(2).collect(),
            }
        };
        if let Some(name) = self.tensor_names(&self.hf_layer_names(layer, stem)) {
            let t = self.load_f32(&name)?;
            let (e, inp, out) = t.dims3().map_err(|e| bad(&name, e.to_string()))?;
            if e != experts {
                return Err(bad(&name, format!("holds {e} experts, the model has {experts}")));
            }
            // `[E, out, in]`.
            let values = t.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let rows = keep(out);
            return Ok(values
                .chunks_exact(out * inp)
                .map(|m| Raw::Dense {
                    rows: rows.len(),
                    cols: inp,
                    values: rows.iter().flat_map(|&r| m[r * inp..(r + 1) * inp].iter().copied()).collect(),
                })
                .collect());
        }
        let blocks_names = self.hf_layer_names(layer, &format!("{stem}_blocks"));
        let name = self
            .tensor_names(&blocks_names)
            .ok_or_else(|| EngineError::MissingTensor(self.hf_layer_names(layer, stem)[0].clone()))?;
        let (dims, blocks) = self.load_u8(&name)?;
        let scales_name = format!("{}_scales", name.trim_end_matches("_blocks"));
        let (sdims, scales) = self.load_u8(&scales_name)?;
        let [e, out, groups, 16] = dims.as_slice() else {
            return Err(bad(&name, format!("has shape {dims:?}, not [experts, out, in/32, 16]")));
        };
        if sdims.as_slice() != [*e, *out, *groups] || *e != experts {
            return Err(bad(&scales_name, format!("has shape {sdims:?}, the blocks {dims:?}")));
        }
        let (out, groups) = (*out, *groups);
        let ggml = GgmlType::from_name("MXFP4").ok_or_else(|| EngineError::Config("no MXFP4 GGML type".into()))?;
        let rows = keep(out);
        Ok((0..experts)
            .map(|x| {
                let mut bytes = Vec::with_capacity(rows.len() * groups * 17);
                for &r in &rows {
                    for g in 0..groups {
                        let at = (x * out + r) * groups + g;
                        bytes.push(scales[at]);
                        bytes.extend(hf_to_ggml_mxfp4(&blocks[at * 16..at * 16 + 16]));
                    }
                }
                Raw::Blocks { ggml, rows: rows.len(), cols: groups * 32, bytes }
            })
            .collect())
    }

    /// Every expert's bias of `which` in layer `layer`, if the file has them (gpt-oss).
    pub fn expert_biases(
        &self,
        layer: usize,
        which: ExpertMat,
        experts: usize,
    ) -> Result<Option<Vec<Vec<f32>>>, EngineError> {
        let (name, interleaved) = match self {
            WeightSource::Gguf { .. } => (vec![format!("blk.{layer}.ffn_{}_exps.bias", which.gguf())], false),
            WeightSource::Safetensors { .. } if which == ExpertMat::Down => {
                (self.hf_layer_names(layer, "mlp.experts.down_proj_bias"), false)
            }
            WeightSource::Safetensors { .. } => (self.hf_layer_names(layer, "mlp.experts.gate_up_proj_bias"), true),
        };
        let Some(name) = self.tensor_names(&name) else { return Ok(None) };
        let t = self.load_f32(&name)?;
        let (e, n) = t.dims2()?;
        if e != experts {
            return Err(EngineError::Config(format!("tensor `{name}` holds {e} experts, the model has {experts}")));
        }
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(
            v.chunks_exact(n)
                .map(|b| {
                    if interleaved {
                        b.iter().skip(usize::from(which == ExpertMat::Up)).step_by(2).copied().collect()
                    } else {
                        b.to_vec()
                    }
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxfp4_layouts_decode_to_the_same_values() {
        // Values 0..32 of a block: codes 0..16 then 0..16 again, scale 2^1.
        let codes: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let want: Vec<f32> = codes.iter().map(|&c| FP4[c as usize] * 2.0).collect();
        // GGML: low nibbles hold values 0..16, high nibbles 16..32.
        let mut ggml = vec![128u8];
        ggml.extend((0..16).map(|j| codes[j] | (codes[j + 16] << 4)));
        let mut a = Vec::new();
        mxfp4_gguf(&ggml, &mut a);
        assert_eq!(a, want);
        // transformers: byte j holds values 2j (low) and 2j+1 (high).
        let blocks: Vec<u8> = (0..16).map(|j| codes[2 * j] | (codes[2 * j + 1] << 4)).collect();
        let mut b = Vec::new();
        mxfp4_hf(&blocks, &[128], &mut b);
        assert_eq!(b, want);
    }

    #[test]
    fn transformers_mxfp4_repacks_to_ggml_blocks_of_the_same_values() {
        let hf: Vec<u8> = (0..16u8).map(|j| j.wrapping_mul(37) ^ 0x5a).collect();
        let mut want = Vec::new();
        mxfp4_hf(&hf, &[121], &mut want);
        let mut block = vec![121u8];
        block.extend(hf_to_ggml_mxfp4(&hf));
        let mut got = Vec::new();
        mxfp4_gguf(&block, &mut got);
        assert_eq!(got, want);
        // The CPU runtime's kernels decode the block to the same values.
        let m =
            crate::cpu::kernels::QMatrix::from_blocks(crate::cpu::quant::Kind::Mxfp4, 1, 32, block.clone()).unwrap();
        let mut row = vec![0f32; 32];
        m.row_f32(0, &mut row);
        assert_eq!(row, want);
        // So does Candle's Q8_0 made from it: exactly.
        let q8 = mxfp4_to_q8_0(&block);
        let t = qtensor(GgmlType::from_name("Q8_0").unwrap(), 1, 32, q8, &Device::Cpu).unwrap();
        let v: Vec<f32> = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, want);
    }

    #[test]
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(130), 8.0);
        assert_eq!(e8m0(120), 1.0 / 128.0);
    }
}
