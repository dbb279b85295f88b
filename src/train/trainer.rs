//! The distillation loop: DistillSpec-style baselines (FKL, RKL, TVD, JSD over all valid
//! tokens) and AdaSPEC's selective stage 2 (SPEC §4), with AdamW, gradient-norm clipping,
//! gradient accumulation, LR schedules, freezing, atomic checkpoints and exact resume.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNN/` holding `model.safetensors` +
//! `config.json` (the draft), `optimizer.safetensors` (AdamW moments `m.<name>`/`v.<name>`)
//! and `state.json` (step, data position, optimizer step count, the training config). It is
//! written into a temp folder that is renamed into place, so a crash never leaves a partial
//! checkpoint. Resuming restores all of it; the data order is a pure function of (seed,
//! epoch), so the next step sees the same batch and gives the same loss as an uninterrupted run.
//!
//! This module never changes the teacher, the reference or the input files; it writes only
//! under the output folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::data::{epoch_order, write_atomic, Example, PaddedBatch};
use super::error::{Error, Result};
use super::gguf_import::{load_checkpoint, save_checkpoint};
use super::loss::{adaspec_loss, check_k, mean_loss, per_token_divergence_rows, Divergence, Selection};
use super::model::{Config, DraftModel, Trainable, Weights};
use super::teacher::{Teacher, TeacherMode};

/// Learning-rate schedule after the (optional) linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Constant (the paper's default).
    #[default]
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Cosine decay to 0 at the last step.
    Cosine,
}

/// Everything that defines a training run (saved in each checkpoint's `state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Per-token divergence.
    pub divergence: Divergence,
    /// AdaSPEC selection: keep the top-k fraction of tokens by ΔL = L_draft − L_ref (needs a
    /// reference model). `None`: all valid tokens (the DistillSpec baselines, stage 1).
    pub select_k: Option<f64>,
    /// How stage 2 ranks tokens for the top-k (default: AdaSPEC's gap; absent in older
    /// checkpoints, which used the gap).
    #[serde(default)]
    pub selection: Selection,
    /// Peak learning rate (default 3e-4).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (default 0.1), not applied to norms and biases (as HF Trainer).
    pub weight_decay: f64,
    /// Global gradient-norm clip (default 1.0; 0 = off).
    pub grad_clip: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps; 0 = `epochs` passes over the training data.
    pub steps: usize,
    /// Epochs when `steps` is 0.
    pub epochs: f64,
    pub schedule: LrSchedule,
    pub warmup_steps: usize,
    pub freeze_embeddings: bool,
    pub freeze_lm_head: bool,
    /// Blocks to train (`None` = all).
    pub train_blocks: Option<Vec<usize>>,
    /// Seed of the data order.
    pub seed: u64,
    /// Checkpoint every N optimizer steps (0 = only the final model).
    pub checkpoint_every: usize,
    /// Validation every N steps (0 = only before and after training).
    pub eval_every: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            divergence: Divergence::Fkl,
            select_k: None,
            selection: Selection::Gap,
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            batch_size: 8,
            grad_accum: 1,
            steps: 0,
            epochs: 1.0,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            freeze_embeddings: false,
            freeze_lm_head: false,
            train_blocks: None,
            seed: 0,
            checkpoint_every: 0,
            eval_every: 0,
            progress: true,
        }
    }
}

impl TrainConfig {
    /// Checks ranges; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(Error::InvalidArg { name, reason });
        if let Some(k) = self.select_k {
            check_k(k)?;
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", format!("must be > 0, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("--betas", format!("must be in [0, 1), got ({}, {})", self.beta1, self.beta2));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("--adam-eps", format!("must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--weight-decay", format!("must be >= 0, got {}", self.weight_decay));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad("--grad-clip", format!("must be >= 0, got {}", self.grad_clip));
        }
        if self.batch_size == 0 {
            return bad("--batch-size", "must be >= 1".into());
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum", "must be >= 1".into());
        }
        if self.steps == 0 && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return bad("--epochs", format!("must be > 0 when --steps is 0, got {}", self.epochs));
        }
        Ok(())
    }

    /// Optimizer steps for `n_train` training sequences.
    pub fn total_steps(&self, n_train: usize) -> usize {
        if self.steps > 0 {
            return self.steps;
        }
        let per_epoch = n_train.div_ceil(self.batch_size * self.grad_accum).max(1);
        ((per_epoch as f64 * self.epochs).ceil() as usize).max(1)
    }

    /// Learning rate of optimizer step `step` (1-based) out of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step.saturating_sub(self.warmup_steps + 1) as f64 / span).clamp(0.0, 1.0);
        match self.schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Linear => self.lr * (1.0 - progress),
            LrSchedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }

    /// The parameters this config trains.
    pub fn trainable(&self) -> Trainable {
        Trainable {
            embeddings: !self.freeze_embeddings,
            lm_head: !self.freeze_lm_head,
            final_norm: true,
            blocks: self.train_blocks.clone(),
        }
    }

    /// `fkl`, …, or `adaspec` (FKL with selection) / `adaspec-<div>`.
    pub fn method_name(&self) -> String {
        match (self.select_k, self.divergence) {
            (None, d) => d.name().to_string(),
            (Some(_), Divergence::Fkl) if self.selection == Selection::Gap => "adaspec".to_string(),
            (Some(_), d) if self.selection == Selection::Gap => format!("adaspec-{}", d.name()),
            (Some(_), d) => format!("adaspec-{}-{}", d.name(), self.selection.name()),
        }
    }
}

/// Where a run is in its data and optimizer (saved as `state.json` with the config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Current epoch and the number of its (shuffled) sequences already used.
    pub epoch: usize,
    pub pos: usize,
    /// Real tokens seen.
    pub tokens_seen: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    state: TrainState,
    config: TrainConfig,
    optimizer_step: usize,
    method: String,
    /// [`super::data::examples_hash`] of the training examples (0 in files from before it
    /// was recorded).
    #[serde(default)]
    data_hash: u64,
    /// The training teacher's mode (absent in older files).
    #[serde(default)]
    teacher: Option<TeacherMode>,
}

/// What differs between a checkpoint's run and this one in anything that shapes the training
/// trajectory (everything but how often it checkpoints, validates or shows progress).
fn resume_differences(old: &StateFile, cfg: &TrainConfig, data: &TrainData) -> Vec<String> {
    let mut d = Vec::new();
    let o = &old.config;
    macro_rules! same {
        ($($f:ident),+) => {
            $(if o.$f != cfg.$f {
                d.push(format!("{}: {:?} then, {:?} now", stringify!($f), o.$f, cfg.$f));
            })+
        };
    }
    same!(divergence, select_k, selection, lr, beta1, beta2, eps, weight_decay, grad_clip, batch_size, grad_accum);
    same!(steps, epochs, schedule, warmup_steps, freeze_embeddings, freeze_lm_head, train_blocks, seed);
    let hash = super::data::examples_hash(data.train);
    if old.data_hash != 0 && old.data_hash != hash {
        d.push(format!("training data: hash {:016x} then, {hash:016x} now", old.data_hash));
    }
    let mode = data.teacher_train.mode();
    if old.teacher.is_some_and(|t| t != mode) {
        d.push(format!("teacher: {:?} then, {mode:?} now", old.teacher));
    }
    d
}

/// One optimizer step's numbers (also a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    /// Mean over the micro-batches with loss positions of Σ selected L / n_valid.
    pub loss: f64,
    /// Selected tokens / valid tokens (1 without selection).
    pub selected_fraction: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Where the step's time went.
    pub phases: PhaseTimes,
}

/// Seconds of one optimizer step by phase: teacher rows (from the cache or memory), forward
/// (draft and reference logits and the loss), backward (gradients and their accumulation),
/// optimizer (norm clip and AdamW).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub teacher_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

impl PhaseTimes {
    /// JSON object with the four phases.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"teacher_s": self.teacher_s, "forward_s": self.forward_s, "backward_s": self.backward_s, "optimizer_s": self.optimizer_s})
    }
}

/// A validation pass (also a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLog {
    pub step: usize,
    /// Mean forward KL(p ‖ q) over the validation response tokens.
    pub val_kl: f64,
    /// Greedy agreement argmax q == argmax p, teacher-forced.
    pub val_alpha: f64,
    /// Mean of the run's own divergence (the training objective without selection).
    pub val_div: f64,
    pub val_tokens: usize,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    /// `out_dir/model.safetensors` (with `config.json` next to it).
    pub final_model: PathBuf,
    pub checkpoints: Vec<PathBuf>,
}

/// The training sequences, validation sequences and a teacher for each list.
pub struct TrainData<'a> {
    pub train: &'a [Example],
    pub val: &'a [Example],
    pub teacher_train: &'a Teacher,
    pub teacher_val: &'a Teacher,
}

/// Adds the gradients of `params` in `grads` into `acc` (one slot per parameter).
pub(crate) fn accumulate(
    grads: &candle_core::backprop::GradStore,
    params: &[(String, Var)],
    acc: &mut [Option<Tensor>],
) -> Result<()> {
    for (i, (_, p)) in params.iter().enumerate() {
        if let Some(g) = grads.get(p.as_tensor()) {
            acc[i] = Some(match acc[i].take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// The global gradient norm of `acc`, which is scaled down to `clip` when above it (0 = off).
pub(crate) fn clip_global_norm(acc: &mut [Option<Tensor>], clip: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in acc.iter().flatten() {
        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if clip > 0.0 && norm > clip {
        let scale = clip / (norm + 1e-6);
        for g in acc.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// AdamW with decoupled weight decay (PyTorch's `AdamW` update), state kept so checkpoints
/// can hold it.
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with(".bias"))
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<AdamW> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (_, p) in &params {
            m.push(p.as_tensor().zeros_like()?);
            v.push(p.as_tensor().zeros_like()?);
        }
        Ok(AdamW {
            params,
            m,
            v,
            t: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with gradients `grads[i]` for `params[i]` (None = no gradient: skipped).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, (name, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(|g| g.as_ref()) else { continue };
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mhat = (&m / bc1)?;
            let vhat = (&v / bc2)?;
            let update = (mhat / (vhat.sqrt()? + self.eps)?)?;
            let theta = p.as_tensor();
            let theta = if decays(name) && self.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.weight_decay))?
            } else {
                theta.clone()
            };
            p.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut map = std::collections::HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: format!("cannot write: {e}") })
    }

    pub(crate) fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: format!("cannot read: {e}") })?;
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (slot, prefix) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                let key = format!("{prefix}.{name}");
                let t = map.get(&key).ok_or_else(|| Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "missing optimizer tensor {key} (was the run started with other --freeze/--train-blocks?)"
                    ),
                })?;
                if t.dims() != p.as_tensor().dims() {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!("{key} has shape {:?}, expected {:?}", t.dims(), p.as_tensor().dims()),
                    });
                }
                *slot = t.to_dtype(p.as_tensor().dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Draft logits at the loss positions of `batch`, (n_loss, vocab). The LM head runs on the
/// selected hidden states only (prompt and padding positions never pay for the vocabulary
/// projection); the result is the same as selecting rows of the full logits.
pub fn batch_logits(model: &DraftModel, batch: &PaddedBatch) -> Result<Tensor> {
    let dev = model.device();
    let ids = Tensor::from_vec(batch.ids.clone(), (batch.batch, batch.seq), dev)?;
    let attn = Tensor::from_vec(batch.attention.clone(), (batch.batch, batch.seq), dev)?;
    let rows: Vec<u32> = batch.loss_rows.iter().map(|&r| r as u32).collect();
    let rows = Tensor::from_vec(rows, batch.loss_rows.len(), dev)?;
    let hidden = model.forward_hidden(&ids, Some(&attn))?; // (batch, seq, hidden)
    let h = hidden.dim(2)?;
    let sel = hidden.reshape((batch.batch * batch.seq, h))?.index_select(&rows, 0)?; // (n_loss, hidden)
    Ok(model.head_logits(&sel)?.to_dtype(DType::F32)?)
}

/// Teacher-forced validation: mean FKL and greedy agreement over `examples`' response tokens.
pub fn validate_model(
    model: &DraftModel,
    examples: &[Example],
    teacher: &Teacher,
    div: Divergence,
    batch_size: usize,
    step: usize,
) -> Result<EvalLog> {
    let (mut kl, mut dv, mut agree, mut n) = (0.0f64, 0.0f64, 0usize, 0usize);
    let idx: Vec<usize> = (0..examples.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let batch = PaddedBatch::new(examples, chunk, 0)?;
        if batch.loss_rows.is_empty() {
            continue;
        }
        let logits = batch_logits(model, &batch)?.detach();
        let rows = batch.loss_rows.len();
        let t = teacher.rows(examples, &batch, logits.device())?;
        let per = per_token_divergence_rows(Divergence::Fkl, &t, &logits)?;
        kl += per.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        dv += if div == Divergence::Fkl {
            per.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?
        } else {
            per_token_divergence_rows(div, &t, &logits)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?
        };
        let a = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let b = t.argmax()?;
        agree += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        n += rows;
    }
    let d = n.max(1) as f64;
    Ok(EvalLog { step, val_kl: kl / d, val_alpha: agree as f64 / d, val_div: dv / d, val_tokens: n })
}

fn next_indices(state: &mut TrainState, n: usize, bs: usize, seed: u64) -> Vec<usize> {
    let order = epoch_order(n, seed, state.epoch);
    let end = (state.pos + bs).min(n);
    let out = order[state.pos..end].to_vec();
    state.pos = end;
    if state.pos >= n {
        state.epoch += 1;
        state.pos = 0;
    }
    out
}

/// Checks the draft against the teacher and the reference before anything is written.
pub fn check_compat(init: &Config, reference: Option<&Config>, teacher_vocab: usize) -> Result<()> {
    if init.vocab_size != teacher_vocab {
        return Err(Error::InvalidArg {
            name: "--draft",
            reason: format!(
                "draft vocab size {} != target vocab size {teacher_vocab}: draft and target must share a tokenizer",
                init.vocab_size
            ),
        });
    }
    if let Some(r) = reference {
        if r.vocab_size != init.vocab_size {
            return Err(Error::InvalidArg {
                name: "--reference",
                reason: format!("reference vocab size {} != draft vocab size {}", r.vocab_size, init.vocab_size),
            });
        }
    }
    Ok(())
}

/// Trains `init` against the teacher. With `cfg.select_k`, `reference` (the stage-1 model) is
/// required. `resume` is a checkpoint folder of an earlier run with the same config.
pub fn train(
    cfg: &TrainConfig,
    init: (Config, Weights),
    reference: Option<(Config, Weights)>,
    data: &TrainData,
    out_dir: &Path,
    resume: Option<&Path>,
) -> Result<TrainReport> {
    cfg.validate()?;
    if cfg.select_k.is_some() != reference.is_some() {
        return Err(Error::InvalidArg {
            name: "--reference",
            reason: "AdaSPEC selection (--k) needs a reference model, and a reference is only used with it".into(),
        });
    }
    if data.train.is_empty() {
        return Err(Error::InvalidArg { name: "--data", reason: "no training examples".into() });
    }
    check_compat(&init.0, reference.as_ref().map(|r| &r.0), data.teacher_train.n_vocab())?;
    let dev = Device::Cpu;
    let mut state = TrainState::default();
    let mut opt_t = 0;
    let (cfg0, weights0) = match resume {
        None => init,
        Some(dir) => {
            let sf = read_state(dir)?;
            let differences = resume_differences(&sf, cfg, data);
            if !differences.is_empty() {
                return Err(Error::InvalidArg {
                    name: "--resume",
                    reason: format!(
                        "{} was written by another run ({} then, {} now); differs in {}",
                        dir.display(),
                        sf.method,
                        cfg.method_name(),
                        differences.join("; ")
                    ),
                });
            }
            let (c, w) = load_checkpoint(&dir.join("model.safetensors"))?;
            if c != init.0 {
                return Err(Error::InvalidArg {
                    name: "--resume",
                    reason: format!("{}: model config differs from the draft being trained", dir.display()),
                });
            }
            state = sf.state;
            opt_t = sf.optimizer_step;
            (c, w)
        }
    };
    let spec = cfg.trainable();
    // Frozen parameters stay plain tensors: no gradient is computed for them.
    let model = DraftModel::from_weights_partial(&cfg0, weights0, DType::F32, &dev, &spec)?;
    let ref_model = match reference {
        Some((c, w)) => Some(DraftModel::inference(&c, w, DType::F32, &dev)?),
        None => None,
    };
    // The model's Vars are exactly the parameters `spec` allows.
    let params: Vec<(String, Var)> = model.named_vars().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    if params.is_empty() {
        return Err(Error::InvalidArg {
            name: "--train-blocks",
            reason: "nothing left to train after freezing".into(),
        });
    }
    let mut opt = AdamW::new(params, cfg)?;
    if let Some(dir) = resume {
        opt.load(&dir.join("optimizer.safetensors"), opt_t)?;
    }

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    // A fresh run starts a new metrics file; a resumed one appends to it.
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(resume.is_some())
        .write(true)
        .truncate(resume.is_none())
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut log_line =
        |v: serde_json::Value| -> Result<()> { writeln!(metrics, "{v}").map_err(|e| Error::io(&metrics_path, e)) };

    let total = cfg.total_steps(data.train.len());
    let mut report = TrainReport {
        steps: Vec::new(),
        evals: Vec::new(),
        final_model: out_dir.join("model.safetensors"),
        checkpoints: Vec::new(),
    };
    let eval_bs = cfg.batch_size;
    if state.step == 0 && !data.val.is_empty() {
        let e = validate_model(&model, data.val, data.teacher_val, cfg.divergence, eval_bs, 0)?;
        log_line(
            serde_json::json!({"kind": "val", "method": cfg.method_name(), "step": e.step, "val_kl": e.val_kl, "val_alpha": e.val_alpha, "val_div": e.val_div, "val_tokens": e.val_tokens}),
        )?;
        report.evals.push(e);
    }
    let bar = if cfg.progress {
        super::teacher::progress(&cfg.method_name(), total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(state.step as u64);
    let start = Instant::now();
    let mut tokens_since = 0usize;
    while state.step < total {
        let t0 = Instant::now();
        let mut acc: Vec<Option<Tensor>> = vec![None; opt.params().len()];
        let (mut loss_sum, mut sel, mut valid, mut tokens, mut used) = (0.0f64, 0usize, 0usize, 0usize, 0usize);
        let mut phases = PhaseTimes::default();
        for _ in 0..cfg.grad_accum {
            let idx = next_indices(&mut state, data.train.len(), cfg.batch_size, cfg.seed);
            let batch = PaddedBatch::new(data.train, &idx, 0)?;
            if batch.loss_rows.is_empty() {
                continue;
            }
            let tp = Instant::now();
            let logp = data.teacher_train.rows(data.train, &batch, &dev)?;
            phases.teacher_s += tp.elapsed().as_secs_f64();
            let tp = Instant::now();
            let logits = batch_logits(&model, &batch)?;
            let out = match (&ref_model, cfg.select_k) {
                (Some(r), Some(k)) => {
                    let ref_logits = batch_logits(r, &batch)?.detach();
                    adaspec_loss(cfg.divergence, &logp, &logits, &ref_logits, k, cfg.selection)?
                }
                _ => mean_loss(cfg.divergence, &logp, &logits)?,
            };
            loss_sum += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            phases.forward_s += tp.elapsed().as_secs_f64();
            used += 1;
            sel += out.n_selected;
            valid += out.n_valid;
            tokens += batch.n_tokens();
            let tp = Instant::now();
            let grads = (out.loss / cfg.grad_accum as f64)?.backward()?;
            accumulate(&grads, opt.params(), &mut acc)?;
            phases.backward_s += tp.elapsed().as_secs_f64();
        }
        let tp = Instant::now();
        let grad_norm = clip_global_norm(&mut acc, cfg.grad_clip)?;
        let lr = cfg.lr_at(state.step + 1, total);
        opt.step(&acc, lr)?;
        phases.optimizer_s = tp.elapsed().as_secs_f64();
        state.step += 1;
        state.tokens_seen += tokens as u64;
        tokens_since += tokens;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        let log = StepLog {
            step: state.step,
            // The mean over the micro-batches that had loss positions.
            loss: loss_sum / used.max(1) as f64,
            selected_fraction: if valid > 0 { sel as f64 / valid as f64 } else { 0.0 },
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / dt,
            elapsed_s: start.elapsed().as_secs_f64(),
            phases,
        };
        log_line(
            serde_json::json!({"kind": "train", "method": cfg.method_name(), "step": log.step, "loss": log.loss, "selected_fraction": log.selected_fraction, "lr": log.lr, "grad_norm": log.grad_norm, "tokens": log.tokens, "tokens_per_s": log.tokens_per_s, "elapsed_s": log.elapsed_s, "phases": log.phases.to_json()}),
        )?;
        bar.set_message(format!(
            "loss {:.4} sel {:.2} {:.0} tok/s",
            log.loss,
            log.selected_fraction,
            tokens_since as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ));
        bar.inc(1);
        tracing::debug!(step = log.step, loss = log.loss, "train step");
        report.steps.push(log);
        if cfg.checkpoint_every > 0 && state.step % cfg.checkpoint_every == 0 && state.step < total {
            let dir = out_dir.join("checkpoints").join(format!("step-{:06}", state.step));
            save_train_checkpoint(&dir, &model, &opt, &state, cfg, data)?;
            report.checkpoints.push(dir);
        }
        if cfg.eval_every > 0 && state.step % cfg.eval_every == 0 && state.step < total && !data.val.is_empty() {
            let e = validate_model(&model, data.val, data.teacher_val, cfg.divergence, eval_bs, state.step)?;
            log_line(
                serde_json::json!({"kind": "val", "method": cfg.method_name(), "step": e.step, "val_kl": e.val_kl, "val_alpha": e.val_alpha, "val_div": e.val_div, "val_tokens": e.val_tokens}),
            )?;
            report.evals.push(e);
        }
    }
    bar.finish_and_clear();
    if !data.val.is_empty() {
        let e = validate_model(&model, data.val, data.teacher_val, cfg.divergence, eval_bs, state.step)?;
        log_line(
            serde_json::json!({"kind": "val", "method": cfg.method_name(), "step": e.step, "val_kl": e.val_kl, "val_alpha": e.val_alpha, "val_div": e.val_div, "val_tokens": e.val_tokens}),
        )?;
        report.evals.push(e);
    }
    if cfg.checkpoint_every > 0 {
        let dir = out_dir.join("checkpoints").join(format!("step-{:06}", state.step));
        save_train_checkpoint(&dir, &model, &opt, &state, cfg, data)?;
        report.checkpoints.push(dir);
    }
    save_checkpoint(&report.final_model, model.config(), &model.to_weights()?)?;
    if let Err(e) = super::plot::write_metrics_svg(&out_dir.join("metrics.svg"), &metrics_path) {
        tracing::warn!("no plot: {e}");
    }
    Ok(report)
}

fn read_state(dir: &Path) -> Result<StateFile> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint { path: p, reason: format!("bad state.json: {e}") })
}

/// Writes a checkpoint folder atomically (temp folder, then rename; an older folder of the
/// same step is replaced).
fn save_train_checkpoint(
    dir: &Path,
    model: &DraftModel,
    opt: &AdamW,
    state: &TrainState,
    cfg: &TrainConfig,
    data: &TrainData,
) -> Result<()> {
    super::data::write_dir_atomic(dir, |tmp| {
        save_checkpoint(&tmp.join("model.safetensors"), model.config(), &model.to_weights()?)?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        let sf = StateFile {
            state: state.clone(),
            config: cfg.clone(),
            optimizer_step: opt.t,
            method: cfg.method_name(),
            data_hash: super::data::examples_hash(data.train),
            teacher: Some(data.teacher_train.mode()),
        };
        let json = serde_json::to_string_pretty(&sf)
            .map_err(|e| Error::Checkpoint { path: tmp.to_path_buf(), reason: e.to_string() })?;
        write_atomic(&tmp.join("state.json"), json.as_bytes())
    })
}

/// Both AdaSPEC stages: stage 1 trains a reference with `stage1` (forward KL, all tokens)
/// from `init` into `out_dir/reference`, stage 2 trains `init` again with selection against
/// that reference into `out_dir/adaspec`. Returns both reports.
pub fn train_adaspec(
    stage1: &TrainConfig,
    stage2: &TrainConfig,
    init: (Config, Weights),
    data: &TrainData,
    out_dir: &Path,
) -> Result<(TrainReport, TrainReport)> {
    if stage2.select_k.is_none() || stage1.select_k.is_some() {
        return Err(Error::InvalidArg {
            name: "--k",
            reason: "stage 1 trains without selection and stage 2 with a k in (0, 1]".into(),
        });
    }
    stage1.validate()?;
    stage2.validate()?;
    check_compat(&init.0, None, data.teacher_train.n_vocab())?;
    let init2 = (init.0.clone(), copy_weights(&init.1)?);
    let r1 = train(stage1, init, None, data, &out_dir.join("reference"), None)?;
    let reference = load_checkpoint(&r1.final_model)?;
    let r2 = train(stage2, init2, Some(reference), data, &out_dir.join("adaspec"), None)?;
    Ok((r1, r2))
}

fn copy_weights(w: &Weights) -> Result<Weights> {
    w.iter().map(|(k, v)| Ok((k.clone(), v.copy()?))).collect()
}
