//! Loading draft weights: from a GGUF file of any quantization candle can dequantize (to f32),
//! with the [`Config`] read from its metadata; and the project's own checkpoints
//! (`NAME.safetensors` + `config.json` in the same folder), which it also writes.
//!
//! Tensors keep their GGUF names and layout (see `model.rs`): no Q/K permutation happens here,
//! so export writes back exactly what llama.cpp expects. Never writes a partial checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::error::{Error, Result};
use super::model::{check_weights, Arch, Config, Weights};
use super::prune::check_layers;

fn gguf_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Gguf { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Reads a GGUF header (metadata + tensor index). Returns the open file for tensor reads.
pub fn read_gguf_content(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| gguf_err(path, e))?;
    Ok((content, reader))
}

/// An unsigned integer metadata value of any integer type.
pub fn meta_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

/// A float metadata value (f32/f64 or integer).
pub fn meta_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => meta_usize(other).map(|x| x as f64),
    }
}

/// The draft [`Config`] described by a GGUF's metadata and tensor index.
pub fn config_from_gguf(content: &Content, path: &Path) -> Result<Config> {
    let origin = path.display().to_string();
    let md = &content.metadata;
    let arch_s = match md.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(Error::Config { origin, reason: "missing general.architecture".into() }),
    };
    let arch = Arch::parse(&arch_s, &origin)?;
    let key = |k: &str| format!("{arch_s}.{k}");
    let need = |k: &str| -> Result<usize> {
        md.get(&key(k)).and_then(meta_usize).ok_or_else(|| Error::Config {
            origin: origin.clone(),
            reason: format!("missing or non-integer metadata key {}", key(k)),
        })
    };
    let hidden = need("embedding_length")?;
    let n_layer = need("block_count")?;
    let n_ff = need("feed_forward_length")?;
    let n_head = need("attention.head_count")?;
    let n_kv = md.get(&key("attention.head_count_kv")).and_then(meta_usize).unwrap_or(n_head);
    let ctx = md.get(&key("context_length")).and_then(meta_usize).unwrap_or(2048);
    let head_dim =
        md.get(&key("attention.key_length")).and_then(meta_usize).unwrap_or(hidden.checked_div(n_head).unwrap_or(0));
    if let Some(rd) = md.get(&key("rope.dimension_count")).and_then(meta_usize) {
        if rd != head_dim {
            return Err(Error::Config {
                origin,
                reason: format!(
                    "partial RoPE ({} = {rd}, head size {head_dim}) is not supported",
                    key("rope.dimension_count")
                ),
            });
        }
    }
    if let Some(Value::String(t)) = md.get(&key("rope.scaling.type")) {
        if t != "none" {
            return Err(Error::Config {
                origin,
                reason: format!("RoPE scaling {t:?} ({}) is not supported", key("rope.scaling.type")),
            });
        }
    }
    let rope_theta = md.get(&key("rope.freq_base")).and_then(meta_f64).unwrap_or(10000.0);
    let eps = md.get(&key("attention.layer_norm_rms_epsilon")).and_then(meta_f64).unwrap_or(1e-6);
    let emb = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::Tensor { origin: origin.clone(), reason: "missing tensor token_embd.weight".into() })?;
    let vocab = emb.shape.dims().first().copied().unwrap_or(0);
    let cfg = Config {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: n_ff,
        num_hidden_layers: n_layer,
        num_attention_heads: n_head,
        num_key_value_heads: n_kv,
        head_dim,
        rope_theta,
        rms_norm_eps: eps,
        max_position_embeddings: ctx,
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        rope_style: arch.rope_style(),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
    };
    cfg.validate(&origin)?;
    Ok(cfg)
}

/// Loads a GGUF model's config and all its weights, dequantized to f32 on the CPU.
/// Tensors the decoder does not use (e.g. `rope_freqs`) are skipped.
pub fn load_gguf(path: &Path) -> Result<(Config, Weights)> {
    load_gguf_blocks(path, None)
}

/// Like [`load_gguf`], but reads only the blocks `layers` (strictly increasing source indices,
/// renumbered 0..k): a layer-pruned draft straight from the file, without materialising the
/// blocks it drops.
pub fn load_gguf_blocks(path: &Path, layers: Option<&[usize]>) -> Result<(Config, Weights)> {
    let (content, mut reader) = read_gguf_content(path)?;
    let src_cfg = config_from_gguf(&content, path)?;
    let (cfg, layers): (Config, Vec<usize>) = match layers {
        None => (src_cfg.clone(), (0..src_cfg.num_hidden_layers).collect()),
        Some(l) => {
            check_layers(l, src_cfg.num_hidden_layers)?;
            let mut c = src_cfg.clone();
            c.num_hidden_layers = l.len();
            (c, l.to_vec())
        }
    };
    let mut weights = Weights::new();
    for (name, shape) in cfg.tensor_shapes() {
        // blk.{new}.x is read from blk.{layers[new]}.x
        let src_name = match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((idx, tail)) => {
                let new: usize = idx.parse().map_err(|_| Error::Tensor {
                    origin: path.display().to_string(),
                    reason: format!("bad block tensor name {name}"),
                })?;
                format!("blk.{}.{tail}", layers[new])
            }
            None => name.clone(),
        };
        let qt = content
            .tensor(&mut reader, &src_name, &Device::Cpu)
            .map_err(|e| gguf_err(path, format!("tensor {src_name}: {e}")))?;
        let t = qt
            .dequantize(&Device::Cpu)
            .map_err(|e| gguf_err(path, format!("dequantize {src_name} ({:?}): {e}", qt.dtype())))?;
        if t.dims() != shape.as_slice() {
            return Err(Error::Tensor {
                origin: path.display().to_string(),
                reason: format!("tensor {src_name} has shape {:?}, expected {shape:?}", t.dims()),
            });
        }
        weights.insert(name, t.to_dtype(DType::F32)?);
    }
    check_weights(&cfg, &weights, &path.display().to_string())?;
    tracing::info!(
        "loaded {} ({} arch, blocks {layers:?}, {:.1}M parameters, dequantized to f32)",
        path.display(),
        cfg.arch.name(),
        cfg.n_params() as f64 / 1e6
    );
    Ok((cfg, weights))
}

/// The `config.json` that belongs to a checkpoint (same folder: one checkpoint config per
/// folder, as in Hugging Face's layout).
pub fn config_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_file_name("config.json")
}

/// Reads a checkpoint `config.json`, refusing unknown architectures with a clear error.
pub fn read_config_json(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config { origin: origin.clone(), reason: format!("not JSON: {e}") })?;
    match raw.get("arch").and_then(|a| a.as_str()) {
        Some(a) => {
            Arch::parse(a, &origin)?;
        }
        None => return Err(Error::Config { origin, reason: "missing \"arch\"".into() }),
    }
    let cfg: Config =
        serde_json::from_value(raw).map_err(|e| Error::Config { origin: origin.clone(), reason: e.to_string() })?;
    cfg.validate(&origin)?;
    Ok(cfg)
}

/// Loads a checkpoint written by [`save_checkpoint`] (weights as f32 on the CPU).
pub fn load_checkpoint(path: &Path) -> Result<(Config, Weights)> {
    let cfg = read_config_json(&config_path(path))?;
    let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("not a readable safetensors file: {e}"),
    })?;
    let mut weights = Weights::new();
    for (k, v) in map {
        weights.insert(k, v.to_dtype(DType::F32)?);
    }
    check_weights(&cfg, &weights, &path.display().to_string())?;
    Ok((cfg, weights))
}

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|_| &magic == b"GGUF")
        .unwrap_or(false)
}

/// Loads either a GGUF model or a safetensors checkpoint, by file content.
pub fn load_any(path: &Path) -> Result<(Config, Weights)> {
    if is_gguf_file(path) {
        load_gguf(path)
    } else if !path.exists() {
        Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
    } else {
        load_checkpoint(path)
    }
}

/// A temp path next to `path`, unique per process and call.
pub(crate) fn temp_path_for(path: &Path) -> Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArg { name: "output", reason: format!("{} has no file name", path.display()) })?;
    Ok(path.with_file_name(format!(".{}.tmp{}-{n}", name.to_string_lossy(), std::process::id())))
}

/// Writes `weights` (checked against `cfg`) as `path` (safetensors) and `config.json` next
/// to it, each through a temp file that is renamed.
pub fn save_checkpoint(path: &Path, cfg: &Config, weights: &Weights) -> Result<()> {
    check_weights(cfg, weights, &path.display().to_string())?;
    let cfg_json = serde_json::to_string_pretty(cfg)
        .map_err(|e| Error::Config { origin: path.display().to_string(), reason: e.to_string() })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let cpath = config_path(path);
    let tmp_w = temp_path_for(path)?;
    let tmp_c = temp_path_for(&cpath)?;
    let result = (|| -> Result<()> {
        let map: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.contiguous()?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&map, &tmp_w)
            .map_err(|e| Error::Checkpoint { path: tmp_w.clone(), reason: format!("cannot write safetensors: {e}") })?;
        std::fs::write(&tmp_c, cfg_json).map_err(|e| Error::io(&tmp_c, e))?;
        std::fs::rename(&tmp_w, path).map_err(|e| Error::io(path, e))?;
        std::fs::rename(&tmp_c, &cpath).map_err(|e| Error::io(&cpath, e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_w);
        let _ = std::fs::remove_file(&tmp_c);
    }
    result
}
