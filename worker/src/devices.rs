//! Which device a load's `device` names: the engine device it runs on and the inventory device
//! its memory is counted against (a pure function of the inventory).

use crate::error::WorkerError;
use crate::gpu::{GpuInfo, InventorySource};

/// Where a model's layers run and whose memory they take.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceBinding {
    /// The engine's device name (`cpu`, `cuda:N`).
    pub engine_device: String,
    /// The inventory device its memory is counted against.
    pub inventory_index: Option<u32>,
    /// What requests and status call it (`gpu:0`, `cpu`, `cuda:1`).
    pub label: String,
}

/// Binds a load request's `device` (`""`, `cpu`, `gpu:N`, `cuda:N`) to this worker's `gpus`.
pub fn bind(device: &str, gpus: &[GpuInfo]) -> Result<DeviceBinding, WorkerError> {
    let device = device.trim().to_ascii_lowercase();
    let nvml = gpus.first().is_some_and(|g| g.source == InventorySource::Nvml);
    let index_of = |text: &str, prefix: &str| -> Result<u32, WorkerError> {
        let n: u32 = text
            .strip_prefix(prefix)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| WorkerError::Invalid(format!("device `{text}`: use cpu, gpu:N or cuda:N")))?;
        if gpus.iter().any(|g| g.index == n) {
            Ok(n)
        } else {
            Err(WorkerError::Invalid(format!(
                "device `{text}`: this worker has {} device(s), numbered 0..{}",
                gpus.len(),
                gpus.len().saturating_sub(1)
            )))
        }
    };
    match device.as_str() {
        "" => {
            // The first inventory device: a GPU through NVML, a declared one, or the CPU.
            let first = gpus.first();
            let cpu = first.is_none_or(|g| g.source == InventorySource::Cpu);
            Ok(DeviceBinding {
                engine_device: if nvml { format!("cuda:{}", first.map_or(0, |g| g.index)) } else { "cpu".into() },
                inventory_index: first.map(|g| g.index),
                label: match first {
                    Some(g) if !cpu => format!("gpu:{}", g.index),
                    _ => "cpu".into(),
                },
            })
        }
        "cpu" => Ok(DeviceBinding {
            engine_device: "cpu".into(),
            inventory_index: gpus.iter().find(|g| g.source == InventorySource::Cpu).map(|g| g.index),
            label: "cpu".into(),
        }),
        d if d.starts_with("gpu:") => {
            let n = index_of(d, "gpu:")?;
            // Declared GPUs are accounted, not driven: their models run on the CPU.
            let engine_device = if nvml { format!("cuda:{n}") } else { "cpu".into() };
            Ok(DeviceBinding { engine_device, inventory_index: Some(n), label: d.to_string() })
        }
        d if d.starts_with("cuda:") => {
            let n = index_of(d, "cuda:")?;
            Ok(DeviceBinding { engine_device: d.to_string(), inventory_index: Some(n), label: d.to_string() })
        }
        d => Err(WorkerError::Invalid(format!("device `{d}`: use cpu, gpu:N or cuda:N"))),
    }
}
