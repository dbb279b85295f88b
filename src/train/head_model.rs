//! The head in candle, computing exactly what llama.cpp's `eagle3` graph computes
//! (`src/models/eagle3.cpp`), with EAGLE-3's training-time test (TTT).
//!
//! One entry at position P reads (token x, g): e = RMSNorm(Emb(x))·attn_norm,
//! ĝ = RMSNorm(g)·attn_norm_2, q/k/v = W·[e; ĝ] (2H wide, RoPE "normal" style at position P),
//! causal attention, r = Wo·attn + g, y = r + FFN(RMSNorm(r)·ffn_norm) (the pre-norm output,
//! the g of the entry's children), logits = output·(RMSNorm(y)·output_norm) over the draft
//! vocabulary. Step 0 reads g = fc(features of P); step i ≥ 1 reads the step-(i−1) output at
//! P−1 and attends to step-0 entries at ≤ P−i and to the step-j entries at P−i+j (j = 1..i) —
//! what the entry of a depth-i draft node sees in the engine's KV cache.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};

use super::error::{Error, Result};
use super::head::{head_tensor, HeadConfig};
use super::model::{rms_norm, rope, trained_linear, RopeStyle, Weights};

/// Additive mask value for keys an entry may not see.
const MASK: f32 = -1e9;

/// A head whose weights are candle variables (trainable) or plain tensors.
pub struct HeadModel {
    cfg: HeadConfig,
    vars: BTreeMap<String, Var>,
}

/// Outputs of one TTT step over a sequence.
pub struct StepOut {
    /// Pre-norm outputs (T, H).
    pub prenorm: Tensor,
    /// Logits over the draft vocabulary (T, V_d).
    pub logits: Tensor,
}

impl HeadModel {
    pub fn new(cfg: &HeadConfig, weights: &Weights) -> Result<HeadModel> {
        if cfg.draft_vocab.is_empty() {
            return Err(Error::InvalidArg {
                name: "head",
                reason: "training needs a head with its own LM head over a reduced draft vocabulary".into(),
            });
        }
        let mut vars = BTreeMap::new();
        for (name, shape) in cfg.tensor_shapes() {
            let t = head_tensor(weights, &name, &shape, "head")?;
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?);
        }
        Ok(HeadModel { cfg: cfg.clone(), vars })
    }

    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// (name, variable) pairs, for the optimizer.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Sets every variable from `weights` (same names and shapes, e.g. a checkpoint of this
    /// head).
    pub fn set_weights(&self, weights: &Weights) -> Result<()> {
        for (name, shape) in self.cfg.tensor_shapes() {
            let t = head_tensor(weights, &name, &shape, "head")?;
            self.vars[&name].set(&t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
        }
        Ok(())
    }

    pub fn to_weights(&self) -> Result<Weights> {
        let mut w = Weights::new();
        for (k, v) in &self.vars {
            w.insert(k.clone(), v.as_tensor().detach());
        }
        Ok(w)
    }

    fn w(&self, name: &str) -> &Tensor {
        self.vars[name].as_tensor()
    }

    /// g = fc(features) for features (T, 3·H_t).
    pub fn encode(&self, features: &Tensor) -> Result<Tensor> {
        trained_linear(features, self.w("fc.weight"))
    }

    /// cos/sin tables (T, head_dim/2) for positions 0..t.
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        rope_tables(t, self.cfg.head_dim, self.cfg.rope_theta)
    }

    /// The additive mask (T, (i+1)·T) of TTT step `i` (see the module docs).
    pub(crate) fn step_mask(t: usize, i: usize) -> Result<Tensor> {
        let mut m = vec![MASK; t * (i + 1) * t];
        for p in 0..t {
            let row = &mut m[p * (i + 1) * t..(p + 1) * (i + 1) * t];
            if p >= i {
                for k in row.iter_mut().take(p - i + 1) {
                    *k = 0.0;
                }
            }
            for j in 1..=i {
                if p + j >= i {
                    row[j * t + (p + j - i)] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(m, (t, (i + 1) * t), &Device::Cpu)?)
    }

    /// All TTT steps 0..steps over one sequence: `emb` (T, H) the frozen target embeddings of
    /// the tokens each entry reads (token[P+1]), `features` (T, 3·H_t) the target features of
    /// positions 0..T. Returns one [`StepOut`] per step.
    pub fn forward_ttt(&self, emb: &Tensor, features: &Tensor, steps: usize) -> Result<Vec<StepOut>> {
        let (t, h) = emb.dims2()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let eps = self.cfg.rms_norm_eps;
        let (cos, sin) = self.rope_tables(t)?;
        let e = rms_norm(emb, self.w("blk.0.attn_norm.weight"), eps)?;
        let mut g = self.encode(features)?;
        let (mut ks, mut vs): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            let gn = rms_norm(&g, self.w("blk.0.attn_norm_2.weight"), eps)?;
            let x = Tensor::cat(&[&e, &gn], 1)?; // (T, 2H)
            let heads = |w: &str, n: usize| -> Result<Tensor> {
                let y = trained_linear(&x, self.w(w))?; // (T, n*hd)
                Ok(y.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?)
                // (1, n, T, hd)
            };
            let q = rope(&heads("blk.0.attn_q.weight", nh)?, &cos, &sin, RopeStyle::Normal)?;
            let k = rope(&heads("blk.0.attn_k.weight", nkv)?, &cos, &sin, RopeStyle::Normal)?;
            let v = heads("blk.0.attn_v.weight", nkv)?;
            ks.push(k);
            vs.push(v);
            let kk = repeat_kv(&Tensor::cat(&ks, 2)?, nh / nkv)?; // (1, nh, (i+1)T, hd)
            let vv = repeat_kv(&Tensor::cat(&vs, 2)?, nh / nkv)?;
            let att = (q.matmul(&kk.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
            let att = att.broadcast_add(&Self::step_mask(t, i)?)?;
            let att = softmax(&att)?;
            let o = att.matmul(&vv)?.squeeze(0)?.transpose(0, 1)?.contiguous()?.reshape((t, nh * hd))?;
            let r = (trained_linear(&o, self.w("blk.0.attn_output.weight"))? + &g)?;
            let rn = rms_norm(&r, self.w("blk.0.ffn_norm.weight"), eps)?;
            let a = trained_linear(&rn, self.w("blk.0.ffn_gate.weight"))?.silu()?;
            let u = trained_linear(&rn, self.w("blk.0.ffn_up.weight"))?;
            let y = (trained_linear(&(a * u)?, self.w("blk.0.ffn_down.weight"))? + r)?;
            let yn = rms_norm(&y, self.w("output_norm.weight"), eps)?;
            let logits = trained_linear(&yn, self.w("output.weight"))?;
            // The next step's entry at P reads this step's output at P-1.
            g = Tensor::cat(&[&Tensor::zeros((1, h), DType::F32, &Device::Cpu)?, &y.narrow(0, 0, t - 1)?], 0)?;
            out.push(StepOut { prenorm: y, logits });
        }
        Ok(out)
    }
}

/// RoPE cos/sin tables (T, head_dim/2) for positions 0..t with base `theta`.
pub(crate) fn rope_tables(t: usize, hd: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let inv: Vec<f64> = (0..half).map(|i| theta.powf(-2.0 * i as f64 / hd as f64)).collect();
    let (mut c, mut s) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for p in 0..t {
        for f in &inv {
            c.push((p as f64 * f).cos() as f32);
            s.push((p as f64 * f).sin() as f32);
        }
    }
    Ok((Tensor::from_vec(c, (t, half), &Device::Cpu)?, Tensor::from_vec(s, (t, half), &Device::Cpu)?))
}

/// The additive mask of TTT step `i` over `t` positions (see the module docs).
pub(crate) fn step_mask(t: usize, i: usize) -> Result<Tensor> {
    HeadModel::step_mask(t, i)
}

/// Softmax over the last dim from basic ops (gradient-carrying; the max shift is detached).
pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// log-softmax over the last dim from basic ops.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&max)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(s.broadcast_sub(&lse)?)
}

pub(crate) fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, n, rep, s, hd))?.contiguous()?.reshape((b, n * rep, s, hd))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_masks_see_what_a_draft_node_sees() {
        // Step 0: causal.
        let m0 = HeadModel::step_mask(3, 0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m0[0], vec![0.0, MASK, MASK]);
        assert_eq!(m0[2], vec![0.0, 0.0, 0.0]);
        // Step 2 at P = 3 of T = 4: step-0 keys 0..=1, step-1 key at 2, step-2 key at 3.
        let m2 = HeadModel::step_mask(4, 2).unwrap().to_vec2::<f32>().unwrap();
        let allowed: Vec<usize> = (0..12).filter(|&k| m2[3][k] == 0.0).collect();
        assert_eq!(allowed, vec![0, 1, 4 + 2, 8 + 3]);
        // Every row sees at least itself.
        for (p, row) in m2.iter().enumerate() {
            assert_eq!(row[8 + p], 0.0);
        }
    }
}
