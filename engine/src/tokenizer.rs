//! Text to token ids and back: from `tokenizer.json` (the `tokenizers` crate), or built from a
//! GGUF file's vocabulary — GPT-2-style byte-level BPE through `tokenizers`, and LLaMA/Gemma
//! SentencePiece vocabularies with merge-by-score, as llama.cpp tokenizes them.

use std::collections::BinaryHeap;
use std::path::Path;

use std::sync::Mutex;

use gantry_core::gguf::{GgufFile, MetaValue};
use serde_json::json;

use crate::EngineError;

/// llama.cpp's token types in GGUF `tokenizer.ggml.token_type`.
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// A tokenizer with its special tokens.
pub struct Tokenizer {
    kind: Kind,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// Tokens that end generation.
    pub eos: Vec<u32>,
    /// Whether encoding a prompt adds `bos`.
    pub add_bos: bool,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Hf(_) => "tokenizers",
            Kind::Spm(_) => "sentencepiece",
        };
        write!(f, "Tokenizer({kind}, {} tokens, bos {:?}, eos {:?})", self.vocab_size, self.bos, self.eos)
    }
}

enum Kind {
    /// Behind a lock: whether special-token text is parsed is a setting of the tokenizer,
    /// switched per call rather than cloning a tokenizer of tens of megabytes.
    Hf(Box<Mutex<tokenizers::Tokenizer>>),
    Spm(Box<Spm>),
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads `tokenizer.json` with the special tokens named in `tokenizer_config.json`.
    pub fn from_hf_folder(dir: &Path, eos_ids: &[u64]) -> Result<Tokenizer, EngineError> {
        let path = dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: serde_json::Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| err(format!("tokenizer_config.json: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let token_of = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let text = v.as_str().or_else(|| v.get("content").and_then(serde_json::Value::as_str))?;
            tok.token_to_id(text)
        };
        let bos = token_of("bos_token");
        let mut eos: Vec<u32> = eos_ids.iter().filter_map(|&id| u32::try_from(id).ok()).collect();
        if eos.is_empty() {
            eos.extend(token_of("eos_token"));
        }
        // Whether the post-processor adds BOS is the tokenizer's business; we ask it.
        let add_bos = bos.is_some_and(|b| tok.encode("a", true).is_ok_and(|e| e.get_ids().first() == Some(&b)));
        let vocab_size = tok.get_vocab_size(true);
        Ok(Tokenizer { kind: Kind::Hf(Box::new(Mutex::new(tok))), bos, eos, add_bos, vocab_size })
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(path: &Path) -> Result<Tokenizer, EngineError> {
        let mut file = read_vocabulary(path)?;
        // Moved out of the metadata, not copied: vocabularies run to hundreds of thousands.
        let mut take_strings = |k: &str| -> Result<Vec<String>, EngineError> {
            match file.metadata.remove(k) {
                Some(MetaValue::Array(items)) => Ok(items
                    .into_iter()
                    .map(|v| match v {
                        MetaValue::String(s) => s,
                        _ => String::new(),
                    })
                    .collect()),
                _ => Err(err(format!("GGUF has no `{k}` list"))),
            }
        };
        let tokens = take_strings("tokenizer.ggml.tokens")?;
        let merges = take_strings("tokenizer.ggml.merges").unwrap_or_default();
        let get = |k: &str| file.get(k);
        let u32_of = |k: &str| get(k).and_then(MetaValue::as_u64).and_then(|v| u32::try_from(v).ok());
        let bool_of = |k: &str| match get(k) {
            Some(MetaValue::Bool(b)) => Some(*b),
            _ => None,
        };
        let model = get("tokenizer.ggml.model").and_then(MetaValue::as_str).unwrap_or_default().to_string();
        let types: Vec<i32> = match get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(items)) => items.iter().map(|v| v.as_u64().map_or(1, |t| t as i32)).collect(),
            _ => vec![1; tokens.len()],
        };
        let bos = u32_of("tokenizer.ggml.bos_token_id");
        let eos: Vec<u32> =
            u32_of("tokenizer.ggml.eos_token_id").into_iter().chain(u32_of("tokenizer.ggml.eot_token_id")).collect();
        let vocab_size = tokens.len();
        let kind = match model.as_str() {
            "gpt2" => {
                if merges.is_empty() {
                    return Err(err("GGUF has no `tokenizer.ggml.merges` list"));
                }
                let pre = get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default").to_string();
                Kind::Hf(Box::new(Mutex::new(byte_level_bpe(&tokens, &types, &merges, &pre)?)))
            }
            "llama" => {
                let scores: Vec<f32> = match get("tokenizer.ggml.scores") {
                    Some(MetaValue::Array(items)) => items.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                    _ => vec![0.0; tokens.len()],
                };
                let add_space_prefix = bool_of("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                Kind::Spm(Box::new(Spm::new(tokens, scores, types, add_space_prefix)?))
            }
            other => {
                return Err(EngineError::Unsupported(format!(
                    "GGUF tokenizer model `{other}` (Gantry reads gpt2 and llama vocabularies)"
                )));
            }
        };
        let add_bos = bool_of("tokenizer.ggml.add_bos_token").unwrap_or(matches!(kind, Kind::Spm(_)));
        Ok(Tokenizer { kind, bos, eos, add_bos, vocab_size })
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Encodes `text`. With `add_special`, prepends BOS as the model expects (unless the text
    /// already starts with it); with `parse_special`, special-token text (`<|im_start|>`)
    /// becomes the special token rather than plain characters.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, EngineError> {
        let mut ids = match &self.kind {
            Kind::Hf(t) => {
                let mut t = t.lock().map_err(|_| err("tokenizer lock poisoned"))?;
                t.set_encode_special_tokens(!parse_special);
                // BOS is added below, the same way for every kind of tokenizer.
                t.encode(text, false).map_err(err)?.get_ids().to_vec()
            }
            Kind::Spm(s) => s.encode(text, parse_special),
        };
        if add_special
            && self.add_bos
            && let Some(b) = self.bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        Ok(ids)
    }

    /// Decodes ids to text, leaving out control tokens when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        match &self.kind {
            Kind::Hf(t) => t.lock().map_err(|_| err("tokenizer lock poisoned"))?.decode(ids, skip_special).map_err(err),
            Kind::Spm(s) => Ok(s.decode(ids, skip_special)),
        }
    }

    /// The text of one token id (for diagnostics).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.kind {
            Kind::Hf(t) => t.lock().ok()?.id_to_token(id),
            Kind::Spm(s) => s.pieces.get(id as usize).cloned(),
        }
    }

    /// A token's own bytes, as it adds them to text: a token may hold part of a UTF-8
    /// character (a byte token, a byte-level BPE piece), so these are bytes. Empty for an id
    /// outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match &self.kind {
            Kind::Spm(s) => s.decode_bytes(&[id], false),
            Kind::Hf(t) => {
                let Ok(t) = t.lock() else { return Vec::new() };
                let Some(piece) = t.id_to_token(id) else { return Vec::new() };
                if let Some(b) = byte_token(&piece) {
                    return vec![b];
                }
                // Special tokens (`<|im_start|>`) are printable ASCII, which byte-level BPE
                // writes as itself.
                let byte_level = matches!(t.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
                if byte_level && let Some(bytes) = byte_level_bytes(&piece) {
                    return bytes;
                }
                piece.replace('\u{2581}', " ").into_bytes()
            }
        }
    }

    /// The id of a token's text, if the vocabulary has it.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.kind {
            Kind::Hf(t) => t.lock().ok()?.token_to_id(text),
            Kind::Spm(s) => s.id_of(text),
        }
    }
}

/// A SentencePiece byte token's value: `<0x0A>` is byte 10.
fn byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The bytes behind a byte-level BPE piece: GPT-2 writes each byte as a printable character
/// (bytes that already are stand for themselves; the others for 256 + their rank among them).
/// `None` if a character is not one of those 256.
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
    piece
        .chars()
        .map(|c| {
            let c = c as u32;
            if c < 256 && printable(c as u8) {
                return Some(c as u8);
            }
            let rank = c.checked_sub(256)? as usize;
            (0..=255u8).filter(|&b| !printable(b)).nth(rank)
        })
        .collect()
}

/// The pre-tokenizer splits llama.cpp applies for each `tokenizer.ggml.pre`, as
/// `tokenizers` JSON.
fn pre_tokenizer(pre: &str) -> Result<serde_json::Value, EngineError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split =
        |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        // Digits one by one, then GPT-2's split (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}"), byte_level(true)]})
        }
        "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => byte_level(true),
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        other => {
            return Err(EngineError::Unsupported(format!(
                "GGUF pre-tokenizer `{other}`; put the model's tokenizer.json beside it instead"
            )));
        }
    })
}

/// A byte-level BPE tokenizer (GPT-2 style) from a GGUF vocabulary and merges, built through
/// `tokenizers`' JSON format (written straight into one string: no intermediate JSON tree).
fn byte_level_bpe(
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    pre: &str,
) -> Result<tokenizers::Tokenizer, EngineError> {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut out = String::with_capacity(tokens.len() * 24 + merges.len() * 24 + 4096);
    out.push_str(r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":["#);
    let mut first = true;
    for (i, t) in types.iter().enumerate() {
        if *t == TYPE_CONTROL || *t == TYPE_USER_DEFINED {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&format!(
                r#"{{"id":{i},"content":{},"single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":{}}}"#,
                quote(&tokens[i]),
                *t == TYPE_CONTROL
            ));
        }
    }
    out.push_str(r#"],"normalizer":null,"pre_tokenizer":"#);
    out.push_str(&pre_tokenizer(pre)?.to_string());
    out.push_str(r#","post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},"#);
    out.push_str(r#""model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{"#);
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quote(t));
        out.push(':');
        out.push_str(&i.to_string());
    }
    out.push_str(r#"},"merges":["#);
    for (i, m) in merges.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quote(m));
    }
    out.push_str("]}}");
    out.parse::<tokenizers::Tokenizer>().map_err(|e| err(format!("building the BPE tokenizer: {e}")))
}

/// Reads a GGUF header keeping the tokenizer's arrays whole.
fn read_vocabulary(path: &Path) -> Result<GgufFile, EngineError> {
    use std::io::Read;
    let io = |e| EngineError::Io { path: path.to_path_buf(), source: e };
    let len = std::fs::metadata(path).map_err(io)?.len();
    let keep = |k: &str| k.starts_with("tokenizer.ggml.");
    let mut want = (4u64 << 20).min(len);
    loop {
        let mut buf = Vec::new();
        std::fs::File::open(path).map_err(io)?.take(want).read_to_end(&mut buf).map_err(io)?;
        match gantry_core::gguf::parse_gguf_keeping(&buf, len, &keep) {
            Ok(f) => return Ok(f),
            Err(gantry_core::Error::NeedMoreBytes { needed }) if needed <= (512 << 20) => {
                want = needed.max(want * 2).min(len);
            }
            Err(e) => return Err(err(format!("{}: {e}", path.display()))),
        }
    }
}

/// SentencePiece-style BPE over a scored vocabulary (LLaMA 1/2, Gemma in GGUF): symbols are
/// UTF-8 characters; the adjacent pair whose merge is in the vocabulary with the highest score
/// merges first; what cannot be a token falls back to `<0xXX>` byte tokens.
struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Token ids sorted by piece, for lookups without a second copy of every piece.
    by_piece: Vec<u32>,
    byte_ids: [Option<u32>; 256],
    /// Control, user-defined and unknown tokens, longest first: text is split on them first.
    specials: Vec<(String, u32, bool)>,
    add_space_prefix: bool,
}

impl Spm {
    fn new(pieces: Vec<String>, scores: Vec<f32>, types: Vec<i32>, add_space_prefix: bool) -> Result<Spm, EngineError> {
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(err("GGUF vocabulary, scores and token types differ in length"));
        }
        let mut byte_ids = [None; 256];
        let mut specials = Vec::new();
        let mut by_piece: Vec<u32> = (0..u32::try_from(pieces.len()).map_err(err)?).collect();
        // Stable: where pieces repeat, the lowest id comes first (and is found).
        by_piece.sort_by(|&a, &b| pieces[a as usize].cmp(&pieces[b as usize]));
        for (i, p) in pieces.iter().enumerate() {
            let id = u32::try_from(i).map_err(err)?;
            match types[i] {
                TYPE_BYTE => {
                    if let Some(b) = p
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        byte_ids[b as usize] = Some(id);
                    }
                }
                // Unknown (2) and control (3) tokens split only when special text is parsed;
                // user-defined ones (4) always.
                2 | TYPE_CONTROL => specials.push((p.clone(), id, false)),
                TYPE_USER_DEFINED => specials.push((p.clone(), id, true)),
                _ => {}
            }
        }
        specials.retain(|(p, _, _)| !p.is_empty());
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Spm { pieces, scores, types, by_piece, byte_ids, specials, add_space_prefix })
    }

    /// The id of a piece.
    fn id_of(&self, piece: &str) -> Option<u32> {
        let pos = self.by_piece.partition_point(|&id| self.pieces[id as usize].as_str() < piece);
        self.by_piece.get(pos).copied().filter(|&id| self.pieces[id as usize] == piece)
    }

    /// Splits text into plain-text fragments and special tokens, longest special first.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text(text.to_string())];
        for (piece, id, always) in &self.specials {
            if !parse_special && !always {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Fragment::Text(t) if t.contains(piece.as_str()) => {
                        let mut rest = t.as_str();
                        while let Some(at) = rest.find(piece.as_str()) {
                            if at > 0 {
                                next.push(Fragment::Text(rest[..at].to_string()));
                            }
                            next.push(Fragment::Token(*id));
                            rest = &rest[at + piece.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest.to_string()));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(&t);
                    self.encode_piece(&s.replace(' ', "\u{2581}"), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols: (start, len, prev, next); merged-away symbols get len 0.
        let mut syms: Vec<(usize, usize, isize, isize)> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push((start, c.len_utf8(), i as isize - 1, i as isize + 1));
        }
        let Some(last) = syms.last_mut() else { return };
        last.3 = -1;
        let n = syms.len();
        let mut heap: BinaryHeap<Bigram> = BinaryHeap::new();
        let try_add = |l: isize, r: isize, syms: &Vec<(usize, usize, isize, isize)>, heap: &mut BinaryHeap<Bigram>| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let piece = &text[syms[l].0..syms[l].0 + syms[l].1 + syms[r].1];
            if let Some(id) = self.id_of(piece) {
                heap.push(Bigram { score: self.scores[id as usize], left: l, right: r, size: piece.len() });
            }
        };
        for i in 1..n {
            try_add(i as isize - 1, i as isize, &syms, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Skip pairs whose symbols have changed since they were queued.
            if syms[l].1 == 0 || syms[r].1 == 0 || syms[l].1 + syms[r].1 != b.size {
                continue;
            }
            syms[l].1 += syms[r].1;
            syms[r].1 = 0;
            syms[l].3 = syms[r].3;
            let after = syms[r].3;
            if after >= 0 {
                syms[after as usize].2 = l as isize;
            }
            try_add(syms[l].2, l as isize, &syms, &mut heap);
            try_add(l as isize, syms[l].3, &syms, &mut heap);
        }
        // Every merged symbol is a vocabulary piece (merges only happen into pieces); a single
        // character that is not one becomes its UTF-8 bytes.
        let mut i: isize = 0;
        while i >= 0 {
            let (start, len, _, next) = syms[i as usize];
            let piece = &text[start..start + len];
            match self.id_of(piece) {
                Some(id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize])),
            }
            i = next;
        }
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else { continue };
            match self.types[id as usize] {
                TYPE_BYTE => {
                    if let Some(b) = piece
                        .strip_prefix("<0x")
                        .and_then(|h| h.strip_suffix('>'))
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                TYPE_CONTROL if skip_special => {}
                _ => bytes.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
            }
        }
        bytes
    }
}

enum Fragment {
    Text(String),
    Token(u32),
}

/// A candidate merge; the heap pops the highest score, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}
