//! The target's own responses to prompts (`data generate`, and the "target continuations" of
//! `eval`), several prompts at a time: each prompt decodes in its own sequence of one KV cache,
//! and every step is one batch holding the next token of each running response plus the
//! prompt tokens of responses just starting (continuous batching). How much that gains is the
//! verification-cost curve (`adaspec bench --matrix` prints it): on a 2-vCPU Zen 3, where 4
//! tokens of the Q4_K_M target cost 2.1 single-token decodes, 8 HumanEval prompts × 64 tokens
//! took 43.2 s at 4 per batch against 49.7 s one at a time (1.15x; prompt processing, which
//! batching does not speed up, is half the time there); flatter curves (GPUs) gain more.
//!
//! Greedy picks the argmax, sampling draws from the warped distribution with seed + i for
//! prompt i, as target-alone generation does. Batched fast-mode kernels round differently
//! from one-token decodes, so at near-ties a response can differ from `adaspec generate`'s;
//! `exact` (reference kernels) makes every response independent of the batching.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::data::{tokenize_prompt, Example, Record, TokenizeOptions};
use super::error::{Error, Result};
use crate::backend::{Batch, Context, ContextParams, Model, Token};
use crate::sampling::{argmax, sample_from, warp, SamplingParams};

/// Tokens one decode call carries at most (prompt chunks fill what decode rows leave).
const STEP_TOKENS: usize = 512;

/// How the target writes responses.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Greedy when temperature is 0; a sampled record i uses seed + i.
    pub sampling: SamplingParams,
    pub tokenize: TokenizeOptions,
    pub n_threads: i32,
    /// KV cells per response (prompt + response must fit).
    pub n_ctx: u32,
    /// Responses decoded together in one batch (1..=64).
    pub parallel: usize,
    /// ggml's reference CPU kernels, whose results do not depend on the batch (load the
    /// target with `repack: false` too): the responses then do not depend on `parallel`.
    pub exact: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            tokenize: TokenizeOptions::default(),
            n_threads: 0,
            n_ctx: 2048,
            parallel: 4,
            exact: false,
        }
    }
}

/// One running response: its sequence's tokens (prompt, then generated) and how many of them
/// the KV cache holds.
struct Slot {
    record: usize,
    tokens: Vec<Token>,
    prompt_len: usize,
    in_cache: usize,
    rng: StdRng,
    /// Batch row whose logits choose this sequence's next token, in the current step.
    row: Option<usize>,
}

impl Slot {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The target's own continuations of `records`' prompts: for each, the prompt tokens, the
/// generated tokens (EOG included when it stopped there) and the generated text, handed to
/// `each` in record order. Prompts that do not fit the context are skipped with a warning.
/// Returns the number of responses.
pub fn generate_continuations(
    target: &Arc<Model>,
    records: &[Record],
    opts: &GenerateOptions,
    mut each: impl FnMut(usize, &Record, &Example, &str) -> Result<()>,
) -> Result<usize> {
    if opts.max_tokens == 0 {
        return Err(Error::InvalidArg { name: "--max-tokens", reason: "must be >= 1".into() });
    }
    if !(1..=64).contains(&opts.parallel) {
        return Err(Error::InvalidArg { name: "--parallel", reason: format!("{} not in 1..=64", opts.parallel) });
    }
    opts.sampling.validate()?;
    let par = opts.parallel.min(records.len().max(1));
    let n_ctx_total = u32::try_from(opts.n_ctx as usize * par)
        .map_err(|_| Error::InvalidArg { name: "--n-ctx", reason: "n_ctx × parallel too large".into() })?;
    let cp = ContextParams {
        n_ctx: n_ctx_total,
        n_batch: STEP_TOKENS as u32,
        n_seq_max: par as u32,
        n_threads: opts.n_threads,
        reference_kernels: opts.exact,
        ..Default::default()
    };
    let mut ctx = Context::new(target.clone(), &cp)?;
    let mut batch = Batch::new(STEP_TOKENS.max(par), 1);
    let mut slots: Vec<Option<Slot>> = (0..par).map(|_| None).collect();
    // Finished records not yet handed on (None: skipped), so `each` sees record order.
    let mut done: BTreeMap<usize, Option<(Example, String)>> = BTreeMap::new();
    let (mut next, mut emit, mut n) = (0usize, 0usize, 0usize);
    let bar = super::teacher::progress("generate", records.len() as u64);
    loop {
        // Start the next prompts in free sequences.
        for slot in slots.iter_mut() {
            while slot.is_none() && next < records.len() {
                let i = next;
                next += 1;
                let prompt = tokenize_prompt(target, &records[i].prompt, &opts.tokenize)?;
                if prompt.is_empty() || prompt.len() + opts.max_tokens + 8 > opts.n_ctx as usize {
                    tracing::warn!(
                        "skipping {}: prompt of {} tokens does not fit --n-ctx {}",
                        records[i].origin,
                        prompt.len(),
                        opts.n_ctx
                    );
                    done.insert(i, None);
                    continue;
                }
                *slot = Some(Slot {
                    record: i,
                    prompt_len: prompt.len(),
                    tokens: prompt,
                    in_cache: 0,
                    rng: StdRng::seed_from_u64(opts.sampling.seed.wrapping_add(i as u64)),
                    row: None,
                });
            }
        }
        if slots.iter().all(Option::is_none) {
            break;
        }
        // One step: every running response's next token first, then prompt chunks.
        batch.clear();
        for decoding in [true, false] {
            for (seq, s) in slots.iter_mut().enumerate() {
                let Some(s) = s.as_mut() else { continue };
                let pending = s.tokens.len() - s.in_cache;
                if (pending == 1) != decoding || pending == 0 {
                    continue;
                }
                let take = pending.min(STEP_TOKENS - batch.n_tokens());
                for p in s.in_cache..s.in_cache + take {
                    let last = p + 1 == s.tokens.len();
                    if last {
                        s.row = Some(batch.n_tokens());
                    }
                    batch.add(s.tokens[p], p as i32, &[seq as i32], last)?;
                }
                s.in_cache += take;
            }
        }
        ctx.decode(&batch)?;
        for (seq, slot) in slots.iter_mut().enumerate() {
            let Some(s) = slot.as_mut() else { continue };
            let Some(row) = s.row.take() else { continue };
            let logits = ctx.logits(row)?;
            let t = if opts.sampling.is_greedy() {
                argmax(logits)
            } else {
                sample_from(&warp(logits, &opts.sampling), &mut s.rng)
            } as Token;
            s.tokens.push(t);
            if !target.is_eog(t) && s.generated() < opts.max_tokens {
                continue;
            }
            // Finished: free its sequence (cells and slot) for the next prompt.
            let Some(s) = slot.take() else { continue };
            ctx.seq_rm(seq as i32, -1, -1);
            let visible: Vec<Token> = s.tokens[s.prompt_len..].iter().copied().filter(|&t| !target.is_eog(t)).collect();
            let text = target.detokenize(&visible);
            done.insert(s.record, Some((Example { prompt_len: s.prompt_len, tokens: s.tokens }, text)));
        }
        while let Some(entry) = done.remove(&emit) {
            if let Some((ex, text)) = entry {
                each(emit, &records[emit], &ex, &text)?;
                n += 1;
            }
            emit += 1;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(n)
}

/// `data generate`: writes `{"prompt", "response"}` lines (the raw prompt, the target's text)
/// to `out` through a temp file renamed at the end. Returns the number of lines.
pub fn generate_dataset(target: &Arc<Model>, records: &[Record], opts: &GenerateOptions, out: &Path) -> Result<usize> {
    if records.is_empty() {
        return Err(Error::InvalidArg { name: "--input", reason: "no prompts".into() });
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = super::gguf_import::temp_path_for(out)?;
    let res = (|| -> Result<usize> {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(f);
        let n = generate_continuations(target, records, opts, |_, r, _, text| {
            let line = serde_json::json!({"prompt": r.prompt, "response": text});
            writeln!(w, "{line}").map_err(|e| Error::io(&tmp, e))
        })?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        if n == 0 {
            return Err(Error::InvalidArg { name: "--input", reason: "no prompt produced a response".into() });
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok(n)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
