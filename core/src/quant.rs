//! Weight formats: GGML quantization types, safetensors dtypes, and what a parameter costs in bytes.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::{Error, Result};

/// A GGML tensor type as stored in GGUF files, with its block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GgmlType {
    /// The numeric id in the GGUF tensor table.
    pub id: u32,
    /// llama.cpp's name (`Q4_K`, `F16`, …).
    pub name: &'static str,
    /// Elements per block.
    pub block_elements: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

/// Every GGML type a GGUF file may hold today: (id, name, elements per block, bytes per block).
/// The block sizes are those of ggml's `block_*` structs (e.g. `block_q4_K`: 2×f16 + 12 scale
/// bytes + 128 nibble bytes = 144 bytes per 256 weights).
const GGML_TYPES: [(u32, &str, u64, u64); 31] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
];

/// MXFP4 (gpt-oss): 32 four-bit values and one shared exponent byte.
const MXFP4: (u32, &str, u64, u64) = (39, "MXFP4", 32, 17);

impl GgmlType {
    /// Looks up a type id from a GGUF tensor table.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().chain(std::iter::once(&MXFP4)).find(|t| t.0 == id).map(|&(id, name, be, bb)| GgmlType {
            id,
            name,
            block_elements: be,
            block_bytes: bb,
        })
    }

    /// Looks up a type by llama.cpp's name, case-insensitively.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GGML_TYPES
            .iter()
            .chain(std::iter::once(&MXFP4))
            .find(|t| t.1.eq_ignore_ascii_case(name))
            .and_then(|t| GgmlType::from_id(t.0))
    }

    /// Bytes taken by `elements` values of this type; `None` when the count is not a whole
    /// number of blocks or the size overflows.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        if !elements.is_multiple_of(self.block_elements) {
            return None;
        }
        (elements / self.block_elements).checked_mul(self.block_bytes)
    }

    /// Average bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes as f64 * 8.0 / self.block_elements as f64
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// A safetensors element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SafetensorsDtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl SafetensorsDtype {
    /// Parses the header spelling (`BF16`, `F8_E4M3`, …).
    pub fn parse(s: &str) -> Option<SafetensorsDtype> {
        use SafetensorsDtype::*;
        Some(match s {
            "BOOL" => Bool,
            "U8" => U8,
            "I8" => I8,
            "F8_E4M3" => F8E4M3,
            "F8_E5M2" => F8E5M2,
            "I16" => I16,
            "U16" => U16,
            "F16" => F16,
            "BF16" => BF16,
            "I32" => I32,
            "U32" => U32,
            "F32" => F32,
            "I64" => I64,
            "U64" => U64,
            "F64" => F64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        use SafetensorsDtype::*;
        match self {
            Bool | U8 | I8 | F8E4M3 | F8E5M2 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            I64 | U64 | F64 => 8,
        }
    }

    /// The header spelling.
    pub fn name(self) -> &'static str {
        use SafetensorsDtype::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8E4M3 => "F8_E4M3",
            F8E5M2 => "F8_E5M2",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            I64 => "I64",
            U64 => "U64",
            F64 => "F64",
        }
    }
}

/// The precision a model is served at, as a user asks for it (`--dtype`). Serialized as its
/// lower-case name (`bf16`, `q4_k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
    /// A GGML quantization applied to the linear weights (embeddings and norms stay wider).
    Ggml(GgmlType),
}

impl Serialize for WeightDtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for WeightDtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        WeightDtype::parse(&name).map_err(serde::de::Error::custom)
    }
}

impl WeightDtype {
    /// Parses `f32`, `f16`/`fp16`/`float16`, `bf16`/`bfloat16`, or a GGML type or llama.cpp
    /// mix name (`q8_0`, `q4_k_m`: the mix is costed at its base type).
    pub fn parse(text: &str) -> Result<WeightDtype> {
        let t = text.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "f32" | "fp32" | "float32" => WeightDtype::F32,
            "f16" | "fp16" | "float16" | "half" => WeightDtype::F16,
            "bf16" | "bfloat16" => WeightDtype::Bf16,
            other => {
                // llama.cpp mixes: q4_k_m, q5_k_s, q3_k_l … cost as their base type.
                let base = other
                    .strip_suffix("_m")
                    .or_else(|| other.strip_suffix("_s"))
                    .or_else(|| other.strip_suffix("_l"))
                    .filter(|b| b.ends_with("_k"))
                    .unwrap_or(other);
                let ty = GgmlType::from_name(base).ok_or_else(|| Error::InvalidInput {
                    what: format!("dtype `{text}`"),
                    problem: "use f32, f16, bf16, or a GGUF quantization such as q8_0, q6_k, q4_k_m, q4_0".into(),
                })?;
                match ty.name {
                    "F32" => WeightDtype::F32,
                    "F16" => WeightDtype::F16,
                    "BF16" => WeightDtype::Bf16,
                    _ => WeightDtype::Ggml(ty),
                }
            }
        })
    }

    /// Bytes for `params` weights at this precision (rounded up to whole blocks).
    pub fn bytes_for(self, params: u64) -> Option<u64> {
        match self {
            WeightDtype::F32 => params.checked_mul(4),
            WeightDtype::F16 | WeightDtype::Bf16 => params.checked_mul(2),
            WeightDtype::Ggml(t) => params.div_ceil(t.block_elements).checked_mul(t.block_bytes),
        }
    }

    /// Average bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            WeightDtype::F32 => 32.0,
            WeightDtype::F16 | WeightDtype::Bf16 => 16.0,
            WeightDtype::Ggml(t) => t.bits_per_weight(),
        }
    }

    /// Whether this is a quantized (sub-16-bit) format.
    pub fn is_quantized(self) -> bool {
        matches!(self, WeightDtype::Ggml(_))
    }

    /// From a `torch_dtype` string (`bfloat16`, `float16`, `float32`).
    pub fn from_torch(name: &str) -> Option<WeightDtype> {
        match name {
            "float32" => Some(WeightDtype::F32),
            "float16" => Some(WeightDtype::F16),
            "bfloat16" => Some(WeightDtype::Bf16),
            _ => None,
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightDtype::F32 => f.write_str("f32"),
            WeightDtype::F16 => f.write_str("f16"),
            WeightDtype::Bf16 => f.write_str("bf16"),
            WeightDtype::Ggml(t) => f.write_str(&t.name.to_ascii_lowercase()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_give_known_bits_per_weight() {
        let cases = [("Q4_0", 4.5), ("Q4_1", 5.0), ("Q8_0", 8.5), ("Q4_K", 4.5), ("Q6_K", 6.5625), ("Q2_K", 2.625)];
        for (name, bpw) in cases {
            assert_eq!(GgmlType::from_name(name).unwrap().bits_per_weight(), bpw, "{name}");
        }
    }

    #[test]
    fn bytes_need_whole_blocks() {
        let q4k = GgmlType::from_name("q4_k").unwrap();
        assert_eq!(q4k.bytes_for(512), Some(288));
        assert_eq!(q4k.bytes_for(100), None);
        assert_eq!(GgmlType::from_id(0).unwrap().bytes_for(u64::MAX), None);
    }

    #[test]
    fn parses_user_dtypes_including_llama_cpp_mixes() {
        assert_eq!(WeightDtype::parse("bfloat16").unwrap(), WeightDtype::Bf16);
        assert_eq!(WeightDtype::parse("FP16").unwrap(), WeightDtype::F16);
        assert_eq!(WeightDtype::parse("q4_k_m").unwrap().to_string(), "q4_k");
        assert_eq!(WeightDtype::parse("Q8_0").unwrap().to_string(), "q8_0");
        let err = WeightDtype::parse("int3").unwrap_err().to_string();
        assert!(err.contains("dtype `int3`") && err.contains("q4_k_m"), "{err}");
    }

    #[test]
    fn dtypes_serialize_as_their_names() {
        let q = WeightDtype::parse("q4_k_m").unwrap();
        assert_eq!(serde_json::to_string(&q).unwrap(), "\"q4_k\"");
        assert_eq!(serde_json::from_str::<WeightDtype>("\"bf16\"").unwrap(), WeightDtype::Bf16);
    }

    #[test]
    fn unknown_type_ids_are_none() {
        assert!(GgmlType::from_id(4).is_none(), "Q4_2 was removed from ggml");
        assert!(GgmlType::from_id(9999).is_none());
    }
}
