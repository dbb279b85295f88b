//! Benchmark prompts from the project's data sets (HumanEval, GSM8K, MT-bench) or any JSONL
//! file with a `prompt`, `question`, `turns` or `text` field.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where `../shared/data`-style data sets live: `$ADASPEC_DATA`, else the first of
/// `../shared/data`, `shared/data`, `data` that exists.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ADASPEC_DATA") {
        return PathBuf::from(d);
    }
    for c in ["../shared/data", "shared/data", "data"] {
        if Path::new(c).is_dir() {
            return PathBuf::from(c);
        }
    }
    PathBuf::from("../shared/data")
}

/// Resolves a data-set name (`humaneval`, `gsm8k`, `mt_bench`) or a path to a JSONL file.
pub fn dataset_path(name: &str) -> PathBuf {
    match name {
        "humaneval" => data_dir().join("humaneval/dev.jsonl"),
        "gsm8k" => data_dir().join("gsm8k/dev.jsonl"),
        "mt_bench" | "mt-bench" => data_dir().join("mt_bench/questions.jsonl"),
        other => PathBuf::from(other),
    }
}

/// Reads up to `n` prompts (the first user turn for conversations).
pub fn load_prompts(name: &str, n: usize) -> Result<Vec<String>> {
    let path = dataset_path(name);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if out.len() >= n {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::InvalidParam {
            name: "dataset",
            reason: format!("{}:{}: {e}", path.display(), i + 1),
        })?;
        let prompt = ["prompt", "question", "text"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string))
            .or_else(|| v.get("turns").and_then(|t| t.get(0)).and_then(|x| x.as_str()).map(str::to_string))
            .or_else(|| {
                v.get("conversations")
                    .and_then(|c| c.get(0))
                    .and_then(|m| m.get("value"))
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
            });
        match prompt {
            Some(p) => out.push(p),
            None => {
                return Err(Error::InvalidParam {
                    name: "dataset",
                    reason: format!("{}:{}: no prompt/question/turns/text field", path.display(), i + 1),
                })
            }
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidParam { name: "dataset", reason: format!("{} has no prompts", path.display()) });
    }
    Ok(out)
}
