//! FSPAD-family heads in candle (training and teacher-forced evaluation), computing exactly
//! what the engine's ggml graph computes ([`crate::fspad`]; checked in `tests/fspad.rs`).
//!
//! Step 0 of a sequence: entry P reads (token[P+1], f[P]); step i ≥ 1 reads the step-(i−1)
//! hidden output of P−1 and attends to step-0 keys at ≤ P−i and step-j keys at P−i+j — what a
//! depth-i draft node sees in the engine (the mask of [`super::head_model`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::error::{Error, Result};
use super::head_model::{log_softmax, repeat_kv, rope_tables, softmax, step_mask};
use super::model::{frozen_linear, rms_norm, rope, trained_linear, RopeStyle, Weights};
use crate::fspad::FspadConfig;

/// One step's outputs over a sequence.
pub struct FspadOut {
    /// The token half (T, H): the LM head reads it.
    pub tok: Tensor,
    /// The hidden output (T, H) children read: the feature half under partial alignment.
    pub hidden: Tensor,
}

/// An FSPAD-family head with trainable weights, and the frozen LM-head rows it scores with.
pub struct FspadModel {
    cfg: FspadConfig,
    vars: BTreeMap<String, Var>,
    /// Frozen LM head over the head's vocabulary (V, H).
    lm: Tensor,
}

impl FspadModel {
    pub fn new(cfg: &FspadConfig, weights: &Weights, lm: Tensor) -> Result<FspadModel> {
        let mut vars = BTreeMap::new();
        for (name, shape) in cfg.tensor_shapes() {
            let t = super::head::head_tensor(weights, &name, &shape, "fspad head")?;
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?);
        }
        if lm.dims().len() != 2 || lm.dims()[1] != cfg.hidden {
            return Err(Error::InvalidArg { name: "lm head", reason: format!("shape {:?}", lm.dims()) });
        }
        Ok(FspadModel { cfg: cfg.clone(), vars, lm: lm.to_dtype(DType::F32)? })
    }

    pub fn config(&self) -> &FspadConfig {
        &self.cfg
    }

    pub fn lm_head(&self) -> &Tensor {
        &self.lm
    }

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn to_weights(&self) -> Weights {
        self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }

    fn w(&self, name: &str) -> &Tensor {
        self.vars[name].as_tensor()
    }

    fn lin(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        trained_linear(x, self.w(name))
    }

    /// Logits over the head's vocabulary of token halves (T, H), through the frozen LM head
    /// (no weight gradient).
    pub fn logits(&self, tok: &Tensor) -> Result<Tensor> {
        frozen_linear(tok, &self.lm)
    }

    /// Steps 0..steps over one sequence: `emb` (T, H) the raw target embeddings of token[P+1],
    /// `feat` (T, H) the (possibly noised) target features f[P].
    pub fn forward(&self, emb: &Tensor, feat: &Tensor, steps: usize) -> Result<Vec<FspadOut>> {
        let c = &self.cfg;
        let (t, h) = emb.dims2()?;
        let (nh, nkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);
        let eps = c.rms_eps as f64;
        let (cos, sin) = rope_tables(t, hd, c.rope_theta as f64)?;
        let gate = if c.variant.sampling() { Some(self.lin(emb, "fs_gate.weight")?.silu()?) } else { None };
        let fc_b = self.w("fc.bias");
        let mut f = feat.clone();
        let (mut ks, mut vs): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            let u = self.lin(&Tensor::cat(&[emb, &f], 1)?, "fc.weight")?.broadcast_add(fc_b)?;
            let x = match &gate {
                Some(g) => {
                    let up = self.lin(&rms_norm(&u, self.w("fs_norm.weight"), eps)?, "fs_up.weight")?;
                    (&u + self.lin(&(g * up)?, "fs_down.weight")?)?
                }
                None => u,
            };
            let heads = |w: &str, n: usize| -> Result<Tensor> {
                Ok(self.lin(&x, w)?.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?)
            };
            let q = rope(&heads("blk.0.attn_q.weight", nh)?, &cos, &sin, RopeStyle::Neox)?;
            let k = rope(&heads("blk.0.attn_k.weight", nkv)?, &cos, &sin, RopeStyle::Neox)?;
            ks.push(k);
            vs.push(heads("blk.0.attn_v.weight", nkv)?);
            let kk = repeat_kv(&Tensor::cat(&ks, 2)?, nh / nkv)?;
            let vv = repeat_kv(&Tensor::cat(&vs, 2)?, nh / nkv)?;
            let att = (q.matmul(&kk.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
            let att = softmax(&att.broadcast_add(&step_mask(t, i)?)?)?;
            let o = att.matmul(&vv)?.squeeze(0)?.transpose(0, 1)?.contiguous()?.reshape((t, nh * hd))?;
            let a = (&x + self.lin(&o, "blk.0.attn_output.weight")?)?;
            let hn = rms_norm(&a, self.w("blk.0.ffn_norm.weight"), eps)?;
            let m = self.lin(
                &(self.lin(&hn, "blk.0.ffn_gate.weight")?.silu()? * self.lin(&hn, "blk.0.ffn_up.weight")?)?,
                "blk.0.ffn_down.weight",
            )?;
            let (tok, hidden) = if c.variant.partial_alignment() {
                let y = (Tensor::cat(&[&a, &a], 1)? + m)?;
                (y.narrow(1, 0, h)?, y.narrow(1, h, h)?)
            } else {
                let y = (a + m)?;
                (y.clone(), y)
            };
            // The next step's entry at P reads this step's hidden output at P-1.
            f = Tensor::cat(&[&Tensor::zeros((1, h), DType::F32, &Device::Cpu)?, &hidden.narrow(0, 0, t - 1)?], 0)?;
            out.push(FspadOut { tok, hidden });
        }
        Ok(out)
    }
}

/// Soft cross-entropy per row of `logits` (n, V) against the distributions `target_logits`
/// (n, V) turn into: −Σ softmax(target) · log_softmax(logits).
pub fn soft_ce(logits: &Tensor, target_logits: &Tensor) -> Result<Tensor> {
    let p = softmax(&target_logits.detach())?;
    Ok((p * log_softmax(logits)?)?.sum(1)?.neg()?)
}

/// SmoothL1 (β = 1) per row, averaged over the hidden dimension: (n).
pub fn smooth_l1(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let d = (x - y)?;
    let a = d.abs()?;
    // 0.5·d² where |d| < 1, |d| − 0.5 elsewhere: min(|d|, 1) · (|d| − 0.5·min(|d|, 1)).
    let m = a.clamp(0.0, 1.0)?;
    let l = (&m * (a - (&m * 0.5)?)?)?;
    Ok(l.mean(1)?)
}
