//! Feature-level heads in the EAGLE-3 layout (SPEC §5): shape, initialisation for a target GGUF
//! (`adaspec head init`) and export as llama.cpp's `eagle3` GGUF, laid out as llama.cpp's own
//! converter writes it: `fc` (3H_t → H), one block with `attn_norm` (on the token embedding)
//! and `attn_norm_2` (on g), 2H-wide q/k/v, `attn_output`, `ffn_norm`, gate/up/down,
//! `output_norm`, and — with a reduced draft vocabulary — its own `output` over the draft ids
//! plus `d2t` (I64, the target id of each draft id: llama.cpp scatters with it). Token embeddings are the target's (shared at run
//! time through llama.cpp's `ctx_other`, frozen in training), so the file does not carry them;
//! without a reduced vocabulary the target's LM head is shared the same way.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::export::{check_destination, tokenizer_metadata, ExportType};
use super::gguf_import::{config_from_gguf, read_gguf_content, temp_path_for};
use super::model::Weights;

/// Shape of a head and what it reads from its target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    /// Target layers whose inputs are read (low, mid, high).
    pub target_layers: [u32; 3],
    pub target_hidden_size: usize,
    /// The target's vocabulary size.
    pub target_vocab: usize,
    /// Reduced draft vocabulary: target ids, increasing; empty = the target's whole vocabulary
    /// and its LM head.
    pub draft_vocab: Vec<u32>,
}

impl HeadConfig {
    /// Tensors in file order, row-major shapes.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let b = |s: &str| format!("blk.0.{s}");
        let mut t = vec![
            ("fc.weight".to_string(), vec![h, 3 * self.target_hidden_size]),
            (b("attn_norm.weight"), vec![h]),
            (b("attn_norm_2.weight"), vec![h]),
            (b("attn_q.weight"), vec![q, 2 * h]),
            (b("attn_k.weight"), vec![kv, 2 * h]),
            (b("attn_v.weight"), vec![kv, 2 * h]),
            (b("attn_output.weight"), vec![h, q]),
            (b("ffn_norm.weight"), vec![h]),
            (b("ffn_gate.weight"), vec![i, h]),
            (b("ffn_up.weight"), vec![i, h]),
            (b("ffn_down.weight"), vec![h, i]),
            ("output_norm.weight".to_string(), vec![h]),
        ];
        if !self.draft_vocab.is_empty() {
            t.push(("output.weight".to_string(), vec![self.draft_vocab.len(), h]));
        }
        t
    }

    /// Number of trainable parameters.
    pub fn n_params(&self) -> usize {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { origin: "head".into(), reason });
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_attention_heads == 0 {
            return bad("sizes must be > 0".into());
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.draft_vocab.windows(2).any(|w| w[0] >= w[1]) {
            return bad("draft vocabulary ids must be strictly increasing".into());
        }
        if self.draft_vocab.last().is_some_and(|&t| t as usize >= self.target_vocab) {
            return bad(format!("draft vocabulary holds ids beyond the target's {}", self.target_vocab));
        }
        Ok(())
    }
}

/// Tensor `name` of a head's `weights`, checked against its expected `shape`.
pub(crate) fn head_tensor<'a>(weights: &'a Weights, name: &str, shape: &[usize], origin: &str) -> Result<&'a Tensor> {
    let t = weights
        .get(name)
        .ok_or_else(|| Error::Tensor { origin: origin.into(), reason: format!("missing tensor {name}") })?;
    if t.dims() != shape {
        return Err(Error::Tensor {
            origin: origin.into(),
            reason: format!("{name} has shape {:?}, expected {shape:?}", t.dims()),
        });
    }
    Ok(t)
}

/// The `count` most frequent token ids of `freq` (ties: lower id first), increasing.
pub fn top_vocab(freq: &[u64], count: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..freq.len() as u32).collect();
    ids.sort_by(|&a, &b| freq[b as usize].cmp(&freq[a as usize]).then(a.cmp(&b)));
    ids.truncate(count);
    ids.sort_unstable();
    ids
}

/// A head shaped for the target GGUF `target`: its hidden size, heads and RoPE base, EAGLE-3's
/// feature layers, FFN width `ffn` (default the target's), over `draft_vocab` (empty = all).
pub fn head_config_for(target: &Path, ffn: Option<usize>, draft_vocab: Vec<u32>) -> Result<HeadConfig> {
    let (content, _) = read_gguf_content(target)?;
    let t = config_from_gguf(&content, target)?;
    let cfg = HeadConfig {
        hidden_size: t.hidden_size,
        num_attention_heads: t.num_attention_heads,
        num_key_value_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        intermediate_size: ffn.unwrap_or(t.intermediate_size),
        rope_theta: t.rope_theta,
        rms_norm_eps: t.rms_norm_eps,
        max_position_embeddings: t.max_position_embeddings,
        target_layers: crate::features::eagle3_layers(t.num_hidden_layers),
        target_hidden_size: t.hidden_size,
        target_vocab: t.vocab_size,
        draft_vocab,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Initial weights: N(0, 0.02) matrices (as HF initialises a decoder layer), unit norms, and —
/// with a reduced vocabulary — the target's LM head rows of the draft ids (dequantized from
/// the target GGUF), so the head starts with the target's output space.
pub fn init_head(cfg: &HeadConfig, target: &Path, seed: u64) -> Result<Weights> {
    cfg.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::InvalidArg { name: "init", reason: e.to_string() })?;
    let mut w = Weights::new();
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        let t = if name.ends_with("norm.weight") || name.ends_with("norm_2.weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else if name == "output.weight" {
            target_lm_rows(target, &cfg.draft_vocab)?
        } else {
            let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
        };
        w.insert(name, t);
    }
    Ok(w)
}

/// Rows `ids` of the target's LM head (`output.weight`, or the tied embedding), f32; every
/// row when `ids` is empty.
pub(crate) fn target_lm_rows(target: &Path, ids: &[u32]) -> Result<Tensor> {
    let (content, mut reader) = read_gguf_content(target)?;
    let name = if content.tensor_infos.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
    let q = content
        .tensor(&mut reader, name, &Device::Cpu)
        .map_err(|e| Error::Gguf { path: target.to_path_buf(), reason: format!("{name}: {e}") })?;
    let full = q.dequantize(&Device::Cpu)?;
    if ids.is_empty() {
        return Ok(full);
    }
    let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
    Ok(full.index_select(&idx, 0)?.contiguous()?)
}

/// `config.json`-style sidecar of a head checkpoint.
pub fn head_config_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("head.json")
}

/// Writes the head as an `eagle3` GGUF at `out`, with `tokenizer_from`'s (the target's)
/// tokenizer copied verbatim.
pub fn write_head_gguf(
    cfg: &HeadConfig,
    weights: &Weights,
    out: &Path,
    tokenizer_from: &Path,
    ty: ExportType,
) -> Result<()> {
    cfg.validate()?;
    check_destination(out, &[tokenizer_from])?;
    let u = |x: usize| Value::U32(u32::try_from(x).unwrap_or(u32::MAX));
    let k = |s: &str| format!("eagle3.{s}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("eagle3".into())),
        ("general.name".into(), Value::String("adaspec-head-eagle3".into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(1)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (k("vocab_size"), u(cfg.target_vocab)),
        (k("target_layers"), Value::Array(cfg.target_layers.iter().map(|&l| Value::I32(l as i32)).collect())),
        (k("target_hidden_size"), u(cfg.target_hidden_size)),
    ];
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        md.push((k("attention.key_length"), u(cfg.head_dim)));
        md.push((k("attention.value_length"), u(cfg.head_dim)));
    }
    md.extend(tokenizer_metadata(tokenizer_from, cfg.target_vocab)?);

    let mut qt: Vec<(String, QTensor)> = Vec::new();
    for (name, shape) in cfg.tensor_shapes() {
        let t = head_tensor(weights, &name, &shape, "head export")?;
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
        qt.push((name, QTensor::quantize(&t, ty.tensor_type(&shape))?));
    }
    // d2t: the target id of each draft id. llama.cpp's graph scatters draft logit i to target
    // row d2t[i] (ggml_set_rows), so the GGUF holds absolute ids (EAGLE-3's checkpoints hold
    // offsets t - i; llama.cpp's converter adds the index).
    let d2t: Vec<i64> = cfg.draft_vocab.iter().map(|&t| t as i64).collect();
    write_head_file(out, &md, qt, &d2t)
}

/// Writes a head GGUF: metadata `md`, tensors `qt` and — when not empty — an I64 `d2t`; the
/// file is re-read before it replaces `out`.
pub(crate) fn write_head_file(
    out: &Path,
    md: &[(String, Value)],
    mut qt: Vec<(String, QTensor)>,
    d2t: &[i64],
) -> Result<()> {
    // candle has no I64 tensors: d2t is written as 2·V zero f32 (the same byte size) and patched.
    if !d2t.is_empty() {
        let z = Tensor::zeros(2 * d2t.len(), DType::F32, &Device::Cpu)?;
        qt.push(("d2t".into(), QTensor::quantize(&z, candle_core::quantized::GgmlDType::F32)?));
    }

    let tmp = temp_path_for(out)?;
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        {
            let mut w = std::io::BufWriter::new(&mut f);
            let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
            gguf_file::write(&mut w, &md_refs, &t_refs)
                .map_err(|e| Error::Gguf { path: tmp.clone(), reason: format!("write: {e}") })?;
            w.flush().map_err(|e| Error::io(&tmp, e))?;
        }
        drop(f);
        // The file must parse and hold every tensor before it is published (read before the
        // patch: candle does not know I64).
        let (back, _) = read_gguf_content(&tmp)?;
        if back.tensor_infos.len() != qt.len() {
            return Err(Error::Gguf { path: tmp.clone(), reason: "re-read found a different tensor count".into() });
        }
        if !d2t.is_empty() {
            let info = back
                .tensor_infos
                .get("d2t")
                .ok_or_else(|| Error::Gguf { path: tmp.clone(), reason: "d2t missing after writing".into() })?;
            let at = back.tensor_data_offset + info.offset;
            crate::tiny_model::patch_f32_to_i64(&tmp, "d2t", d2t.len() as u64)?;
            let mut f = std::fs::OpenOptions::new().write(true).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.seek(SeekFrom::Start(at)).map_err(|e| Error::io(&tmp, e))?;
            let bytes: Vec<u8> = d2t.iter().flat_map(|v| v.to_le_bytes()).collect();
            f.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves a head checkpoint: safetensors weights and the config next to it.
pub fn save_head(path: &Path, cfg: &HeadConfig, weights: &Weights) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> = weights.clone().into_iter().collect();
    // Each file through a temp file and a rename: never half-written.
    let json = serde_json::to_string_pretty(cfg)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    super::data::write_atomic(&head_config_path(path), json.as_bytes())?;
    let tmp = super::gguf_import::temp_path_for(path)?;
    candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Loads a head checkpoint written by [`save_head`].
pub fn load_head(path: &Path) -> Result<(HeadConfig, Weights)> {
    let cp = head_config_path(path);
    let json = std::fs::read_to_string(&cp).map_err(|e| Error::io(&cp, e))?;
    let cfg: HeadConfig = serde_json::from_str(&json)
        .map_err(|e| Error::Checkpoint { path: cp.clone(), reason: format!("bad head config: {e}") })?;
    let w = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok((cfg, w.into_iter().collect()))
}
