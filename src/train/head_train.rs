//! Head training (`adaspec head train`): target features and teacher distributions from the
//! target GGUF through llama.cpp (the model users verify with, quantization included), cached on
//! disk, then EAGLE-3's training-time test in candle.
//!
//! Per sequence of T tokens, entry P (0..T-1) reads token[P+1] with the features of P and is
//! trained towards the target's distribution after token[P+1] (its logits at P+1), renormalised
//! over the draft vocabulary and stored sparsely as the top-K draft ids plus one "other" bin
//! (the rest of the draft vocabulary's mass, compared with the head's own mass there — no
//! uniform tail). Positions whose target argmax lies outside the draft vocabulary are masked,
//! as EAGLE-3 does; so are prompt positions. TTT step i feeds entry P the step-(i−1) output of
//! P−1 (see `head_model`); its loss weight is 0.8^i.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::data::Example;
use super::error::{Error, Result};
use super::head::HeadConfig;
use super::head_model::{log_softmax, HeadModel};
use super::trainer::{accumulate, clip_global_norm, AdamW, TrainConfig};
use crate::backend::{Batch, Context, ContextExtras, ContextParams, Model};
use crate::features::FeatureTap;

/// Teacher entries kept per position.
pub const TEACHER_K: usize = 16;

/// One cached training sequence.
pub struct HeadExample {
    /// Entries 0..n (n = T-1): frozen target embeddings of token[P+1] (n, H), f16.
    pub emb: Tensor,
    /// Target features of positions 0..n (n, 3·H_t), f16.
    pub feat: Tensor,
    /// Teacher top-K draft ids (n, K) u32 and probabilities (n, K) f32; other-bin mass (n).
    pub tid: Tensor,
    pub tp: Tensor,
    pub other: Tensor,
    /// 1 where entry P is trained (response position, target argmax in the draft vocab).
    pub mask: Tensor,
    /// Target argmax as a draft id (n) u32 (0 where masked): greedy acceptance.
    pub argmax: Tensor,
}

/// Extracts features and teacher rows for `examples` with llama.cpp, or loads them from
/// `cache` (a safetensors file keyed by the data and head vocabulary).
pub fn extract(
    target: &Arc<Model>,
    cfg: &HeadConfig,
    examples: &[Example],
    threads: i32,
    cache: Option<&Path>,
    progress: bool,
) -> Result<Vec<HeadExample>> {
    let key = cache_key(target, cfg, examples);
    if let Some(p) = cache.filter(|p| p.is_file()) {
        match load_cache(p, key) {
            Ok(v) => {
                tracing::info!("features and teacher from the cache {}", p.display());
                return Ok(v);
            }
            Err(e) => tracing::warn!("cache {} not usable ({e}); extracting again", p.display()),
        }
    }
    let emb_all = target_embeddings(target)?;
    let h_t = target.n_embd();
    let tap = Arc::new(FeatureTap::new(cfg.target_layers, target.n_layer(), h_t)?);
    let max_t = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
    let n_ctx = (max_t + 8).next_multiple_of(256) as u32;
    let cp = ContextParams { n_ctx, n_batch: 64, n_threads: threads, ..Default::default() };
    let mut ctx =
        Context::with_extras(target.clone(), &cp, ContextExtras { tap: Some(tap.clone()), ..Default::default() })?;
    let mut batch = Batch::new(64, 1);
    // Target id → draft id.
    let mut to_draft = vec![u32::MAX; target.n_vocab()];
    for (d, &t) in cfg.draft_vocab.iter().enumerate() {
        to_draft[t as usize] = d as u32;
    }
    let bar = progress_bar(examples.len(), progress, "target features");
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(examples.len());
    let mut n_tokens = 0usize;
    for ex in examples {
        let t = ex.tokens.len();
        if t < 3 {
            continue;
        }
        ctx.clear();
        tap.clear();
        let n = t - 1;
        let mut tid = vec![0u32; n * TEACHER_K];
        let mut tp = vec![0f32; n * TEACHER_K];
        let mut other = vec![0f32; n];
        let mut mask = vec![0f32; n];
        let mut argmax = vec![0u32; n];
        for (c, chunk) in ex.tokens.chunks(64).enumerate() {
            batch.clear();
            for (j, &tok) in chunk.iter().enumerate() {
                let pos = c * 64 + j;
                // Entry P = pos - 1 is trained towards the logits at pos (pos >= 1).
                let want = pos >= 1 && pos + 1 >= ex.prompt_len;
                batch.add(tok, pos as i32, &[0], want)?;
            }
            ctx.decode(&batch)?;
            for (j, _) in chunk.iter().enumerate() {
                let pos = c * 64 + j;
                if !(pos >= 1 && pos + 1 >= ex.prompt_len) {
                    continue;
                }
                let p = pos - 1;
                let logits = ctx.logits(j)?;
                let am = crate::sampling::argmax(logits);
                let Some(&d) = to_draft.get(am).filter(|&&d| d != u32::MAX) else { continue };
                // Softmax over the draft vocabulary.
                let sub: Vec<f32> = cfg.draft_vocab.iter().map(|&t| logits[t as usize]).collect();
                let m = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = sub.iter().map(|v| (v - m).exp()).sum();
                let top = crate::sampling::top_k_indices(&sub, TEACHER_K);
                let mut mass = 0.0f32;
                for (k, (i, v)) in top.iter().enumerate() {
                    let q = (v - m).exp() / z;
                    tid[p * TEACHER_K + k] = *i as u32;
                    tp[p * TEACHER_K + k] = q;
                    mass += q;
                }
                other[p] = (1.0 - mass).max(0.0);
                mask[p] = 1.0;
                argmax[p] = d;
            }
        }
        let mut feats = Vec::new();
        tap.gather(&(0..n).collect::<Vec<_>>(), &mut feats)?;
        let h = target.n_embd();
        let emb: Vec<f32> = ex.tokens[1..]
            .iter()
            .flat_map(|&x| emb_all[x as usize * h..(x as usize + 1) * h].iter().copied())
            .collect();
        let dev = Device::Cpu;
        out.push(HeadExample {
            emb: Tensor::from_vec(emb, (n, h), &dev)?.to_dtype(DType::F16)?,
            feat: Tensor::from_vec(feats, (n, 3 * h_t), &dev)?.to_dtype(DType::F16)?,
            tid: Tensor::from_vec(tid, (n, TEACHER_K), &dev)?,
            tp: Tensor::from_vec(tp, (n, TEACHER_K), &dev)?,
            other: Tensor::from_vec(other, n, &dev)?,
            mask: Tensor::from_vec(mask, n, &dev)?,
            argmax: Tensor::from_vec(argmax, n, &dev)?,
        });
        n_tokens += t;
        bar.inc(1);
        bar.set_message(format!("{:.0} tok/s", n_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)));
    }
    bar.finish_and_clear();
    tracing::info!(
        "target features: {} sequences, {n_tokens} tokens, {:.0} tok/s",
        out.len(),
        n_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)
    );
    if let Some(p) = cache {
        save_cache(p, &out, key)?;
    }
    Ok(out)
}

/// What a feature cache was made from: the sequences (tokens and prompt lengths), the target's
/// shape, the head's target layers and draft vocabulary, and the teacher's K. A cache whose
/// key differs is extracted again, never silently reused for other data.
fn cache_key(target: &Model, cfg: &HeadConfig, examples: &[Example]) -> u64 {
    let mut h = super::data::Fnv64::default();
    h.write(&super::data::examples_hash(examples).to_le_bytes());
    for x in [target.n_vocab(), target.n_embd(), target.n_layer(), TEACHER_K] {
        h.write(&(x as u64).to_le_bytes());
    }
    for &l in &cfg.target_layers {
        h.write(&(l as u64).to_le_bytes());
    }
    for &t in &cfg.draft_vocab {
        h.write(&t.to_le_bytes());
    }
    h.finish()
}

/// The target's token embedding matrix (n_vocab × H, f32), read from its GGUF.
fn target_embeddings(target: &Model) -> Result<Vec<f32>> {
    let path = target.path();
    let (content, mut reader) = super::gguf_import::read_gguf_content(path)?;
    let q = content
        .tensor(&mut reader, "token_embd.weight", &Device::Cpu)
        .map_err(|e| Error::Gguf { path: path.to_path_buf(), reason: format!("token_embd.weight: {e}") })?;
    Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The cache key as a tensor (two u32 halves; safetensors has no u64 that candle reads).
const CACHE_KEY: &str = "cache.key";

fn save_cache(path: &Path, v: &[HeadExample], key: u64) -> Result<()> {
    let mut m: HashMap<String, Tensor> = HashMap::new();
    m.insert(CACHE_KEY.into(), Tensor::new(&[key as u32, (key >> 32) as u32], &Device::Cpu)?);
    for (i, e) in v.iter().enumerate() {
        for (k, t) in [
            ("emb", &e.emb),
            ("feat", &e.feat),
            ("tid", &e.tid),
            ("tp", &e.tp),
            ("other", &e.other),
            ("mask", &e.mask),
            ("argmax", &e.argmax),
        ] {
            m.insert(format!("{i}.{k}"), t.clone());
        }
    }
    let tmp = super::gguf_import::temp_path_for(path)?;
    candle_core::safetensors::save(&m, &tmp)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn load_cache(path: &Path, key: u64) -> Result<Vec<HeadExample>> {
    let m = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    let stored = m.get(CACHE_KEY).map(|t| t.to_vec1::<u32>()).transpose()?;
    if stored.as_deref() != Some(&[key as u32, (key >> 32) as u32][..]) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "made for other data, another target or another head vocabulary".into(),
        });
    }
    let mut out = Vec::new();
    for i in 0.. {
        let get = |k: &str| m.get(&format!("{i}.{k}")).cloned();
        let Some(emb) = get("emb") else { break };
        let need = |k: &str| {
            get(k).ok_or_else(|| Error::Checkpoint { path: path.to_path_buf(), reason: format!("missing {i}.{k}") })
        };
        out.push(HeadExample {
            emb,
            feat: need("feat")?,
            tid: need("tid")?,
            tp: need("tp")?,
            other: need("other")?,
            mask: need("mask")?,
            argmax: need("argmax")?,
        });
    }
    if out.is_empty() {
        return Err(Error::Checkpoint { path: path.to_path_buf(), reason: "empty".into() });
    }
    Ok(out)
}

pub(crate) fn progress_bar(n: usize, show: bool, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(n as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{elapsed}}<{{eta}} {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// Head training settings.
#[derive(Debug, Clone)]
pub struct HeadTrainConfig {
    /// Unrolled TTT steps (EAGLE-3: 7).
    pub ttt_steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    /// Optimizer steps; each takes `batch` sequences.
    pub steps: usize,
    pub batch: usize,
    /// Global gradient-norm clip (EAGLE-3: 0.5).
    pub grad_clip: f64,
    pub seed: u64,
    pub progress: bool,
    /// JSONL metrics log (one line per step and per evaluation).
    pub log: Option<PathBuf>,
    /// AdaSPEC selection: at each TTT step of a sequence, train only the top-k fraction of its
    /// positions by ΔL = L_head − L_reference (needs the reference head in [`train_head`]).
    pub select_k: Option<f64>,
    /// How the top k are ranked (see [`super::loss::Selection`]; default AdaSPEC's gap).
    pub selection: super::loss::Selection,
    /// Write a checkpoint ([`super::head_checkpoint`]) every N steps and after the last one
    /// into `checkpoint_dir` (0 = none).
    pub checkpoint_every: usize,
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the run saved in this checkpoint folder (the same run: checked).
    pub resume: Option<PathBuf>,
}

impl Default for HeadTrainConfig {
    fn default() -> Self {
        HeadTrainConfig {
            ttt_steps: 3,
            lr: 3e-4,
            warmup_steps: 20,
            steps: 200,
            batch: 4,
            grad_clip: 0.5,
            seed: 0,
            progress: true,
            log: None,
            select_k: None,
            selection: super::loss::Selection::Gap,
            checkpoint_every: 0,
            checkpoint_dir: None,
            resume: None,
        }
    }
}

/// Loss and greedy agreement of one sequence.
struct SeqLoss {
    loss: Tensor,
    /// Per TTT step: (agreeing positions, trained positions).
    agree: Vec<(f64, f64)>,
    /// Positions trained on and positions that could be (they differ under selection).
    selected: (f64, f64),
    /// With `detail` (evaluation): per TTT step, the rank of the target's argmax among the
    /// head's logits at every entry (0 = the head's own argmax; `u32::MAX` where the entry has
    /// no valid target), and the summed 1 − TV over the K + 1 bins.
    ranks: Vec<Vec<u32>>,
    overlap: Vec<f64>,
}

/// Cross-entropy of one TTT step's logits against the K + 1-bin teacher, per position (n).
fn step_ce(logits: &Tensor, ex: &HeadExample) -> Result<Tensor> {
    let lsm = log_softmax(logits)?; // (n, V_d)
    let lq = lsm.gather(&ex.tid, 1)?; // (n, K)
    let q_other = (1.0 - lq.exp()?.sum(1)?)?.clamp(1e-6, 1.0)?.log()?; // (n)
    Ok(((&ex.tp * &lq)?.sum(1)? + (&ex.other * q_other)?)?.neg()?)
}

/// `None` when no position of the sequence is trained (all masked). With `select` (a
/// reference head, k and the rule), each step trains only the top-k fraction of its valid
/// positions by ΔL = CE(head) − CE(reference) (or by −CE(reference)), the loss still divided by the number of valid positions
/// (AdaSPEC's normalisation).
fn seq_loss(
    model: &HeadModel,
    ex: &HeadExample,
    steps: usize,
    select: Option<(&HeadModel, f64, super::loss::Selection)>,
    detail: bool,
) -> Result<Option<SeqLoss>> {
    if ex.mask.sum_all()?.to_scalar::<f32>()? == 0.0 {
        return Ok(None);
    }
    let emb = ex.emb.to_dtype(DType::F32)?;
    let feat = ex.feat.to_dtype(DType::F32)?;
    let n = emb.dims()[0];
    let outs = model.forward_ttt(&emb, &feat, steps)?;
    let ref_outs = match select {
        Some((r, _, _)) => Some(r.forward_ttt(&emb, &feat, steps)?),
        None => None,
    };
    let mut total: Option<Tensor> = None;
    let mut agree = Vec::with_capacity(steps);
    let mut selected = (0.0, 0.0);
    let (mut ranks, mut overlap) = (Vec::new(), Vec::new());
    let mask_all = ex.mask.to_vec1::<f32>()?;
    let am = ex.argmax.to_vec1::<u32>()?;
    for (i, o) in outs.iter().enumerate() {
        // Step i's entries P < i have no valid input.
        let mut mask = mask_all.clone();
        for m in mask.iter_mut().take(i.min(n)) {
            *m = 0.0;
        }
        let count: f32 = mask.iter().sum();
        if detail {
            let (r, ov) = rank_and_overlap(&o.logits, ex, &mask)?;
            ranks.push(r);
            overlap.push(ov);
        }
        if count == 0.0 {
            agree.push((0.0, 0.0));
            continue;
        }
        let ce = step_ce(&o.logits, ex)?; // (n)
        let mut train_mask = mask.clone();
        if let (Some(refs), Some((_, k, selection))) = (&ref_outs, select) {
            let ce_ref = step_ce(&refs[i].logits.detach(), ex)?.to_vec1::<f32>()?;
            let ce_head = ce.detach().to_vec1::<f32>()?;
            let valid: Vec<usize> = (0..n).filter(|&p| mask[p] > 0.0).collect();
            let delta: Vec<f32> = match selection {
                super::loss::Selection::Gap => valid.iter().map(|&p| ce_head[p] - ce_ref[p]).collect(),
                super::loss::Selection::RefLoss => valid.iter().map(|&p| -ce_ref[p]).collect(),
            };
            let keep = super::loss::select_top_gap(&delta, k)?;
            for (&p, &kept) in valid.iter().zip(&keep) {
                train_mask[p] = kept;
            }
        }
        selected.0 += train_mask.iter().sum::<f32>() as f64;
        selected.1 += count as f64;
        let m = Tensor::from_vec(train_mask, n, &Device::Cpu)?;
        let l = ((ce * &m)?.sum_all()? / count as f64)?;
        let l = (l * 0.8f64.powi(i as i32))?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
        let pred = o.logits.argmax(1)?.to_vec1::<u32>()?;
        let hits: f32 = pred.iter().zip(&am).zip(&mask).map(|((p, a), m)| if p == a { *m } else { 0.0 }).sum();
        agree.push((hits as f64, count as f64));
    }
    Ok(total.map(|loss| SeqLoss { loss, agree, selected, ranks, overlap }))
}

/// Per entry, the rank of the target's argmax among `logits` (n, V_d) — how many draft tokens
/// the head scores strictly higher — or `u32::MAX` where `mask` is 0; and Σ over the valid
/// entries of 1 − TV between the head's distribution and the teacher, both coarsened to the
/// teacher's K + 1 bins (an upper bound on the exact overlap over the draft vocabulary, tight
/// when the "other" bin is small).
fn rank_and_overlap(logits: &Tensor, ex: &HeadExample, mask: &[f32]) -> Result<(Vec<u32>, f64)> {
    let tgt = logits.gather(&ex.argmax.unsqueeze(1)?, 1)?; // (n, 1)
    let above = logits.broadcast_gt(&tgt)?.to_dtype(DType::F32)?.sum(1)?.to_vec1::<f32>()?;
    let ranks = above.iter().zip(mask).map(|(&a, &m)| if m > 0.0 { a as u32 } else { u32::MAX }).collect();
    let q = log_softmax(logits)?.exp()?; // (n, V_d)
    let qk = q.gather(&ex.tid, 1)?; // (n, K)
    let q_other = (1.0 - qk.sum(1)?)?.clamp(0.0, 1.0)?;
    let kept = qk.minimum(&ex.tp)?.sum(1)?;
    let per = (kept + q_other.minimum(&ex.other)?)?.to_vec1::<f32>()?;
    Ok((ranks, per.iter().zip(mask).map(|(&o, &m)| (o * m) as f64).sum()))
}

/// Accepted draft tokens per start, measured rather than estimated: for every start P0 with a
/// valid target and `depth` entries of future in the sequence, the number of consecutive depths
/// j whose entry P0 + j (TTT step j: the head fed its own outputs along the target's tokens,
/// exactly as in a draft tree) ranks the target's token below `k` — a chain for k = 1, the path
/// through a full top-k tree of that depth otherwise. Returns (Σ accepted, starts).
pub(crate) fn accepted_runs(ranks: &[Vec<u32>], valid_start: &[f32], k: u32) -> (f64, f64) {
    let depth = ranks.len();
    let n = valid_start.len().saturating_sub(depth.saturating_sub(1));
    let (mut sum, mut starts) = (0.0, 0.0);
    for (p0, &valid) in valid_start.iter().enumerate().take(n) {
        if valid <= 0.0 || depth == 0 {
            continue;
        }
        starts += 1.0;
        sum += (0..depth).take_while(|&j| ranks[j].get(p0 + j).is_some_and(|&r| r < k)).count() as f64;
    }
    (sum, starts)
}

/// Held-out measures of a head on `val`, teacher-forced (the target's tokens, the head's own
/// hidden states at every TTT step, as along the accepted path of a draft tree).
#[derive(Debug, Clone, Default)]
pub struct HeadEval {
    /// Greedy agreement per TTT step: α_i = P(head argmax = target argmax | step i).
    pub alpha: Vec<f64>,
    /// The chain length under independence, 1 + Σ_d Π_{i<d} α_i (the estimate earlier reports
    /// used; [`HeadEval::tau`] measures it).
    pub tau_chain: f64,
    /// Mean loss per sequence (Σ_i 0.8^i · CE_i).
    pub loss: f64,
    /// 1 − TV per TTT step over the teacher's K + 1 bins (the acceptance rate of sampled drafts
    /// against a sampling target, over the draft vocabulary; an upper bound, see
    /// `rank_and_overlap`).
    pub one_minus_tv: Vec<f64>,
    /// (k, τ): tokens per target pass measured position by position ([`accepted_runs`]) for a
    /// chain of the TTT depth (k = 1) and full top-k trees of that depth (k = 2, 4).
    pub tau: Vec<(u32, f64)>,
    /// Start positions the τ values average over.
    pub starts: usize,
}

impl HeadEval {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "alpha": self.alpha,
            "tau_chain": self.tau_chain,
            "loss": self.loss,
            "one_minus_tv": self.one_minus_tv,
            "tau_measured": tau_json(&self.tau),
            "starts": self.starts,
        })
    }
}

/// Tree widths [`evaluate`] measures τ for.
pub const EVAL_TREE_K: [u32; 3] = [1, 2, 4];

/// Measured τ per tree width as JSON: `{"chain": τ(k = 1), "top2": …, "top4": …}`.
pub(crate) fn tau_json(tau: &[(u32, f64)]) -> serde_json::Value {
    tau.iter()
        .map(|(k, t)| (if *k == 1 { "chain".to_string() } else { format!("top{k}") }, serde_json::json!(t)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Σ accepted and starts per width of [`EVAL_TREE_K`], summed over sequences ([`accepted_runs`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct TauRuns([(f64, f64); EVAL_TREE_K.len()]);

impl TauRuns {
    pub(crate) fn add(&mut self, ranks: &[Vec<u32>], valid_start: &[f32]) {
        for (r, &k) in self.0.iter_mut().zip(&EVAL_TREE_K) {
            let (sum, starts) = accepted_runs(ranks, valid_start, k);
            r.0 += sum;
            r.1 += starts;
        }
    }

    /// (k, τ = 1 + accepted per start) per width.
    pub(crate) fn tau(&self) -> Vec<(u32, f64)> {
        EVAL_TREE_K.iter().zip(&self.0).map(|(&k, (sum, c))| (k, 1.0 + sum / c.max(1.0))).collect()
    }

    pub(crate) fn starts(&self) -> usize {
        self.0[0].1 as usize
    }
}

/// Evaluates `model` on `val` with `steps` TTT steps (see [`HeadEval`]).
pub fn evaluate(model: &HeadModel, val: &[HeadExample], steps: usize) -> Result<HeadEval> {
    let mut acc = vec![(0.0, 0.0); steps];
    let mut ov = vec![0.0; steps];
    let mut runs = TauRuns::default();
    let mut loss = 0.0;
    let mut n = 0usize;
    for ex in val {
        let Some(s) = seq_loss(model, ex, steps, None, true)? else { continue };
        n += 1;
        loss += s.loss.to_scalar::<f32>()? as f64;
        for (a, b) in acc.iter_mut().zip(&s.agree) {
            a.0 += b.0;
            a.1 += b.1;
        }
        for (a, b) in ov.iter_mut().zip(&s.overlap) {
            *a += b;
        }
        runs.add(&s.ranks, &ex.mask.to_vec1::<f32>()?);
    }
    let alpha: Vec<f64> = acc.iter().map(|(h, c)| if *c > 0.0 { h / c } else { 0.0 }).collect();
    let one_minus_tv = ov.iter().zip(&acc).map(|(o, (_, c))| if *c > 0.0 { o / c } else { 0.0 }).collect();
    let mut tau_chain = 1.0;
    let mut reach = 1.0;
    for a in &alpha {
        reach *= a;
        tau_chain += reach;
    }
    Ok(HeadEval {
        alpha,
        tau_chain,
        loss: loss / n.max(1) as f64,
        one_minus_tv,
        tau: runs.tau(),
        starts: runs.starts(),
    })
}

/// Trains `model` on `train`, evaluating on `val` at the start, every `eval_every` steps and at
/// the end. With `cfg.select_k`, `reference` (e.g. a head trained without selection: AdaSPEC's
/// stage 1) is required and each step trains on the selected positions only. Returns the JSON
/// records of the evaluations.
pub fn train_head(
    model: &HeadModel,
    reference: Option<&HeadModel>,
    train: &[HeadExample],
    val: &[HeadExample],
    cfg: &HeadTrainConfig,
    eval_every: usize,
) -> Result<Vec<serde_json::Value>> {
    let select = match (reference, cfg.select_k) {
        (Some(r), Some(k)) => {
            super::loss::check_k(k)?;
            Some((r, k, cfg.selection))
        }
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArg {
                name: "--reference",
                reason: "AdaSPEC selection (--k) needs a reference head, and a reference is only used with it".into(),
            })
        }
    };
    use super::head_checkpoint as ckpt;
    if cfg.checkpoint_every > 0 && cfg.checkpoint_dir.is_none() {
        return Err(Error::InvalidArg { name: "--checkpoint-every", reason: "needs a checkpoint folder".into() });
    }
    let tc = TrainConfig { beta1: 0.9, beta2: 0.95, weight_decay: 0.0, lr: cfg.lr, ..Default::default() };
    let mut opt = AdamW::new(model.named_vars(), &tc)?;
    let run = ckpt::HeadRunKey::new(cfg, train, select.map(|s| s.0))?;
    let resumed = match &cfg.resume {
        Some(dir) => Some(ckpt::restore(dir, model, &mut opt, &run)?),
        None => None,
    };
    // A fresh run starts a new metrics file; a resumed one appends to it.
    let mut log = match &cfg.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(resumed.is_some())
                .truncate(resumed.is_none())
                .open(p)
                .map_err(|e| Error::io(p, e))?,
        ),
        None => None,
    };
    let method = if select.is_some() { "head-adaspec" } else { "head" };
    let mut write = |v: &serde_json::Value| -> Result<()> {
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            writeln!(f, "{v}").map_err(|e| Error::io(cfg.log.clone().unwrap_or_default(), e))?;
        }
        Ok(())
    };
    let mut evals = Vec::new();
    let mut do_eval = |step: usize, write: &mut dyn FnMut(&serde_json::Value) -> Result<()>| -> Result<()> {
        let e = evaluate(model, val, cfg.ttt_steps)?;
        let mut v = e.to_json();
        v["kind"] = serde_json::json!("eval");
        v["step"] = serde_json::json!(step);
        // The metrics plot's validation series: depth-1 greedy agreement.
        v["val_alpha"] = serde_json::json!(e.alpha.first().copied().unwrap_or(0.0));
        tracing::info!("eval at step {step}: loss {:.4}, α per step {:.3?}, τ measured {:.2?}", e.loss, e.alpha, e.tau);
        write(&v)?;
        evals.push(v);
        Ok(())
    };
    let (start, mut cursor, mut tokens) = resumed.as_ref().map(|s| (s.step, s.cursor, s.tokens)).unwrap_or((0, 0, 0));
    if start == 0 {
        do_eval(0, &mut write)?;
    } else {
        tracing::info!("resumed at step {start} of {}", cfg.steps);
    }
    let order = super::data::permutation(train.len(), cfg.seed);
    let bar = progress_bar(cfg.steps, cfg.progress, "head train");
    bar.set_position(start as u64);
    let t0 = Instant::now();
    let tokens0 = tokens;
    for step in start + 1..=cfg.steps {
        let mut acc: Vec<Option<Tensor>> = vec![None; opt.params().len()];
        let mut loss_sum = 0.0;
        let mut sel = (0.0, 0.0);
        let mut phases = super::trainer::PhaseTimes::default();
        for _ in 0..cfg.batch {
            let ex = &train[order[cursor % order.len()]];
            cursor += 1;
            tokens += ex.emb.dims()[0];
            let tp = Instant::now();
            let Some(s) = seq_loss(model, ex, cfg.ttt_steps, select, false)? else { continue };
            loss_sum += s.loss.to_scalar::<f32>()? as f64;
            phases.forward_s += tp.elapsed().as_secs_f64();
            sel = (sel.0 + s.selected.0, sel.1 + s.selected.1);
            let tp = Instant::now();
            let grads = (s.loss / cfg.batch as f64)?.backward()?;
            accumulate(&grads, opt.params(), &mut acc)?;
            phases.backward_s += tp.elapsed().as_secs_f64();
        }
        let tp = Instant::now();
        let norm = clip_global_norm(&mut acc, cfg.grad_clip)?;
        let lr = if step <= cfg.warmup_steps { cfg.lr * step as f64 / cfg.warmup_steps as f64 } else { cfg.lr };
        opt.step(&acc, lr)?;
        phases.optimizer_s = tp.elapsed().as_secs_f64();
        let tps = (tokens - tokens0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let loss = loss_sum / cfg.batch as f64;
        write(
            &serde_json::json!({"kind": "train", "method": method, "step": step, "loss": loss, "grad_norm": norm, "lr": lr, "tokens": tokens, "tokens_per_s": tps, "selected_fraction": sel.0 / sel.1.max(1.0), "phases": phases.to_json()}),
        )?;
        bar.inc(1);
        bar.set_message(format!("loss {loss:.3} {tps:.0} tok/s"));
        if eval_every > 0 && step % eval_every == 0 && step < cfg.steps {
            do_eval(step, &mut write)?;
        }
        if let Some(dir) = cfg.checkpoint_dir.as_ref().filter(|_| cfg.checkpoint_every > 0) {
            if step % cfg.checkpoint_every == 0 || step == cfg.steps {
                let state = ckpt::HeadRunState { step, cursor, tokens, run: run.clone() };
                ckpt::save(&ckpt::step_dir(dir, step), model, &opt, &state)?;
            }
        }
    }
    bar.finish_and_clear();
    do_eval(cfg.steps, &mut write)?;
    if let Some(p) = &cfg.log {
        if let Err(e) = super::plot::write_metrics_svg(&p.with_extension("svg"), p) {
            tracing::warn!("no plot: {e}");
        }
    }
    Ok(evals)
}

#[cfg(test)]
mod tests {
    use super::accepted_runs;

    const X: u32 = u32::MAX;

    #[test]
    fn accepted_runs_follow_the_draft_path_and_stop_at_the_first_miss() {
        // Three TTT steps over six entries: step j's entry p0 + j is depth j of the draft from p0.
        let ranks = vec![
            vec![0, 0, 1, 0, X, 0], // step 0
            vec![X, 0, 0, 3, 0, 0], // step 1 (entry 0 has no input at step 1)
            vec![X, X, 0, 1, 0, 2], // step 2
        ];
        let valid = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        // Starts with 3 entries of future: 0..=3, all valid.
        // chain (k 1): p0 0: d0 ok (0), d1 entry 1 rank 0 ok, d2 entry 2 rank 0 ok → 3;
        // p0 1: d0 ok, d1 entry 2 ok, d2 entry 3 rank 1 miss → 2; p0 2: rank 1 miss → 0;
        // p0 3: d0 ok, d1 entry 4 ok, d2 entry 5 rank 2 miss → 2.
        assert_eq!(accepted_runs(&ranks, &valid, 1), (7.0, 4.0));
        // top-2: p0 2: d0 ok, d1 entry 3 rank 3 miss → 1; p0 1: d2 rank 1 ok → 3.
        assert_eq!(accepted_runs(&ranks, &valid, 2), (3.0 + 3.0 + 1.0 + 2.0, 4.0));
        // A start without a valid target is not counted; a sequence shorter than the depth has none.
        assert_eq!(accepted_runs(&ranks, &[0.0; 6], 1), (0.0, 0.0));
        assert_eq!(accepted_runs(&[vec![0, 0], vec![0, 0], vec![0, 0]], &[1.0, 1.0], 1), (0.0, 0.0));
    }
}
