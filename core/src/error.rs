//! The one error type of `gantry-core`: every way a model's files or a request can be wrong.

use thiserror::Error;

/// What went wrong while reading a model or answering a question about it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// `config.json` (or another JSON file) is not valid JSON.
    #[error("{file} is not valid JSON: {detail}")]
    MalformedJson { file: String, detail: String },

    /// A required key is absent from a model's configuration.
    #[error("{file} has no `{key}`, which a {family} model needs")]
    MissingKey { file: String, key: String, family: String },

    /// A key holds a value of the wrong type or an impossible value.
    #[error("{file}: `{key}` {problem}")]
    BadValue { file: String, key: String, problem: String },

    /// The architecture is not one Gantry knows.
    #[error(
        "unknown model architecture `{name}`; Gantry knows: gpt2, gpt_oss, llama, mistral, mixtral, \
         phi, phi3, gemma, gemma2, gemma3, falcon, qwen2, qwen2_moe, qwen3, qwen3_moe"
    )]
    UnknownArchitecture { name: String },

    /// The file is not a GGUF file at all.
    #[error("not a GGUF file: {reason}")]
    NotGguf { reason: String },

    /// A GGUF file ends before its header, metadata or tensor data do.
    #[error("truncated GGUF file: {what} would end at byte {needed}, but the file has {len} bytes")]
    TruncatedGguf { what: String, needed: u64, len: u64 },

    /// The bytes given end inside the GGUF header: read at least `needed` bytes of the file
    /// and parse again (see `gguf::parse_gguf_prefix`). Not an error in the file.
    #[error("the GGUF header continues past the bytes read; read at least {needed} bytes")]
    NeedMoreBytes { needed: u64 },

    /// A GGUF file's content is structurally invalid.
    #[error("invalid GGUF file: {reason}")]
    InvalidGguf { reason: String },

    /// A safetensors header is invalid or truncated.
    #[error("invalid safetensors file {file}: {reason}")]
    InvalidSafetensors { file: String, reason: String },

    /// A number is outside what any real model or machine has.
    #[error("absurd {what}: {value} ({why})")]
    Absurd { what: String, value: String, why: String },

    /// Arithmetic on sizes overflowed 64 bits: the inputs are not a real model.
    #[error("size overflow while computing {what}: the inputs are far beyond any real model")]
    Overflow { what: String },

    /// A user-given value (GPU list, dtype, context) could not be understood.
    #[error("{what}: {problem}")]
    InvalidInput { what: String, problem: String },

    /// The catalog data file is malformed (a bug in the shipped data, caught by tests).
    #[error("catalog: {0}")]
    Catalog(String),

    /// A catalog id that is not in the catalog.
    #[error(
        "`{id}` is not in the catalog (see `gantry select` for the list); pass a path to a model folder, config.json or .gguf file instead"
    )]
    NotInCatalog { id: String },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checked arithmetic helpers that turn overflow into [`Error::Overflow`].
pub(crate) trait CheckedOps: Sized {
    fn mul_or(self, rhs: Self, what: &str) -> Result<Self>;
    fn add_or(self, rhs: Self, what: &str) -> Result<Self>;
}

impl CheckedOps for u64 {
    fn mul_or(self, rhs: u64, what: &str) -> Result<u64> {
        self.checked_mul(rhs).ok_or_else(|| Error::Overflow { what: what.to_string() })
    }
    fn add_or(self, rhs: u64, what: &str) -> Result<u64> {
        self.checked_add(rhs).ok_or_else(|| Error::Overflow { what: what.to_string() })
    }
}

/// Multiplies all factors with overflow checking.
pub(crate) fn product(factors: &[u64], what: &str) -> Result<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.mul_or(f, what))
}

/// Adds all terms with overflow checking.
pub(crate) fn sum(terms: &[u64], what: &str) -> Result<u64> {
    terms.iter().try_fold(0u64, |acc, &t| acc.add_or(t, what))
}
