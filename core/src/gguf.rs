//! A GGUF reader for the header, metadata and tensor table (not the tensor data).
//!
//! It works on the file's bytes (a memory map in practice) and trusts nothing: every length
//! is checked against the bytes that remain before anything is allocated, so a truncated or
//! hostile file gives an error naming what is wrong and where, never a panic or a huge
//! allocation.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are not something any writer produces.
const MAX_ARRAY_DEPTH: u32 = 3;
/// Arrays longer than this are summarised (`tokenizer.ggml.tokens` holds 50K–260K strings).
pub const KEEP_ARRAY_ELEMENTS: u64 = 1024;
/// Elements of short arrays kept over the whole file (their own keys aside): a kept element
/// costs a [`MetaValue`] (32 bytes) for as little as one byte of file, so a header of many
/// short arrays would cost 32× its size; past this budget they are summarised like long ones.
/// Real models keep a few dozen such elements.
pub const KEEP_SHORT_ARRAY_ELEMENTS: u64 = 16_384;

/// A metadata value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MetaValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    /// An array too long to keep: its element type id and length.
    LongArray {
        element_type: u32,
        len: u64,
    },
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The number of elements of an array value.
    pub fn array_len(&self) -> Option<u64> {
        match self {
            MetaValue::Array(v) => Some(v.len() as u64),
            MetaValue::LongArray { len, .. } => Some(*len),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions, innermost first (GGML order).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub elements: u64,
    pub bytes: u64,
}

/// A GGUF file's header, metadata and tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// Length of the file the table was read from.
    pub file_len: u64,
}

impl GgufFile {
    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }

    /// An architecture-scoped key: `arch_u64("context_length")` reads `<arch>.context_length`.
    pub fn arch_u64(&self, key: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.{key}")).and_then(MetaValue::as_u64)
    }

    /// Sum of all tensors' data bytes.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Sum of all tensors' element counts (the exact parameter count).
    pub fn tensor_elements(&self) -> u64 {
        self.tensors.iter().map(|t| t.elements).sum()
    }
}

/// Parses the header, metadata and tensor table of a GGUF file held in `bytes`, and checks
/// that every tensor's data lies within `bytes`.
pub fn parse_gguf(bytes: &[u8]) -> Result<GgufFile> {
    parse_gguf_prefix(bytes, bytes.len() as u64)
}

/// Parses a GGUF file of `file_len` bytes from its first bytes. When the header runs past
/// `prefix`, the answer is [`Error::NeedMoreBytes`] with how many are needed, so a caller can
/// read the metadata (a few MiB) without reading the tensor data (gigabytes). Tensor data
/// ranges are checked against `file_len`.
pub fn parse_gguf_prefix(prefix: &[u8], file_len: u64) -> Result<GgufFile> {
    parse_gguf_keeping(prefix, file_len, &|_| false)
}

/// [`parse_gguf_prefix`], keeping every element of the arrays whose keys `keep_whole`
/// accepts (the tokenizer's vocabulary, scores and merges) instead of summarising them.
pub fn parse_gguf_keeping(prefix: &[u8], file_len: u64, keep_whole: &dyn Fn(&str) -> bool) -> Result<GgufFile> {
    let bytes = prefix;
    let mut r = Reader { bytes, pos: 0, file_len, keep_whole, short_array_elements_left: KEEP_SHORT_ARRAY_ELEMENTS };
    let magic = r.take(4, "the magic number").map_err(|_| Error::NotGguf {
        reason: format!("only {} bytes, a GGUF file starts with the 4 bytes `GGUF`", bytes.len()),
    })?;
    if magic != MAGIC {
        return Err(Error::NotGguf { reason: format!("starts with {:02x?}, not `GGUF`", magic) });
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::InvalidGguf {
            reason: format!("version {version} is not supported (GGUF versions 2 and 3 are)"),
        });
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    // A key/value takes at least 13 bytes (key length, one-byte key, type, one-byte value).
    r.ensure_count(n_kv, 13, "the metadata entries")?;
    // A tensor entry takes at least 25 bytes (name length, dims count, one dim, type, offset).
    r.ensure_count(n_tensors, 25, "the tensor entries")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.name(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("the type of `{key}`"))?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }

    let mut tensors = Vec::with_capacity(r.capacity_for(n_tensors, 25));
    for i in 0..n_tensors {
        tensors.push(r.tensor_info(i)?);
    }

    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v.as_u64().filter(|a| a.is_power_of_two() && *a <= 1 << 20).ok_or_else(|| Error::InvalidGguf {
            reason: format!("general.alignment {v:?} is not a power of two up to 1 MiB"),
        })?,
    };
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes))
            .ok_or_else(|| Error::InvalidGguf { reason: format!("tensor `{}` has an offset past 2^64", t.name) })?;
        if end > file_len {
            return Err(Error::TruncatedGguf { what: format!("tensor `{}`", t.name), needed: end, len: file_len });
        }
    }
    Ok(GgufFile { version, metadata, tensors, data_offset, file_len })
}

struct Reader<'a> {
    /// The file's first bytes (all of it, or a prefix holding at least the header).
    bytes: &'a [u8],
    pos: usize,
    file_len: u64,
    keep_whole: &'a dyn Fn(&str) -> bool,
    /// What is left of [`KEEP_SHORT_ARRAY_ELEMENTS`].
    short_array_elements_left: u64,
}

impl<'a> Reader<'a> {
    /// Bytes left in the whole file (the prefix may hold fewer).
    fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos as u64)
    }

    /// Room to set aside for `count` entries of at least `min_bytes_each`: no more than the
    /// bytes at hand can hold. Counts are checked against the file's length, but a prefix's
    /// claimed length (a header read over HTTP, or a huge file) must not size an allocation:
    /// the list grows as entries are actually read. (Found by fuzzing: a 40-byte prefix
    /// claiming a 2^60-byte file asked for 27 TB.)
    fn capacity_for(&self, count: u64, min_bytes_each: u64) -> usize {
        let at_hand = (self.bytes.len().saturating_sub(self.pos) as u64) / min_bytes_each.max(1);
        usize::try_from(count.min(at_hand)).unwrap_or(0)
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = (self.pos as u64).saturating_add(n);
        if end > self.file_len {
            return Err(Error::TruncatedGguf { what: what.to_string(), needed: end, len: self.file_len });
        }
        if end > self.bytes.len() as u64 {
            return Err(Error::NeedMoreBytes { needed: end });
        }
        let n = n as usize; // fits: end <= bytes.len()
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Refuses counts whose minimal encoding could not fit in what remains.
    fn ensure_count(&self, count: u64, min_bytes_each: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_bytes_each) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(Error::TruncatedGguf {
                what: format!("{what} ({count} of them)"),
                needed: (self.pos as u64).saturating_add(count.saturating_mul(min_bytes_each)),
                len: self.file_len,
            }),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(&format!("the length of {what}"))?;
        let raw = self.take(len, what)?;
        // Tokenizer vocabularies hold arbitrary byte strings; keep them readable, never fail.
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    /// A name (a metadata key, a tensor's name): it must be UTF-8, as the format says, since
    /// lookups by name would silently miss a mangled one.
    fn name(&mut self, what: &str) -> Result<String> {
        let len = self.u64(&format!("the length of {what}"))?;
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw).map(str::to_string).map_err(|e| Error::InvalidGguf {
            reason: format!("{what} is not UTF-8 (bad byte at {}: {})", e.valid_up_to(), String::from_utf8_lossy(raw)),
        })
    }

    fn skip_string(&mut self, what: &str) -> Result<()> {
        let len = self.u64(&format!("the length of {what}"))?;
        self.take(len, what).map(|_| ())
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        let what = format!("the value of `{key}`");
        self.value_described(ty, key, &what, depth)
    }

    /// A value whose error description is already made (arrays reuse one for every element).
    fn value_described(&mut self, ty: u32, key: &str, what: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U64(u64::from(self.array::<1>(what)?[0])),
            1 => MetaValue::I64(i64::from(i8::from_le_bytes(self.array(what)?))),
            2 => MetaValue::U64(u64::from(u16::from_le_bytes(self.array(what)?))),
            3 => MetaValue::I64(i64::from(i16::from_le_bytes(self.array(what)?))),
            4 => MetaValue::U64(u64::from(self.u32(what)?)),
            5 => MetaValue::I64(i64::from(i32::from_le_bytes(self.array(what)?))),
            6 => MetaValue::F64(f64::from(f32::from_le_bytes(self.array(what)?))),
            7 => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => MetaValue::String(self.string(what)?),
            9 => self.array_value(key, depth)?,
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(Error::InvalidGguf { reason: format!("`{key}` has unknown value type {other}") });
            }
        })
    }

    fn array_value(&mut self, key: &str, depth: u32) -> Result<MetaValue> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(Error::InvalidGguf {
                reason: format!("`{key}` nests arrays more than {MAX_ARRAY_DEPTH} deep"),
            });
        }
        let elem = self.u32(&format!("the element type of `{key}`"))?;
        let len = self.u64(&format!("the length of `{key}`"))?;
        let min_size = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => {
                return Err(Error::InvalidGguf { reason: format!("`{key}` is an array of unknown type {other}") });
            }
        };
        self.ensure_count(len, min_size, &format!("the elements of `{key}`"))?;
        let whole = (self.keep_whole)(key);
        let keep = whole || (len <= KEEP_ARRAY_ELEMENTS && len <= self.short_array_elements_left);
        if !whole && keep {
            self.short_array_elements_left -= len;
        }
        if !keep {
            // Skip without keeping: fixed-size elements in one step, strings one by one.
            match elem {
                8 => {
                    let what = format!("an element of `{key}`");
                    for _ in 0..len {
                        self.skip_string(&what)?;
                    }
                }
                9 => {
                    for _ in 0..len {
                        self.array_value(key, depth + 1)?;
                    }
                }
                _ => {
                    self.take(len * min_size, &format!("`{key}`"))?;
                }
            }
            return Ok(MetaValue::LongArray { element_type: elem, len });
        }
        let mut items = Vec::with_capacity(self.capacity_for(len, min_size));
        let what = format!("an element of `{key}`");
        for _ in 0..len {
            items.push(match elem {
                8 => MetaValue::String(self.string(&what)?),
                _ => self.value_described(elem, key, &what, depth + 1)?,
            });
        }
        Ok(MetaValue::Array(items))
    }

    fn tensor_info(&mut self, index: u64) -> Result<GgufTensor> {
        let name = self.name(&format!("the name of tensor #{index}"))?;
        let n_dims = self.u32(&format!("the dimension count of `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(Error::InvalidGguf {
                reason: format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(&format!("a dimension of `{name}`"))?);
        }
        let type_id = self.u32(&format!("the type of `{name}`"))?;
        let offset = self.u64(&format!("the offset of `{name}`"))?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| Error::InvalidGguf { reason: format!("tensor `{name}` has unknown GGML type {type_id}") })?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e > 0 && e <= 1 << 40)
            .ok_or_else(|| Error::InvalidGguf { reason: format!("tensor `{name}` has absurd shape {dims:?}") })?;
        let bytes = ggml_type.bytes_for(elements).ok_or_else(|| Error::InvalidGguf {
            reason: format!(
                "tensor `{name}` ({elements} elements) is not a whole number of {} blocks of {}",
                ggml_type, ggml_type.block_elements
            ),
        })?;
        Ok(GgufTensor { name, dims, ggml_type, offset, elements, bytes })
    }
}

/// Writes GGUF files for tests: a minimal, correct writer of the same format.
#[cfg(any(test, feature = "test-support"))]
pub mod write {
    /// A metadata value to write.
    #[derive(Debug, Clone)]
    pub enum Value {
        U32(u32),
        U64(u64),
        F32(f32),
        Str(String),
        StrArray(Vec<String>),
        U32Array(Vec<u32>),
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn header(metadata: &[(&str, Value)], n_tensors: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(n_tensors as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            match v {
                Value::U32(n) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&n.to_le_bytes());
                }
                Value::U64(n) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&n.to_le_bytes());
                }
                Value::F32(n) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&n.to_le_bytes());
                }
                Value::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Value::StrArray(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut out, s);
                    }
                }
                Value::U32Array(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for n in items {
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// Builds a GGUF v3 file with the given metadata and F32 tensors of the given shapes
    /// (zero data).
    pub fn gguf(metadata: &[(&str, Value)], tensors: &[(&str, &[u64])]) -> Vec<u8> {
        let mut out = header(metadata, tensors.len());
        let mut offset = 0u64;
        let mut sizes = Vec::new();
        for (name, dims) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            let bytes = dims.iter().fold(4u64, |a, d| a.saturating_mul(*d));
            sizes.push(bytes);
            offset = offset.saturating_add(bytes.div_ceil(32).saturating_mul(32));
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        // Shapes too large to write are left without data (for tests of absurd shapes).
        for bytes in sizes.into_iter().filter(|&b| b < 1 << 24) {
            out.resize(out.len() + (bytes.div_ceil(32) * 32) as usize, 0);
        }
        out
    }

    /// A tensor with its data, for [`gguf_with_data`].
    #[derive(Debug)]
    pub struct RawTensor<'a> {
        pub name: String,
        /// Innermost first (GGML order).
        pub dims: Vec<u64>,
        /// GGML type id.
        pub ggml_type: u32,
        pub data: &'a [u8],
    }

    /// Builds a GGUF v3 file with the given metadata and tensors with their data.
    pub fn gguf_with_data(metadata: &[(&str, Value)], tensors: &[RawTensor<'_>]) -> Vec<u8> {
        let mut out = header(metadata, tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for t in tensors {
            out.extend_from_slice(t.data);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::{Value, gguf};
    use super::*;

    /// Found by fuzzing: a short prefix claiming a huge file (as a header read over HTTP may)
    /// passed the count check against the claimed length and reserved room for every claimed
    /// tensor (27 TB). Now the room is what the bytes at hand hold, and the read asks for more.
    #[test]
    fn a_prefix_claiming_a_huge_file_allocates_only_what_it_holds() {
        let mut prefix = b"GGUF".to_vec();
        prefix.extend_from_slice(&3u32.to_le_bytes());
        prefix.extend_from_slice(&(1u64 << 40).to_le_bytes()); // tensors
        prefix.extend_from_slice(&0u64.to_le_bytes()); // metadata
        prefix.extend_from_slice(&[7; 16]);
        match parse_gguf_prefix(&prefix, 1 << 60) {
            Err(Error::NeedMoreBytes { .. }) => {}
            other => panic!("expected a request for more bytes, got {other:?}"),
        }
        // The same with an array claiming 2^40 strings.
        let mut prefix = b"GGUF".to_vec();
        prefix.extend_from_slice(&3u32.to_le_bytes());
        prefix.extend_from_slice(&0u64.to_le_bytes());
        prefix.extend_from_slice(&1u64.to_le_bytes());
        prefix.extend_from_slice(&5u64.to_le_bytes());
        prefix.extend_from_slice(b"a.key");
        prefix.extend_from_slice(&9u32.to_le_bytes());
        prefix.extend_from_slice(&8u32.to_le_bytes());
        prefix.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(parse_gguf_prefix(&prefix, 1 << 60), Err(Error::NeedMoreBytes { .. })));
    }

    fn tiny() -> Vec<u8> {
        gguf(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("llama.context_length", Value::U32(2048)),
                ("tokenizer.ggml.tokens", Value::StrArray((0..2000).map(|i| format!("t{i}")).collect())),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ],
            &[("token_embd.weight", &[8, 16]), ("blk.0.attn_q.weight", &[8, 8])],
        )
    }

    #[test]
    fn reads_metadata_and_tensor_table() {
        let f = parse_gguf(&tiny()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.arch_u64("context_length"), Some(2048));
        assert_eq!(f.get("tokenizer.ggml.tokens"), Some(&MetaValue::LongArray { element_type: 8, len: 2000 }));
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors[0].dims, vec![8, 16]);
        assert_eq!(f.tensor_elements(), 128 + 64);
        assert_eq!(f.tensor_bytes(), 4 * (128 + 64));
        assert_eq!(f.data_offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tiny();
        for cut in 0..full.len() {
            let err = parse_gguf(&full[..cut]).expect_err("a truncated file must not parse");
            assert!(
                matches!(err, Error::TruncatedGguf { .. } | Error::NotGguf { .. }),
                "cut at {cut}: unexpected {err}"
            );
        }
    }

    #[test]
    fn a_short_prefix_asks_for_more_bytes_then_parses() {
        let full = tiny();
        let len = full.len() as u64;
        let err = parse_gguf_prefix(&full[..64], len).unwrap_err();
        let Error::NeedMoreBytes { needed } = err else { panic!("{err}") };
        assert!(needed > 64 && needed <= len);
        // The header alone (no tensor data) is enough.
        let header_end = parse_gguf(&full).unwrap().data_offset as usize;
        let f = parse_gguf_prefix(&full[..header_end], len).unwrap();
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.file_len, len);
    }

    #[test]
    fn names_the_tensor_whose_data_is_missing() {
        let full = tiny();
        let err = parse_gguf(&full[..full.len() - 10]).unwrap_err().to_string();
        assert!(err.contains("truncated GGUF file: tensor `blk.0.attn_q.weight`"), "{err}");
    }

    #[test]
    fn refuses_hostile_lengths_without_allocating() {
        // A header claiming 2^60 metadata entries.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = parse_gguf(&bytes).unwrap_err().to_string();
        assert!(err.contains("metadata entries"), "{err}");

        // A string claiming to be 2^63 bytes long.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 63).to_le_bytes());
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(parse_gguf(&bytes), Err(Error::TruncatedGguf { .. })));
    }

    #[test]
    fn refuses_wrong_magic_version_and_types() {
        assert!(matches!(parse_gguf(b"GGML\x03\0\0\0"), Err(Error::NotGguf { .. })));
        let mut v1 = tiny();
        v1[4] = 1;
        assert!(parse_gguf(&v1).unwrap_err().to_string().contains("version 1 is not supported"));
        // Corrupt the value type of the first metadata key (right after its name).
        let mut bad = tiny();
        let at = 24 + 8 + "general.architecture".len();
        bad[at] = 99;
        assert!(parse_gguf(&bad).unwrap_err().to_string().contains("unknown value type 99"));
    }

    #[test]
    fn refuses_absurd_tensor_shapes() {
        let bytes = gguf(&[], &[("huge", &[1 << 32, 1 << 32])]);
        let err = parse_gguf(&bytes).unwrap_err().to_string();
        assert!(err.contains("absurd shape"), "{err}");
    }
}
