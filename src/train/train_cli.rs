//! Command-line front ends of distillation and evaluation: `adaspec train`, `adaspec train
//! adaspec`, `adaspec eval` and `adaspec data generate`, as clap argument structs plus
//! `run_*` functions that `src/main.rs` wires in.
//!
//! Every argument is checked and every input (models, data, vocabularies) is loaded before
//! anything is written, so a bad invocation leaves no output behind. Progress goes to stderr;
//! results (summaries, JSON) to stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::data::{load_examples, read_records, split_validation, BadLines, Example, TokenizeOptions};
use super::eval::{acceptance_on, DraftSource, EvalReport};
use super::generate::{generate_continuations, generate_dataset, GenerateOptions};
use super::gguf_import::load_any;
use super::loss::{check_k, Divergence, Selection};
use super::prune::parse_layers;
use super::teacher::{Teacher, TeacherMode};
use super::trainer::{check_compat, train, train_adaspec, LrSchedule, TrainConfig, TrainData, TrainReport};
use crate::backend::{Model, ModelParams};
use crate::sampling::SamplingParams;

/// `adaspec train [adaspec] …`: one distillation run, or with the word `adaspec` both AdaSPEC
/// stages end to end.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// `adaspec`: run both stages: stage 1 trains a reference with forward KL from the draft
    /// (OUT/reference), stage 2 trains the draft again with token selection against it
    /// (OUT/adaspec), with the same number of optimizer steps (--method is then ignored).
    #[arg(value_parser = ["adaspec"])]
    pub pipeline: Option<String>,
    #[command(flatten)]
    pub opts: TrainOpts,
}

/// `--method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Forward KL on all valid tokens.
    Fkl,
    /// Reverse KL on all valid tokens.
    Rkl,
    /// Total variation on all valid tokens.
    Tvd,
    /// Jensen-Shannon on all valid tokens.
    Jsd,
    /// Forward KL on the top-k tokens by KL gap to --reference.
    Adaspec,
}

/// `--teacher`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TeacherArg {
    /// Full vocabulary, recomputed per batch.
    Exact,
    /// Top-K probabilities + the remaining mass, compared as K + 1 bins; cached on disk.
    Sparse,
}

/// Flags of a training run.
#[derive(Debug, Clone, Args)]
pub struct TrainOpts {
    /// Target model (GGUF): the teacher, run through llama.cpp exactly as it will verify.
    #[arg(long)]
    pub target: PathBuf,
    /// Initial draft: a GGUF (dequantized to f32) or a safetensors checkpoint.
    #[arg(long)]
    pub draft: PathBuf,
    /// Training data, JSONL (GSM8K, HumanEval, ShareGPT or {"prompt","response"}); repeatable.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Validation data; default: a --val-fraction split of --data.
    #[arg(long, num_args = 1..)]
    pub val_data: Vec<PathBuf>,
    /// Fraction of --data held out for validation when --val-data is not given.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// At most this many validation sequences (0 = all).
    #[arg(long, default_value_t = 64)]
    pub max_val: usize,
    /// At most this many training sequences, taken after a seeded shuffle (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_examples: usize,
    /// Wrap prompts in the target's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message with --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum sequence length in tokens (prompt + response).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Do not append EOS after responses.
    #[arg(long)]
    pub no_eos: bool,
    /// Malformed JSONL lines: "stop" (error naming file:line) or "skip" (warn and go on).
    #[arg(long, value_enum, default_value_t = BadLines::Stop)]
    pub on_bad_line: BadLines,
    /// The loss: a divergence over all valid tokens (DistillSpec baselines) or AdaSPEC.
    #[arg(long, value_enum, default_value_t = Method::Fkl)]
    pub method: Method,
    /// Reference model for --method adaspec (stage-1 checkpoint or GGUF).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Fraction of valid tokens AdaSPEC trains on, in (0, 1].
    #[arg(long, default_value_t = 0.4)]
    pub k: f64,
    /// How AdaSPEC ranks tokens for the top k: `gap` (the paper: L_draft − L_ref, largest
    /// first) or `ref-loss` (the tokens the reference fits best; see the README's synthetic
    /// selection results for when the two differ).
    #[arg(long, value_enum, default_value_t = Selection::Gap)]
    pub select_by: Selection,
    /// Learning rate (peak, after warm-up).
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Decoupled weight decay (not applied to norms and biases).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps (0 = --epochs passes over the data).
    #[arg(long, default_value_t = 0)]
    pub steps: usize,
    /// Epochs when --steps is 0.
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Learning-rate schedule after --warmup-steps of linear warm-up.
    #[arg(long, value_enum, default_value_t = LrSchedule::Constant)]
    pub lr_schedule: LrSchedule,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Do not train the token embeddings (a tied embedding/head matrix is then frozen too).
    #[arg(long)]
    pub freeze_embeddings: bool,
    /// Do not train the LM head (a tied embedding/head matrix is then frozen too).
    #[arg(long)]
    pub freeze_lm_head: bool,
    /// Train only these blocks, e.g. 0,1,23 (default all).
    #[arg(long)]
    pub train_blocks: Option<String>,
    /// Seed of the data shuffles and the validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N optimizer steps (0 = only the final model).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Validate every N steps (0 = before and after training only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// How the teacher's distributions are made.
    #[arg(long, value_enum, default_value_t = TeacherArg::Sparse)]
    pub teacher: TeacherArg,
    /// K of the sparse teacher.
    #[arg(long, default_value_t = 64)]
    pub teacher_top_k: usize,
    /// Folder of the sparse teacher cache (default OUT/teacher-cache).
    #[arg(long)]
    pub teacher_cache: Option<PathBuf>,
    /// Resume from a checkpoint folder (OUT/checkpoints/step-NNNNNN) of the same run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// CPU threads for llama.cpp (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Output folder: model.safetensors + config.json, metrics.jsonl, metrics.svg (loss, validation α, selected fraction), checkpoints/.
    #[arg(short, long)]
    pub output: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

impl TrainOpts {
    /// The training config these flags describe (`method` overrides `--method`).
    pub fn train_config(&self, method: Method) -> anyhow::Result<TrainConfig> {
        if method != Method::Adaspec && self.select_by != Selection::Gap {
            anyhow::bail!("--select-by {} needs --method adaspec", self.select_by.name());
        }
        let (divergence, select_k) = match method {
            Method::Adaspec => {
                check_k(self.k)?;
                (Divergence::Fkl, Some(self.k))
            }
            Method::Fkl => (Divergence::Fkl, None),
            Method::Rkl => (Divergence::Rkl, None),
            Method::Tvd => (Divergence::Tvd, None),
            Method::Jsd => (Divergence::Jsd, None),
        };
        let cfg = TrainConfig {
            divergence,
            select_k,
            selection: self.select_by,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            steps: self.steps,
            epochs: self.epochs,
            schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            freeze_embeddings: self.freeze_embeddings,
            freeze_lm_head: self.freeze_lm_head,
            train_blocks: self.train_blocks.as_deref().map(parse_layers).transpose()?,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
            progress: !self.no_progress,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn teacher_mode(&self) -> anyhow::Result<TeacherMode> {
        match self.teacher {
            TeacherArg::Exact => Ok(TeacherMode::Exact),
            TeacherArg::Sparse if self.teacher_top_k >= 1 => Ok(TeacherMode::Sparse { top_k: self.teacher_top_k }),
            TeacherArg::Sparse => bail!("--teacher-top-k must be >= 1"),
        }
    }

    fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions {
            chat: self.chat,
            system: self.system.clone(),
            max_len: self.max_len,
            append_eos: !self.no_eos,
        }
    }
}

/// Loaded inputs of a training run (nothing written yet).
struct Inputs {
    target: Arc<Model>,
    init: (super::model::Config, super::model::Weights),
    train: Vec<Example>,
    val: Vec<Example>,
}

fn load_inputs(o: &TrainOpts) -> anyhow::Result<Inputs> {
    let bad: BadLines = o.on_bad_line;
    o.teacher_mode()?;
    if !(0.0..1.0).contains(&o.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", o.val_fraction);
    }
    let target = Arc::new(
        Model::load(&o.target, &ModelParams::default())
            .with_context(|| format!("loading target {}", o.target.display()))?,
    );
    let init = load_any(&o.draft).with_context(|| format!("loading draft {}", o.draft.display()))?;
    check_compat(&init.0, None, target.n_vocab())?;
    let topts = o.tokenize_options();
    let (mut examples, stats) = load_examples(&target, &o.data, &topts, bad)?;
    tracing::info!(?stats, "training data");
    // Seeded shuffle first so --max-examples and the split are random but reproducible.
    let order = super::data::permutation(examples.len(), o.seed ^ 0xda7a);
    let mut shuffled: Vec<Example> = order.into_iter().map(|i| std::mem::take(&mut examples[i])).collect();
    let (mut train_ex, mut val) = if o.val_data.is_empty() {
        split_validation(std::mem::take(&mut shuffled), o.val_fraction, o.seed)?
    } else {
        let (v, _) = load_examples(&target, &o.val_data, &topts, bad)?;
        (shuffled, v)
    };
    if o.max_examples > 0 {
        train_ex.truncate(o.max_examples);
    }
    if o.max_val > 0 {
        val.truncate(o.max_val);
    }
    Ok(Inputs { target, init, train: train_ex, val })
}

fn print_report(o: &TrainOpts, reports: &[(&str, &TrainReport)], secs: f64) -> anyhow::Result<()> {
    if o.json {
        let v: Vec<serde_json::Value> = reports
            .iter()
            .map(|(name, r)| {
                serde_json::json!({
                    "stage": name,
                    "model": r.final_model,
                    "steps": r.steps.len(),
                    "final_loss": r.steps.last().map(|s| s.loss),
                    "evals": r.evals,
                    "checkpoints": r.checkpoints,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"runs": v, "seconds": secs}))?);
        return Ok(());
    }
    for (name, r) in reports {
        let first = r.evals.first();
        let last = r.evals.last();
        println!(
            "{name}: {} steps, final loss {:.4}, val KL {} -> {}, val alpha {} -> {}; model {}",
            r.steps.len(),
            r.steps.last().map(|s| s.loss).unwrap_or(f64::NAN),
            first.map(|e| format!("{:.4}", e.val_kl)).unwrap_or_else(|| "-".into()),
            last.map(|e| format!("{:.4}", e.val_kl)).unwrap_or_else(|| "-".into()),
            first.map(|e| format!("{:.3}", e.val_alpha)).unwrap_or_else(|| "-".into()),
            last.map(|e| format!("{:.3}", e.val_alpha)).unwrap_or_else(|| "-".into()),
            r.final_model.display()
        );
    }
    println!("{secs:.1} s");
    Ok(())
}

/// Runs `adaspec train …` / `adaspec train adaspec …`.
pub fn run_train(args: &TrainArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    match args.pipeline.as_deref() {
        Some(_) => {
            let o = &args.opts;
            if o.resume.is_some() {
                bail!("--resume resumes one stage: use `adaspec train --method fkl|adaspec --resume DIR`");
            }
            let s1 = o.train_config(Method::Fkl)?;
            let s2 = o.train_config(Method::Adaspec)?;
            let inp = load_inputs(o)?;
            let (teacher_train, teacher_val) = make_teachers(o, &inp)?;
            let data = TrainData {
                train: &inp.train,
                val: &inp.val,
                teacher_train: &teacher_train,
                teacher_val: &teacher_val,
            };
            let (r1, r2) = train_adaspec(&s1, &s2, inp.init, &data, &o.output)?;
            print_report(o, &[("reference (fkl)", &r1), ("adaspec", &r2)], t0.elapsed().as_secs_f64())
        }
        None => {
            let o = &args.opts;
            let cfg = o.train_config(o.method)?;
            let reference = match (&cfg.select_k, &o.reference) {
                (Some(_), Some(r)) => Some(load_any(r).with_context(|| format!("loading reference {}", r.display()))?),
                (Some(_), None) => {
                    bail!("--method adaspec needs --reference REF (a stage-1 model; or run `adaspec train adaspec`)")
                }
                (None, Some(_)) => bail!("--reference is only used with --method adaspec"),
                (None, None) => None,
            };
            let inp = load_inputs(o)?;
            check_compat(&inp.init.0, reference.as_ref().map(|r| &r.0), inp.target.n_vocab())?;
            let (teacher_train, teacher_val) = make_teachers(o, &inp)?;
            let data = TrainData {
                train: &inp.train,
                val: &inp.val,
                teacher_train: &teacher_train,
                teacher_val: &teacher_val,
            };
            let r = train(&cfg, inp.init, reference, &data, &o.output, o.resume.as_deref())?;
            print_report(o, &[(cfg.method_name().as_str(), &r)], t0.elapsed().as_secs_f64())
        }
    }
}

fn make_teachers(o: &TrainOpts, inp: &Inputs) -> anyhow::Result<(Teacher, Teacher)> {
    let mode = o.teacher_mode()?;
    let cache = o.teacher_cache.clone().unwrap_or_else(|| o.output.join("teacher-cache"));
    let t = Teacher::new(inp.target.clone(), mode, &inp.train, Some(&cache), o.threads)?;
    let v = Teacher::new(inp.target.clone(), mode, &inp.val, Some(&cache), o.threads)?;
    Ok((t, v))
}

/// `adaspec eval --target T --draft D --data FILE…`
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Target model (GGUF).
    #[arg(long)]
    pub target: PathBuf,
    /// Draft: a GGUF (run by llama.cpp) or a trainer checkpoint (model.safetensors, run by candle).
    #[arg(long)]
    pub draft: PathBuf,
    /// Evaluation data (JSONL, same formats as training); held out from training.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// At most this many sequences (the first ones; 0 = all).
    #[arg(long, default_value_t = 50)]
    pub max_examples: usize,
    /// Tokens of the target's own greedy continuation per prompt for (b) (0 = skip (b)).
    #[arg(long, default_value_t = 64)]
    pub continuation_tokens: usize,
    /// Continuations decoded together for (b), one sequence each in one batch (1..=64).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Wrap prompts in the target's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message with --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum sequence length in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Malformed JSONL lines: stop or skip.
    #[arg(long, value_enum, default_value_t = BadLines::Stop)]
    pub on_bad_line: BadLines,
    /// CPU threads for llama.cpp (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Also write the JSON report here.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// Runs `adaspec eval`: prints the JSON report (and writes it with -o).
pub fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    let report = eval_report(args)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.output {
        super::data::write_atomic(out, json.as_bytes())?;
    }
    println!("{json}");
    Ok(())
}

/// Computes `adaspec eval`'s report.
pub fn eval_report(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    let t0 = Instant::now();
    let bad: BadLines = args.on_bad_line;
    let target = Arc::new(
        Model::load(&args.target, &ModelParams::default())
            .with_context(|| format!("loading target {}", args.target.display()))?,
    );
    let draft = DraftSource::load(&args.draft).with_context(|| format!("loading draft {}", args.draft.display()))?;
    if draft.n_vocab() != target.n_vocab() {
        bail!("draft vocab size {} != target vocab size {}", draft.n_vocab(), target.n_vocab());
    }
    let (mut records, _) = read_records(&args.data, false, bad)?;
    if args.max_examples > 0 {
        records.truncate(args.max_examples);
    }
    if records.is_empty() {
        bail!("no records in {}", super::data::join_paths(&args.data));
    }
    let topts =
        TokenizeOptions { chat: args.chat, system: args.system.clone(), max_len: args.max_len, append_eos: true };
    let with_resp: Vec<_> = records.iter().filter(|r| r.response.is_some()).cloned().collect();
    let dataset = if with_resp.is_empty() {
        None
    } else {
        let (ex, _) = super::data::tokenize_records(&target, &with_resp, &topts)?;
        Some(acceptance_on(&target, &draft, &ex, args.threads)?)
    };
    let target_continuations = if args.continuation_tokens > 0 {
        let gopts = GenerateOptions {
            max_tokens: args.continuation_tokens,
            sampling: SamplingParams::greedy(),
            tokenize: topts.clone(),
            n_threads: args.threads,
            n_ctx: (args.max_len + args.continuation_tokens + 16) as u32,
            parallel: args.parallel,
            exact: false,
        };
        let mut ex = Vec::new();
        generate_continuations(&target, &records, &gopts, |_, _, e, _| {
            ex.push(e.clone());
            Ok(())
        })?;
        Some(acceptance_on(&target, &draft, &ex, args.threads)?)
    } else {
        None
    };
    Ok(EvalReport {
        target: args.target.clone(),
        draft: args.draft.clone(),
        data: args.data.clone(),
        dataset,
        target_continuations,
        continuation_tokens: args.continuation_tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `adaspec data …`
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// Subcommands of `adaspec data`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write {"prompt","response"} JSONL whose responses the target itself generated.
    Generate(DataGenerateArgs),
}

/// `adaspec data generate --target T --input PROMPTS.jsonl -o OUT.jsonl`
#[derive(Debug, Args)]
pub struct DataGenerateArgs {
    /// Target model (GGUF).
    #[arg(long)]
    pub target: PathBuf,
    /// Prompts: JSONL in any supported format (responses in it are ignored); repeatable.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output JSONL, written when every prompt is answered. Until then each response is
    /// appended to OUTPUT.partial as it finishes; running the same command again resumes there
    /// (other settings are refused, naming what differs).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Most tokens per response.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p when sampling (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed when sampling (prompt i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap prompts in the target's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message with --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// At most this many prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_prompts: usize,
    /// KV-cache size (prompt + response must fit).
    #[arg(long, default_value_t = 2048)]
    pub n_ctx: u32,
    /// Malformed JSONL lines: stop or skip.
    #[arg(long, value_enum, default_value_t = BadLines::Stop)]
    pub on_bad_line: BadLines,
    /// CPU threads for llama.cpp (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Responses decoded together, one sequence each in one batch (1..=64; on a 2-core CPU
    /// 4 was 1.15x faster than 1, a GPU gains more). Batched kernels round differently, so at
    /// near-ties a response can differ from `--parallel 1`'s (see --exact).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Batch-invariant kernels (ggml's reference kernels, no weight repacking): slower, and
    /// every response is then the same whatever --parallel is.
    #[arg(long)]
    pub exact: bool,
}

/// Runs `adaspec data …`.
pub fn run_data(args: &DataArgs) -> anyhow::Result<()> {
    match &args.command {
        DataCommand::Generate(a) => run_data_generate(a),
    }
}

/// Runs `adaspec data generate`.
pub fn run_data_generate(a: &DataGenerateArgs) -> anyhow::Result<()> {
    let bad: BadLines = a.on_bad_line;
    let (mut records, _) = read_records(&a.input, false, bad)?;
    if a.max_prompts > 0 {
        records.truncate(a.max_prompts);
    }
    let target = Arc::new(
        Model::load(&a.target, &ModelParams { repack: !a.exact, ..Default::default() })
            .with_context(|| format!("loading target {}", a.target.display()))?,
    );
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: 0.0,
            seed: a.seed,
        },
        tokenize: TokenizeOptions { chat: a.chat, system: a.system.clone(), max_len: usize::MAX, append_eos: false },
        n_threads: a.threads,
        n_ctx: a.n_ctx,
        parallel: a.parallel,
        exact: a.exact,
    };
    let t0 = Instant::now();
    let n = generate_dataset(&target, &records, &opts, &a.output)?;
    eprintln!("wrote {n} responses to {} in {:.1} s", a.output.display(), t0.elapsed().as_secs_f64());
    Ok(())
}
