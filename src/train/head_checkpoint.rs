//! Checkpoints of a head training run (`adaspec head train --checkpoint-every N`, `--resume`):
//! the head, the optimizer's moments and the position in the data order, written atomically
//! into `step-NNNNNN/` folders, and the check that a resumed run is the run that was saved.
//!
//! A checkpoint folder holds `head.safetensors` (+ `head.head.json`, a head checkpoint any
//! head command reads), `optimizer.safetensors` (AdamW's m and v) and `state.json`. Resuming
//! restores all of it; the data order is a pure function of the seed, so a resumed run is
//! bit-identical to an uninterrupted one. It never resumes a run that differs in anything that
//! shapes the trajectory: it names the difference instead. `--steps` may grow: the learning
//! rate is constant after warm-up, so a resumed run with more steps is the longer run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::head_model::HeadModel;
use super::head_train::{HeadExample, HeadTrainConfig};
use super::trainer::AdamW;

/// Everything that shapes a head run's trajectory (compared on resume; `steps` only has to
/// reach the checkpoint's step: a run can be resumed to train longer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadRunKey {
    pub ttt_steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub steps: usize,
    pub batch: usize,
    pub grad_clip: f64,
    pub seed: u64,
    /// AdaSPEC: k, the ranking rule and a hash of the reference head's weights (None: every
    /// valid position is trained).
    pub select: Option<(f64, String, String)>,
    /// Training sequences and a hash of their teacher tokens and masks.
    pub n_train: usize,
    pub data_hash: String,
}

impl HeadRunKey {
    pub fn new(cfg: &HeadTrainConfig, train: &[HeadExample], reference: Option<&HeadModel>) -> Result<HeadRunKey> {
        let select = match (cfg.select_k, reference) {
            (Some(k), Some(r)) => Some((k, cfg.selection.name().to_string(), format!("{:016x}", weights_hash(r)?))),
            _ => None,
        };
        Ok(HeadRunKey {
            ttt_steps: cfg.ttt_steps,
            lr: cfg.lr,
            warmup_steps: cfg.warmup_steps,
            steps: cfg.steps,
            batch: cfg.batch,
            grad_clip: cfg.grad_clip,
            seed: cfg.seed,
            select,
            n_train: train.len(),
            data_hash: format!("{:016x}", data_hash(train)?),
        })
    }

    /// Human-readable differences from `other` (the run being started).
    fn differences(&self, other: &HeadRunKey) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{name}: checkpoint {a}, now {b}"));
            }
        };
        cmp("--ttt", self.ttt_steps.to_string(), other.ttt_steps.to_string());
        cmp("--lr", self.lr.to_string(), other.lr.to_string());
        cmp("--warmup", self.warmup_steps.to_string(), other.warmup_steps.to_string());
        cmp("--batch", self.batch.to_string(), other.batch.to_string());
        cmp("gradient clip", self.grad_clip.to_string(), other.grad_clip.to_string());
        cmp("--seed", self.seed.to_string(), other.seed.to_string());
        let sel = |s: &Option<(f64, String, String)>| match s {
            Some((k, rule, r)) => format!("--k {k} --select-by {rule}, reference {r}"),
            None => "no selection".into(),
        };
        cmp("selection", sel(&self.select), sel(&other.select));
        cmp(
            "data",
            format!("{} sequences ({})", self.n_train, self.data_hash),
            format!("{} sequences ({})", other.n_train, other.data_hash),
        );
        d
    }
}

/// Where a run stands (saved in `state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadRunState {
    /// Optimizer steps done.
    pub step: usize,
    /// Sequences consumed from the data order.
    pub cursor: usize,
    /// Tokens trained on so far.
    pub tokens: usize,
    pub run: HeadRunKey,
}

/// FNV-1a over each sequence's length, mask and teacher argmax: cheap, and it changes with the
/// data, the draft vocabulary and the target.
fn data_hash(train: &[HeadExample]) -> Result<u64> {
    let mut h = super::data::Fnv64::default();
    for ex in train {
        h.write(&(ex.mask.dims()[0] as u64).to_le_bytes());
        for m in ex.mask.to_vec1::<f32>()? {
            h.write(&m.to_le_bytes());
        }
        for a in ex.argmax.to_vec1::<u32>()? {
            h.write(&a.to_le_bytes());
        }
    }
    Ok(h.finish())
}

/// FNV-1a over a head's weights in name order.
fn weights_hash(model: &HeadModel) -> Result<u64> {
    let mut h = super::data::Fnv64::default();
    for (name, v) in model.named_vars() {
        h.write(name.as_bytes());
        for x in v.as_tensor().flatten_all()?.to_vec1::<f32>()? {
            h.write(&x.to_le_bytes());
        }
    }
    Ok(h.finish())
}

/// The folder of the checkpoint after `step` under `dir`.
pub fn step_dir(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:06}"))
}

/// Writes the checkpoint folder `dir` atomically (a temp folder renamed into place; an older
/// folder of the same name is replaced).
pub fn save(dir: &Path, model: &HeadModel, opt: &AdamW, state: &HeadRunState) -> Result<()> {
    super::data::write_dir_atomic(dir, |tmp| {
        super::head::save_head(&tmp.join("head.safetensors"), model.config(), &model.to_weights()?)?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| Error::Checkpoint { path: tmp.to_path_buf(), reason: e.to_string() })?;
        super::data::write_atomic(&tmp.join("state.json"), json.as_bytes())
    })
}

/// Restores `model` and `opt` from the checkpoint folder `dir` of a run with key `run`;
/// returns its state. Refuses a checkpoint of another head shape or another run, naming what
/// differs.
pub fn restore(dir: &Path, model: &HeadModel, opt: &mut AdamW, run: &HeadRunKey) -> Result<HeadRunState> {
    let refuse = |reason: String| Error::InvalidArg { name: "--resume", reason };
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: HeadRunState = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint { path: sp.clone(), reason: format!("bad state.json: {e}") })?;
    let diff = state.run.differences(run);
    if !diff.is_empty() {
        return Err(refuse(format!("{} is a checkpoint of another run: {}", dir.display(), diff.join("; "))));
    }
    // The learning rate is constant after warm-up, so nothing before the last step depends on
    // --steps: a run resumed with more steps is the longer run, bit for bit.
    if state.step > run.steps {
        return Err(refuse(format!(
            "{} is at step {}, beyond --steps {}; pass --steps {} or more",
            dir.display(),
            state.step,
            run.steps,
            state.step
        )));
    }
    let (cfg, weights) = super::head::load_head(&dir.join("head.safetensors"))?;
    if &cfg != model.config() {
        return Err(refuse(format!("{} holds a head of another shape or vocabulary than --init", dir.display())));
    }
    model.set_weights(&weights)?;
    opt.load(&dir.join("optimizer.safetensors"), state.step)?;
    Ok(state)
}
