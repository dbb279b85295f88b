//! `adaspec inspect`: what a GGUF holds (architecture, sizes, tensor types, tokenizer) and
//! whether two files pass llama.cpp's draft/target vocabulary rules — from metadata only
//! (gguf-rs), so it needs neither llama.cpp nor candle and never loads tensor data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result};

/// llama.cpp's `SPEC_VOCAB_MAX_SIZE_DIFFERENCE`.
pub const MAX_VOCAB_SIZE_DIFFERENCE: usize = 128;
/// llama.cpp's `SPEC_VOCAB_CHECK_START_TOKEN_ID`: token texts are compared from this id on.
pub const CHECK_START_TOKEN_ID: usize = 5;

/// Tokenizer facts of a GGUF.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenizerSummary {
    /// `tokenizer.ggml.model` (gpt2 = BPE, llama = SPM, …).
    pub model: Option<String>,
    pub pre: Option<String>,
    pub n_tokens: usize,
    pub n_merges: usize,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    pub eot_token_id: Option<u64>,
    pub padding_token_id: Option<u64>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub has_chat_template: bool,
}

/// What `adaspec inspect FILE` reports.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: PathBuf,
    pub file_size: u64,
    pub gguf_version: String,
    pub architecture: String,
    pub name: Option<String>,
    pub n_params: u64,
    pub n_tensors: usize,
    pub context_length: Option<u64>,
    pub embedding_length: Option<u64>,
    pub block_count: Option<u64>,
    pub feed_forward_length: Option<u64>,
    pub head_count: Option<u64>,
    pub head_count_kv: Option<u64>,
    pub rope_freq_base: Option<f64>,
    /// Tensor type name → number of tensors of that type.
    pub tensor_types: BTreeMap<String, usize>,
    pub tokenizer: TokenizerSummary,
    /// What a head (`eagle3` or `fspad`) reads and drafts over (None for other architectures).
    pub head: Option<HeadSummary>,
    #[serde(skip)]
    tokens: Vec<String>,
}

/// A head's link to its target.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HeadSummary {
    /// `eagle3` (llama.cpp's graph) or `fspad` (the engine's FSPAD-family graph).
    pub kind: String,
    /// FSPAD-family variant: `eagle2`, `fspad`, `fs` or `pad` (None for eagle3).
    pub variant: Option<String>,
    /// Target layers whose inputs it reads (eagle3; FSPAD-family heads read the final norm).
    pub target_layers: Vec<i64>,
    pub target_hidden_size: Option<u64>,
    /// Size of its reduced draft vocabulary (`d2t`), or None when it uses the target's.
    pub draft_vocab: Option<u64>,
    pub own_token_embd: bool,
    pub own_output: bool,
}

/// Draft/target compatibility by llama.cpp's rules (common/speculative.cpp).
#[derive(Debug, Clone, Serialize)]
pub struct CompatReport {
    pub target: PathBuf,
    pub draft: PathBuf,
    pub compatible: bool,
    /// One line per broken rule (empty when compatible).
    pub problems: Vec<String>,
    pub n_vocab_target: usize,
    pub n_vocab_draft: usize,
    /// Token ids (≥ 5, below both sizes) whose texts differ.
    pub n_differing_tokens: usize,
    pub first_differing_token: Option<usize>,
}

fn gguf_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::InvalidGguf { path: path.to_path_buf(), reason: reason.to_string() }
}

fn as_u64(v: Option<&Value>) -> Option<u64> {
    v.and_then(|v| v.as_u64())
}

/// GGML type name of a tensor type id.
pub fn ggml_type_name(kind: u32) -> String {
    let s = match kind {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("type{other}"),
    };
    s.to_string()
}

/// Reads a GGUF's metadata and tensor index (no tensor data).
pub fn inspect(path: impl AsRef<Path>) -> Result<InspectReport> {
    let path = path.as_ref();
    let meta =
        std::fs::metadata(path).map_err(|e| Error::ModelFile { path: path.to_path_buf(), reason: e.to_string() })?;
    let path_str = path.to_str().ok_or_else(|| gguf_err(path, "path is not valid UTF-8"))?;
    let mut container = gguf_rs::get_gguf_container_array_size(path_str, u64::MAX).map_err(|e| gguf_err(path, e))?;
    let model = container.decode().map_err(|e| gguf_err(path, e))?;
    let gguf_version = model.get_version();
    let md = model.metadata();
    let architecture = md.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("unknown").to_string();
    let ak = |k: &str| md.get(&format!("{architecture}.{k}"));
    let mut tensor_types = BTreeMap::new();
    let mut n_params = 0u64;
    for t in model.tensors() {
        *tensor_types.entry(ggml_type_name(t.kind)).or_insert(0) += 1;
        n_params += t.shape.iter().take(t.n_dimensions as usize).product::<u64>();
    }
    let tokens: Vec<String> = match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect(),
        _ => Vec::new(),
    };
    let n_merges = match md.get("tokenizer.ggml.merges") {
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    };
    let s = |k: &str| md.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let b = |k: &str| md.get(k).and_then(|v| v.as_bool());
    let tokenizer = TokenizerSummary {
        model: s("tokenizer.ggml.model"),
        pre: s("tokenizer.ggml.pre"),
        n_tokens: tokens.len(),
        n_merges,
        bos_token_id: as_u64(md.get("tokenizer.ggml.bos_token_id")),
        eos_token_id: as_u64(md.get("tokenizer.ggml.eos_token_id")),
        eot_token_id: as_u64(md.get("tokenizer.ggml.eot_token_id")),
        padding_token_id: as_u64(md.get("tokenizer.ggml.padding_token_id")),
        add_bos_token: b("tokenizer.ggml.add_bos_token"),
        add_eos_token: b("tokenizer.ggml.add_eos_token"),
        has_chat_template: md.contains_key("tokenizer.chat_template"),
    };
    let find = |n: &str| model.tensors().iter().find(|t| t.name == n).cloned();
    let head = match architecture.as_str() {
        "fspad" => Some(HeadSummary {
            kind: "fspad".into(),
            variant: s("fspad.variant"),
            target_layers: Vec::new(),
            target_hidden_size: as_u64(md.get("fspad.embedding_length")),
            draft_vocab: find("d2t").map(|t| t.shape[0]),
            own_token_embd: false,
            own_output: find("output.weight").is_some(),
        }),
        "eagle3" => Some(HeadSummary {
            kind: "eagle3".into(),
            variant: None,
            target_layers: match md.get("eagle3.target_layers") {
                Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
                _ => Vec::new(),
            },
            target_hidden_size: as_u64(md.get("eagle3.target_hidden_size")),
            draft_vocab: find("d2t").map(|t| t.shape[0]),
            own_token_embd: find("token_embd.weight").is_some(),
            own_output: find("output.weight").is_some(),
        }),
        _ => None,
    };
    Ok(InspectReport {
        head,
        path: path.to_path_buf(),
        file_size: meta.len(),
        gguf_version,
        name: s("general.name"),
        context_length: as_u64(ak("context_length")),
        embedding_length: as_u64(ak("embedding_length")),
        block_count: as_u64(ak("block_count")),
        feed_forward_length: as_u64(ak("feed_forward_length")),
        head_count: as_u64(ak("attention.head_count")),
        head_count_kv: as_u64(ak("attention.head_count_kv")),
        rope_freq_base: ak("rope.freq_base").and_then(|v| v.as_f64()),
        architecture,
        n_params,
        n_tensors: model.tensors().len(),
        tensor_types,
        tokenizer,
        tokens,
    })
}

/// Whether `draft` may draft for `target` by llama.cpp's rules: same vocab type, same
/// add-bos/add-eos flags and bos/eos ids, sizes within 128, identical token texts (ids ≥ 5).
pub fn compat(target: impl AsRef<Path>, draft: impl AsRef<Path>) -> Result<CompatReport> {
    let t = inspect(target)?;
    let d = inspect(draft)?;
    Ok(compat_reports(&t, &d))
}

/// [`compat`] on two reports already read.
pub fn compat_reports(t: &InspectReport, d: &InspectReport) -> CompatReport {
    let mut problems = Vec::new();
    let (tt, dt) = (&t.tokenizer, &d.tokenizer);
    if tt.model != dt.model {
        problems.push(format!("vocab type differs: target {:?}, draft {:?}", tt.model, dt.model));
    }
    if tt.add_bos_token.unwrap_or(false) != dt.add_bos_token.unwrap_or(false)
        || tt.add_eos_token.unwrap_or(false) != dt.add_eos_token.unwrap_or(false)
    {
        problems.push(format!(
            "add_bos/add_eos differ: target {:?}/{:?}, draft {:?}/{:?}",
            tt.add_bos_token, tt.add_eos_token, dt.add_bos_token, dt.add_eos_token
        ));
    }
    if tt.bos_token_id != dt.bos_token_id || tt.eos_token_id != dt.eos_token_id {
        problems.push(format!(
            "bos/eos differ: target {:?}/{:?}, draft {:?}/{:?}",
            tt.bos_token_id, tt.eos_token_id, dt.bos_token_id, dt.eos_token_id
        ));
    }
    if tt.n_tokens == 0 || dt.n_tokens == 0 {
        problems.push("a file has no tokenizer.ggml.tokens".to_string());
    }
    if tt.n_tokens.abs_diff(dt.n_tokens) > MAX_VOCAB_SIZE_DIFFERENCE {
        problems.push(format!(
            "vocab sizes differ by more than {MAX_VOCAB_SIZE_DIFFERENCE}: target {}, draft {}",
            tt.n_tokens, dt.n_tokens
        ));
    }
    let n = t.tokens.len().min(d.tokens.len());
    let diffs: Vec<usize> = (CHECK_START_TOKEN_ID..n).filter(|&i| t.tokens[i] != d.tokens[i]).collect();
    if let Some(&i) = diffs.first() {
        problems.push(format!(
            "{} token texts differ, first at id {i}: target {:?}, draft {:?}",
            diffs.len(),
            t.tokens[i],
            d.tokens[i]
        ));
    }
    if let Some(h) = &d.head {
        if h.target_hidden_size != t.embedding_length {
            problems.push(format!(
                "the head reads features of hidden size {:?}, the target's is {:?}",
                h.target_hidden_size, t.embedding_length
            ));
        }
        if h.kind == "eagle3" && h.target_layers.len() != 3 {
            problems.push(format!("eagle3.target_layers must hold 3 layer ids, has {:?}", h.target_layers));
        }
        if let Some(l) = h.target_layers.iter().find(|&&l| l < 0 || Some(l as u64) >= t.block_count) {
            problems.push(format!("the head reads layer {l}, the target has {:?} layers", t.block_count));
        }
        if tt.n_tokens != dt.n_tokens {
            problems.push(format!(
                "a head carries its target's tokenizer: {} tokens, the target has {}",
                dt.n_tokens, tt.n_tokens
            ));
        }
    }
    CompatReport {
        target: t.path.clone(),
        draft: d.path.clone(),
        compatible: problems.is_empty(),
        problems,
        n_vocab_target: tt.n_tokens,
        n_vocab_draft: dt.n_tokens,
        n_differing_tokens: diffs.len(),
        first_differing_token: diffs.first().copied(),
    }
}

/// `adaspec inspect FILE.gguf [--compat OTHER.gguf] [--json]`
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// GGUF file to describe.
    pub file: PathBuf,
    /// Also check whether FILE (as draft, or as an eagle3 or fspad head: hidden size, layers, vocabulary)
    /// is compatible with this target GGUF.
    #[arg(long, value_name = "TARGET.gguf")]
    pub compat: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `adaspec inspect`. Fails (non-zero exit) when `--compat` finds the pair incompatible.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let report = inspect(&args.file)?;
    let compat = match &args.compat {
        Some(target) => Some(compat_reports(&inspect(target)?, &report)),
        None => None,
    };
    if args.json {
        let v = serde_json::json!({ "file": report, "compat": compat });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let opt = |x: Option<u64>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!("file:          {} ({} bytes, GGUF {})", report.path.display(), report.file_size, report.gguf_version);
        println!(
            "architecture:  {}{}",
            report.architecture,
            report.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
        );
        println!("parameters:    {} in {} tensors", report.n_params, report.n_tensors);
        println!(
            "sizes:         blocks {}, embd {}, ffn {}, heads {}/{} kv, ctx {}, rope base {}",
            opt(report.block_count),
            opt(report.embedding_length),
            opt(report.feed_forward_length),
            opt(report.head_count),
            opt(report.head_count_kv),
            opt(report.context_length),
            report.rope_freq_base.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
        );
        let types: Vec<String> = report.tensor_types.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        println!("tensor types:  {}", types.join(", "));
        let tk = &report.tokenizer;
        println!(
            "tokenizer:     {} (pre {}), {} tokens, {} merges, bos {}, eos {}, chat template {}",
            tk.model.as_deref().unwrap_or("-"),
            tk.pre.as_deref().unwrap_or("-"),
            tk.n_tokens,
            tk.n_merges,
            opt(tk.bos_token_id),
            opt(tk.eos_token_id),
            if tk.has_chat_template { "yes" } else { "no" }
        );
        if let Some(h) = &report.head {
            let reads = match &h.variant {
                Some(v) => format!("fspad ({v}), reads the target's final-norm hidden state"),
                None => format!("eagle3, reads target layers {:?}", h.target_layers),
            };
            println!(
                "head:          {reads} of hidden size {}, draft vocabulary {}, {} embedding, {} LM head",
                opt(h.target_hidden_size),
                h.draft_vocab.map(|v| v.to_string()).unwrap_or_else(|| "= the target's".into()),
                if h.own_token_embd { "own" } else { "the target's" },
                if h.own_output { "own" } else { "the target's" }
            );
        }
        if let Some(c) = &compat {
            if c.compatible {
                println!("compat:        compatible as a draft for {}", c.target.display());
            } else {
                println!("compat:        NOT compatible as a draft for {}:", c.target.display());
                for p in &c.problems {
                    println!("  - {p}");
                }
            }
        }
    }
    if let Some(c) = compat {
        if !c.compatible {
            anyhow::bail!(
                "{} is not draft-compatible with {}: {}",
                c.draft.display(),
                c.target.display(),
                c.problems.join("; ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_model::{write_tiny_model, TinyArch, TinyModelConfig};

    #[test]
    fn a_head_is_described_and_checked_against_its_target() {
        use crate::tiny_model::{write_tiny_head, TinyHeadConfig};
        let dir = std::env::temp_dir().join(format!("adaspec-inspect-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = TinyModelConfig { n_layer: 6, ..Default::default() };
        let (t, h, other) = (dir.join("t.gguf"), dir.join("h.gguf"), dir.join("o.gguf"));
        write_tiny_model(&t, &cfg).unwrap();
        write_tiny_model(&other, &TinyModelConfig { n_embd: 32, n_layer: 2, ..Default::default() }).unwrap();
        write_tiny_head(&h, &cfg, &TinyHeadConfig { draft_vocab: Some(100), ..Default::default() }).unwrap();
        let r = inspect(&h).unwrap();
        assert_eq!(r.architecture, "eagle3");
        let hs = r.head.clone().unwrap();
        assert_eq!(hs.target_layers, vec![2, 3, 3]);
        assert_eq!(
            (hs.target_hidden_size, hs.draft_vocab, hs.own_output, hs.own_token_embd),
            (Some(64), Some(100), true, false)
        );
        assert_eq!(r.tensor_types.get("I64").copied(), Some(1));
        assert!(compat(&t, &h).unwrap().compatible);
        let bad = compat(&other, &h).unwrap();
        assert!(!bad.compatible);
        assert!(bad.problems.iter().any(|p| p.contains("hidden size")), "{:?}", bad.problems);
        assert!(bad.problems.iter().any(|p| p.contains("reads layer")), "{:?}", bad.problems);
        assert!(inspect(&t).unwrap().head.is_none());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn inspect_and_compat_on_tiny_models() {
        let dir = std::env::temp_dir().join(format!("adaspec-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.gguf");
        let b = dir.join("b.gguf");
        write_tiny_model(&a, &TinyModelConfig { arch: TinyArch::Qwen2, ..Default::default() }).unwrap();
        write_tiny_model(&b, &TinyModelConfig { n_layer: 1, ..Default::default() }).unwrap();
        let r = inspect(&a).unwrap();
        assert_eq!(r.architecture, "qwen2");
        assert_eq!(r.block_count, Some(2));
        assert_eq!(r.tensor_types.get("F32").copied(), Some(r.n_tensors));
        assert!(r.tokenizer.n_tokens > 256);
        let c = compat(&a, &b).unwrap();
        assert!(c.compatible, "{:?}", c.problems);
        assert!(inspect(dir.join("missing.gguf")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn real_pair_is_compatible_and_smollm2_is_not() {
        let dir = crate::models::models_dir();
        let t = dir.join(crate::models::DEFAULT_TARGET);
        let d = dir.join(crate::models::DEFAULT_DRAFT);
        let s = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !t.exists() || !d.exists() || !s.exists() {
            eprintln!("real models not found in {}; skipping", dir.display());
            return;
        }
        let r = inspect(&d).unwrap();
        eprintln!("{}", serde_json::to_string(&r).unwrap());
        assert_eq!(r.architecture, "qwen2");
        assert_eq!(r.block_count, Some(24));
        assert_eq!(r.tokenizer.n_tokens, 151_936);
        let c = compat(&t, &d).unwrap();
        assert!(c.compatible, "{:?}", c.problems);
        let c = compat(&t, &s).unwrap();
        eprintln!("{:?}", c.problems);
        assert!(!c.compatible);
    }
}
