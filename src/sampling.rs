//! Sampling parameters and the *warp* (temperature, top-k, top-p, min-p) applied to both the
//! target's and the draft's logits. Verification compares warped distributions, so the same
//! warp must be used everywhere (SPEC §3). Pure functions only: no llama.cpp here.

use rand::Rng;

use crate::error::{Error, Result};

/// How tokens are chosen. `temperature <= 0` means greedy (argmax).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose mass reaches top_p (1 = off).
    pub top_p: f32,
    /// Drop tokens with probability below min_p × the top probability (0 = off).
    pub min_p: f32,
    /// Random seed for sampling.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether this is greedy (argmax) decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Rejects values outside their ranges, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidParam {
                name: "temperature",
                reason: format!("{} must be >= 0", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidParam { name: "top_p", reason: format!("{} must be in (0, 1]", self.top_p) });
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::InvalidParam { name: "min_p", reason: format!("{} must be in [0, 1]", self.min_p) });
        }
        Ok(())
    }
}

/// Index of the largest logit (lowest index on ties, so every path agrees).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

/// The `k` largest entries as (index, value), largest first.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if top.len() < k || v > top[top.len() - 1].1 {
            let pos = top.iter().position(|&(_, w)| v > w).unwrap_or(top.len());
            top.insert(pos, (i, v));
            if top.len() > k {
                top.pop();
            }
        }
    }
    top
}

/// log Σ exp(logits), computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return m;
    }
    let s: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + s.ln() as f32
}

/// Applies the warp to logits and returns a dense probability vector (zeros outside the kept
/// set). Same order as llama.cpp's default sampler chain: top-k, then top-p and min-p on the
/// untempered distribution, then temperature over the kept tokens. Temperature 0 returns the
/// one-hot argmax distribution.
pub fn warp(logits: &[f32], p: &SamplingParams) -> Vec<f32> {
    let n = logits.len();
    let mut probs = vec![0f32; n];
    if n == 0 {
        return probs;
    }
    if p.is_greedy() {
        probs[argmax(logits)] = 1.0;
        return probs;
    }
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..n).collect();
    if p.top_k > 0 && p.top_k < n {
        idx.select_nth_unstable_by(p.top_k - 1, desc);
        idx.truncate(p.top_k);
    }
    let m = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
    if p.top_p < 1.0 {
        // Smallest prefix (by logit) whose mass reaches top_p. Sort only as much as needed:
        // select the best k, check their mass, grow k.
        let total: f64 = idx.iter().map(|&i| ((logits[i] - m) as f64).exp()).sum();
        let goal = p.top_p as f64 * total;
        let mut k = 64.min(idx.len());
        loop {
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, desc);
            }
            idx[..k].sort_by(desc);
            let mut acc = 0.0;
            let mut cut = None;
            for (j, &i) in idx[..k].iter().enumerate() {
                acc += ((logits[i] - m) as f64).exp();
                if acc >= goal {
                    cut = Some(j + 1);
                    break;
                }
            }
            match cut {
                Some(c) => {
                    idx.truncate(c);
                    break;
                }
                None if k == idx.len() => break,
                None => k = (k * 4).min(idx.len()),
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = m + p.min_p.ln();
        idx.retain(|&i| logits[i] >= floor);
    }
    let inv_t = 1.0 / p.temperature;
    let w: Vec<f64> = idx.iter().map(|&i| (((logits[i] - m) * inv_t) as f64).exp()).collect();
    let mass: f64 = w.iter().sum();
    for (&i, &x) in idx.iter().zip(&w) {
        probs[i] = (x / mass) as f32;
    }
    probs
}

/// Draws an index from a probability vector (need not be normalised; all-zero → argmax 0).
pub fn sample_from<R: Rng + ?Sized>(probs: &[f32], rng: &mut R) -> usize {
    let total: f64 = probs.iter().map(|&x| x.max(0.0) as f64).sum();
    if total <= 0.0 {
        return argmax(probs);
    }
    let mut u = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &x) in probs.iter().enumerate() {
        if x > 0.0 {
            last = i;
            u -= x as f64;
            if u < 0.0 {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_warp_is_one_hot_argmax() {
        let p = warp(&[0.1, 3.0, 2.0], &SamplingParams::greedy());
        assert_eq!(p, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let logits = [4.0, 3.0, 2.0, 1.0];
        let sp = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let p = warp(&logits, &sp);
        assert!(p[2] == 0.0 && p[3] == 0.0 && (p[0] + p[1] - 1.0).abs() < 1e-6);
        let sp = SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let p = warp(&logits, &sp);
        assert_eq!(p[0], 1.0);
        let sp = SamplingParams { temperature: 1.0, min_p: 0.3, ..Default::default() };
        let p = warp(&logits, &sp);
        // e^-1 = 0.37 >= 0.3 kept, e^-2 = 0.135 dropped
        assert!(p[1] > 0.0 && p[2] == 0.0);
    }

    #[test]
    fn temperature_flattens() {
        let logits = [2.0, 0.0];
        let cold = warp(&logits, &SamplingParams { temperature: 0.5, ..Default::default() });
        let hot = warp(&logits, &SamplingParams { temperature: 2.0, ..Default::default() });
        assert!(cold[0] > hot[0]);
    }

    /// The incremental top-p selection equals a plain full sort.
    #[test]
    fn top_p_matches_full_sort() {
        use rand::{rngs::StdRng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(9);
        for case in 0..50 {
            let n = 2000;
            let scale = 1.0 + (case % 5) as f32 * 2.0;
            let logits: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * scale).collect();
            let top_p = 0.05 + 0.9 * rng.random::<f32>();
            let sp = SamplingParams { temperature: 0.7, top_p, ..Default::default() };
            let got = warp(&logits, &sp);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let m = logits[order[0]];
            let total: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
            let mut acc = 0.0;
            let mut keep = 0;
            for &i in &order {
                acc += ((logits[i] - m) as f64).exp();
                keep += 1;
                if acc >= top_p as f64 * total {
                    break;
                }
            }
            let kept: std::collections::HashSet<usize> = order[..keep].iter().copied().collect();
            for (i, g) in got.iter().enumerate().take(n) {
                assert_eq!(*g > 0.0, kept.contains(&i), "case {case} token {i}");
            }
        }
    }

    #[test]
    fn top_k_indices_sorted() {
        assert_eq!(top_k_indices(&[1.0, 5.0, 3.0, 4.0], 2), vec![(1, 5.0), (3, 4.0)]);
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { min_p: 2.0, ..Default::default() }.validate().is_err());
    }
}
