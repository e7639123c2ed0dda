//! How hidden states travel between the pipeline stages of a split model: their element type
//! on the wire. A deployment names it (`stage_wire_dtype`), the controller checks it, each
//! stage encodes and decodes with it.

use crate::error::Error;

/// The element type of hidden states on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDtype {
    /// 4 bytes a value: exact.
    #[default]
    F32,
    /// 2 bytes a value, rounded.
    F16,
    /// 2 bytes a value, rounded more coarsely, f32's range.
    Bf16,
}

impl WireDtype {
    /// `f32`, `f16` or `bf16` (`float32`, `float16`, `bfloat16` too); empty means f32.
    pub fn parse(name: &str) -> Result<WireDtype, Error> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "f32" | "float32" => Ok(WireDtype::F32),
            "f16" | "float16" => Ok(WireDtype::F16),
            "bf16" | "bfloat16" => Ok(WireDtype::Bf16),
            other => Err(Error::InvalidInput {
                what: format!("wire dtype `{other}`"),
                problem: "use f32, f16 or bf16".into(),
            }),
        }
    }

    /// The name as written on the wire and in specs.
    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "f32",
            WireDtype::F16 => "f16",
            WireDtype::Bf16 => "bf16",
        }
    }

    /// Bytes per value.
    pub fn width(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_ones_are_refused() {
        for w in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
            assert_eq!(WireDtype::parse(w.name()), Ok(w));
        }
        assert_eq!(WireDtype::parse(""), Ok(WireDtype::F32));
        assert_eq!(WireDtype::parse(" BFloat16 "), Ok(WireDtype::Bf16));
        assert_eq!(WireDtype::parse("q4").unwrap_err().to_string(), "wire dtype `q4`: use f32, f16 or bf16");
    }
}
