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
    let mut n = 0;
    generate_each(target, records, opts, |i, r, out| match out {
        Some((ex, text)) => {
            n += 1;
            each(i, r, ex, text)
        }
        None => Ok(()),
    })?;
    Ok(n)
}

/// [`generate_continuations`], handing on skipped records too (as `None`), every record in order.
fn generate_each(
    target: &Arc<Model>,
    records: &[Record],
    opts: &GenerateOptions,
    mut each: impl FnMut(usize, &Record, Option<(&Example, &str)>) -> Result<()>,
) -> Result<()> {
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
    let (mut next, mut emit) = (0usize, 0usize);
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
        emit_ready(&mut done, &mut emit, records, &mut each, &bar)?;
    }
    // Records skipped after the last response.
    emit_ready(&mut done, &mut emit, records, &mut each, &bar)?;
    bar.finish_and_clear();
    Ok(())
}

/// Hands on the finished records that are next in record order.
fn emit_ready(
    done: &mut BTreeMap<usize, Option<(Example, String)>>,
    emit: &mut usize,
    records: &[Record],
    each: &mut impl FnMut(usize, &Record, Option<(&Example, &str)>) -> Result<()>,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    while let Some(entry) = done.remove(emit) {
        each(*emit, &records[*emit], entry.as_ref().map(|(ex, text)| (ex, text.as_str())))?;
        *emit += 1;
        bar.inc(1);
    }
    Ok(())
}

/// `data generate`: writes `{"prompt", "response"}` lines (the raw prompt, the target's text)
/// to `out`. Returns the number of lines.
///
/// Long runs survive interruption: every finished response is appended (and flushed) to
/// `OUT.partial` at once, after a header naming the run's settings; a later call with the same
/// target, prompts and settings resumes after the last complete line (a half-written one from a
/// kill is dropped), and one with other settings is refused naming what differs. `out` is
/// written from it through a temp file when every prompt is done, and the partial file removed.
pub fn generate_dataset(target: &Arc<Model>, records: &[Record], opts: &GenerateOptions, out: &Path) -> Result<usize> {
    if records.is_empty() {
        return Err(Error::InvalidArg { name: "--input", reason: "no prompts".into() });
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let partial = partial_path(out);
    let header = run_header(target, records, opts);
    let mut lines = resume_lines(&partial, &header)?;
    let done = lines.len();
    if done > 0 {
        // Shown at the CLI's default level: output from an earlier run is being reused.
        tracing::warn!("resuming {}: {done} of {} prompts already answered", partial.display(), records.len());
    }
    if done < records.len() {
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&partial).map_err(|e| Error::io(&partial, e))?;
        if done == 0 {
            f.set_len(0).map_err(|e| Error::io(&partial, e))?;
            writeln!(f, "{header}").map_err(|e| Error::io(&partial, e))?;
        }
        // Record i of the whole input samples with seed + i wherever the run restarted.
        let mut rest_opts = opts.clone();
        rest_opts.sampling.seed = opts.sampling.seed.wrapping_add(done as u64);
        let mut write = |j: usize, r: &Record, text: Option<&str>| -> Result<()> {
            let i = done + j;
            let line = match text {
                Some(t) => serde_json::json!({"record": i, "prompt": r.prompt, "response": t}),
                None => serde_json::json!({"record": i, "skipped": true}),
            };
            writeln!(f, "{line}").and_then(|_| f.flush()).map_err(|e| Error::io(&partial, e))?;
            lines.push(line);
            Ok(())
        };
        generate_each(target, &records[done..], &rest_opts, |j, r, out| write(j, r, out.map(|(_, text)| text)))?;
    }
    let answered: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("response").is_some()).collect();
    if answered.is_empty() {
        return Err(Error::InvalidArg { name: "--input", reason: "no prompt produced a response".into() });
    }
    let mut text = String::new();
    for l in &answered {
        text.push_str(&serde_json::json!({"prompt": l["prompt"], "response": l["response"]}).to_string());
        text.push('\n');
    }
    super::data::write_atomic(out, text.as_bytes())?;
    let _ = std::fs::remove_file(&partial);
    Ok(answered.len())
}

/// Where `data generate` keeps an unfinished run: `OUT.partial` next to `out`.
pub fn partial_path(out: &Path) -> std::path::PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// The first line of a partial file: the settings that decide its responses.
fn run_header(target: &Model, records: &[Record], opts: &GenerateOptions) -> serde_json::Value {
    let mut h = super::data::Fnv64::default();
    for r in records {
        h.write(r.prompt.as_bytes());
        h.write(&[0]);
    }
    let s = &opts.sampling;
    let target_size = std::fs::metadata(target.path()).map(|m| m.len()).unwrap_or(0);
    serde_json::json!({
        "adaspec_data_generate": 1,
        "--target": format!("{} ({target_size} bytes)", target.path().file_name().unwrap_or_default().to_string_lossy()),
        "--input": format!("{} prompts, hash {:016x}", records.len(), h.finish()),
        "--max-tokens": opts.max_tokens,
        "--temperature": s.temperature,
        "--top-k": s.top_k,
        "--top-p": s.top_p,
        "--seed": if s.is_greedy() { 0 } else { s.seed },
        "--chat": opts.tokenize.chat,
        "--system": opts.tokenize.system,
        "--n-ctx": opts.n_ctx,
        "--exact": opts.exact,
    })
}

/// The complete record lines of an earlier run's partial file, in record order; empty when
/// there is none. A last line cut short by a kill is dropped; a header of other settings is an
/// error naming each difference.
fn resume_lines(partial: &Path, header: &serde_json::Value) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(partial) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(partial, e)),
    };
    let mut it = text.split_inclusive('\n');
    let Some(first) = it.next() else { return Ok(Vec::new()) };
    let old: serde_json::Value = match serde_json::from_str(first.trim_end()) {
        Ok(v) if first.ends_with('\n') => v,
        _ => return Ok(Vec::new()), // killed while writing the header
    };
    let (Some(old_map), Some(new_map)) = (old.as_object(), header.as_object()) else {
        return Err(Error::InvalidArg {
            name: "--output",
            reason: format!("{} is not a partial `data generate` file", partial.display()),
        });
    };
    let diff: Vec<String> = new_map
        .iter()
        .filter(|(k, v)| old_map.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {} there, {v} now", old_map.get(k).unwrap_or(&serde_json::Value::Null)))
        .collect();
    if !diff.is_empty() {
        return Err(Error::InvalidArg {
            name: "--output",
            reason: format!(
                "{} is an unfinished run with other settings ({}); rerun with its settings to resume it, or delete it to start over",
                partial.display(),
                diff.join("; ")
            ),
        });
    }
    let mut lines = Vec::new();
    let mut good_len = first.len();
    for l in it {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l.trim_end()) else { break };
        if !l.ends_with('\n') || v.get("record").and_then(|r| r.as_u64()) != Some(lines.len() as u64) {
            break;
        }
        good_len += l.len();
        lines.push(v);
    }
    if good_len < text.len() {
        // Drop the torn tail so that appended lines follow the last complete one.
        let f = std::fs::OpenOptions::new().write(true).open(partial).map_err(|e| Error::io(partial, e))?;
        f.set_len(good_len as u64).map_err(|e| Error::io(partial, e))?;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ModelParams;
    use crate::tiny_model::{write_tiny_model, TinyModelConfig};

    /// An interrupted `data generate` resumes after the last complete line of its partial file
    /// (a torn line is dropped, answered records are not generated again), ends byte-identical
    /// to an uninterrupted run, and a partial file of other settings is refused by name.
    #[test]
    fn an_interrupted_run_resumes_where_it_stopped() {
        let dir = std::env::temp_dir().join(format!("adaspec-generate-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        write_tiny_model(&path, &TinyModelConfig::default()).unwrap();
        let target = Arc::new(Model::load(&path, &ModelParams::default()).unwrap());
        let records: Vec<Record> = (0..9)
            .map(|i| Record {
                prompt: format!("prompt {i} {}", "x ".repeat(i)),
                response: None,
                origin: format!("t:{i}"),
            })
            .collect();
        let opts = GenerateOptions { max_tokens: 6, n_ctx: 64, parallel: 3, exact: true, ..Default::default() };
        let (whole, resumed) = (dir.join("whole.jsonl"), dir.join("resumed.jsonl"));
        assert_eq!(generate_dataset(&target, &records, &opts, &whole).unwrap(), 9);
        assert!(!partial_path(&whole).exists(), "the partial file is removed when done");
        let want: Vec<String> = std::fs::read_to_string(&whole).unwrap().lines().map(String::from).collect();

        // A run killed after 4 records, mid-way through the 5th line; record 0 marked, to see
        // that it is kept rather than generated again.
        let mut text = format!("{}\n", run_header(&target, &records, &opts));
        for (i, line) in want.iter().take(4).enumerate() {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["record"] = i.into();
            if i == 0 {
                v["response"] = "KEPT".into();
            }
            text.push_str(&format!("{v}\n"));
        }
        text.push_str("{\"record\": 4, \"prom");
        std::fs::write(partial_path(&resumed), &text).unwrap();
        assert_eq!(generate_dataset(&target, &records, &opts, &resumed).unwrap(), 9);
        let got: Vec<String> = std::fs::read_to_string(&resumed).unwrap().lines().map(String::from).collect();
        assert!(got[0].contains("\"response\":\"KEPT\""), "{}", got[0]);
        assert_eq!(got[1..], want[1..]);
        assert!(!partial_path(&resumed).exists());

        // Other settings: refused, naming the flag; the partial file is left as it was.
        std::fs::write(partial_path(&resumed), &text).unwrap();
        let other = GenerateOptions { max_tokens: 7, ..opts.clone() };
        let err = generate_dataset(&target, &records, &other, &resumed).unwrap_err().to_string();
        assert!(err.contains("--max-tokens: 6 there, 7 now"), "{err}");
        assert_eq!(std::fs::read_to_string(partial_path(&resumed)).unwrap(), text);
        std::fs::remove_dir_all(&dir).ok();
    }
}
