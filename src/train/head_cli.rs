//! `adaspec head …`: heads in the EAGLE-3 layout for a user's own GGUF target.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::data::{read_records, BadLines};
use super::export::ExportType;
use super::head::{head_config_for, init_head, save_head, top_vocab, write_head_gguf};
use crate::backend::{Model, ModelParams};

/// `adaspec head …`
#[derive(Debug, Args)]
pub struct HeadArgs {
    #[command(subcommand)]
    pub command: HeadCommand,
}

/// Subcommands of `adaspec head`.
#[derive(Debug, Subcommand)]
pub enum HeadCommand {
    /// Make an untrained head shaped for a target (EAGLE-3 layout, llama.cpp's `eagle3` GGUF).
    Init(HeadInitArgs),
    /// Train a head on the target's own features and distributions (EAGLE-3 training-time test).
    Train(HeadTrainArgs),
    /// Train an FSPAD-family head (FSPAD, its EAGLE-2-style baseline or an ablation) as the
    /// FSPAD code does, and write it as an `fspad` GGUF the engine drafts with.
    Fspad(super::fspad_cli::FspadArgs),
    /// Measure a head checkpoint on data: teacher-forced greedy agreement with the target per
    /// TTT step (α), the chain length it implies (τ) and the loss.
    Eval(HeadEvalArgs),
}

/// The target and the data a head is trained or measured on (shared by `head train` and
/// `head eval`).
#[derive(Debug, Args)]
pub struct HeadDataArgs {
    /// The target GGUF (features and teacher distributions come from it, through llama.cpp).
    #[arg(long)]
    pub target: PathBuf,
    /// Data (JSONL with responses: the formats `adaspec train` reads); loss and agreement on
    /// the fixed response tokens only.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// No chat template around prompts (default: the target's template).
    #[arg(long)]
    pub raw: bool,
    /// Longest sequence (prompt + response) in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Most sequences to use (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_examples: usize,
    /// Cache of the extracted target features and teacher (safetensors); reused when present.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// CPU threads for the target (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

/// `adaspec head eval --target T.gguf --head head.safetensors --data D.jsonl [--ttt 3] [--json]`
#[derive(Debug, Args)]
pub struct HeadEvalArgs {
    #[command(flatten)]
    pub input: HeadDataArgs,
    /// The head: a checkpoint of `adaspec head init --checkpoint` or `adaspec head train`.
    #[arg(long)]
    pub head: PathBuf,
    /// TTT steps to measure (α of step i: the head drafting i tokens ahead on its own outputs).
    #[arg(long, default_value_t = 3)]
    pub ttt: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `adaspec head train --target T.gguf --init head.safetensors --data D.jsonl -o trained.safetensors --export head.gguf`
#[derive(Debug, Args)]
pub struct HeadTrainArgs {
    #[command(flatten)]
    pub input: HeadDataArgs,
    /// The head to start from: a checkpoint of `adaspec head init --checkpoint` or of an
    /// earlier `head train`.
    #[arg(long)]
    pub init: PathBuf,
    /// Fraction of sequences held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Unrolled training-time-test steps (EAGLE-3 uses 7).
    #[arg(long, default_value_t = 3)]
    pub ttt: usize,
    /// Peak learning rate (AdamW 0.9/0.95, no weight decay, norm clip 0.5).
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Evaluate every N steps (0 = only at the start and end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Seed of the example order and the validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// AdaSPEC: a reference head (checkpoint, e.g. one trained without selection from the same
    /// --init); each step then trains only the --k fraction of positions where the head trails
    /// the reference most.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Fraction of positions AdaSPEC trains on, in (0, 1] (with --reference).
    #[arg(long, default_value_t = 0.4)]
    pub k: f64,
    /// How the top k are ranked: `gap` (AdaSPEC: CE(head) − CE(reference), largest first) or
    /// `ref-loss` (the positions the reference fits best).
    #[arg(long, value_enum, default_value_t = crate::train::loss::Selection::Gap)]
    pub select_by: crate::train::loss::Selection,
    /// Output checkpoint (safetensors; config in NAME.head.json).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also export the trained head as an eagle3 GGUF.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Weight type of --export: f32, f16, q8_0, q4_0 or q4_k.
    #[arg(long = "type", value_enum, default_value_t = ExportType::Q8_0)]
    pub ty: ExportType,
    /// JSONL metrics (one line per step and per evaluation); the plot of them (training loss,
    /// held-out depth-1 α, selected fraction) is written next to it as NAME.svg.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Write a checkpoint (head, optimizer state, position in the data) every N steps and after
    /// the last, into OUTPUT's stem + `.checkpoints/step-NNNNNN/` (0 = none).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue from a checkpoint folder of `--checkpoint-every` (same data, learning rate,
    /// warm-up, batch, TTT steps, seed, and selection with the same reference head: a differing
    /// run is refused, naming the difference). The result is bit-identical to an uninterrupted
    /// run. --steps may be raised to train a finished run longer (the learning rate is constant
    /// after warm-up, so that is the longer run, bit for bit).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `adaspec head init --target T.gguf [--data D.jsonl] [--draft-vocab N] [--ffn N] -o head.gguf`
#[derive(Debug, Args)]
pub struct HeadInitArgs {
    /// The target GGUF the head drafts for (its hidden size, heads, RoPE base, layer count,
    /// tokenizer and LM head are read from it).
    #[arg(long)]
    pub target: PathBuf,
    /// JSONL data whose token frequencies choose the reduced draft vocabulary (the formats
    /// `adaspec train` reads; prompts and responses are both counted).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Size of the reduced draft vocabulary (EAGLE-3 uses 32000): the most frequent target
    /// tokens of --data, with the head's own LM head over them initialised from the target's.
    /// 0 = the target's whole vocabulary and its LM head, shared at run time.
    #[arg(long, default_value_t = 32000)]
    pub draft_vocab: usize,
    /// FFN width of the head's decoder layer (default: the target's).
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Weight type of the GGUF: f32, f16, q8_0, q4_0 or q4_k (norms stay f32).
    #[arg(long = "type", value_enum, default_value_t = ExportType::F16)]
    pub ty: ExportType,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output GGUF.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also save a training checkpoint (safetensors, config in NAME.head.json).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `adaspec head …`.
pub fn run(args: &HeadArgs) -> anyhow::Result<()> {
    match &args.command {
        HeadCommand::Init(a) => run_init(a),
        HeadCommand::Train(a) => run_train(a),
        HeadCommand::Eval(a) => run_eval(a),
        HeadCommand::Fspad(a) => super::fspad_cli::run(a),
    }
}

impl HeadDataArgs {
    pub(crate) fn n_threads(&self) -> i32 {
        if self.threads > 0 {
            self.threads
        } else {
            crate::backend::default_threads()
        }
    }
}

/// A head checkpoint, the target it was made for and examples of data, all checked.
struct HeadInputs {
    cfg: super::head::HeadConfig,
    weights: super::model::Weights,
    target: std::sync::Arc<Model>,
    examples: Vec<super::data::Example>,
}

fn head_inputs(head: &std::path::Path, d: &HeadDataArgs, seed: u64) -> anyhow::Result<HeadInputs> {
    use super::data::{load_examples, TokenizeOptions};
    let (cfg, weights) =
        super::head::load_head(head).with_context(|| format!("loading the head {}", head.display()))?;
    let target_path = &d.target;
    let target = std::sync::Arc::new(Model::load(target_path, &ModelParams::default())?);
    if target.n_embd() != cfg.target_hidden_size || target.n_vocab() != cfg.target_vocab {
        anyhow::bail!(
            "{} was made for a target of hidden size {} and vocabulary {}, {} has {} and {}",
            head.display(),
            cfg.target_hidden_size,
            cfg.target_vocab,
            target_path.display(),
            target.n_embd(),
            target.n_vocab()
        );
    }
    let opts = TokenizeOptions { chat: !d.raw, max_len: d.max_len, ..Default::default() };
    let (mut examples, stats) = load_examples(&target, &d.data, &opts, BadLines::Stop)?;
    tracing::info!("{} sequences ({stats:?})", examples.len());
    if d.max_examples > 0 {
        let order = super::data::permutation(examples.len(), seed ^ 0x5eed);
        let keep: Vec<_> = order.into_iter().take(d.max_examples).map(|i| examples[i].clone()).collect();
        examples = keep;
    }
    Ok(HeadInputs { cfg, weights, target, examples })
}

fn run_eval(a: &HeadEvalArgs) -> anyhow::Result<()> {
    use super::head_model::HeadModel;
    use super::head_train::{evaluate, extract};
    if a.ttt == 0 {
        anyhow::bail!("--ttt must be at least 1");
    }
    let inp = head_inputs(&a.head, &a.input, 0)?;
    let feats = extract(&inp.target, &inp.cfg, &inp.examples, a.input.n_threads(), a.input.cache.as_deref(), true)?;
    if feats.is_empty() {
        anyhow::bail!("no usable sequences in the data");
    }
    let model = HeadModel::new(&inp.cfg, &inp.weights)?;
    let e = evaluate(&model, &feats, a.ttt)?;
    if a.json {
        let mut v = e.to_json();
        v["head"] = serde_json::json!(a.head);
        v["sequences"] = serde_json::json!(feats.len());
        println!("{v}");
    } else {
        let f = |x: &[f64]| x.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(" / ");
        let tau: Vec<String> = e
            .tau
            .iter()
            .map(|(k, t)| if *k == 1 { format!("chain {t:.2}") } else { format!("top-{k} tree {t:.2}") })
            .collect();
        println!(
            "{} on {} sequences ({} draft starts):\n  greedy α per TTT step {}\n  1 − TV per TTT step {}\n  \
             τ measured (depth {}): {}; under independence {:.2}\n  loss {:.3}",
            a.head.display(),
            feats.len(),
            e.starts,
            f(&e.alpha),
            f(&e.one_minus_tv),
            a.ttt,
            tau.join(", "),
            e.tau_chain,
            e.loss
        );
    }
    Ok(())
}

fn run_train(a: &HeadTrainArgs) -> anyhow::Result<()> {
    if a.reference.is_none() && a.select_by != crate::train::loss::Selection::Gap {
        anyhow::bail!("--select-by {} needs --reference (AdaSPEC selection)", a.select_by.name());
    }
    use super::data::split_validation;
    use super::head::load_head;
    use super::head_model::HeadModel;
    use super::head_train::{extract, train_head, HeadTrainConfig};
    let ty = a.ty;
    let HeadInputs { cfg, weights, target, examples } = head_inputs(&a.init, &a.input, a.seed)?;
    let (train, val) = split_validation(examples, a.val_fraction, a.seed)?;
    tracing::info!("{} training and {} validation sequences", train.len(), val.len());
    let all: Vec<_> = train.iter().chain(&val).cloned().collect();
    let mut feats = extract(&target, &cfg, &all, a.input.n_threads(), a.input.cache.as_deref(), true)?;
    if feats.len() != all.len() {
        anyhow::bail!("{} of {} sequences were usable (too short ones are skipped)", feats.len(), all.len());
    }
    let val_feats = feats.split_off(train.len());
    let model = HeadModel::new(&cfg, &weights)?;
    let reference = match &a.reference {
        Some(p) => {
            let (rc, rw) = load_head(p).with_context(|| format!("loading the reference head {}", p.display()))?;
            if rc != cfg {
                anyhow::bail!("--reference {} has another shape or vocabulary than --init", p.display());
            }
            Some(HeadModel::new(&rc, &rw)?)
        }
        None => None,
    };
    let tc = HeadTrainConfig {
        ttt_steps: a.ttt,
        lr: a.lr,
        warmup_steps: a.warmup,
        steps: a.steps,
        batch: a.batch,
        seed: a.seed,
        log: a.metrics.clone(),
        select_k: a.reference.as_ref().map(|_| a.k),
        selection: a.select_by,
        checkpoint_every: a.checkpoint_every,
        checkpoint_dir: Some(a.output.with_extension("checkpoints")),
        resume: a.resume.clone(),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let evals = train_head(&model, reference.as_ref(), &feats, &val_feats, &tc, a.eval_every)?;
    let trained = model.to_weights()?;
    save_head(&a.output, &cfg, &trained)?;
    if let Some(out) = &a.export {
        write_head_gguf(&cfg, &trained, out, &a.input.target, ty)?;
    }
    let last = evals.last().cloned().unwrap_or_default();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"output": a.output, "export": a.export, "seconds": t0.elapsed().as_secs_f64(), "evals": evals})
        );
    } else {
        println!(
            "wrote {}{} after {} steps in {:.0} s; held-out greedy α per TTT step {}, τ(chain) ≈ {}",
            a.output.display(),
            a.export.as_ref().map(|e| format!(" and {}", e.display())).unwrap_or_default(),
            a.steps,
            t0.elapsed().as_secs_f64(),
            last["alpha"],
            last["tau_chain"]
        );
    }
    Ok(())
}

/// The `n` most frequent target tokens of `data` (prompts and responses), increasing; empty
/// for `n` = 0 (the target's whole vocabulary).
pub(crate) fn draft_vocab_for(target_path: &std::path::Path, data: &[PathBuf], n: usize) -> anyhow::Result<Vec<u32>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    {
        if data.is_empty() {
            anyhow::bail!("--draft-vocab {} needs --data to count token frequencies (or --draft-vocab 0)", n);
        }
        let target = Model::load(target_path, &ModelParams::default())
            .with_context(|| format!("loading the tokenizer of {}", target_path.display()))?;
        let (records, _) = read_records(data, false, BadLines::Stop)?;
        let mut freq = vec![0u64; target.n_vocab()];
        for r in &records {
            for text in std::iter::once(&r.prompt).chain(r.response.iter()) {
                for t in target.tokenize(text, false, false)? {
                    if let Some(f) = freq.get_mut(t as usize) {
                        *f += 1;
                    }
                }
            }
        }
        let seen = freq.iter().filter(|&&f| f > 0).count();
        if n >= target.n_vocab() {
            anyhow::bail!(
                "--draft-vocab {} is not below the target's vocabulary ({}); use 0 for the whole vocabulary",
                n,
                target.n_vocab()
            );
        }
        if seen < n {
            tracing::warn!(
                "the data holds {seen} distinct tokens, fewer than --draft-vocab {}: the rest are the lowest unseen ids",
                n
            );
        }
        Ok(top_vocab(&freq, n))
    }
}

fn run_init(a: &HeadInitArgs) -> anyhow::Result<()> {
    let ty = a.ty;
    let draft_vocab = draft_vocab_for(&a.target, &a.data, a.draft_vocab)?;
    let cfg = head_config_for(&a.target, a.ffn, draft_vocab)?;
    let weights = init_head(&cfg, &a.target, a.seed)?;
    write_head_gguf(&cfg, &weights, &a.output, &a.target, ty)?;
    if let Some(cp) = &a.checkpoint {
        save_head(cp, &cfg, &weights)?;
    }
    if a.json {
        let v = serde_json::json!({
            "output": a.output,
            "checkpoint": a.checkpoint,
            "type": ty.name(),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "target_layers": cfg.target_layers,
            "draft_vocab": cfg.draft_vocab.len(),
            "parameters": cfg.n_params(),
        });
        println!("{v}");
    } else {
        println!(
            "wrote {} ({}, hidden {}, FFN {}, target layers {:?}, draft vocabulary {}, {:.1}M parameters)",
            a.output.display(),
            ty.name(),
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.target_layers,
            if cfg.draft_vocab.is_empty() { "the target's".to_string() } else { cfg.draft_vocab.len().to_string() },
            cfg.n_params() as f64 / 1e6
        );
    }
    Ok(())
}
