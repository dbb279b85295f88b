//! The trainable draft decoder: one implementation of the `llama` and `qwen2` architectures,
//! whose differences (q/k/v biases, RoPE layout and base, tied LM head) are [`Config`] values.
//!
//! The forward pass returns logits at every position (batch × seq × vocab) and is built only
//! from candle ops that carry gradients (SPEC §7): RMSNorm, softmax and RoPE are written with
//! basic ops here. It must never use `candle_nn::RmsNorm::forward`, `ops::softmax_last_dim` or
//! `rotary_emb::rope`, which silently stop the gradient in candle 0.11.
//!
//! Weights are named exactly as in llama.cpp's GGUF files (`token_embd.weight`,
//! `blk.N.attn_q.weight`, …) and stored row-major (`[out_features, in_features]`), so import,
//! checkpoints and export need no renaming. Q/K are kept in the layout of the GGUF they came
//! from: `llama` GGUFs hold llama.cpp's permuted Q/K, which the "normal" (adjacent pairs)
//! rotation reproduces; `qwen2` uses the NeoX (half split) rotation.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Named weights, row-major, any dtype/device (import and export use f32 on the CPU).
pub type Weights = BTreeMap<String, Tensor>;

/// Additive attention mask value: large enough to zero a probability, small enough that two
/// of them add up without overflowing f32 (a fully masked row stays finite).
const MASK_VALUE: f64 = -1e9;

/// Decoder architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// `llama` (SmolLM2): no attention biases, "normal" RoPE on GGUF weights.
    Llama,
    /// `qwen2` (Qwen2.5): q/k/v biases, NeoX RoPE.
    Qwen2,
}

impl Arch {
    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Parses a `general.architecture` string; `origin` names the file for the error.
    pub fn parse(s: &str, origin: &str) -> Result<Arch> {
        match s {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(Error::UnknownArch { arch: other.to_string(), origin: origin.to_string() }),
        }
    }

    /// The rotation llama.cpp applies to this architecture's GGUF Q/K weights.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Normal,
            Arch::Qwen2 => RopeStyle::Neox,
        }
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's `LLAMA_ROPE_TYPE_NORM`.
    Normal,
    /// Half split (i, i + d/2): llama.cpp's `LLAMA_ROPE_TYPE_NEOX`, HF's `rotate_half`.
    Neox,
}

/// Shape and hyper-parameters of a draft; serialised as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head size (usually hidden_size / num_attention_heads); RoPE covers all of it.
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// `{arch}.context_length` written back on export.
    pub max_position_embeddings: usize,
    /// q/k/v projections have biases (qwen2).
    pub attention_bias: bool,
    pub rope_style: RopeStyle,
    /// The LM head is the token embedding matrix (no `output.weight`).
    pub tie_word_embeddings: bool,
}

impl Config {
    /// Checks the head arithmetic; `origin` names the file or caller for the error.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { origin: origin.to_string(), reason });
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.head_dim == 0
        {
            return bad(format!("all sizes must be > 0, got {self:?}"));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim must be even for RoPE, got {}", self.head_dim));
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || self.num_attention_heads % self.num_key_value_heads != 0
        {
            return bad(format!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta must be > 0, got {}", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!("rms_norm_eps must be >= 0, got {}", self.rms_norm_eps));
        }
        Ok(())
    }

    /// Every tensor this config needs, with its row-major shape, in GGUF file order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, hd) = (self.hidden_size, self.head_dim);
        let q_dim = self.num_attention_heads * hd;
        let kv_dim = self.num_key_value_heads * hd;
        let mut t = vec![("token_embd.weight".to_string(), vec![self.vocab_size, d])];
        for i in 0..self.num_hidden_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            t.push((p("attn_norm.weight"), vec![d]));
            t.push((p("attn_q.weight"), vec![q_dim, d]));
            t.push((p("attn_k.weight"), vec![kv_dim, d]));
            t.push((p("attn_v.weight"), vec![kv_dim, d]));
            if self.attention_bias {
                t.push((p("attn_q.bias"), vec![q_dim]));
                t.push((p("attn_k.bias"), vec![kv_dim]));
                t.push((p("attn_v.bias"), vec![kv_dim]));
            }
            t.push((p("attn_output.weight"), vec![d, q_dim]));
            t.push((p("ffn_norm.weight"), vec![d]));
            t.push((p("ffn_gate.weight"), vec![self.intermediate_size, d]));
            t.push((p("ffn_up.weight"), vec![self.intermediate_size, d]));
            t.push((p("ffn_down.weight"), vec![d, self.intermediate_size]));
        }
        t.push(("output_norm.weight".to_string(), vec![d]));
        if !self.tie_word_embeddings {
            t.push(("output.weight".to_string(), vec![self.vocab_size, d]));
        }
        t
    }

    /// Number of parameters (a tied head counted once).
    pub fn n_params(&self) -> usize {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Checks that `weights` holds exactly the tensors `cfg` needs, with the right shapes.
pub fn check_weights(cfg: &Config, weights: &Weights, origin: &str) -> Result<()> {
    cfg.validate(origin)?;
    let expected = cfg.tensor_shapes();
    for (name, shape) in &expected {
        match weights.get(name) {
            None => {
                return Err(Error::Tensor {
                    origin: origin.to_string(),
                    reason: format!("missing tensor {name} (expected shape {shape:?})"),
                })
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::Tensor {
                    origin: origin.to_string(),
                    reason: format!("tensor {name} has shape {:?}, expected {shape:?}", t.dims()),
                })
            }
            Some(_) => {}
        }
    }
    if weights.len() != expected.len() {
        let known: std::collections::BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = weights.keys().map(|k| k.as_str()).filter(|k| !known.contains(k)).collect();
        return Err(Error::Tensor {
            origin: origin.to_string(),
            reason: format!("unexpected tensors for this config: {extra:?}"),
        });
    }
    Ok(())
}

/// Makes the LM head the embedding matrix: drops `output.weight`.
pub fn tie_head(cfg: &mut Config, weights: &mut Weights) {
    weights.remove("output.weight");
    cfg.tie_word_embeddings = true;
}

/// Gives the model its own LM head, initialised as a copy of the embeddings when tied.
pub fn untie_head(cfg: &mut Config, weights: &mut Weights) -> Result<()> {
    if cfg.tie_word_embeddings || !weights.contains_key("output.weight") {
        let emb = weights
            .get("token_embd.weight")
            .ok_or_else(|| Error::Tensor {
                origin: "untie_head".into(),
                reason: "missing tensor token_embd.weight".into(),
            })?
            .copy()?;
        weights.insert("output.weight".to_string(), emb);
    }
    cfg.tie_word_embeddings = false;
    Ok(())
}

/// Which parameters an optimizer may update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trainable {
    /// Token embeddings. A tied embedding/head matrix is trainable only when both
    /// `embeddings` and `lm_head` are true (freezing either freezes the shared matrix).
    pub embeddings: bool,
    /// The untied LM head (`output.weight`).
    pub lm_head: bool,
    /// The final norm (`output_norm.weight`).
    pub final_norm: bool,
    /// Blocks to train (`None` = all).
    pub blocks: Option<Vec<usize>>,
}

impl Default for Trainable {
    fn default() -> Self {
        Trainable { embeddings: true, lm_head: true, final_norm: true, blocks: None }
    }
}

impl Trainable {
    /// Whether the parameter called `name` (a GGUF tensor name) is trainable.
    pub fn allows(&self, name: &str, tied: bool) -> bool {
        if name == "token_embd.weight" {
            return self.embeddings && (!tied || self.lm_head);
        }
        if name == "output.weight" {
            return self.lm_head;
        }
        if name == "output_norm.weight" {
            return self.final_norm;
        }
        if let Some(rest) = name.strip_prefix("blk.") {
            let idx = rest.split('.').next().and_then(|s| s.parse::<usize>().ok());
            return match (&self.blocks, idx) {
                (None, _) => true,
                (Some(list), Some(i)) => list.contains(&i),
                (Some(_), None) => false,
            };
        }
        false
    }
}

// Parameters are plain tensors; in a trainable model each is the tensor of a `Var` (same id
// and storage), so gradients and in-place updates reach them.
struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    q_b: Option<Tensor>,
    k_b: Option<Tensor>,
    v_b: Option<Tensor>,
}

struct Block {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The draft decoder. Its parameters are candle [`Var`]s, so `loss.backward()` yields a
/// gradient for each of them.
pub struct DraftModel {
    cfg: Config,
    dtype: DType,
    device: Device,
    vars: BTreeMap<String, Var>,
    params: BTreeMap<String, Tensor>,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
}

impl DraftModel {
    /// Builds a trainable model from `weights` (checked against `cfg`), converted to `dtype`
    /// on `device`: every parameter is a [`Var`]. F32 for training, F64 for gradient checks.
    pub fn from_weights(cfg: &Config, weights: Weights, dtype: DType, device: &Device) -> Result<Self> {
        Self::build(cfg, weights, dtype, device, Some(&Trainable::default()))
    }

    /// Like [`Self::from_weights`], but only the parameters `spec` allows become [`Var`]s; the
    /// frozen ones are plain tensors, so backward never computes (or allocates) their gradients.
    /// Freezing a tied 151,936 × 896 embedding saves a 0.5 GB gradient per step.
    pub fn from_weights_partial(
        cfg: &Config,
        weights: Weights,
        dtype: DType,
        device: &Device,
        spec: &Trainable,
    ) -> Result<Self> {
        Self::build(cfg, weights, dtype, device, Some(spec))
    }

    /// Builds an inference-only model: parameters are plain tensors, so a forward pass records
    /// no autograd graph (a fraction of the memory). For teachers, evaluation and parity.
    pub fn inference(cfg: &Config, weights: Weights, dtype: DType, device: &Device) -> Result<Self> {
        Self::build(cfg, weights, dtype, device, None)
    }

    fn build(
        cfg: &Config,
        mut weights: Weights,
        dtype: DType,
        device: &Device,
        trainable: Option<&Trainable>,
    ) -> Result<Self> {
        check_weights(cfg, &weights, "DraftModel::from_weights")?;
        let mut vars = BTreeMap::new();
        let mut params = BTreeMap::new();
        for (name, _) in cfg.tensor_shapes() {
            let src = weights.remove(&name).ok_or_else(|| Error::Tensor {
                origin: "DraftModel::from_weights".into(),
                reason: format!("missing tensor {name}"),
            })?;
            let t = src.to_device(device)?.to_dtype(dtype)?.detach();
            // Drop the source before the next one: import peaks at one model plus one tensor.
            drop(src);
            let t = if trainable.is_some_and(|spec| spec.allows(&name, cfg.tie_word_embeddings)) {
                let var = Var::from_tensor(&t)?;
                let vt = var.as_tensor().clone();
                vars.insert(name.clone(), var);
                vt
            } else {
                t
            };
            params.insert(name, t);
        }
        let get = |name: &str| -> Result<Tensor> {
            params.get(name).cloned().ok_or_else(|| Error::Tensor {
                origin: "DraftModel::from_weights".into(),
                reason: format!("missing tensor {name}"),
            })
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = |s: &str| -> Result<Option<Tensor>> {
                if cfg.attention_bias {
                    get(&p(s)).map(Some)
                } else {
                    Ok(None)
                }
            };
            blocks.push(Block {
                attn_norm: get(&p("attn_norm.weight"))?,
                attn: Attention {
                    q: get(&p("attn_q.weight"))?,
                    k: get(&p("attn_k.weight"))?,
                    v: get(&p("attn_v.weight"))?,
                    o: get(&p("attn_output.weight"))?,
                    q_b: bias("attn_q.bias")?,
                    k_b: bias("attn_k.bias")?,
                    v_b: bias("attn_v.bias")?,
                },
                ffn_norm: get(&p("ffn_norm.weight"))?,
                gate: get(&p("ffn_gate.weight"))?,
                up: get(&p("ffn_up.weight"))?,
                down: get(&p("ffn_down.weight"))?,
            });
        }
        let embed = get("token_embd.weight")?;
        let norm = get("output_norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(get("output.weight")?) };
        Ok(DraftModel { cfg: cfg.clone(), dtype, device: device.clone(), vars, params, embed, blocks, norm, lm_head })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The LM head matrix, (vocab, hidden): the embedding matrix when the two are tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// `hidden` (rows, hidden) times the LM head: the logits (rows, vocab). A frozen head (not
    /// a [`Var`]) goes through [`frozen_linear`], so backward computes the hidden states'
    /// gradient only.
    pub fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.head();
        let trainable = self.vars.values().any(|v| v.as_tensor().id() == w.id());
        if trainable || self.vars.is_empty() {
            return Ok(hidden.matmul(&w.t()?)?);
        }
        frozen_linear(hidden, w)
    }

    /// The [`Var`] parameters by GGUF tensor name: all of them for [`Self::from_weights`], the
    /// allowed ones for [`Self::from_weights_partial`], none for an [`Self::inference`] model.
    pub fn named_vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Whether the parameters are [`Var`]s (built with [`Self::from_weights`]).
    pub fn is_trainable(&self) -> bool {
        !self.vars.is_empty()
    }

    /// The parameters `spec` lets an optimizer update (frozen ones are left out).
    pub fn trainable_vars(&self, spec: &Trainable) -> Vec<Var> {
        self.vars
            .iter()
            .filter(|(name, _)| spec.allows(name, self.cfg.tie_word_embeddings))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A detached f32 CPU copy of the current weights (for checkpoints and export).
    pub fn to_weights(&self) -> Result<Weights> {
        let mut w = Weights::new();
        for (name, t) in &self.params {
            let t = t.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?.copy()?;
            w.insert(name.clone(), t);
        }
        Ok(w)
    }

    /// Logits at every position.
    ///
    /// `input_ids`: (batch, seq) integer token ids. `attention_mask`: optional (batch, seq),
    /// 1 for real tokens and 0 for padding (any dtype); padded keys are never attended to.
    /// Positions are 0..seq for every row, so pad on the right. Returns (batch, seq, vocab)
    /// in the model's dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?; // (batch, seq, hidden)
        let (b, s, h) = hidden.dims3()?;
        let logits = hidden.reshape((b * s, h))?.matmul(&self.head().t()?)?; // (batch*seq, vocab)
        Ok(logits.reshape((b, s, self.cfg.vocab_size))?)
    }

    /// Hidden states after the final norm, (batch, seq, hidden).
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let h = self.cfg.hidden_size;
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((b, s, h))?; // (batch, seq, hidden)
        let mask = self.attention_bias_mask(b, s, attention_mask)?; // (batch, 1, seq, seq)
        let (cos, sin) = self.rope_tables(s)?;
        for block in &self.blocks {
            let r = rms_norm(&x, &block.attn_norm, self.cfg.rms_norm_eps)?;
            let a = self.attention(&block.attn, &r, &mask, &cos, &sin)?;
            x = (x + a)?;
            let r = rms_norm(&x, &block.ffn_norm, self.cfg.rms_norm_eps)?;
            let m = mlp(block, &r)?;
            x = (x + m)?;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Causal + key-padding additive mask, (batch, 1, seq, seq).
    fn attention_bias_mask(&self, b: usize, s: usize, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let causal: Vec<f64> =
            (0..s).flat_map(|i| (0..s).map(move |j| if j <= i { 0.0 } else { MASK_VALUE })).collect();
        let causal = Tensor::from_vec(causal, (1, 1, s, s), &self.device)?.to_dtype(self.dtype)?;
        let Some(m) = attention_mask else {
            return Ok(causal.broadcast_as((b, 1, s, s))?.contiguous()?);
        };
        if m.dims() != [b, s] {
            return Err(Error::InvalidArg {
                name: "attention_mask",
                reason: format!("shape {:?}, expected [{b}, {s}] like input_ids", m.dims()),
            });
        }
        // 0 where the key is a real token, MASK_VALUE where it is padding.
        let keep = m.to_dtype(self.dtype)?.to_device(&self.device)?.detach();
        let pad = (keep.affine(-1.0, 1.0)? * MASK_VALUE)?;
        let pad = pad.reshape((b, 1, 1, s))?;
        Ok(pad.broadcast_add(&causal)?.contiguous()?)
    }

    /// cos/sin of position × frequency, (seq, head_dim/2), in the model's dtype.
    fn rope_tables(&self, s: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let inv: Vec<f64> = (0..half).map(|i| self.cfg.rope_theta.powf(-2.0 * i as f64 / hd as f64)).collect();
        let mut cos = Vec::with_capacity(s * half);
        let mut sin = Vec::with_capacity(s * half);
        for p in 0..s {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (s, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (s, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    fn attention(&self, a: &Attention, x: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let x2 = x.reshape((b * s, h))?; // (batch*seq, hidden)
        let heads = |w: &Tensor, bias: &Option<Tensor>, n: usize| -> Result<Tensor> {
            let y = linear(&x2, w, bias.as_ref())?; // (batch*seq, n*hd)
            Ok(y.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?) // (batch, n, seq, hd)
        };
        let q = heads(&a.q, &a.q_b, nh)?;
        let k = heads(&a.k, &a.k_b, nkv)?;
        let v = heads(&a.v, &a.v_b, nkv)?;
        let q = rope(&q, cos, sin, self.cfg.rope_style)?;
        let k = rope(&k, cos, sin, self.cfg.rope_style)?;
        let k = repeat_kv(&k, nh / nkv)?; // (batch, nh, seq, hd)
        let v = repeat_kv(&v, nh / nkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // (batch, nh, seq, seq)
        let att = att.broadcast_add(mask)?;
        let att = softmax_last(&att)?;
        let o = att.matmul(&v)?; // (batch, nh, seq, hd)
        let o = o.transpose(1, 2)?.contiguous()?.reshape((b * s, nh * hd))?;
        let o = linear(&o, &a.o, None)?; // (batch*seq, hidden)
        Ok(o.reshape((b, s, h))?)
    }
}

/// SwiGLU MLP: down(silu(gate(x)) * up(x)).
fn mlp(block: &Block, x: &Tensor) -> Result<Tensor> {
    let (b, s, h) = x.dims3()?;
    let x2 = x.reshape((b * s, h))?;
    let g = linear(&x2, &block.gate, None)?;
    let u = linear(&x2, &block.up, None)?;
    let act = (g.silu()? * u)?; // (batch*seq, ffn)
    let y = linear(&act, &block.down, None)?;
    Ok(y.reshape((b, s, h))?)
}

/// x · wᵀ (+ b) for x (rows, in) and w (out, in).
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = trained_linear(x, w)?;
    match b {
        Some(b) => Ok(y.broadcast_add(b)?),
        None => Ok(y),
    }
}

/// `x · wᵀ` for a constant `w` (out, in) whose gradient is never wanted. candle's matmul
/// backward computes both operands' gradients; for a frozen 151,936-row LM head the weight's
/// is a second vocabulary-sized matmul per step, thrown away (≈ 3 s of a 22.6 s step of the
/// pruned 0.5B at batch 4 × 256). This op's backward is `grad · w` alone. Same forward and
/// input gradient, bit for bit, as `x.matmul(&w.t())`. F32 2-D `x` on the CPU; anything else
/// takes the plain matmul.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 || x.rank() != 2 || !x.device().is_cpu() {
        return Ok(x.matmul(&w.t()?)?);
    }
    // The op reads its input as one contiguous slice.
    Ok(x.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(FrozenLinear { w: w.detach() })))?)
}

struct FrozenLinear {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let data = storage.as_slice::<f32>()?;
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => Tensor::from_slice(&data[a..b], layout.shape(), &Device::Cpu)?,
            None => candle_core::bail!("frozen-linear: the input is not contiguous"),
        };
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// `x · wᵀ` for a trained `w` (out, in), with the weight's gradient computed as `gradᵀ · x`:
/// contiguous, in `w`'s own layout. Through `x.matmul(&w.t())` candle computes it as
/// `xᵀ · grad` for the transposed view and adds its transpose into the weight's gradient slot —
/// an element-by-element strided add over the whole weight per use (a quarter of an EAGLE-3
/// head's training step, with four TTT uses of every weight). Same forward, bit for bit (the
/// same gemm call); the gradients equal the plain matmul's up to summation order. F32 2-D `x`
/// and `w` on the CPU; anything else takes the plain matmul.
pub fn trained_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let plain = x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || x.rank() != 2
        || w.rank() != 2
        || !x.device().is_cpu()
        || !w.device().is_cpu()
        || x.dims()[1] != w.dims()[1];
    if plain {
        return Ok(x.matmul(&w.t()?)?);
    }
    Ok(x.contiguous()?.apply_op2_arc(&w.contiguous()?, std::sync::Arc::new(Box::new(TrainedLinear)))?)
}

struct TrainedLinear;

impl candle_core::CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("trained-linear: the inputs are not contiguous")
        };
        let (x, w) = (&xs.as_slice::<f32>()?[x0..x1], &ws.as_slice::<f32>()?[w0..w1]);
        let ((m, k), (n, k2)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        if k != k2 {
            candle_core::bail!("trained-linear: ({m}, {k}) · ({n}, {k2})ᵀ")
        }
        let mut y = vec![0f32; m * n];
        let threads = candle_core::utils::get_num_threads();
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // SAFETY: y is (m, n) row-major; x is (m, k) row-major; wᵀ is read through w's (n, k)
        // row-major storage (column stride k, row stride 1), all in bounds. The call is the one
        // candle's matmul makes for `x.matmul(&w.t())`.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0f32,
                1f32,
                false,
                false,
                false,
                par,
            )
        };
        Ok((candle_core::CpuStorage::F32(y), (m, n).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // From detached operands: a gradient that kept `x`'s graph would chain every step's
        // forward graph into the optimizer's moments (candle detaches the gradients it pops,
        // not the ones a custom op returns for leaves).
        let (x, w) = (x.detach(), w.detach());
        Ok((Some(grad_res.matmul(&w)?), Some(grad_res.t()?.matmul(&x)?)))
    }
}

/// RMSNorm from basic ops (gradient-carrying): x / sqrt(mean(x²) + eps) * w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Softmax over the last dim from basic ops; the max shift is detached (softmax is
/// shift-invariant, so this changes no gradient).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Rotary embedding for x (batch, heads, seq, head_dim) with cos/sin (seq, head_dim/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (b, nh, s, hd) = x.dims4()?;
    let half = hd / 2;
    match style {
        RopeStyle::Neox => {
            let x1 = x.narrow(3, 0, half)?;
            let x2 = x.narrow(3, half, half)?;
            let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
            let r2 = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
            Ok(Tensor::cat(&[r1, r2], 3)?)
        }
        RopeStyle::Normal => {
            let xp = x.reshape((b, nh, s, half, 2))?;
            let x0 = xp.narrow(4, 0, 1)?;
            let x1 = xp.narrow(4, 1, 1)?;
            let cos = cos.reshape((s, half, 1))?;
            let sin = sin.reshape((s, half, 1))?;
            let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Ok(Tensor::cat(&[r0, r1], 4)?.reshape((b, nh, s, hd))?)
        }
    }
}

/// (batch, n_kv, seq, hd) → (batch, n_kv*rep, seq, hd), each KV head repeated `rep` times.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, nkv, rep, s, hd))?.contiguous()?.reshape((b, nkv * rep, s, hd))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_linear_matches_matmul_and_its_weight_gradient_is_contiguous() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 19), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 19), &Device::Cpu).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (37, 23), &Device::Cpu).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let ours = trained_linear(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(v(&plain), v(&ours), "the same gemm call");
        // Used twice, as a TTT step reuses a weight: the gradients accumulate.
        let twice = |y: &Tensor| (y * &up).unwrap().sum_all().unwrap() + (y.sqr().unwrap().sum_all().unwrap() * 0.5);
        let gp = twice(&plain).unwrap().backward().unwrap();
        let gt = twice(&ours).unwrap().backward().unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            v(a).iter().zip(v(b)).all(|(p, q)| (p - q).abs() <= 1e-4 * (1.0 + p.abs().max(q.abs())))
        };
        for var in [&x, &w] {
            let (a, b) = (gp.get(var.as_tensor()).unwrap(), gt.get(var.as_tensor()).unwrap());
            assert_eq!(a.dims(), b.dims());
            assert!(close(a, b), "{:?}", var.dims());
        }
        assert!(gt.get(w.as_tensor()).unwrap().is_contiguous());
        // Anything but 2-D f32 takes the plain matmul.
        let (x64, w64) = (x.as_tensor().to_dtype(DType::F64).unwrap(), w.as_tensor().to_dtype(DType::F64).unwrap());
        let v64 = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(v64(&trained_linear(&x64, &w64).unwrap()), v64(&x64.matmul(&w64.t().unwrap()).unwrap()));
    }

    #[test]
    fn frozen_linear_matches_matmul_bit_for_bit_and_skips_the_weight_gradient() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (11, 5), &Device::Cpu).unwrap();
        let up = Tensor::randn(0f32, 1.0, (7, 11), &Device::Cpu).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_linear(x.as_tensor(), &w).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&plain), v(&frozen));
        let gp = (&plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gf = (&frozen * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(v(gp.get(x.as_tensor()).unwrap()), v(gf.get(x.as_tensor()).unwrap()));
        // The plain matmul also computed a gradient for the weight (stored under its transposed
        // view: one tensor of w's size more); the frozen op computed none.
        let sizes = |g: &candle_core::backprop::GradStore| {
            let mut s: Vec<usize> = g.get_ids().map(|&id| g.get_id(id).unwrap().elem_count()).collect();
            s.sort();
            s
        };
        let (sp, sf) = (sizes(&gp), sizes(&gf));
        assert!(sp.contains(&w.elem_count()) && !sf.contains(&w.elem_count()), "{sp:?} {sf:?}");
    }
}
