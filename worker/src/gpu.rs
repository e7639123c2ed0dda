//! The GPUs a worker offers: read through NVML, declared on the command line or in a file, or
//! — with neither — this machine's memory as one CPU device so the worker can still serve.

use std::path::Path;

use gantry_core::hardware::parse_gpus;
use serde::Serialize;

/// One device and its memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    /// NVML's UUID (`GPU-…`); for declared and CPU devices, a stable name.
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// `(major, minor)` CUDA compute capability.
    pub compute_capability: Option<(u32, u32)>,
    /// Percent of time a kernel ran over the last sample period.
    pub utilization_percent: Option<u32>,
    pub source: InventorySource,
}

/// Where the inventory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InventorySource {
    Nvml,
    Declared,
    Cpu,
}

impl InventorySource {
    pub fn as_str(self) -> &'static str {
        match self {
            InventorySource::Nvml => "nvml",
            InventorySource::Declared => "declared",
            InventorySource::Cpu => "cpu",
        }
    }
}

/// A source of the worker's device list, re-read for fresh free memory.
pub trait GpuInventory: Send + Sync + std::fmt::Debug {
    /// The devices now.
    fn gpus(&self) -> Result<Vec<GpuInfo>, String>;
    /// The driver version, where there is one.
    fn driver_version(&self) -> Option<String> {
        None
    }
    /// A remark for operators (why NVML is not used, …).
    fn note(&self) -> &str;
    /// Whether the GPUs are linked to each other (NVLink).
    fn linked(&self) -> bool {
        false
    }
}

/// Devices declared by the operator: `2x80GiB`, or a file with one `NAME SIZE` per line.
#[derive(Debug)]
pub struct DeclaredInventory {
    gpus: Vec<GpuInfo>,
    note: String,
}

impl DeclaredInventory {
    /// From a GPU list such as `2x80GiB,4x16GiB`.
    pub fn from_spec(spec: &str) -> Result<DeclaredInventory, String> {
        let gpus = parse_gpus(spec).map_err(|e| e.to_string())?;
        Ok(DeclaredInventory::new(
            gpus.into_iter().map(|g| (g.name, g.memory_bytes)).collect(),
            format!("declared: {spec}"),
        ))
    }

    /// From a file of `NAME SIZE` lines (`#` comments, blank lines ignored), e.g.
    /// `a100-0 80GiB`.
    pub fn from_file(path: &Path) -> Result<DeclaredInventory, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut gpus = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(name), Some(size), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("{}:{}: expected `NAME SIZE`, like `a100-0 80GiB`", path.display(), n + 1));
            };
            let bytes =
                gantry_core::units::parse_bytes(size).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
            gpus.push((name.to_string(), bytes));
        }
        if gpus.is_empty() {
            return Err(format!("{} lists no GPUs", path.display()));
        }
        Ok(DeclaredInventory::new(gpus, format!("declared in {}", path.display())))
    }

    fn new(gpus: Vec<(String, u64)>, note: String) -> DeclaredInventory {
        let gpus = gpus
            .into_iter()
            .enumerate()
            .map(|(i, (name, bytes))| GpuInfo {
                index: i as u32,
                uuid: format!("declared-{i}-{name}"),
                name,
                total_bytes: bytes,
                used_bytes: 0,
                free_bytes: bytes,
                compute_capability: None,
                utilization_percent: None,
                source: InventorySource::Declared,
            })
            .collect();
        DeclaredInventory { gpus, note }
    }
}

impl GpuInventory for DeclaredInventory {
    fn gpus(&self) -> Result<Vec<GpuInfo>, String> {
        Ok(self.gpus.clone())
    }

    fn note(&self) -> &str {
        &self.note
    }
}

/// This machine's memory as one CPU device (`MemTotal`/`MemAvailable` of `/proc/meminfo`).
#[derive(Debug)]
pub struct CpuInventory {
    note: String,
}

impl CpuInventory {
    pub fn new(note: String) -> CpuInventory {
        CpuInventory { note }
    }
}

/// Parses `MemTotal` and `MemAvailable` (kB) from `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

impl GpuInventory for CpuInventory {
    fn gpus(&self) -> Result<Vec<GpuInfo>, String> {
        let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
        let (total, free) = parse_meminfo(&text).ok_or("no MemTotal/MemAvailable in /proc/meminfo")?;
        Ok(vec![GpuInfo {
            index: 0,
            name: "cpu".into(),
            uuid: "cpu-0".into(),
            total_bytes: total,
            used_bytes: total.saturating_sub(free),
            free_bytes: free,
            compute_capability: None,
            utilization_percent: None,
            source: InventorySource::Cpu,
        }])
    }

    fn note(&self) -> &str {
        &self.note
    }
}

/// Raw values NVML reports for one device, converted by [`GpuInfo::from_nvml`].
#[derive(Debug, Clone, Default)]
pub struct NvmlReading {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total: u64,
    pub memory_used: u64,
    pub memory_free: u64,
    pub cc_major: Option<i32>,
    pub cc_minor: Option<i32>,
    pub utilization_gpu: Option<u32>,
}

impl GpuInfo {
    /// Converts NVML's reading; memory is in bytes in NVML's `nvmlMemory_t`. Impossible values
    /// (used above total, negative capability, utilization over 100) are dropped, not trusted.
    pub fn from_nvml(r: NvmlReading) -> GpuInfo {
        let used = r.memory_used.min(r.memory_total);
        let free = r.memory_free.min(r.memory_total);
        let cc = match (r.cc_major, r.cc_minor) {
            (Some(a), Some(b)) if a >= 0 && b >= 0 => Some((a as u32, b as u32)),
            _ => None,
        };
        GpuInfo {
            index: r.index,
            name: r.name,
            uuid: r.uuid,
            total_bytes: r.memory_total,
            used_bytes: used,
            free_bytes: free,
            compute_capability: cc,
            utilization_percent: r.utilization_gpu.filter(|&u| u <= 100),
            source: InventorySource::Nvml,
        }
    }
}

/// GPUs read through NVML (`libnvidia-ml.so`, loaded at run time: nothing to link at build
/// time, and its absence is an answer, not a crash).
pub struct NvmlInventory {
    nvml: nvml_wrapper::Nvml,
    note: String,
    linked: bool,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlInventory")
    }
}

impl NvmlInventory {
    /// Initializes NVML; the error says why it cannot be used.
    pub fn new() -> Result<NvmlInventory, String> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML is not available ({e})"))?;
        let count = nvml.device_count().map_err(|e| format!("NVML cannot count devices ({e})"))?;
        if count == 0 {
            return Err("NVML reports no GPUs".into());
        }
        // Linked when there are several GPUs and every one has an active NVLink.
        let linked = count > 1
            && (0..count)
                .all(|i| nvml.device_by_index(i).is_ok_and(|d| d.link_wrapper_for(0).is_active().unwrap_or(false)));
        let links = if linked { ", NVLink" } else { "" };
        Ok(NvmlInventory { nvml, linked, note: format!("NVML: {count} GPU(s){links}") })
    }
}

impl GpuInventory for NvmlInventory {
    fn gpus(&self) -> Result<Vec<GpuInfo>, String> {
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for i in 0..count {
            let d = self.nvml.device_by_index(i).map_err(|e| format!("GPU {i}: {e}"))?;
            let mem = d.memory_info().map_err(|e| format!("GPU {i} memory: {e}"))?;
            let cc = d.cuda_compute_capability().ok();
            out.push(GpuInfo::from_nvml(NvmlReading {
                index: i,
                name: d.name().unwrap_or_else(|_| format!("gpu{i}")),
                uuid: d.uuid().unwrap_or_default(),
                memory_total: mem.total,
                memory_used: mem.used,
                memory_free: mem.free,
                cc_major: cc.as_ref().map(|c| c.major),
                cc_minor: cc.as_ref().map(|c| c.minor),
                utilization_gpu: d.utilization_rates().ok().map(|u| u.gpu),
            }));
        }
        Ok(out)
    }

    fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    fn note(&self) -> &str {
        &self.note
    }

    fn linked(&self) -> bool {
        self.linked
    }
}

/// Chooses the inventory: the declared list or file when given; else NVML; else the CPU,
/// with a note saying why NVML was not used.
pub fn detect(declared: Option<&str>) -> Result<Box<dyn GpuInventory>, String> {
    if let Some(spec) = declared {
        let path = Path::new(spec);
        return Ok(if path.is_file() {
            Box::new(DeclaredInventory::from_file(path)?)
        } else {
            Box::new(DeclaredInventory::from_spec(spec)?)
        });
    }
    match NvmlInventory::new() {
        Ok(n) => Ok(Box::new(n)),
        Err(why) => Ok(Box::new(CpuInventory::new(format!("{why}; serving on the CPU")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_readings_convert_to_bytes_and_drop_impossible_values() {
        let g = GpuInfo::from_nvml(NvmlReading {
            index: 1,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: "GPU-0b1c".into(),
            memory_total: 85_520_809_984,
            memory_used: 600_000_000,
            memory_free: 84_920_809_984,
            cc_major: Some(9),
            cc_minor: Some(0),
            utilization_gpu: Some(37),
        });
        assert_eq!((g.total_bytes, g.free_bytes, g.used_bytes), (85_520_809_984, 84_920_809_984, 600_000_000));
        assert_eq!(g.compute_capability, Some((9, 0)));
        assert_eq!(g.utilization_percent, Some(37));
        let odd = GpuInfo::from_nvml(NvmlReading {
            memory_total: 10,
            memory_used: 20,
            memory_free: 30,
            cc_major: Some(-1),
            cc_minor: Some(0),
            utilization_gpu: Some(250),
            ..Default::default()
        });
        assert_eq!((odd.used_bytes, odd.free_bytes), (10, 10));
        assert_eq!((odd.compute_capability, odd.utilization_percent), (None, None));
    }

    #[test]
    fn declared_lists_and_files_become_devices() {
        let inv = DeclaredInventory::from_spec("2x80GiB,1x24GiB").unwrap();
        let g = inv.gpus().unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(g[2].total_bytes, 24 << 30);
        assert_eq!(g[0].source, InventorySource::Declared);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gpus.txt");
        std::fs::write(&f, "# my node\na100-0 80GiB\n\nl4-1 24GB  # the small one\n").unwrap();
        let g = DeclaredInventory::from_file(&f).unwrap().gpus().unwrap();
        assert_eq!((g[0].name.as_str(), g[1].total_bytes), ("a100-0", 24_000_000_000));
        std::fs::write(&f, "a100-0\n").unwrap();
        assert!(DeclaredInventory::from_file(&f).unwrap_err().contains(":1: expected `NAME SIZE`"));
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(text), Some((24_576_000 * 1024, 20_000_000 * 1024)));
        assert_eq!(parse_meminfo("nonsense"), None);
    }

    #[test]
    fn without_nvml_or_a_declaration_the_cpu_serves_and_says_why() {
        // This machine has no NVIDIA driver: NVML fails to load and the CPU is offered.
        let inv = detect(None).unwrap();
        let g = inv.gpus().unwrap();
        if g[0].source == InventorySource::Cpu {
            assert!(inv.note().starts_with("NVML is not available"), "{}", inv.note());
            assert!(g[0].total_bytes > 0 && g[0].free_bytes <= g[0].total_bytes);
        }
    }
}
