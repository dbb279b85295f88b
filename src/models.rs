//! Where the default model pair lives, and friendly resolution of model paths.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// File name of the default target (Qwen2.5-Coder 1.5B Instruct, Q4_K_M).
pub const DEFAULT_TARGET: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
/// File name of the default draft (Qwen2.5-Coder 0.5B Instruct, AWQ Q4_K_M).
pub const DEFAULT_DRAFT: &str = "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf";

/// `$ADASPEC_MODELS`, else `~/.cache/adaspec/models` (where scripts/fetch-models.sh puts them).
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ADASPEC_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("adaspec").join("models")
}

/// The given path, or the default file in [`models_dir`]; a missing default says how to get it.
pub fn resolve(given: Option<PathBuf>, default_name: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let p = models_dir().join(default_name);
    if !p.exists() {
        return Err(Error::ModelFile {
            path: p,
            reason: "default model not found; run scripts/fetch-models.sh (or pass --target/--draft)".into(),
        });
    }
    Ok(p)
}
