//! GPU inventories as users write them: `1x24GiB`, `2x80GiB,4x16GiB`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::units::{format_bytes, parse_bytes};

/// One GPU's memory, as declared or reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// A label (`gpu0`, or the NVML name).
    pub name: String,
    pub memory_bytes: u64,
}

/// Parses a GPU list: comma-separated groups of `COUNTxSIZE` (or a bare `SIZE` for one GPU).
///
/// `2x80GiB,4x16GiB` is six GPUs. At most 1024 GPUs, each between 1 MiB and 1 PiB.
pub fn parse_gpus(spec: &str) -> Result<Vec<Gpu>> {
    let bad = |problem: String| Error::InvalidInput { what: format!("GPU list `{spec}`"), problem };
    let mut gpus = Vec::new();
    for group in spec.split(',').map(str::trim) {
        if group.is_empty() {
            return Err(bad("empty entry; write groups like 2x80GiB,4x16GiB".into()));
        }
        let (count, size) = match group.split_once(['x', 'X', '×']) {
            Some((n, size)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
                let n: u64 = n.parse().map_err(|_| bad(format!("`{n}` is not a GPU count")))?;
                (n, size)
            }
            _ => (1, group),
        };
        if count == 0 {
            return Err(bad(format!("`{group}` has zero GPUs")));
        }
        let bytes = parse_bytes(size).map_err(|e| bad(e.to_string()))?;
        if bytes < (1 << 20) {
            return Err(bad(format!("{} per GPU is less than 1 MiB", format_bytes(bytes))));
        }
        if gpus.len() as u64 + count > 1024 {
            return Err(bad("more than 1024 GPUs".into()));
        }
        for _ in 0..count {
            let name = format!("gpu{}", gpus.len());
            gpus.push(Gpu { name, memory_bytes: bytes });
        }
    }
    Ok(gpus)
}

/// Summarises a GPU list compactly: `2×80.0 GiB + 4×16.0 GiB`.
pub fn describe_gpus(gpus: &[Gpu]) -> String {
    let mut groups: Vec<(u64, usize)> = Vec::new();
    for g in gpus {
        match groups.last_mut() {
            Some((size, n)) if *size == g.memory_bytes => *n += 1,
            _ => groups.push((g.memory_bytes, 1)),
        }
    }
    groups.iter().map(|(size, n)| format!("{n}×{}", format_bytes(*size))).collect::<Vec<_>>().join(" + ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::GIB;

    #[test]
    fn parses_groups_of_gpus() {
        let gpus = parse_gpus("2x80GiB,4x16GiB").unwrap();
        assert_eq!(gpus.len(), 6);
        assert_eq!(gpus[0].memory_bytes, 80 * GIB);
        assert_eq!(gpus[5].memory_bytes, 16 * GIB);
        assert_eq!(gpus[5].name, "gpu5");
        assert_eq!(parse_gpus("24GiB").unwrap().len(), 1);
        assert_eq!(parse_gpus("1X24GiB").unwrap()[0].memory_bytes, 24 * GIB);
        assert_eq!(describe_gpus(&gpus), "2×80.0 GiB + 4×16.0 GiB");
    }

    #[test]
    fn refuses_bad_gpu_lists_with_the_reason() {
        let cases = [
            ("", "empty entry"),
            ("2x80GiB,", "empty entry"),
            ("0x80GiB", "zero GPUs"),
            ("2x80", "add a unit"),
            ("2xbig", "expected a number"),
            ("100000x80GiB", "more than 1024 GPUs"),
            ("1x512KiB", "less than 1 MiB"),
        ];
        for (spec, want) in cases {
            let err = parse_gpus(spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }
}
