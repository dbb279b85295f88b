//! Distillation losses: per-token divergences between the teacher's distribution p and the
//! draft's q = softmax(draft logits), and AdaSPEC's token selection (SPEC §4).
//!
//! Everything is computed in f32 (or the logits' float dtype) from log-probabilities, with
//! ops that carry gradients in candle 0.11: `log_softmax_last` is `x - logsumexp(x)` with a
//! detached max shift. This module must never use `candle_nn::ops::softmax_last_dim` (no
//! gradient) and never lets a gradient flow into the teacher or through the selection mask.
//!
//! Shapes: teacher log-probs and draft logits are (n_tokens, vocab): only the valid
//! (response) positions of a micro-batch, flattened. Per-token losses are (n_tokens,).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// A per-token divergence between teacher p and draft q (DistillSpec's baselines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Divergence {
    /// Forward KL, KL(p ‖ q) = Σ p (log p − log q). AdaSPEC's loss.
    Fkl,
    /// Reverse KL, KL(q ‖ p) = Σ q (log q − log p).
    Rkl,
    /// Total variation, ½ Σ |p − q| (expected acceptance under sampling is 1 − TV).
    Tvd,
    /// Jensen–Shannon, ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2.
    Jsd,
}

impl Divergence {
    /// The CLI name (`fkl`, `rkl`, `tvd`, `jsd`).
    pub fn name(self) -> &'static str {
        match self {
            Divergence::Fkl => "fkl",
            Divergence::Rkl => "rkl",
            Divergence::Tvd => "tvd",
            Divergence::Jsd => "jsd",
        }
    }
}

/// Log-softmax over the last dim, `x − logsumexp(x)`, from gradient-carrying ops. The max
/// shift is detached (log-softmax is shift invariant, so no gradient changes).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The teacher's distributions at the loss positions of a micro-batch, as the losses take them.
#[derive(Debug, Clone)]
pub enum TeacherRows {
    /// Full-vocabulary log-probabilities, (n_tokens, vocab).
    Dense(Tensor),
    /// K + 1 bins per position: the teacher's top-K token ids `ids` (n_tokens, K; u32, most
    /// likely first) and `logp` (n_tokens, K + 1): their log-probabilities and, last, the log of
    /// the remaining mass r = 1 − Σ top-K (the "other" bin). The draft is compared on the same
    /// bins: its probabilities of those K tokens and its total mass on every other token.
    Bins { ids: Tensor, logp: Tensor },
}

impl TeacherRows {
    /// Number of positions.
    pub fn n_rows(&self) -> Result<usize> {
        Ok(match self {
            TeacherRows::Dense(t) => t.dim(0)?,
            TeacherRows::Bins { logp, .. } => logp.dim(0)?,
        })
    }

    /// The teacher's most likely token at each position (exact in both forms).
    pub fn argmax(&self) -> Result<Vec<u32>> {
        Ok(match self {
            TeacherRows::Dense(t) => t.argmax(D::Minus1)?.to_vec1::<u32>()?,
            TeacherRows::Bins { ids, .. } => ids.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<u32>()?,
        })
    }

    /// The teacher's log-probabilities (constants) and the draft's on the same support:
    /// the full vocabulary, or the K + 1 bins.
    fn pair(&self, draft_logits: &Tensor) -> Result<(Tensor, Tensor)> {
        let bad = |what: String| Error::InvalidArg { name: "teacher/draft", reason: what };
        let dtype = draft_logits.dtype();
        if draft_logits.rank() != 2 {
            return Err(bad(format!("draft logits {:?} must be (n_tokens, vocab)", draft_logits.dims())));
        }
        let logq = log_softmax_last(draft_logits)?;
        match self {
            TeacherRows::Dense(t) => {
                if t.dims() != draft_logits.dims() {
                    return Err(bad(format!(
                        "teacher log-probs {:?} and draft logits {:?} must both be (n_tokens, vocab)",
                        t.dims(),
                        draft_logits.dims()
                    )));
                }
                Ok((t.to_dtype(dtype)?.detach(), logq))
            }
            TeacherRows::Bins { ids, logp } => {
                let (n, v) = draft_logits.dims2()?;
                let (ni, k) = ids.dims2()?;
                if ni != n || logp.dims() != [n, k + 1] || k >= v {
                    return Err(bad(format!(
                        "teacher bins: ids {:?} and log-probs {:?} do not fit draft logits {:?} (K < vocab)",
                        ids.dims(),
                        logp.dims(),
                        draft_logits.dims()
                    )));
                }
                let kept = logq.gather(ids, 1)?; // (n, K)
                                                 // log Σ_{x ∉ top-K} q(x): a log-sum-exp over the row with the kept tokens masked
                                                 // out (exact, unlike log(1 − Σ kept q), which cancels when the kept mass is ~1).
                let id_rows = ids.to_vec2::<u32>()?;
                let mut mask = vec![0f32; n * v];
                for (r, row) in id_rows.iter().enumerate() {
                    for &id in row {
                        if let Some(m) = mask.get_mut(r * v + id as usize) {
                            *m = f32::NEG_INFINITY;
                        }
                    }
                }
                let mask = Tensor::from_vec(mask, (n, v), logq.device())?.to_dtype(logq.dtype())?;
                let masked = logq.add(&mask)?;
                let max = masked.max_keepdim(D::Minus1)?.detach();
                let other = ((masked.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?)
                    .maximum(super::teacher::LOGP_FLOOR as f64)?; // (n, 1)
                Ok((logp.to_dtype(dtype)?.detach(), Tensor::cat(&[&kept, &other], 1)?))
            }
        }
    }
}

/// Per-token divergence, (n_tokens,), between the teacher's log-probabilities `teacher_logp`
/// (n_tokens, vocab; treated as constants) and the draft's `draft_logits` (n_tokens, vocab;
/// gradients flow into these). Teacher log-probs may be very negative but must be finite.
pub fn per_token_divergence(div: Divergence, teacher_logp: &Tensor, draft_logits: &Tensor) -> Result<Tensor> {
    per_token_divergence_rows(div, &TeacherRows::Dense(teacher_logp.clone()), draft_logits)
}

/// Per-token divergence, (n_tokens,), between the teacher's distributions (dense, or K + 1
/// bins: then the divergence of the two distributions coarsened to those bins, which is at
/// most the full one) and the draft's `draft_logits` (n_tokens, vocab; gradients flow into
/// these).
pub fn per_token_divergence_rows(div: Divergence, teacher: &TeacherRows, draft_logits: &Tensor) -> Result<Tensor> {
    let (logp, logq) = teacher.pair(draft_logits)?;
    let p = logp.exp()?;
    let out = match div {
        Divergence::Fkl => (&p * (&logp - &logq)?)?.sum(D::Minus1)?,
        Divergence::Rkl => {
            let q = logq.exp()?;
            (&q * (&logq - &logp)?)?.sum(D::Minus1)?
        }
        Divergence::Tvd => {
            let q = logq.exp()?;
            ((&p - &q)?.abs()?.sum(D::Minus1)? * 0.5)?
        }
        Divergence::Jsd => {
            // log m = log ½ + logaddexp(log p, log q), finite even where p or q underflow.
            let q = logq.exp()?;
            let hi = logp.maximum(&logq)?.detach();
            let sum = ((&logp - &hi)?.exp()? + (&logq - &hi)?.exp()?)?;
            let logm = ((sum.log()? + hi)? + 0.5f64.ln())?;
            let kl_pm = (&p * (&logp - &logm)?)?.sum(D::Minus1)?;
            let kl_qm = (&q * (&logq - &logm)?)?.sum(D::Minus1)?;
            ((kl_pm + kl_qm)? * 0.5)?
        }
    };
    Ok(out)
}

/// The (1 − k) quantile of `values` as `torch.quantile`/numpy compute it by default (linear
/// interpolation between order statistics): sorted ascending x₀ ≤ … ≤ x_{n−1},
/// pos = (1 − k)(n − 1), q = x_⌊pos⌋ + (pos − ⌊pos⌋)(x_⌈pos⌉ − x_⌊pos⌋), clamped to x_⌈pos⌉.
/// With distinct values, exactly n − ⌈pos⌉ of them are ≥ q (≈ k·n; all n when k = 1);
/// ties at q are all ≥ q, so more may be. NaNs sort last. `values` must be non-empty.
pub fn upper_quantile(values: &[f32], k: f64) -> Result<f32> {
    check_k(k)?;
    if values.is_empty() {
        return Err(Error::InvalidArg { name: "values", reason: "quantile of an empty set".into() });
    }
    let mut v: Vec<f32> = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = (1.0 - k) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (pos.ceil() as usize).min(v.len() - 1);
    let (a, b) = (v[lo] as f64, v[hi] as f64);
    let q = a + (pos - lo as f64) * (b - a);
    Ok(q.min(b) as f32)
}

/// Checks that the AdaSPEC selection fraction k is in (0, 1].
pub fn check_k(k: f64) -> Result<()> {
    if k.is_finite() && k > 0.0 && k <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidArg { name: "--k", reason: format!("the selected fraction must be in (0, 1], got {k}") })
    }
}

/// AdaSPEC's selection: 1.0 for tokens with ΔL ≥ [`upper_quantile`]`(ΔL, k)` (the top-k
/// fraction with the largest gap, ties at the threshold all kept), else 0.0. Plain numbers:
/// no gradient can flow through the mask.
pub fn select_top_gap(delta: &[f32], k: f64) -> Result<Vec<f32>> {
    if delta.is_empty() {
        check_k(k)?;
        return Ok(Vec::new());
    }
    let thr = upper_quantile(delta, k)?;
    Ok(delta.iter().map(|&d| if d >= thr { 1.0 } else { 0.0 }).collect())
}

/// A micro-batch loss and what it was made of.
pub struct LossOutput {
    /// Scalar loss to back-propagate: Σ selected L / n_valid.
    pub loss: Tensor,
    /// The per-token losses (detached) as plain numbers.
    pub per_token: Vec<f32>,
    /// Number of tokens selected (all of them without selection).
    pub n_selected: usize,
    /// Number of valid tokens (the denominator).
    pub n_valid: usize,
}

/// Loss over all valid tokens: mean of the per-token divergence (DistillSpec baselines).
pub fn mean_loss(div: Divergence, teacher: &TeacherRows, draft_logits: &Tensor) -> Result<LossOutput> {
    let per = per_token_divergence_rows(div, teacher, draft_logits)?;
    let n = per.dim(0)?;
    let per_token = per.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let loss = if n == 0 { per.sum_all()? } else { (per.sum_all()? / n as f64)? };
    Ok(LossOutput { loss, per_token, n_selected: n, n_valid: n })
}

/// Which tokens stage 2 trains on: the top-k fraction by a per-token score, recomputed
/// every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// AdaSPEC's rule: the largest gap ΔL = L_draft − L_ref (the tokens where the draft lags
    /// the reference most). Its fixed point is the reference: wherever the draft falls behind
    /// the reference, ΔL grows and the token is selected again.
    #[default]
    Gap,
    /// The tokens the reference fits best (smallest L_ref): a fixed notion of "learnable"
    /// that does not pull the draft back to the reference's compromise on tokens it drops.
    RefLoss,
}

impl Selection {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Selection::Gap => "gap",
            Selection::RefLoss => "ref-loss",
        }
    }
}

/// AdaSPEC stage-2 loss: L_draft = div(p ‖ q_draft) per token, L_ref = div(p ‖ q_ref)
/// (`ref_logits` are detached); with [`Selection::Gap`] keep ΔL = L_draft − L_ref ≥
/// quantile(ΔL, 1 − k) via [`select_top_gap`] (with [`Selection::RefLoss`] the score is
/// −L_ref); loss = Σ selected L_draft / n_valid (the mean over selected tokens scaled by the
/// selected fraction).
pub fn adaspec_loss(
    div: Divergence,
    teacher: &TeacherRows,
    draft_logits: &Tensor,
    ref_logits: &Tensor,
    k: f64,
    selection: Selection,
) -> Result<LossOutput> {
    check_k(k)?;
    let per = per_token_divergence_rows(div, teacher, draft_logits)?;
    let per_ref = per_token_divergence_rows(div, teacher, &ref_logits.detach())?;
    let n = per.dim(0)?;
    let per_token = per.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if n == 0 {
        return Ok(LossOutput { loss: per.sum_all()?, per_token, n_selected: 0, n_valid: 0 });
    }
    let ref_vals = per_ref.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let score: Vec<f32> = match selection {
        Selection::Gap => per_token.iter().zip(&ref_vals).map(|(d, r)| d - r).collect(),
        Selection::RefLoss => ref_vals.iter().map(|r| -r).collect(),
    };
    let mask = select_top_gap(&score, k)?;
    let n_selected = mask.iter().filter(|&&m| m > 0.0).count();
    let mask = Tensor::from_vec(mask, n, per.device())?.to_dtype(per.dtype())?;
    let loss = ((per * mask)?.sum_all()? / n as f64)?;
    Ok(LossOutput { loss, per_token, n_selected, n_valid: n })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(rows: &[&[f64]]) -> Tensor {
        let n = rows.len();
        let v = rows[0].len();
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (n, v), &Device::Cpu).unwrap()
    }

    fn logp_of(p: &[f64]) -> Vec<f64> {
        p.iter().map(|x| x.ln()).collect()
    }

    // Hand-computed cases: p = (0.5, 0.25, 0.25), draft logits (0, 0, ln 2) → q = (¼, ¼, ½).
    fn case() -> (Tensor, Tensor) {
        let p = [0.5, 0.25, 0.25];
        let logp = t2(&[&logp_of(&p)]);
        let z = t2(&[&[0.0, 0.0, 2f64.ln()]]);
        (logp, z)
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0]
    }

    #[test]
    fn divergences_match_hand_computed_values() {
        let (logp, z) = case();
        let ln2 = 2f64.ln();
        // KL(p‖q) = ½ ln 2 + ¼ ln 1 + ¼ ln ½ = ¼ ln 2.
        let fkl = scalar(&per_token_divergence(Divergence::Fkl, &logp, &z).unwrap());
        assert!((fkl - 0.25 * ln2).abs() < 1e-12, "{fkl}");
        // KL(q‖p) = ¼ ln ½ + ¼ ln 1 + ½ ln 2 = ¼ ln 2.
        let rkl = scalar(&per_token_divergence(Divergence::Rkl, &logp, &z).unwrap());
        assert!((rkl - 0.25 * ln2).abs() < 1e-12, "{rkl}");
        // TV = ½ (¼ + 0 + ¼) = ¼.
        let tvd = scalar(&per_token_divergence(Divergence::Tvd, &logp, &z).unwrap());
        assert!((tvd - 0.25).abs() < 1e-12, "{tvd}");
        // m = (3/8, 1/4, 3/8); JSD = ½ [½ ln(4/3) + ½ ln(2/3)] + ½ [¼ ln(2/3) + ½ ln(4/3)].
        let m: [f64; 3] = [0.375, 0.25, 0.375];
        let p: [f64; 3] = [0.5, 0.25, 0.25];
        let q: [f64; 3] = [0.25, 0.25, 0.5];
        let want: f64 = 0.5 * (0..3).map(|i| p[i] * (p[i] / m[i]).ln() + q[i] * (q[i] / m[i]).ln()).sum::<f64>();
        let jsd = scalar(&per_token_divergence(Divergence::Jsd, &logp, &z).unwrap());
        assert!((jsd - want).abs() < 1e-12, "{jsd} vs {want}");
    }

    #[test]
    fn identical_distributions_give_zero_and_f32_is_stable_for_huge_logits() {
        // Logits of 1e4 overflow a naive exp in f32; log-softmax must stay finite.
        let z = Tensor::from_vec(vec![1e4f32, 0.0, -1e4, 5e3], (1, 4), &Device::Cpu).unwrap();
        let logp = log_softmax_last(&z).unwrap();
        for div in [Divergence::Fkl, Divergence::Rkl, Divergence::Tvd, Divergence::Jsd] {
            let v = per_token_divergence(div, &logp, &z).unwrap().to_vec1::<f32>().unwrap()[0];
            assert!(v.is_finite() && v.abs() < 1e-6, "{div:?}: {v}");
        }
        // A teacher with an (almost) zero-probability token and a draft that also has one.
        let logp = Tensor::from_vec(vec![0.0f32, -200.0, -300.0], (1, 3), &Device::Cpu).unwrap();
        let z = Tensor::from_vec(vec![-500.0f32, 0.0, 0.0], (1, 3), &Device::Cpu).unwrap();
        for div in [Divergence::Fkl, Divergence::Rkl, Divergence::Tvd, Divergence::Jsd] {
            let v = per_token_divergence(div, &logp, &z).unwrap().to_vec1::<f32>().unwrap()[0];
            assert!(v.is_finite() && v >= 0.0, "{div:?}: {v}");
        }
    }

    /// The autograd gradient of `teacher`'s divergence at draft logits `z0` (1 × 3), checked
    /// against central finite differences; returned for further checks.
    fn checked_gradient(div: Divergence, teacher: &TeacherRows, z0: &Tensor) -> Vec<f64> {
        let var = Var::from_tensor(z0).unwrap();
        let l = per_token_divergence_rows(div, teacher, var.as_tensor()).unwrap().sum_all().unwrap();
        let grads = l.backward().unwrap();
        let g = grads.get(var.as_tensor()).expect("gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = z0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in 0..3 {
            let eval = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let zz = Tensor::from_vec(v, (1, 3), &Device::Cpu).unwrap();
                scalar(&per_token_divergence_rows(div, teacher, &zz).unwrap())
            };
            let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6, "{div:?} d/dz{i}: autograd {} vs fd {fd}", g[i]);
        }
        g
    }

    #[test]
    fn gradients_flow_and_match_finite_differences() {
        // Away from TV's kinks (p ≠ q everywhere) for the finite differences.
        let (logp, z0) = case();
        let z0 = (z0 + t2(&[&[0.1, -0.2, 0.05]])).unwrap();
        let dense = TeacherRows::Dense(logp);
        for div in [Divergence::Fkl, Divergence::Rkl, Divergence::Tvd, Divergence::Jsd] {
            let g = checked_gradient(div, &dense, &z0);
            // FKL's gradient is q − p exactly.
            if div == Divergence::Fkl {
                let q = log_softmax_last(&z0).unwrap().exp().unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let p = [0.5, 0.25, 0.25];
                for i in 0..3 {
                    assert!((g[i] - (q[i] - p[i])).abs() < 1e-12);
                }
            }
        }
    }

    /// The case above on K + 1 = 2 bins: teacher top-1 is token 0 (p 0.5, other 0.5); the
    /// draft's bins are q(0) = ¼ and q(other) = ¾.
    fn bins_case() -> TeacherRows {
        let ids = Tensor::from_vec(vec![0u32], (1, 1), &Device::Cpu).unwrap();
        TeacherRows::Bins { ids, logp: t2(&[&[0.5f64.ln(), 0.5f64.ln()]]) }
    }

    #[test]
    fn bins_compare_the_coarsened_distributions() {
        let (logp, z) = case();
        let bins = bins_case();
        let (p, q) = ([0.5f64, 0.5], [0.25f64, 0.75]);
        let kl = |a: &[f64; 2], b: &[f64; 2]| a[0] * (a[0] / b[0]).ln() + a[1] * (a[1] / b[1]).ln();
        let m = [(p[0] + q[0]) / 2.0, (p[1] + q[1]) / 2.0];
        for (div, want) in [
            (Divergence::Fkl, kl(&p, &q)),
            (Divergence::Rkl, kl(&q, &p)),
            (Divergence::Tvd, 0.25),
            (Divergence::Jsd, 0.5 * (kl(&p, &m) + kl(&q, &m))),
        ] {
            let got = scalar(&per_token_divergence_rows(div, &bins, &z).unwrap());
            assert!((got - want).abs() < 1e-12, "{div:?}: {got} vs {want}");
            // Coarsening never increases a divergence (data processing).
            let full = scalar(&per_token_divergence(div, &logp, &z).unwrap());
            assert!(got <= full + 1e-12, "{div:?}: bins {got} > full {full}");
        }
        assert_eq!(bins.argmax().unwrap(), vec![0]);
        // Gradients through the gathered and the masked-out part match finite differences.
        let z0 = (z + t2(&[&[0.1, -0.2, 0.05]])).unwrap();
        for div in [Divergence::Fkl, Divergence::Rkl, Divergence::Jsd] {
            checked_gradient(div, &bins, &z0);
        }
    }

    #[test]
    fn quantile_is_numpy_linear() {
        let v = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(upper_quantile(&v, 1.0).unwrap(), 1.0); // q=0 → min
        assert_eq!(upper_quantile(&v, 0.5).unwrap(), 3.0); // median
        assert!((upper_quantile(&v, 0.4).unwrap() - 3.4).abs() < 1e-6); // pos 2.4
        assert_eq!(upper_quantile(&[7.0], 0.4).unwrap(), 7.0);
        assert!(upper_quantile(&[], 0.4).is_err());
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(select_top_gap(&v, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selection_keeps_largest_gaps_with_fraction_k() {
        // 100 distinct gaps in a scrambled order: exactly n − ⌈(1−k)(n−1)⌉ are kept, and they
        // are the largest.
        let n = 100;
        let delta: Vec<f32> = (0..n).map(|i| ((i * 37) % n) as f32 * 0.1 - 3.0).collect();
        for k in [0.05, 0.1, 0.4, 0.5, 0.77, 1.0] {
            let m = select_top_gap(&delta, k).unwrap();
            let kept = m.iter().filter(|&&x| x > 0.0).count();
            let want = n - ((1.0 - k) * (n - 1) as f64).ceil() as usize;
            assert_eq!(kept, want, "k={k}");
            assert!((kept as f64 / n as f64 - k).abs() <= 1.0 / n as f64, "k={k}");
            let min_kept = delta.iter().zip(&m).filter(|(_, &s)| s > 0.0).map(|(d, _)| *d).fold(f32::MAX, f32::min);
            let max_dropped = delta.iter().zip(&m).filter(|(_, &s)| s == 0.0).map(|(d, _)| *d).fold(f32::MIN, f32::max);
            assert!(min_kept > max_dropped, "k={k}");
        }
    }

    #[test]
    fn selection_keeps_all_ties_at_the_threshold() {
        // Threshold lands on the tied value 2.0: all four 2.0s are kept.
        let delta = [0.0f32, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.5, -1.0, 1.5];
        let m = select_top_gap(&delta, 0.4).unwrap();
        assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        // All equal: everything is kept whatever k is.
        let m = select_top_gap(&[0.3f32; 8], 0.1).unwrap();
        assert!(m.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn adaspec_loss_is_sum_of_selected_over_valid_and_mask_has_no_gradient() {
        // Four tokens; the reference equals the teacher on tokens 0 and 2 (L_ref = 0) and the
        // draft on 1 and 3 (ΔL = 0), so with k = 0.5 the selected tokens are 0 and 2.
        let p = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]];
        let logp =
            t2(&p.iter().map(|r| logp_of(r)).collect::<Vec<_>>().iter().map(|v| v.as_slice()).collect::<Vec<_>>());
        let z = t2(&[&[0.0, 1.0, 0.0], &[2.0, 0.0, 0.0], &[1.0, 0.0, -1.0], &[0.0, 0.5, 0.0]]);
        let logp_rows = logp.to_vec2::<f64>().unwrap();
        let z_rows = z.to_vec2::<f64>().unwrap();
        let r = t2(&[&logp_rows[0], &z_rows[1], &logp_rows[2], &z_rows[3]]);
        let var = Var::from_tensor(&z).unwrap();
        let dense = TeacherRows::Dense(logp.clone());
        let out = adaspec_loss(Divergence::Fkl, &dense, var.as_tensor(), &r, 0.5, Selection::Gap).unwrap();
        assert_eq!(out.n_valid, 4);
        assert_eq!(out.n_selected, 2);
        let per = &out.per_token;
        let want = (per[0] as f64 + per[2] as f64) / 4.0;
        assert!((scalar(&out.loss.reshape(1).unwrap()) - want).abs() < 1e-6);
        // Unselected tokens get no gradient; selected ones get (q − p)/4.
        let g = var.as_tensor().clone();
        let grads = out.loss.backward().unwrap();
        let g = grads.get(&g).unwrap().to_vec2::<f64>().unwrap();
        assert!(g[1].iter().chain(&g[3]).all(|&x| x == 0.0));
        assert!(g[0].iter().any(|&x| x.abs() > 1e-3));
        // k = 1 keeps everything and equals the mean loss.
        let all = adaspec_loss(Divergence::Fkl, &dense, &z, &r, 1.0, Selection::Gap).unwrap();
        let mean = mean_loss(Divergence::Fkl, &dense, &z).unwrap();
        assert_eq!(all.n_selected, 4);
        assert!((scalar(&all.loss.reshape(1).unwrap()) - scalar(&mean.loss.reshape(1).unwrap())).abs() < 1e-12);
        assert!(adaspec_loss(Divergence::Fkl, &dense, &z, &r, 0.0, Selection::Gap).is_err());
    }

    #[test]
    fn ref_loss_selection_keeps_the_tokens_the_reference_fits_best() {
        // The draft equals the teacher on token 0 (ΔL < 0 there: the gap rule drops it) and
        // the reference fits tokens 0 and 3 best, so ref-loss keeps 0 and 3, the gap rule 2
        // and 3.
        let p = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]];
        let rows: Vec<Vec<f64>> = p.iter().map(|r| logp_of(r)).collect();
        let logp = t2(&rows.iter().map(|v| v.as_slice()).collect::<Vec<_>>());
        let z = t2(&[&rows[0], &[2.0, 0.0, 0.0], &[3.0, 0.0, -3.0], &[0.0, 3.0, 0.0]]);
        let r = t2(&[&[1.0, 0.5, 0.0], &[0.0, 0.0, 1.5], &[0.0, 2.0, -1.0], &[0.2, -0.5, -0.5]]);
        let dense = TeacherRows::Dense(logp);
        let l = |x: &Tensor| per_token_divergence_rows(Divergence::Fkl, &dense, x).unwrap().to_vec1::<f64>().unwrap();
        let (ld, lr) = (l(&z), l(&r));
        let two = |score: Vec<f64>| {
            let mut i: Vec<usize> = (0..4).collect();
            i.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
            let mut t = vec![i[0], i[1]];
            t.sort();
            t
        };
        assert_eq!(two(lr.iter().map(|x| -x).collect()), vec![0, 3], "L_ref {lr:?}");
        assert_eq!(two(ld.iter().zip(&lr).map(|(d, r)| d - r).collect()), vec![2, 3], "L {ld:?} L_ref {lr:?}");
        for (sel, want) in [(Selection::RefLoss, [0, 3]), (Selection::Gap, [2, 3])] {
            let var = Var::from_tensor(&z).unwrap();
            let out = adaspec_loss(Divergence::Fkl, &dense, var.as_tensor(), &r, 0.5, sel).unwrap();
            assert_eq!(out.n_selected, 2);
            let expect = (ld[want[0]] + ld[want[1]]) / 4.0;
            assert!((scalar(&out.loss.reshape(1).unwrap()) - expect).abs() < 1e-9, "{sel:?}");
            let grads = out.loss.backward().unwrap();
            let g = grads.get(var.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
            for (i, row) in g.iter().enumerate() {
                assert_eq!(row.iter().any(|&x| x.abs() > 1e-9), want.contains(&i) && ld[i] > 1e-6, "{sel:?} row {i}");
            }
        }
    }
}
