//! GGUF export of a draft (`adaspec-export --gguf`): the draft's own architecture with every
//! metadata key llama.cpp reads for it, the target's `tokenizer.*` metadata copied verbatim
//! (so the vocabularies are identical), weights as f32/f16/q8_0/q4_0/q4_k.
//!
//! Writes through a temp file in the destination's folder that is renamed only once complete
//! and re-read: a failure never leaves a broken GGUF at the destination nor replaces a good one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use super::error::{Error, Result};
use super::gguf_import::{load_any, read_gguf_content, temp_path_for};
use super::model::{check_weights, Config, Weights};

/// Weight type of an exported GGUF. 1-D tensors (norms, biases) are always f32; a 2-D tensor
/// whose rows do not fit the quantization block falls back to q8_0 (rows % 32 == 0) or f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportType {
    #[value(name = "f32")]
    F32,
    #[value(name = "f16")]
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl ExportType {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            ExportType::F32 => "f32",
            ExportType::F16 => "f16",
            ExportType::Q8_0 => "q8_0",
            ExportType::Q4_0 => "q4_0",
            ExportType::Q4K => "q4_k",
        }
    }

    /// `general.file_type` (llama_ftype).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q8_0 => 7,
            ExportType::Q4K => 14,
        }
    }

    /// The tensor type used for a tensor of `shape` (row-major).
    pub(crate) fn tensor_type(self, shape: &[usize]) -> GgmlDType {
        if shape.len() < 2 {
            return GgmlDType::F32;
        }
        let cols = shape.last().copied().unwrap_or(0);
        let fits = |t: GgmlDType| cols % t.block_size() == 0;
        let wanted = match self {
            ExportType::F32 => GgmlDType::F32,
            ExportType::F16 => GgmlDType::F16,
            ExportType::Q8_0 => GgmlDType::Q8_0,
            ExportType::Q4_0 => GgmlDType::Q4_0,
            ExportType::Q4K => GgmlDType::Q4K,
        };
        if fits(wanted) {
            wanted
        } else if fits(GgmlDType::Q8_0) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F16
        }
    }
}

impl FromStr for ExportType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(ExportType::F32),
            "f16" => Ok(ExportType::F16),
            "q8_0" => Ok(ExportType::Q8_0),
            "q4_0" => Ok(ExportType::Q4_0),
            "q4_k" | "q4k" => Ok(ExportType::Q4K),
            other => Err(Error::InvalidArg {
                name: "--type",
                reason: format!("{other:?}: expected f32, f16, q8_0, q4_0 or q4_k"),
            }),
        }
    }
}

/// Exports a checkpoint (safetensors + config.json, or a GGUF) as a llama.cpp GGUF at `out`
/// with the tokenizer of `tokenizer_from`.
pub fn export_gguf(checkpoint: &Path, out: &Path, tokenizer_from: &Path, ty: ExportType) -> Result<()> {
    let (cfg, weights) = load_any(checkpoint)?;
    write_draft_gguf(&cfg, &weights, out, tokenizer_from, ty)
}

fn u32v(x: usize, what: &str) -> Result<Value> {
    u32::try_from(x)
        .map(Value::U32)
        .map_err(|_| Error::Config { origin: "export".into(), reason: format!("{what} = {x} does not fit a u32") })
}

/// The architecture metadata llama.cpp reads for `cfg` (SPEC §6).
fn arch_metadata(cfg: &Config, ty: ExportType) -> Result<Vec<(String, Value)>> {
    let a = cfg.arch.name();
    let k = |s: &str| format!("{a}.{s}");
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(a.to_string())),
        ("general.name".to_string(), Value::String(format!("adaspec-draft-{a}"))),
        ("general.file_type".to_string(), Value::U32(ty.file_type())),
        ("general.quantization_version".to_string(), Value::U32(2)),
        (k("context_length"), u32v(cfg.max_position_embeddings, "context_length")?),
        (k("embedding_length"), u32v(cfg.hidden_size, "embedding_length")?),
        (k("block_count"), u32v(cfg.num_hidden_layers, "block_count")?),
        (k("feed_forward_length"), u32v(cfg.intermediate_size, "feed_forward_length")?),
        (k("attention.head_count"), u32v(cfg.num_attention_heads, "head_count")?),
        (k("attention.head_count_kv"), u32v(cfg.num_key_value_heads, "head_count_kv")?),
        (k("rope.dimension_count"), u32v(cfg.head_dim, "rope.dimension_count")?),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (k("vocab_size"), u32v(cfg.vocab_size, "vocab_size")?),
    ];
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        md.push((k("attention.key_length"), u32v(cfg.head_dim, "key_length")?));
        md.push((k("attention.value_length"), u32v(cfg.head_dim, "value_length")?));
    }
    Ok(md)
}

/// Checks that `out` can be written without clobbering an input; returns nothing on success.
pub(crate) fn check_destination(out: &Path, inputs: &[&Path]) -> Result<()> {
    if out.is_dir() {
        return Err(Error::InvalidArg {
            name: "--output",
            reason: format!("{} is a directory, expected a file path", out.display()),
        });
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::InvalidArg {
            name: "--output",
            reason: format!("folder {} does not exist", parent.display()),
        });
    }
    if let Ok(o) = out.canonicalize() {
        for i in inputs {
            if i.canonicalize().map(|c| c == o).unwrap_or(false) {
                return Err(Error::InvalidArg {
                    name: "--output",
                    reason: format!("{} is also an input file; refusing to overwrite it", out.display()),
                });
            }
        }
    }
    Ok(())
}

/// Every `tokenizer.*` key of the GGUF `tokenizer_from`, verbatim and sorted, after checking
/// that its vocabulary has `vocab_size` tokens (the model being written must index it).
pub(crate) fn tokenizer_metadata(tokenizer_from: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let (tok, _) = read_gguf_content(tokenizer_from)?;
    let n_tokens = match tok.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => v.len(),
        _ => {
            return Err(Error::Gguf {
                path: tokenizer_from.to_path_buf(),
                reason: "no tokenizer.ggml.tokens array: not a llama.cpp model with a tokenizer".into(),
            })
        }
    };
    if n_tokens != vocab_size {
        return Err(Error::VocabMismatch {
            draft: vocab_size,
            tokenizer: n_tokens,
            tokenizer_path: tokenizer_from.to_path_buf(),
        });
    }
    let mut keys: Vec<&String> = tok.metadata.keys().filter(|k| k.starts_with("tokenizer.")).collect();
    keys.sort();
    Ok(keys.into_iter().map(|k| (k.clone(), tok.metadata[k].clone())).collect())
}

/// Writes the draft `cfg`/`weights` as a GGUF at `out` with `tokenizer_from`'s tokenizer.
pub fn write_draft_gguf(
    cfg: &Config,
    weights: &Weights,
    out: &Path,
    tokenizer_from: &Path,
    ty: ExportType,
) -> Result<()> {
    check_weights(cfg, weights, "export")?;
    check_destination(out, &[tokenizer_from])?;

    let mut md = arch_metadata(cfg, ty)?;
    md.extend(tokenizer_metadata(tokenizer_from, cfg.vocab_size)?);

    // Tensors in file order.
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (name, shape) in cfg.tensor_shapes() {
        let t = weights
            .get(&name)
            .ok_or_else(|| Error::Tensor { origin: "export".into(), reason: format!("missing tensor {name}") })?;
        let t = t.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let vals = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = vals.iter().position(|v| !v.is_finite()) {
            return Err(Error::Tensor {
                origin: "export".into(),
                reason: format!("tensor {name} holds a non-finite value at flat index {bad}"),
            });
        }
        let q = QTensor::quantize(&t, ty.tensor_type(&shape))?;
        qtensors.push((name, q));
    }

    let tmp = temp_path_for(out)?;
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::new(file);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &md_refs, &t_refs)
            .map_err(|e| Error::Gguf { path: tmp.clone(), reason: format!("write: {e}") })?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        let file = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        // Re-read the header: the file we are about to publish must parse and be complete.
        let (back, _) = read_gguf_content(&tmp)?;
        if back.tensor_infos.len() != qtensors.len() {
            return Err(Error::Gguf {
                path: tmp.clone(),
                reason: format!("re-read found {} tensors, wrote {}", back.tensor_infos.len(), qtensors.len()),
            });
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        tracing::info!(
            "exported {} ({} arch, {}, {} tensors, tokenizer from {})",
            out.display(),
            cfg.arch.name(),
            ty.name(),
            qtensors.len(),
            tokenizer_from.display()
        );
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
