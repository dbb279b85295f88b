//! The trainer's one error type. Messages name the file, tensor or argument at fault and the
//! expected value, because they reach the CLI unchanged. Never panics, never prints.

use std::path::PathBuf;

/// Everything the trainer side (model, import, prune, export) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor computation failed inside candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// I/O with the path that failed.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A GGUF file could not be read or written.
    #[error("GGUF {path}: {reason}")]
    Gguf { path: PathBuf, reason: String },
    /// A safetensors checkpoint could not be read or written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// A model architecture this trainer does not implement.
    #[error("unknown architecture {arch:?} in {origin}: supported are \"llama\" and \"qwen2\"")]
    UnknownArch { arch: String, origin: String },
    /// A config is missing a key or holds an inconsistent value.
    #[error("bad model config ({origin}): {reason}")]
    Config { origin: String, reason: String },
    /// A tensor is missing, unexpected or has the wrong shape.
    #[error("bad weights ({origin}): {reason}")]
    Tensor { origin: String, reason: String },
    /// The draft's vocabulary does not match the tokenizer it is exported with.
    #[error("draft vocab size {draft} != tokenizer vocab size {tokenizer} in {tokenizer_path}")]
    VocabMismatch { draft: usize, tokenizer: usize, tokenizer_path: PathBuf },
    /// A parameter is out of range; the message names it and the accepted values.
    #[error("invalid argument {name}: {reason}")]
    InvalidArg { name: &'static str, reason: String },
    /// The engine (llama.cpp side) failed.
    #[error(transparent)]
    Engine(#[from] crate::Error),
}

/// Result with the trainer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
}
