//! adaspec: lossless speculative generation with draft trees on llama.cpp, and (behind the
//! `train` feature) AdaSPEC distillation of better drafts.
//!
//! The engine (everything outside `train`) never depends on candle.

pub mod backend;
#[cfg(feature = "cli")]
pub mod bench;
pub mod cost;
pub mod cpu_kernels;
#[cfg(feature = "cli")]
pub mod dataset;
pub mod eagle;
pub mod error;
pub mod features;
pub mod fspad;
#[cfg(feature = "cli")]
pub mod inspect;
pub mod model_file;
pub mod models;
pub mod ngram;
pub mod policy;
pub mod probe;
pub mod proposer;
pub mod sampling;
pub mod session;
pub mod strategy;
#[cfg(feature = "fixtures")]
pub mod tiny_model;
pub mod tree;
pub mod verifier;
pub mod verify;

#[cfg(feature = "train")]
pub mod train;

pub use backend::{check_vocab_compat, ChatMessage, Model, ModelParams, Token};
pub use error::{Error, Result};
pub use sampling::SamplingParams;
pub use session::{GenerateParams, Generation, Prompt, Session, SessionParams, Stats, StopReason};
pub use strategy::{NumericMode, Strategy};
