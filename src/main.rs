//! `adaspec`: speculative generation with draft trees on llama.cpp, its benchmark, and (with
//! the `train` feature) the AdaSPEC trainer's commands.

/// With the trainer built in: mimalloc (candle's vocabulary-sized temporaries are reused instead
/// of mapped and unmapped by glibc per op; see Cargo.toml).
#[cfg(feature = "train")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use adaspec::bench::{format_table, run_bench, BenchConfig};
use adaspec::models::{resolve, DEFAULT_DRAFT, DEFAULT_TARGET};
use adaspec::{
    ChatMessage, GenerateParams, Model, ModelParams, NumericMode, Prompt, SamplingParams, Session, SessionParams,
    Strategy,
};

#[derive(Parser)]
#[command(name = "adaspec", version, about = "Lossless speculative generation with draft trees on llama.cpp")]
struct Cli {
    /// Log level (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a target verified draft tree (output identical to the target's).
    Generate(GenerateArgs),
    /// Compare target alone and drafting strategies on a data set, interleaved in one run.
    Bench(BenchArgs),
    /// Describe a GGUF file (architecture, sizes, tensor types, tokenizer); check a draft/target pair.
    Inspect(adaspec::inspect::InspectArgs),
    /// Make drafts: `draft init` prunes a bigger model's blocks into a cheap draft (train feature).
    #[cfg(feature = "train")]
    Draft(adaspec::train::cli::DraftArgs),
    /// Make feature-level heads (EAGLE-3 layout, llama.cpp's `eagle3` GGUF) for a target (train feature).
    #[cfg(feature = "train")]
    Head(adaspec::train::head_cli::HeadArgs),
    /// Distil a draft against the target: fkl|rkl|tvd|jsd baselines or AdaSPEC (train feature).
    #[cfg(feature = "train")]
    Train(Box<adaspec::train::train_cli::TrainArgs>),
    /// Measure draft acceptance against the target (α, 1−TV, τ) on a data set (train feature).
    #[cfg(feature = "train")]
    Eval(adaspec::train::train_cli::EvalArgs),
    /// Make training data: `data generate` writes the target's own responses (train feature).
    #[cfg(feature = "train")]
    Data(adaspec::train::train_cli::DataArgs),
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Target GGUF [default: $ADASPEC_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf].
    #[arg(long)]
    target: Option<PathBuf>,
    /// Draft GGUF with the target's vocabulary, or `none` to draft with n-gram lookups only
    /// [default: $ADASPEC_MODELS/qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf].
    #[arg(long)]
    draft: Option<PathBuf>,
    /// Feature-level head made for the target: an `eagle3` GGUF (`adaspec head init` and
    /// `adaspec head train`) or an `fspad` GGUF (FSPAD, EAGLE-2-style or an ablation: `adaspec
    /// head fspad`); drafts from the target's own hidden states instead of the draft model, or
    /// together with it when --draft is given too (`auto` then plans each round with whichever
    /// pays more). In `bench`, used by `head=STRATEGY` and `head+model=STRATEGY` configurations.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Do not let `auto` add n-gram lookups of the prompt and output (on by default, used
    /// wherever auto finds they pay).
    #[arg(long)]
    no_lookup: bool,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Context size in tokens.
    #[arg(long, default_value_t = 4096)]
    ctx: u32,
    /// Drafting strategy: auto | none | chain:N | tree:K,D,N (EAGLE-2 dynamic: top-K, depth D, N nodes) | static:0;1;0,0 (child-rank paths).
    #[arg(long, default_value = "auto")]
    strategy: String,
    /// fast: fastest kernels, lossless in distribution; exact: greedy output bit-identical to target-alone decoding in the same mode.
    #[arg(long, default_value = "fast")]
    mode: String,
    /// Layers to offload to a GPU (needs a cuda/vulkan/metal build).
    #[arg(long, default_value_t = 0)]
    gpu_layers: u32,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Format the prompt with the model's chat template (as a user message).
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Also run the target alone on the same prompt and report the speedup.
    #[arg(long)]
    compare: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// humaneval | humaneval_edit | gsm8k (held-out split) | mt_bench (built in, or from $ADASPEC_DATA),
    /// or FILE.jsonl (fields prompt/question/text/turns/conversations).
    #[arg(long, default_value = "humaneval")]
    dataset: String,
    /// Number of prompts.
    #[arg(long, default_value_t = 10)]
    n_prompts: usize,
    /// Tokens per prompt (generated exactly, ignoring end-of-generation).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Configurations besides target alone, separated by spaces or '/':
    /// `[model=|lookup=|both=|head=|head+model=]STRATEGY` (which drafts it may use: the draft
    /// model, n-gram lookups, both, the --head, or the head and the draft model — `auto` picks
    /// one per round; lookups join `auto` in all but `model=`; bare `auto` = both, a bare fixed
    /// strategy = the model).
    #[arg(long, default_value = "auto/model=auto/lookup=auto/chain:2/chain:3/tree:2,4,8")]
    strategies: String,
    /// Use raw prompts instead of the chat template.
    #[arg(long)]
    raw: bool,
    /// Stop at end-of-generation instead of generating exactly --max-tokens.
    #[arg(long)]
    stop_at_eog: bool,
    /// Start `auto` from its priors on every prompt (a fresh process each time) instead of
    /// from what the previous session of the same setup learned (a host serving requests).
    #[arg(long)]
    cold_start: bool,
    /// Runs of every configuration per prompt, interleaved; each one's fastest run counts (a
    /// machine shared with other work only ever slows a run down). Speedups are fastest over
    /// fastest; the JSON keeps every run's speed.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Write the JSON report here.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
    /// Run the matrix: every --formats target format × every --datasets data set (--dataset is
    /// then ignored), each cell side by side with its ratios, the format's ceiling (speedup of a
    /// free, always-right draft on its measured verification curve) and `auto` against the best
    /// fixed strategy; stops at end-of-generation (like llama.cpp).
    #[arg(long)]
    matrix: bool,
    /// Target formats for --matrix: the given target where its file name says the format, else a
    /// copy converted with llama.cpp's quantizer, cached in $ADASPEC_MODELS/converted.
    #[arg(long, default_value = "q4_k_m,q8_0,f16", value_delimiter = ',')]
    formats: Vec<String>,
    /// Data sets for --matrix.
    #[arg(long, default_value = "humaneval,gsm8k,mt_bench,humaneval_edit", value_delimiter = ',')]
    datasets: Vec<String>,
    /// llama.cpp's speculative decoding in the same --matrix run: the `llama-spec-bench` binary
    /// that scripts/build-llama-tools.sh builds (target/llama-tools/bin/llama-spec-bench).
    #[arg(long)]
    peer: Option<PathBuf>,
    /// llama.cpp configurations for --peer: draft-simple:K (draft-model chains of up to K) and
    /// ngram-mod (its n-gram drafter).
    #[arg(long, default_value = "draft-simple:3,ngram-mod", value_delimiter = ',')]
    peer_variants: Vec<String>,
}

fn load_models(m: &ModelArgs, need_draft: bool) -> Result<(Arc<Model>, Option<Arc<Model>>, SessionParams)> {
    let strategy: Strategy = m.strategy.parse()?;
    let mode: NumericMode = m.mode.parse()?;
    let target_path = resolve(m.target.clone(), DEFAULT_TARGET)?;
    let mp = ModelParams { n_gpu_layers: m.gpu_layers, use_mmap: true, repack: mode == NumericMode::Fast };
    let target = Arc::new(Model::load(&target_path, &mp)?);
    // With a head, a draft model is loaded only where --draft names one (then both draft).
    let no_draft = m.draft.as_deref() == Some(std::path::Path::new("none"))
        || (m.head.is_some() && m.draft.is_none() && !need_draft);
    let draft = if !no_draft && (need_draft || strategy != Strategy::None) {
        let p = resolve(m.draft.clone(), DEFAULT_DRAFT)?;
        Some(Arc::new(Model::load(&p, &ModelParams { repack: true, ..mp.clone() })?))
    } else {
        None
    };
    Ok((
        target,
        draft,
        SessionParams {
            n_ctx: m.ctx,
            n_threads: m.threads,
            strategy,
            mode,
            lookup: !m.no_lookup,
            share_learning: true,
        },
    ))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => bail!("give --prompt TEXT or --prompt-file FILE"),
    };
    let (target, draft, sp) = load_models(&a.models, false)?;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", text));
        Prompt::Chat(msgs)
    } else {
        Prompt::Text(text)
    };
    let gp = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            seed: a.seed,
        },
        stop: a.stop.clone(),
        ignore_eog: false,
    };
    let mut session = match (&a.models.head, draft) {
        (Some(h), draft) if sp.strategy != Strategy::None => {
            let head = adaspec::session::HeadFile::load(h, target.params())?;
            match draft {
                Some(d) => Session::with_draft_and_head(target.clone(), d, head, sp.clone())?,
                None => Session::with_head_file(target.clone(), head, sp.clone())?,
            }
        }
        (_, draft) => Session::new(target.clone(), draft, sp.clone())?,
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let g = session.generate(&prompt, &gp, &mut |_, piece| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        true
    })?;
    let baseline = if a.compare {
        let mut base = Session::new(target, None, SessionParams { strategy: Strategy::None, ..sp.clone() })?;
        Some(base.generate(&prompt, &gp, &mut |_, _| true)?)
    } else {
        None
    };
    let speedup = baseline.as_ref().map(|b| g.stats.tokens_per_second / b.stats.tokens_per_second.max(1e-9));
    let identical = baseline.as_ref().map(|b| b.tokens == g.tokens);
    if json {
        let v = serde_json::json!({
            "text": g.text,
            "tokens": g.tokens,
            "stop_reason": g.stop_reason,
            "stats": g.stats,
            "strategy": sp.strategy.to_string(),
            "mode": sp.mode,
            "target_alone": baseline.as_ref().map(|b| serde_json::json!({"stats": b.stats, "identical": identical})),
            "speedup": speedup,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let s = &g.stats;
        let mut line = format!(
            "\n\n[adaspec] {} tokens, {:.2} tok/s, acceptance {:.2}, {:.2} tokens/target pass, strategy {}, mode {}",
            s.tokens, s.tokens_per_second, s.acceptance_rate, s.tokens_per_pass, sp.strategy, sp.mode
        );
        if let (Some(b), Some(x), Some(same)) = (&baseline, speedup, identical) {
            let verdict = if same {
                "identical to target alone".to_string()
            } else {
                let at = g.tokens.iter().zip(&b.tokens).take_while(|(x, y)| x == y).count();
                let why = if sp.mode == NumericMode::Fast {
                    " (fast mode: the verification batch's logits round differently from one-token \
                     decoding, which flips a near-tie; --mode exact is bit-identical)"
                } else {
                    ""
                };
                format!("departs from target alone at generated token {at}{why}")
            };
            line.push_str(&format!(
                "\n[adaspec] target alone {:.2} tok/s -> speedup {:.2}x; output {verdict}",
                b.stats.tokens_per_second, x
            ));
        }
        eprintln!("{line}");
    }
    Ok(())
}

/// `--strategies`: configurations separated by '/' or spaces.
fn variants(list: &str) -> adaspec::Result<Vec<adaspec::bench::Variant>> {
    list.split(['/', ' ']).filter(|s| !s.is_empty()).map(str::parse).collect()
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.matrix {
        return bench_matrix(a);
    }
    // Prompts first: a wrong --dataset fails before the models are loaded.
    let prompts = adaspec::dataset::load_prompts(&a.dataset, a.n_prompts)?;
    let (target, draft, sp) = load_models(&ModelArgs { strategy: "none".into(), ..a.models.clone() }, true)?;
    let draft = draft.context("bench needs a draft model (lookup=... configurations run without it)")?;
    let strategies = variants(&a.strategies)?;
    let cfg = BenchConfig {
        prompts,
        strategies,
        max_tokens: a.max_tokens,
        chat: !a.raw,
        threads: sp.n_threads,
        mode: sp.mode,
        n_ctx: a.models.ctx.min(2048),
        ignore_eog: !a.stop_at_eog,
        head: a.models.head.clone(),
        cold_start: a.cold_start,
        repeat: a.repeat,
    };
    let report = run_bench(target, draft, &cfg, &mut |done, total, line| eprintln!("[{done}/{total}] {line}"))?;
    println!("{}", format_table(&report));
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.out, json).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn bench_matrix(a: BenchArgs) -> Result<()> {
    use adaspec::bench::matrix::{format_matrix, run_matrix, MatrixConfig};
    let mode: NumericMode = a.models.mode.parse()?;
    let target = resolve(a.models.target.clone(), DEFAULT_TARGET)?;
    let draft = resolve(a.models.draft.clone(), DEFAULT_DRAFT)?;
    let threads = if a.models.threads > 0 { a.models.threads } else { adaspec::backend::default_threads() };
    let strategies = variants(&a.strategies)?;
    let formats = a.formats.iter().map(|f| f.parse()).collect::<adaspec::Result<Vec<_>>>()?;
    let peer = match &a.peer {
        Some(bin) => Some(adaspec::bench::peer::Peer {
            bin: bin.clone(),
            variants: a.peer_variants.iter().map(|v| v.parse()).collect::<adaspec::Result<Vec<_>>>()?,
            threads,
            n_ctx: a.models.ctx.min(2048),
            workdir: std::env::temp_dir().join("adaspec-peer"),
        }),
        None => None,
    };
    let cfg = MatrixConfig {
        target,
        draft,
        formats,
        datasets: a.datasets.clone(),
        n_prompts: a.n_prompts,
        bench: BenchConfig {
            prompts: Vec::new(),
            strategies,
            max_tokens: a.max_tokens,
            chat: !a.raw,
            threads,
            mode,
            n_ctx: a.models.ctx.min(2048),
            ignore_eog: false,
            head: a.models.head.clone(),
            cold_start: a.cold_start,
            repeat: a.repeat,
        },
        cache_dir: adaspec::models::models_dir().join("converted"),
        peer,
    };
    let out = a.out.clone();
    let save = |r: &adaspec::bench::matrix::MatrixReport| {
        if let Ok(json) = serde_json::to_string_pretty(r) {
            let _ = std::fs::write(&out, json);
        }
    };
    let report = run_matrix(&cfg, &mut |line| eprintln!("{line}"), &mut |r| save(r))?;
    println!("{}", format_matrix(&report));
    save(&report);
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn main() -> ExitCode {
    #[cfg(feature = "train")]
    adaspec::train::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log.clone()));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let r = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Bench(a) => bench(a),
        Command::Inspect(a) => adaspec::inspect::run(&a),
        #[cfg(feature = "train")]
        Command::Draft(a) => adaspec::train::cli::run(&a),
        #[cfg(feature = "train")]
        Command::Head(a) => adaspec::train::head_cli::run(&a),
        #[cfg(feature = "train")]
        Command::Train(a) => adaspec::train::train_cli::run_train(&a),
        #[cfg(feature = "train")]
        Command::Eval(a) => adaspec::train::train_cli::run_eval(&a),
        #[cfg(feature = "train")]
        Command::Data(a) => adaspec::train::train_cli::run_data(&a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
