//! adaspec: lossless speculative generation with draft trees on llama.cpp, and (behind the
//! `train` feature) AdaSPEC distillation of better drafts.
//!
//! The engine (everything outside `train`) never depends on candle.

pub mod error;
pub mod tiny_model;

#[cfg(feature = "train")]
pub mod train;

pub use error::{Error, Result};
