//! Errors of the model runtime: what was wrong, with the file, tensor or value involved, so
//! a user can act on the message.

use std::ops::Range;
use std::path::PathBuf;

/// Everything that can go wrong while reading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path holds nothing Strata can read as a model.
    #[error("{path}: not a model: {reason}")]
    NotAModel {
        /// What was opened.
        path: PathBuf,
        /// What was expected there.
        reason: String,
    },
    /// Reading a file failed at the operating-system level.
    #[error("reading {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model file's header or metadata does not parse.
    #[error("{path}: malformed {format} file: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// `safetensors`, `gguf` or `config.json`.
        format: &'static str,
        /// What is wrong, as precisely as we can say.
        reason: String,
    },
    /// A file is shorter than its own header says: usually an interrupted download.
    #[error(
        "{path}: truncated: tensor `{tensor}` needs bytes {start}..{end} but the file has {file_len} bytes (re-download or re-convert the file)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The tensor whose data runs past the end.
        tensor: String,
        /// First byte of the tensor's data.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The file's actual length.
        file_len: u64,
    },
    /// A tensor the architecture needs is not in the file.
    #[error("{path}: missing tensor `{tensor}` (expected for a {arch} model)")]
    MissingTensor {
        /// The file searched (the directory for sharded models).
        path: PathBuf,
        /// The tensor name in the file's own naming.
        tensor: String,
        /// The architecture that needs it.
        arch: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?} from the model config")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Shape in the file (rows first).
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor's element type is one we do not run.
    #[error("{path}: tensor `{tensor}` has type {dtype}, which Strata does not support (supported: {supported})")]
    UnsupportedDType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type found.
        dtype: String,
        /// What would work.
        supported: &'static str,
    },
    /// The model's architecture is not one Strata implements.
    #[error("unsupported architecture `{arch}` (supported: llama, mistral, qwen2, qwen3)")]
    UnsupportedArchitecture {
        /// The architecture as the file names it.
        arch: String,
    },
    /// The config is missing a field or has a value we cannot run.
    #[error("{path}: invalid model config: {reason}")]
    InvalidConfig {
        /// The config's file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A slice that does not fit the model.
    #[error("layer slice {slice:?} does not fit a model of {layers} layers")]
    SliceOutOfRange {
        /// The requested slice.
        slice: Range<usize>,
        /// Layers in the model.
        layers: usize,
    },
    /// A KV cache used with a stage of other layers.
    #[error("layer {layer} is not in this KV cache's layers {layers:?}")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// The layers the cache holds.
        layers: Range<usize>,
    },
    /// A forward was asked of a sequence this stage does not know.
    #[error("unknown sequence {seq}")]
    UnknownSequence {
        /// The sequence id.
        seq: u64,
    },
    /// A chunk's start position does not match the cached length of its sequence.
    #[error("sequence {seq}: chunk starts at position {start} but {cached} positions are cached")]
    PositionMismatch {
        /// The sequence id.
        seq: u64,
        /// Where the chunk claims to start.
        start: usize,
        /// What the cache holds.
        cached: usize,
    },
    /// A sequence would run past the model's context length.
    #[error("sequence of {requested} tokens exceeds the model's context length of {context}")]
    ContextOverflow {
        /// Tokens the sequence would hold.
        requested: usize,
        /// The model's limit.
        context: usize,
    },
    /// A batch whose parts disagree (wrong number of rows, a stage given tokens instead of
    /// activations, ...).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Invalid sampling parameters.
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),

    /// A draft model that cannot draft for this model.
    #[error("draft model: {0}")]
    Draft(String),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
