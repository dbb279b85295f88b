//! `adaspec head fspad`: train an FSPAD-family head for a GGUF target and write it as the
//! engine's `fspad` GGUF.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::data::{load_examples, split_validation, BadLines, TokenizeOptions};
use super::export::ExportType;
use super::fspad_model::FspadModel;
use super::fspad_train::{
    extract, fspad_config_for, init_fspad, load_fspad_gguf, target_lm, train_fspad, write_fspad_gguf, FspadTrainConfig,
};
use super::head_cli::{draft_vocab_for, HeadDataArgs};
use crate::backend::{Model, ModelParams};
use crate::fspad::Variant;

/// Which head: `fspad` (feature sampling + partial alignment), `eagle2` (the EAGLE-2-style
/// baseline), `fs` (feature sampling only) or `pad` (partial alignment only).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VariantArg {
    Fspad,
    Eagle2,
    Fs,
    Pad,
}

impl From<VariantArg> for Variant {
    fn from(v: VariantArg) -> Variant {
        match v {
            VariantArg::Fspad => Variant::Fspad,
            VariantArg::Eagle2 => Variant::Eagle2,
            VariantArg::Fs => Variant::FsOnly,
            VariantArg::Pad => Variant::PadOnly,
        }
    }
}

/// `adaspec head fspad --variant fspad --target T.gguf --data D.jsonl -o head.gguf`
#[derive(Debug, Args)]
pub struct FspadArgs {
    #[command(flatten)]
    pub input: HeadDataArgs,
    /// The head to train.
    #[arg(long, value_enum, default_value_t = VariantArg::Fspad)]
    pub variant: VariantArg,
    /// Continue from this `fspad` GGUF (its variant, shape and vocabulary) instead of a fresh
    /// head.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Reduced draft vocabulary: the N most frequent target tokens of --data, scored with the
    /// target's frozen LM-head rows (0 = the target's whole vocabulary, as the FSPAD code does;
    /// slower on CPUs, in training and at every draft step).
    #[arg(long, default_value_t = 32000)]
    pub draft_vocab: usize,
    /// FFN width of the decoder layer and of the feature-sampling MLP (default: the target's).
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Peak learning rate (AdamW 0.9/0.95; the FSPAD code's 5e-5 is for many epochs).
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Element-wise gradient value clip.
    #[arg(long, default_value_t = 0.5)]
    pub clip: f64,
    /// Input-feature noise: uniform of amplitude NOISE·512/L (0 = none).
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    /// Weight of the feature (SmoothL1) loss.
    #[arg(long, default_value_t = 1.0)]
    pub feature_weight: f64,
    /// Weight of the token (soft cross-entropy) loss.
    #[arg(long, default_value_t = 0.1)]
    pub token_weight: f64,
    /// Fraction of sequences held out for the evaluation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Draft depths of the held-out greedy agreement α.
    #[arg(long, default_value_t = 5)]
    pub depth: usize,
    /// Seed of the initial weights, example order, noise and validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// AdaSPEC on the token loss: a reference head (`fspad` GGUF of the same shape, e.g. one
    /// trained without selection); each step trains the --k fraction of positions picked by
    /// --select-by.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Fraction of positions AdaSPEC trains the token loss on, in (0, 1].
    #[arg(long, default_value_t = 0.4)]
    pub k: f64,
    /// `gap` (AdaSPEC: CE(head) − CE(reference), largest first) or `ref-loss`.
    #[arg(long, value_enum, default_value_t = crate::train::loss::Selection::Gap)]
    pub select_by: crate::train::loss::Selection,
    /// Weight type of the GGUF: f32, f16, q8_0, q4_0 or q4_k (vectors stay f32).
    #[arg(long = "type", value_enum, default_value_t = ExportType::Q8_0)]
    pub ty: ExportType,
    /// Output GGUF.
    #[arg(short, long)]
    pub output: PathBuf,
    /// JSONL metrics (one line per step).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `adaspec head fspad`.
pub fn run(a: &FspadArgs) -> anyhow::Result<()> {
    if a.input.cache.is_some() {
        anyhow::bail!("--cache holds eagle3 features; FSPAD heads read other features and extract them each run");
    }
    let target_path = &a.input.target;
    let target = std::sync::Arc::new(Model::load(target_path, &ModelParams::default())?);
    let (cfg, weights, lm, d2t) = match &a.init {
        Some(p) => {
            let (cfg, w, lm, d2t) = load_fspad_gguf(p).with_context(|| format!("loading {}", p.display()))?;
            let lm = match lm {
                Some(l) => l,
                None => target_lm(target_path, &[])?,
            };
            (cfg, w, lm, d2t)
        }
        None => {
            let cfg = fspad_config_for(target_path, a.variant.into(), a.ffn)?;
            let d2t = draft_vocab_for(target_path, &a.input.data, a.draft_vocab)?;
            let lm = target_lm(target_path, &d2t)?;
            (cfg.clone(), init_fspad(&cfg, a.seed)?, lm, d2t)
        }
    };
    if cfg.hidden != target.n_embd() || cfg.target_vocab != target.n_vocab() {
        anyhow::bail!("the head does not fit {} (hidden size or vocabulary)", target_path.display());
    }
    let reference = match &a.reference {
        Some(p) => {
            let (rc, rw, rlm, rd) = load_fspad_gguf(p).with_context(|| format!("loading {}", p.display()))?;
            if rc != cfg || rd != d2t {
                anyhow::bail!("--reference {} has another variant, shape or vocabulary", p.display());
            }
            Some(FspadModel::new(&rc, &rw, rlm.unwrap_or_else(|| lm.clone()))?)
        }
        None => None,
    };
    let opts = TokenizeOptions { chat: !a.input.raw, max_len: a.input.max_len, ..Default::default() };
    let (mut examples, stats) = load_examples(&target, &a.input.data, &opts, BadLines::Stop)?;
    tracing::info!("{} sequences ({stats:?})", examples.len());
    if a.input.max_examples > 0 {
        let order = super::data::permutation(examples.len(), a.seed ^ 0x5eed);
        examples = order.into_iter().take(a.input.max_examples).map(|i| examples[i].clone()).collect();
    }
    let (train, val) = split_validation(examples, a.val_fraction, a.seed)?;
    let t0 = std::time::Instant::now();
    let train = extract(&target, &train, a.input.n_threads(), true)?;
    let val = extract(&target, &val, a.input.n_threads(), true)?;
    let extract_s = t0.elapsed().as_secs_f64();
    let model = FspadModel::new(&cfg, &weights, lm.clone())?;
    let tc = FspadTrainConfig {
        lr: a.lr,
        warmup_steps: a.warmup,
        steps: a.steps,
        batch: a.batch,
        grad_clip_value: a.clip,
        feature_weight: a.feature_weight,
        token_weight: a.token_weight,
        noise: a.noise,
        select_k: a.reference.as_ref().map(|_| a.k),
        selection: a.select_by,
        seed: a.seed,
        progress: true,
        log: a.metrics.clone(),
    };
    let mut summary = train_fspad(&model, reference.as_ref(), &train, &val, &tc, a.depth)?;
    write_fspad_gguf(&cfg, &model.to_weights(), Some(&lm), &d2t, &a.output, target_path, a.ty)?;
    summary["output"] = serde_json::json!(a.output);
    summary["extract_seconds"] = serde_json::json!(extract_s);
    summary["train_sequences"] = serde_json::json!(train.len());
    summary["val_sequences"] = serde_json::json!(val.len());
    summary["draft_vocab"] = serde_json::json!(d2t.len());
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "wrote {} ({} head, {} steps, {:.0} tok/s); held-out greedy α per depth {}, τ(chain) ≈ {:.2}",
            a.output.display(),
            cfg.variant,
            a.steps,
            summary["train_tokens_per_s"].as_f64().unwrap_or(0.0),
            summary["alpha"],
            summary["tau_chain"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
