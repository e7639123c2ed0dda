//! Hidden states between pipeline stages: raw little-endian tensors in f32 (exact), f16 or
//! bf16, checked against the model's width before anything is allocated from the sizes a
//! message claims.

use candle_core::{DType, Device, Tensor};
use gantry_core::WireDtype;

use crate::EngineError;

/// A tensor as it travels: little-endian values of `dtype`, row-major (the fields of
/// `gantry.v1.HiddenStates`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenStates {
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    pub shape: Vec<u32>,
    pub data: Vec<u8>,
}

fn dtype(wire: WireDtype) -> DType {
    match wire {
        WireDtype::F32 => DType::F32,
        WireDtype::F16 => DType::F16,
        WireDtype::Bf16 => DType::BF16,
    }
}

/// Hidden states `[1, t, hidden]` ready to send.
pub fn encode(hidden: &Tensor, wire: WireDtype) -> Result<HiddenStates, EngineError> {
    let shape: Vec<u32> = hidden.dims().iter().map(|&d| d as u32).collect();
    let flat = hidden.flatten_all()?.to_dtype(dtype(wire))?;
    let mut data = Vec::with_capacity(flat.elem_count() * wire.width());
    match wire {
        WireDtype::F32 => flat.to_vec1::<f32>()?.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
        WireDtype::F16 => flat.to_vec1::<half::f16>()?.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
        WireDtype::Bf16 => flat.to_vec1::<half::bf16>()?.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
    }
    Ok(HiddenStates { dtype: wire.name().into(), shape, data })
}

/// Received hidden states as an f32 tensor on `device`, checked against `hidden_size`
/// before anything is allocated from the sizes it claims.
pub fn decode(h: &HiddenStates, hidden_size: usize, device: &Device) -> Result<Tensor, EngineError> {
    let wire = WireDtype::parse(&h.dtype)?;
    let bad = |why: String| EngineError::Config(format!("hidden states of shape {:?}: {why}", h.shape));
    let [batch, t, width] = h.shape[..] else { return Err(bad("expected [1, tokens, hidden]".into())) };
    if batch != 1 || t == 0 || width as usize != hidden_size {
        return Err(bad(format!("expected [1, tokens ≥ 1, {hidden_size}]")));
    }
    let count = t as usize * width as usize;
    if h.data.len() != count * wire.width() {
        return Err(bad(format!("{} bytes of {} data, expected {}", h.data.len(), wire.name(), count * wire.width())));
    }
    let values: Vec<f32> = match wire {
        WireDtype::F32 => h.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        WireDtype::F16 => h.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        WireDtype::Bf16 => h.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    };
    Ok(Tensor::from_vec(values, (1, t as usize, width as usize), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_states_round_trip_in_each_wire_dtype() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let t = Tensor::from_vec(values.clone(), (1, 3, 4), &Device::Cpu).unwrap();
        for wire in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
            let msg = encode(&t, wire).unwrap();
            assert_eq!(msg.data.len(), 12 * wire.width());
            let back = decode(&msg, 4, &Device::Cpu).unwrap();
            // Quarter steps are exact in every one of these formats.
            assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), values, "{}", wire.name());
        }
    }

    #[test]
    fn hostile_hidden_states_are_refused_before_allocating() {
        let ok = HiddenStates { dtype: "f32".into(), shape: vec![1, 2, 4], data: vec![0; 32] };
        assert!(decode(&ok, 4, &Device::Cpu).is_ok());
        let cases = [
            (HiddenStates { shape: vec![1, 2, 8], ..ok.clone() }, "expected [1, tokens ≥ 1, 4]"),
            (HiddenStates { shape: vec![1, u32::MAX, 4], ..ok.clone() }, "32 bytes of f32 data, expected"),
            (HiddenStates { shape: vec![2, 4], ..ok.clone() }, "expected [1, tokens, hidden]"),
            (HiddenStates { data: vec![0; 31], ..ok.clone() }, "31 bytes of f32 data, expected 32"),
            (HiddenStates { dtype: "q4".into(), ..ok.clone() }, "wire dtype `q4`: use f32, f16 or bf16"),
        ];
        for (msg, want) in cases {
            let e = decode(&msg, 4, &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
