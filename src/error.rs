//! The engine's one error type. Messages name the file, argument or value at fault, because
//! they travel unchanged to the CLI and across the C boundary.

use std::path::PathBuf;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file does not exist or cannot be read.
    #[error("cannot read model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },
    /// The file exists but is not a (complete) GGUF file.
    #[error("{path} is not a valid GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    /// llama.cpp refused to load the model.
    #[error("llama.cpp failed to load {path}")]
    ModelLoad { path: PathBuf },
    /// llama.cpp refused to create a context.
    #[error("llama.cpp failed to create a context: {0}")]
    ContextCreate(String),
    /// Target and draft do not share a vocabulary.
    #[error("draft is not compatible with target: {0}")]
    IncompatibleVocab(String),
    /// A parameter is out of range; the message names it and the accepted values.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParam { name: &'static str, reason: String },
    /// llama_decode failed (code from llama.cpp).
    #[error("llama.cpp decode failed with code {code}: {what}")]
    Decode { code: i32, what: String },
    /// The sequence no longer fits into the context window.
    #[error("context full: {needed} tokens needed, context size is {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    /// Tokenization or detokenization failed.
    #[error("tokenizer error: {0}")]
    Tokenize(String),
    /// The model's chat template could not be applied.
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// Writing or reading a GGUF file (export, tiny test models).
    #[error("GGUF error: {0}")]
    Gguf(String),
    /// I/O with the path that failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A generate call was made while the same session was generating (e.g. from its callback).
    #[error("session is busy: {0}")]
    Busy(String),
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
