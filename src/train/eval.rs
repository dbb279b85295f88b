//! Acceptance evaluation of a draft against its target (SPEC §1), teacher-forced:
//! * α: fraction of response positions where argmax q == argmax p given the same prefix,
//!   over (a) the dataset's responses and (b) the target's own greedy continuations of the
//!   prompts (on (b) teacher forcing is exactly greedy speculative decoding);
//! * expected acceptance under sampling, mean of Σ min(p, q) = 1 − TV(p, q);
//! * per-position acceptance α_j = P(draft token j accepted | tokens 1..j−1 accepted), measured
//!   from runs of consecutive agreements, and τ (tokens per target pass) for chains
//!   γ = 1..8: measured τ = 1 + Σ_{j≤γ} Π_{l≤j} α_l, next to the i.i.d. formula
//!   (1 − α^{γ+1}) / (1 − α).
//!
//! This module never trains and never modifies models; the target's own continuations come
//! from [`super::generate`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::data::Example;
use super::error::{Error, Result};
use super::gguf_import::{is_gguf_file, load_checkpoint};
use super::model::DraftModel;
use crate::backend::{sequence_logits_rows, Model, ModelParams};

/// Longest chain τ is reported for.
pub const MAX_GAMMA: usize = 8;

/// A draft to evaluate: a GGUF run by llama.cpp, or a trainer checkpoint run by candle.
pub enum DraftSource {
    Gguf(Arc<Model>),
    Candle(Box<DraftModel>),
}

impl DraftSource {
    /// Loads a GGUF (by content) or a safetensors checkpoint (with `config.json` next to it).
    pub fn load(path: &Path) -> Result<DraftSource> {
        if is_gguf_file(path) {
            Ok(DraftSource::Gguf(Arc::new(Model::load(path, &ModelParams::default())?)))
        } else {
            let (cfg, w) = load_checkpoint(path)?;
            Ok(DraftSource::Candle(Box::new(DraftModel::inference(&cfg, w, DType::F32, &Device::Cpu)?)))
        }
    }

    /// Wraps a model being trained (or any candle draft).
    pub fn n_vocab(&self) -> usize {
        match self {
            DraftSource::Gguf(m) => m.n_vocab(),
            DraftSource::Candle(m) => m.config().vocab_size,
        }
    }

    /// Teacher-forced logits at positions `rows` of `tokens`, (rows.len() × vocab) row-major.
    pub fn logits(&self, tokens: &[i32], rows: std::ops::Range<usize>, n_threads: i32) -> Result<Vec<f32>> {
        match self {
            DraftSource::Gguf(m) => Ok(sequence_logits_rows(m, tokens, rows, n_threads)?),
            DraftSource::Candle(m) => {
                let tokens = &tokens[..rows.end.min(tokens.len())];
                let ids: Vec<u32> = tokens.iter().map(|&t| t.max(0) as u32).collect();
                let ids = Tensor::from_vec(ids, (1, tokens.len()), m.device())?;
                let hidden = m.forward_hidden(&ids, None)?.squeeze(0)?; // (seq, hidden)
                let sel = hidden.narrow(0, rows.start, rows.len())?;
                let l = sel.matmul(&m.head().t()?)?.to_dtype(DType::F32)?; // (rows, vocab)
                Ok(l.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// Expected tokens per target pass for a chain of length γ at i.i.d. acceptance α.
pub fn tau_iid(alpha: f64, gamma: usize) -> f64 {
    if alpha >= 1.0 {
        return gamma as f64 + 1.0;
    }
    (1.0 - alpha.powi(gamma as i32 + 1)) / (1.0 - alpha)
}

/// τ for one chain length, measured and i.i.d.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TauRow {
    pub gamma: usize,
    /// From the measured per-position acceptance.
    pub measured: f64,
    /// From α alone, assuming independent positions.
    pub iid: f64,
}

/// Acceptance numbers over one set of sequences.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AcceptanceStats {
    pub sequences: usize,
    pub positions: usize,
    /// Greedy agreement.
    pub alpha: f64,
    /// Mean Σ min(p, q) = 1 − TV.
    pub expected_acceptance: f64,
    /// α_j for j = 1..=8.
    pub per_position_acceptance: Vec<f64>,
    pub tau: Vec<TauRow>,
}

/// Accumulates agreement runs and TV over sequences.
#[derive(Debug, Default, Clone)]
pub struct AcceptanceCounter {
    sequences: usize,
    positions: usize,
    agree: usize,
    overlap: f64,
    /// num[j], den[j] for per-position acceptance (index j−1).
    num: [usize; MAX_GAMMA],
    den: [usize; MAX_GAMMA],
}

impl AcceptanceCounter {
    /// Adds one sequence's per-position agreements and overlaps Σ min(p, q).
    pub fn add(&mut self, agree: &[bool], overlap: &[f64]) {
        let n = agree.len();
        self.sequences += 1;
        self.positions += n;
        self.agree += agree.iter().filter(|&&a| a).count();
        self.overlap += overlap.iter().sum::<f64>();
        // run[i] = consecutive agreements starting at i.
        let mut run = vec![0usize; n + 1];
        for i in (0..n).rev() {
            run[i] = if agree[i] { run[i + 1] + 1 } else { 0 };
        }
        for (i, &r) in run.iter().take(n).enumerate() {
            let avail = n - i;
            for j in 1..=MAX_GAMMA.min(avail) {
                if r + 1 >= j {
                    self.den[j - 1] += 1;
                    if r >= j {
                        self.num[j - 1] += 1;
                    }
                }
            }
        }
    }

    pub fn finish(&self) -> AcceptanceStats {
        let d = self.positions.max(1) as f64;
        let alpha = self.agree as f64 / d;
        let per: Vec<f64> = (0..MAX_GAMMA)
            .map(|j| if self.den[j] > 0 { self.num[j] as f64 / self.den[j] as f64 } else { 0.0 })
            .collect();
        let mut tau = Vec::with_capacity(MAX_GAMMA);
        let (mut prod, mut sum) = (1.0, 1.0);
        for (j, a) in per.iter().enumerate() {
            prod *= a;
            sum += prod;
            tau.push(TauRow { gamma: j + 1, measured: sum, iid: tau_iid(alpha, j + 1) });
        }
        AcceptanceStats {
            sequences: self.sequences,
            positions: self.positions,
            alpha,
            expected_acceptance: self.overlap / d,
            per_position_acceptance: per,
            tau,
        }
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

fn softmax64(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// Teacher-forced acceptance of `draft` against `target` over the response positions of
/// `examples`.
pub fn acceptance_on(
    target: &Arc<Model>,
    draft: &DraftSource,
    examples: &[Example],
    n_threads: i32,
) -> Result<AcceptanceStats> {
    let v = target.n_vocab();
    if draft.n_vocab() != v {
        return Err(Error::InvalidArg {
            name: "--draft",
            reason: format!("draft vocab size {} != target vocab size {v}", draft.n_vocab()),
        });
    }
    let mut c = AcceptanceCounter::default();
    let bar = super::teacher::progress("eval", examples.len() as u64);
    for e in examples {
        let range = e.loss_positions();
        if range.is_empty() {
            continue;
        }
        let p = sequence_logits_rows(target, &e.tokens, range.clone(), n_threads)?;
        let q = draft.logits(&e.tokens, range.clone(), n_threads)?;
        let mut agree = Vec::with_capacity(range.len());
        let mut overlap = Vec::with_capacity(range.len());
        for (pr, qr) in p.chunks_exact(v).zip(q.chunks_exact(v)) {
            agree.push(argmax(pr) == argmax(qr));
            let (ps, qs) = (softmax64(pr), softmax64(qr));
            overlap.push(ps.iter().zip(&qs).map(|(a, b)| a.min(*b)).sum());
        }
        c.add(&agree, &overlap);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(c.finish())
}

/// The JSON report of `adaspec eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub target: PathBuf,
    pub draft: PathBuf,
    pub data: Vec<PathBuf>,
    /// (a) teacher-forced over the dataset responses.
    pub dataset: Option<AcceptanceStats>,
    /// (b) teacher-forced over the target's greedy continuations of the prompts.
    pub target_continuations: Option<AcceptanceStats>,
    pub continuation_tokens: usize,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_give_per_position_acceptance_and_tau() {
        let mut c = AcceptanceCounter::default();
        // Always accept: α_j = 1, τ(γ) = γ + 1.
        c.add(&[true; 20], &[1.0; 20]);
        let s = c.finish();
        assert_eq!(s.alpha, 1.0);
        assert!(s.per_position_acceptance.iter().all(|&a| a == 1.0));
        assert_eq!(s.tau[3].measured, 5.0);
        assert_eq!(s.tau[3].iid, 5.0);
        // Alternating: from an agreeing start the run is 1, so α_1 = ½, α_2 = 0.
        let mut c = AcceptanceCounter::default();
        let a: Vec<bool> = (0..40).map(|i| i % 2 == 0).collect();
        c.add(&a, &[0.5; 40]);
        let s = c.finish();
        assert_eq!(s.alpha, 0.5);
        assert!((s.per_position_acceptance[0] - 0.5).abs() < 1e-12);
        assert_eq!(s.per_position_acceptance[1], 0.0);
        assert!((s.tau[0].measured - 1.5).abs() < 1e-12);
        assert!((s.tau[7].measured - 1.5).abs() < 1e-12);
        assert!((s.tau[0].iid - 1.5).abs() < 1e-12);
        assert!((s.expected_acceptance - 0.5).abs() < 1e-12);
    }
}
