//! Safetensors headers and `model.safetensors.index.json`: tensor names, dtypes and shapes.
//!
//! A safetensors file starts with an 8-byte little-endian header length and a JSON header;
//! the callers read just that prefix (kilobytes of a multi-gigabyte file) and hand it here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::quant::SafetensorsDtype;

/// The safetensors format caps the header at 100 MB.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsTensor {
    pub name: String,
    pub dtype: SafetensorsDtype,
    pub shape: Vec<u64>,
    pub elements: u64,
    pub bytes: u64,
}

/// A parsed safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SafetensorsHeader {
    pub tensors: Vec<SafetensorsTensor>,
    /// The free-form `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// Reads the header length from a file's first 8 bytes and checks it is plausible.
pub fn header_len(file: &str, first8: &[u8], file_len: u64) -> Result<u64> {
    let bad = |reason: String| Error::InvalidSafetensors { file: file.to_string(), reason };
    let raw: [u8; 8] = first8
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| bad(format!("{} bytes is shorter than the 8-byte header length", first8.len())))?;
    let n = u64::from_le_bytes(raw);
    if n == 0 || n > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {n} is outside 1..={MAX_HEADER_BYTES}")));
    }
    if n.saturating_add(8) > file_len {
        return Err(bad(format!("header of {n} bytes runs past the end of the {file_len}-byte file (truncated?)")));
    }
    Ok(n)
}

/// Parses a safetensors header from the file's first `8 + header_len` bytes, checking every
/// tensor's data range against the file length.
pub fn parse_header(file: &str, prefix: &[u8], file_len: u64) -> Result<SafetensorsHeader> {
    let bad = |reason: String| Error::InvalidSafetensors { file: file.to_string(), reason };
    let n = header_len(file, prefix, file_len)?;
    let end = 8 + n as usize; // n <= MAX_HEADER_BYTES
    let json = prefix.get(8..end).ok_or_else(|| bad(format!("needs {end} bytes of header, got {}", prefix.len())))?;
    let value: Value = serde_json::from_slice(json).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = file_len - 8 - n;

    let mut header = SafetensorsHeader::default();
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    header.metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let dtype_name =
            entry.get("dtype").and_then(Value::as_str).ok_or_else(|| bad(format!("`{name}` has no dtype")))?;
        let dtype = SafetensorsDtype::parse(dtype_name)
            .ok_or_else(|| bad(format!("`{name}` has unknown dtype {dtype_name}")))?;
        let shape: Vec<u64> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("`{name}` has no shape")))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| bad(format!("`{name}` has a non-integer dimension {d}"))))
            .collect::<Result<_>>()?;
        let elements = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&e| e <= 1 << 40)
            .ok_or_else(|| bad(format!("`{name}` has absurd shape {shape:?}")))?;
        let bytes = elements * dtype.size();
        let offsets: Vec<u64> = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let [start, stop] = offsets[..] else {
            return Err(bad(format!("`{name}` needs data_offsets [start, end]")));
        };
        if stop < start || stop - start != bytes {
            return Err(bad(format!(
                "`{name}`: data_offsets [{start}, {stop}] do not hold {bytes} bytes of {dtype_name} {shape:?}"
            )));
        }
        if stop > data_len {
            return Err(bad(format!(
                "`{name}` ends at data byte {stop} but the file holds {data_len} bytes of data (truncated?)"
            )));
        }
        header.tensors.push(SafetensorsTensor { name: name.clone(), dtype, shape, elements, bytes });
    }
    Ok(header)
}

/// A sharded checkpoint's `model.safetensors.index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SafetensorsIndex {
    /// `metadata.total_size`: bytes of all tensor data.
    pub total_size: Option<u64>,
    /// The shard files, sorted.
    pub files: BTreeSet<String>,
    /// How many tensors the weight map names.
    pub tensor_count: usize,
}

/// Parses `model.safetensors.index.json`.
pub fn parse_index(text: &str) -> Result<SafetensorsIndex> {
    let file = "model.safetensors.index.json";
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::MalformedJson { file: file.into(), detail: e.to_string() })?;
    let map = value.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::MissingKey {
        file: file.into(),
        key: "weight_map".into(),
        family: "sharded".into(),
    })?;
    let mut files = BTreeSet::new();
    for (tensor, f) in map {
        let f = f.as_str().ok_or_else(|| Error::BadValue {
            file: file.into(),
            key: format!("weight_map.{tensor}"),
            problem: "must be a file name".into(),
        })?;
        // Shards live beside the index; a path that climbs out is refused.
        if f.contains("..") || f.starts_with('/') || f.contains('\\') {
            return Err(Error::BadValue {
                file: file.into(),
                key: format!("weight_map.{tensor}"),
                problem: format!("`{f}` is not a plain file name beside the index"),
            });
        }
        files.insert(f.to_string());
    }
    Ok(SafetensorsIndex {
        total_size: value.pointer("/metadata/total_size").and_then(Value::as_u64),
        files,
        tensor_count: map.len(),
    })
}

/// Builds a safetensors file (header and zeroed data) for tests.
#[cfg(any(test, feature = "test-support"))]
pub fn write_safetensors(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = SafetensorsDtype::parse(dtype).map_or(1, SafetensorsDtype::size);
        let bytes = shape.iter().product::<u64>() * size;
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let json = Value::Object(header).to_string();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + offset as usize, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dtypes_shapes_and_sizes() {
        let file = write_safetensors(&[("a", "BF16", &[4, 8]), ("b", "F32", &[3])]);
        let h = parse_header("m.safetensors", &file, file.len() as u64).unwrap();
        assert_eq!(h.tensors.len(), 2);
        let a = h.tensors.iter().find(|t| t.name == "a").unwrap();
        assert_eq!((a.dtype, a.elements, a.bytes), (SafetensorsDtype::BF16, 32, 64));
    }

    #[test]
    fn truncated_or_hostile_headers_are_errors() {
        let file = write_safetensors(&[("a", "F16", &[1024])]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (file[..4].to_vec(), "shorter than the 8-byte header length"),
            (file[..file.len() - 1].to_vec(), "truncated?"),
            (u64::MAX.to_le_bytes().to_vec(), "outside 1..="),
            ([&20u64.to_le_bytes()[..], b"not json at all!!!!!"].concat(), "not valid JSON"),
        ];
        for (bytes, want) in cases {
            let err = parse_header("m.safetensors", &bytes, bytes.len() as u64).unwrap_err().to_string();
            assert!(err.contains(want), "want {want}: {err}");
        }
    }

    #[test]
    fn offsets_must_match_the_shape() {
        let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(&[0; 16]);
        let err = parse_header("m", &bytes, bytes.len() as u64).unwrap_err().to_string();
        assert!(err.contains("do not hold 16 bytes"), "{err}");
    }

    #[test]
    fn reads_the_index_and_refuses_escaping_paths() {
        let idx = parse_index(
            r#"{"metadata":{"total_size":16060522496},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(idx.total_size, Some(16_060_522_496));
        assert_eq!(idx.files.len(), 2);
        let err = parse_index(r#"{"weight_map":{"a":"../../etc/passwd"}}"#).unwrap_err().to_string();
        assert!(err.contains("not a plain file name"), "{err}");
    }
}
