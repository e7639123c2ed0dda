//! The shape of a decoder-only transformer, normalised across families, and its parameter count.
//!
//! Every family's `config.json` (or GGUF metadata) is reduced to an [`Architecture`]; the
//! parameter count is then one formula with a few switches (biases, norms per layer, gated
//! MLP, experts) rather than one formula per family.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, product, sum};
use crate::family::Family;

/// Mixture-of-experts routing: how many expert MLPs a layer has and how many each token uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moe {
    /// Experts per MoE layer.
    pub experts: u64,
    /// Experts each token is routed through.
    pub experts_per_token: u64,
    /// Intermediate size of one expert (often the config's `intermediate_size`).
    pub expert_intermediate_size: u64,
    /// Intermediate size of an always-on shared expert (Qwen2-MoE), if any.
    pub shared_expert_intermediate_size: Option<u64>,
}

/// The switches that make one family's layer differ from another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Normalisation layers per block (1 for parallel Falcon-7B/Phi-2, 4 for Gemma 2/3).
    pub norms_per_layer: u64,
    /// LayerNorm with bias (GPT-2, Phi-2, Falcon) rather than RMSNorm.
    pub norm_bias: bool,
    /// Bias on the query/key/value projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub out_bias: bool,
    /// Gated MLP (gate, up, down: 3 matrices) rather than up/down (2 matrices).
    pub gated_mlp: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys (Gemma 3, Qwen 3).
    pub qk_norm: bool,
    /// Learned attention sinks, one per head (gpt-oss).
    pub attention_sinks: bool,
    /// Bias on the output head (Phi-2).
    pub head_bias: bool,
}

impl LayerShape {
    /// The common modern block: RMSNorm ×2, no biases, gated MLP (LLaMA, Mistral, Qwen 3, Phi-3).
    pub const fn llama() -> LayerShape {
        LayerShape {
            norms_per_layer: 2,
            norm_bias: false,
            qkv_bias: false,
            out_bias: false,
            gated_mlp: true,
            mlp_bias: false,
            qk_norm: false,
            attention_sinks: false,
            head_bias: false,
        }
    }
}

/// Which layers attend only to a recent window of tokens (their KV cache is capped at it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// Window size in tokens.
    pub window: u64,
    /// Indices of the layers that use it; the others attend to the full context.
    pub layers: Vec<u32>,
}

/// The SigLIP-style vision tower and projector of a multimodal model, as a parameter count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisionTower {
    /// Parameters of the vision encoder.
    pub encoder_params: u64,
    /// Parameters of the projector into the text model.
    pub projector_params: u64,
}

/// A decoder-only transformer's shape, normalised across families.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Architecture {
    pub family: Family,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    /// The output head shares the token embedding matrix.
    pub tied_embeddings: bool,
    /// Size of a learned absolute position table (GPT-2's `wpe`), if any.
    pub learned_positions: Option<u64>,
    pub moe: Option<Moe>,
    pub shape: LayerShape,
    pub sliding_window: Option<SlidingWindow>,
    pub vision: Option<VisionTower>,
}

/// A parameter count split the way memory is split across pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamBreakdown {
    /// Token (and learned position) embeddings: live on the first stage.
    pub embedding: u64,
    /// One transformer block (all blocks are the same size).
    pub per_layer: u64,
    /// All blocks.
    pub layers: u64,
    /// The final norm and the output head when not tied: live on the last stage.
    pub head: u64,
    /// Vision tower and projector (multimodal models).
    pub vision: u64,
    /// Everything.
    pub total: u64,
    /// Parameters used per token (differs from `total` for mixture-of-experts).
    pub active: u64,
}

/// The most layers a model may have (far beyond any published one); per-layer lists are sized
/// only after a count is checked against it.
pub const MAX_LAYERS: u64 = 1 << 14;

impl Architecture {
    /// Checks the numbers are those of a model that could exist, before any arithmetic.
    pub fn validate(&self) -> Result<()> {
        let absurd = |what: &str, value: u64, why: &str| Error::Absurd {
            what: what.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        // Bounds far beyond any published model, tight enough that products fit in u64.
        let limits: [(&str, u64, u64); 7] = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, 1 << 14),
            ("num_key_value_heads", self.num_kv_heads, 1 << 14),
            ("head_dim", self.head_dim, 1 << 14),
        ];
        for (what, value, max) in limits {
            if value == 0 {
                return Err(absurd(what, value, "must be at least 1"));
            }
            if value > max {
                return Err(absurd(what, value, &format!("the largest plausible value is {max}")));
            }
        }
        if self.num_kv_heads > self.num_heads {
            return Err(absurd(
                "num_key_value_heads",
                self.num_kv_heads,
                &format!("more key/value heads than attention heads ({})", self.num_heads),
            ));
        }
        if let Some(moe) = self.moe {
            if moe.experts == 0 || moe.experts > 4096 {
                return Err(absurd("num_local_experts", moe.experts, "must be 1..=4096"));
            }
            if moe.experts_per_token == 0 || moe.experts_per_token > moe.experts {
                return Err(absurd(
                    "num_experts_per_tok",
                    moe.experts_per_token,
                    &format!("must be 1..={}", moe.experts),
                ));
            }
            if moe.expert_intermediate_size == 0 || moe.expert_intermediate_size > 1 << 22 {
                return Err(absurd("moe_intermediate_size", moe.expert_intermediate_size, "must be 1..=4194304"));
            }
        }
        Ok(())
    }

    /// Width of the query projection output (`heads × head_dim`).
    pub fn q_width(&self) -> u64 {
        self.num_heads * self.head_dim
    }

    /// Width of one of the key or value projections (`kv_heads × head_dim`).
    pub fn kv_width(&self) -> u64 {
        self.num_kv_heads * self.head_dim
    }

    /// Counts parameters from the shape alone (no tensor table), split by where they live.
    pub fn count_params(&self) -> Result<ParamBreakdown> {
        self.validate()?;
        let what = "the parameter count";
        let h = self.hidden_size;
        let s = self.shape;
        let b = |on: bool, n: u64| if on { n } else { 0 };

        let positions = product(&[self.learned_positions.unwrap_or(0), h], what)?;
        let embedding = sum(&[product(&[self.vocab_size, h], what)?, positions], what)?;

        let q = self.q_width();
        let kv = self.kv_width();
        let attention = sum(
            &[
                product(&[h, q + 2 * kv], what)?,
                b(s.qkv_bias, q + 2 * kv),
                product(&[q, h], what)?,
                b(s.out_bias, h),
                b(s.qk_norm, 2 * self.head_dim),
                b(s.attention_sinks, self.num_heads),
            ],
            what,
        )?;
        let norms = s.norms_per_layer * if s.norm_bias { 2 * h } else { h };

        let dense_mlp = |inter: u64| -> Result<u64> {
            let mats = if s.gated_mlp { 3 } else { 2 };
            let biases = if s.mlp_bias { inter * (mats - 1) + h } else { 0 };
            sum(&[product(&[mats, h, inter], what)?, biases], what)
        };
        let (mlp_total, mlp_active) = match self.moe {
            None => {
                let m = dense_mlp(self.intermediate_size)?;
                (m, m)
            }
            Some(moe) => {
                let expert = dense_mlp(moe.expert_intermediate_size)?;
                let router = sum(&[product(&[h, moe.experts], what)?, b(s.mlp_bias, moe.experts)], what)?;
                let shared = match moe.shared_expert_intermediate_size {
                    // A shared expert plus its scalar gate (Qwen2-MoE).
                    Some(inter) => sum(&[dense_mlp(inter)?, h], what)?,
                    None => 0,
                };
                let all = sum(&[product(&[expert, moe.experts], what)?, router, shared], what)?;
                let active = sum(&[product(&[expert, moe.experts_per_token], what)?, router, shared], what)?;
                (all, active)
            }
        };

        let per_layer = sum(&[attention, norms, mlp_total], what)?;
        let per_layer_active = sum(&[attention, norms, mlp_active], what)?;
        let layers = product(&[per_layer, self.num_layers], what)?;
        let layers_active = product(&[per_layer_active, self.num_layers], what)?;

        let final_norm = if s.norm_bias { 2 * h } else { h };
        let untied_head = if self.tied_embeddings { 0 } else { product(&[self.vocab_size, h], what)? };
        let head = sum(&[final_norm, untied_head, b(s.head_bias, self.vocab_size)], what)?;

        let vision = self.vision.map_or(Ok(0), |v| sum(&[v.encoder_params, v.projector_params], what))?;
        let total = sum(&[embedding, layers, head, vision], what)?;
        let active = sum(&[embedding, layers_active, head, vision], what)?;
        Ok(ParamBreakdown { embedding, per_layer, layers, head, vision, total, active })
    }

    /// Whether layer `index` attends only to the sliding window.
    pub fn is_sliding(&self, index: u64) -> bool {
        self.sliding_window
            .as_ref()
            .is_some_and(|sw| u32::try_from(index).is_ok_and(|i| sw.layers.binary_search(&i).is_ok()))
    }

    /// Parameters of the expert weight matrices alone (the part MXFP4 quantizes in gpt-oss).
    pub fn expert_matrix_params(&self) -> Result<u64> {
        let Some(moe) = self.moe else { return Ok(0) };
        let mats = if self.shape.gated_mlp { 3 } else { 2 };
        product(
            &[mats, self.hidden_size, moe.expert_intermediate_size, moe.experts, self.num_layers],
            "the expert parameter count",
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SmolLM2-135M's shape, written out by hand.
    pub(crate) fn smollm2() -> Architecture {
        Architecture {
            family: Family::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            tied_embeddings: true,
            learned_positions: None,
            moe: None,
            shape: LayerShape::llama(),
            sliding_window: None,
            vision: None,
        }
    }

    #[test]
    fn counts_smollm2_exactly() {
        let p = smollm2().count_params().unwrap();
        assert_eq!(p.total, 134_515_008);
        assert_eq!(p.embedding, 49152 * 576);
        assert_eq!(p.head, 576, "tied head: only the final norm");
        assert_eq!(p.per_layer * 30 + p.embedding + p.head, p.total);
        assert_eq!(p.active, p.total);
    }

    #[test]
    fn rejects_absurd_shapes_before_arithmetic() {
        type Mutation = fn(&mut Architecture);
        let cases: [(&str, Mutation); 4] = [
            ("hidden_size", |a| a.hidden_size = 0),
            ("vocab_size", |a| a.vocab_size = u64::MAX),
            ("num_key_value_heads", |a| a.num_kv_heads = 10),
            ("num_hidden_layers", |a| a.num_layers = 1 << 40),
        ];
        for (key, mutate) in cases {
            let mut a = smollm2();
            mutate(&mut a);
            let err = a.count_params().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn sliding_layers_are_looked_up_by_index() {
        let mut a = smollm2();
        a.sliding_window = Some(SlidingWindow { window: 512, layers: vec![0, 2, 4] });
        assert!(a.is_sliding(2));
        assert!(!a.is_sliding(3));
        assert!(!a.is_sliding(u64::MAX));
    }
}
