//! Side-by-side benchmark: target alone and each strategy on the same prompts, interleaved
//! prompt by prompt in one process, so that machine noise hits every configuration alike.
//! Ratios are computed per prompt against the target-alone run of that prompt. [`matrix`] runs
//! it over target formats × data sets, with llama.cpp's own speculation as a [`peer`].

pub mod matrix;
pub mod peer;

use std::sync::Arc;

use crate::backend::{ChatMessage, Model, Token};
use crate::error::Result;
use crate::session::{GenerateParams, Prompt, Session, SessionParams};
use crate::strategy::{NumericMode, Strategy};

/// Which drafts a benchmarked configuration may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drafts {
    /// The draft model only.
    Model,
    /// n-gram lookups only (no draft model loaded).
    Lookup,
    /// Both (`auto` combines them; fixed strategies use the model).
    Both,
    /// A feature-level head (`--head`; `auto` adds lookups where they pay, as with the model).
    Head,
    /// The head and the draft model (`auto` plans each round with the one that pays more, and
    /// adds lookups; fixed strategies use the draft model).
    HeadAndModel,
}

/// One benchmarked configuration: `[model=|lookup=|both=|head=|head+model=]STRATEGY`; a bare strategy
/// means `both=` for `auto` and `model=` otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub strategy: Strategy,
    pub drafts: Drafts,
}

impl std::str::FromStr for Variant {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (drafts, st) = match s.split_once('=') {
            Some(("model", st)) => (Some(Drafts::Model), st),
            Some(("lookup", st)) => (Some(Drafts::Lookup), st),
            Some(("both", st)) => (Some(Drafts::Both), st),
            Some(("head", st)) => (Some(Drafts::Head), st),
            Some(("head+model", st)) => (Some(Drafts::HeadAndModel), st),
            Some((other, _)) => {
                return Err(crate::error::Error::InvalidParam {
                    name: "strategies",
                    reason: format!(
                        "{other:?}: expected model=, lookup=, both=, head= or head+model= before the strategy"
                    ),
                })
            }
            None => (None, s),
        };
        let strategy: Strategy = st.parse()?;
        let drafts = drafts.unwrap_or(Variant::default_drafts(&strategy));
        Ok(Variant { strategy, drafts })
    }
}

impl Variant {
    /// What a bare strategy name means.
    fn default_drafts(strategy: &Strategy) -> Drafts {
        if *strategy == Strategy::Auto {
            Drafts::Both
        } else {
            Drafts::Model
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = match self.drafts {
            d if d == Variant::default_drafts(&self.strategy) => "",
            Drafts::Model => "model=",
            Drafts::Lookup => "lookup=",
            Drafts::Both => "both=",
            Drafts::Head => "head=",
            Drafts::HeadAndModel => "head+model=",
        };
        write!(f, "{prefix}{}", self.strategy)
    }
}

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompts: Vec<String>,
    pub strategies: Vec<Variant>,
    pub max_tokens: usize,
    pub chat: bool,
    pub threads: i32,
    pub mode: NumericMode,
    pub n_ctx: u32,
    /// Generate exactly max_tokens (ignore end-of-generation), like llama-bench.
    pub ignore_eog: bool,
    /// The `eagle3` head `head=` configurations draft with.
    pub head: Option<std::path::PathBuf>,
    /// `auto` learns from its priors on every prompt ([`SessionParams::share_learning`] off)
    /// instead of continuing from the previous prompt's session.
    pub cold_start: bool,
    /// Runs of every configuration per prompt (at least 1), interleaved; each configuration's
    /// fastest run counts (machine noise only ever slows a run down).
    pub repeat: usize,
}

/// One configuration on one prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRun {
    pub prompt_index: usize,
    pub strategy: String,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub speedup: f64,
    pub acceptance_rate: f64,
    pub tokens_per_pass: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub rounds: usize,
    /// Greedy output equal to the target-alone output of the same prompt.
    pub identical: bool,
    /// Index of the first differing generated token, if any (in any of the repeats).
    pub first_difference: Option<usize>,
    /// Tokens per second of every repeat (the fastest is `tokens_per_second`).
    pub repeats_tokens_per_second: Vec<f64>,
    /// The generated tokens (not in the JSON report).
    #[serde(skip)]
    pub output: Vec<Token>,
}

/// Summary of one strategy over all prompts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchSummary {
    pub strategy: String,
    pub median_tokens_per_second: f64,
    pub median_speedup: f64,
    pub mean_acceptance: f64,
    pub mean_tokens_per_pass: f64,
    pub identical: usize,
    pub prompts: usize,
}

/// Everything a benchmark run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub target: String,
    pub draft: String,
    pub mode: NumericMode,
    pub threads: i32,
    pub max_tokens: usize,
    pub chat: bool,
    pub summaries: Vec<BenchSummary>,
    pub runs: Vec<BenchRun>,
    /// Target decode ms by batch size as measured by `auto` (if it ran).
    pub target_cost_ms: Vec<(usize, f64)>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The faster of two runs of one configuration on one prompt, remembering every repeat's speed
/// and whether any output differed from target alone.
fn faster(a: BenchRun, b: BenchRun) -> BenchRun {
    let mut all = a.repeats_tokens_per_second.clone();
    all.extend(&b.repeats_tokens_per_second);
    let first_difference = a.first_difference.or(b.first_difference);
    let mut best = if b.tokens_per_second > a.tokens_per_second { b } else { a };
    best.repeats_tokens_per_second = all;
    best.identical = first_difference.is_none();
    best.first_difference = first_difference;
    best
}

/// Runs the benchmark. `progress(done, total, line)` is called after every run.
pub fn run_bench(
    target: Arc<Model>,
    draft: Arc<Model>,
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<BenchReport> {
    let mut configs = vec![Variant { strategy: Strategy::None, drafts: Drafts::Model }];
    configs.extend(cfg.strategies.iter().filter(|v| v.strategy != Strategy::None).cloned());
    let head = match (&cfg.head, configs.iter().any(|v| matches!(v.drafts, Drafts::Head | Drafts::HeadAndModel))) {
        (Some(p), _) => Some(crate::session::HeadFile::load(p, target.params())?),
        (None, true) => {
            return Err(crate::error::Error::InvalidParam {
                name: "strategies",
                reason: "head= and head+model= configurations need a head (--head H.gguf)".into(),
            })
        }
        (None, false) => None,
    };
    let session_for = |v: &Variant| {
        let sp = SessionParams {
            n_ctx: cfg.n_ctx,
            n_threads: cfg.threads,
            strategy: v.strategy.clone(),
            mode: cfg.mode,
            lookup: v.drafts != Drafts::Model,
            share_learning: !cfg.cold_start,
        };
        match (v.drafts, &head) {
            (Drafts::Head, Some(h)) => Session::with_head_file(target.clone(), h.clone(), sp),
            (Drafts::HeadAndModel, Some(h)) => {
                Session::with_draft_and_head(target.clone(), draft.clone(), h.clone(), sp)
            }
            _ => Session::new(target.clone(), (v.drafts != Drafts::Lookup).then(|| draft.clone()), sp),
        }
    };
    let gp = GenerateParams { max_tokens: cfg.max_tokens, ignore_eog: cfg.ignore_eog, ..Default::default() };
    let repeat = cfg.repeat.max(1);
    let total = cfg.prompts.len() * configs.len() * repeat;
    let mut runs = Vec::new();
    let mut done = 0;
    // One warm-up generation per configuration so first-touch costs (page faults, the cost
    // measurement `auto` makes once per process) hit nobody's numbers.
    for v in &configs {
        let warm = GenerateParams { max_tokens: 8, ..gp.clone() };
        session_for(v)?.generate(&Prompt::Text("Hello".into()), &warm, &mut |_, _| true)?;
    }
    let mut costed = None;
    for (pi, text) in cfg.prompts.iter().enumerate() {
        let prompt = if cfg.chat {
            Prompt::Chat(vec![ChatMessage::new("user", text.clone())])
        } else {
            Prompt::Text(text.clone())
        };
        // Every configuration's runs of this prompt, repeats interleaved so that noise hits
        // all of them alike; the fastest of each counts.
        let mut mine: Vec<Option<BenchRun>> = vec![None; configs.len()];
        let mut base_tokens: Vec<Token> = Vec::new();
        for r in 0..repeat {
            for (ci, v) in configs.iter().enumerate() {
                // A fresh session per prompt, as `adaspec generate` runs it; `auto` continues
                // from what the previous session of its setup learned unless `cold_start`.
                let mut s = session_for(v)?;
                let g = s.generate(&prompt, &gp, &mut |_, _| true)?;
                if v.strategy == Strategy::Auto && costed.is_none() {
                    costed = Some(s.cost_model().target.points());
                }
                if ci == 0 && r == 0 {
                    base_tokens = g.tokens.clone();
                }
                let first_difference = g.tokens.iter().zip(base_tokens.iter()).position(|(a, b)| a != b).or(
                    if g.tokens.len() != base_tokens.len() {
                        Some(g.tokens.len().min(base_tokens.len()))
                    } else {
                        None
                    },
                );
                let run = BenchRun {
                    prompt_index: pi,
                    strategy: configs[ci].to_string(),
                    tokens: g.stats.tokens,
                    tokens_per_second: g.stats.tokens_per_second,
                    speedup: 0.0,
                    acceptance_rate: g.stats.acceptance_rate,
                    tokens_per_pass: g.stats.tokens_per_pass,
                    draft_ms: g.stats.draft_ms,
                    verify_ms: g.stats.verify_ms,
                    rounds: g.stats.rounds,
                    identical: first_difference.is_none(),
                    first_difference,
                    repeats_tokens_per_second: vec![g.stats.tokens_per_second],
                    output: g.tokens,
                };
                done += 1;
                progress(
                    done,
                    total,
                    &format!(
                        "prompt {pi} {:<14} {:6.2} tok/s  acc {:.2}  tok/pass {:.2}",
                        run.strategy, run.tokens_per_second, run.acceptance_rate, run.tokens_per_pass
                    ),
                );
                mine[ci] = Some(match mine[ci].take() {
                    None => run,
                    Some(best) => faster(best, run),
                });
            }
        }
        let base_tps = mine[0].as_ref().map_or(0.0, |r| r.tokens_per_second);
        for mut run in mine.into_iter().flatten() {
            run.speedup = if base_tps > 0.0 { run.tokens_per_second / base_tps } else { 0.0 };
            runs.push(run);
        }
    }
    let summaries = configs
        .iter()
        .map(|st| {
            let name = st.to_string();
            let mine: Vec<&BenchRun> = runs.iter().filter(|r| r.strategy == name).collect();
            let n = mine.len().max(1) as f64;
            BenchSummary {
                strategy: name,
                median_tokens_per_second: median(mine.iter().map(|r| r.tokens_per_second).collect()),
                median_speedup: median(mine.iter().map(|r| r.speedup).collect()),
                mean_acceptance: mine.iter().map(|r| r.acceptance_rate).sum::<f64>() / n,
                mean_tokens_per_pass: mine.iter().map(|r| r.tokens_per_pass).sum::<f64>() / n,
                identical: mine.iter().filter(|r| r.identical).count(),
                prompts: mine.len(),
            }
        })
        .collect();
    // The cost curve `auto` measured at start-up and refined online on the first prompt.
    let target_cost_ms = costed.unwrap_or_default();
    Ok(BenchReport {
        target: target.path().display().to_string(),
        draft: draft.path().display().to_string(),
        mode: cfg.mode,
        threads: cfg.threads,
        max_tokens: cfg.max_tokens,
        chat: cfg.chat,
        summaries,
        runs,
        target_cost_ms,
    })
}

/// The summary as a table for people.
pub fn format_table(r: &BenchReport) -> String {
    let mut s = format!(
        "{:<22} {:>10} {:>9} {:>11} {:>9} {:>10}\n",
        "strategy", "tok/s(med)", "speedup", "acceptance", "tok/pass", "identical"
    );
    for x in &r.summaries {
        s.push_str(&format!(
            "{:<22} {:>10.2} {:>8.2}x {:>11.2} {:>9.2} {:>7}/{}\n",
            x.strategy,
            x.median_tokens_per_second,
            x.median_speedup,
            x.mean_acceptance,
            x.mean_tokens_per_pass,
            x.identical,
            x.prompts
        ));
    }
    s
}
