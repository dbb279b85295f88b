//! Training data: JSONL loaders (GSM8K, HumanEval, ShareGPT, plain prompt/response, MT-bench
//! prompts), tokenization through the engine's llama.cpp tokenizer, response-only loss
//! positions, seeded shuffling, a validation split and right-padded batches.
//!
//! Formats, detected per line from the keys present:
//! * GSM8K `{"question", "answer"}`, HumanEval `{"prompt", "canonical_solution"}`, plain
//!   `{"prompt", "response"}`;
//! * ShareGPT `{"conversations": [{"from", "value"}, …]}`: the first human turn is the prompt
//!   and the assistant turn after it the response (later turns are ignored);
//! * prompt-only lines (`{"prompt"}`, `{"question"}`, MT-bench `{"turns": [..]}`) are accepted
//!   where only prompts are needed (`data generate`, evaluation on target continuations).
//!
//! Without `--chat` the prompt text is used as written (GSM8K and ShareGPT get a newline
//! appended); with `--chat` it is wrapped in the target's chat template as one user turn.
//! The response is tokenized on its own (no special tokens) and followed by EOS.
//!
//! This module never reads the network, never writes files and never panics on bad input:
//! every malformed line is reported as `file:line: reason`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{Error, Result};
use crate::backend::{ChatMessage, Model};

/// What to do with a malformed or unusable JSONL line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BadLines {
    /// Stop with an error naming file:line (default).
    #[default]
    Stop,
    /// Skip the line with a warning (through `tracing`) naming file:line.
    Skip,
}

/// One prompt (and maybe its response) read from a JSONL line.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The prompt text, before any chat template.
    pub prompt: String,
    /// The reference response, when the line has one.
    pub response: Option<String>,
    /// `file:line`, for messages.
    pub origin: String,
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

/// Extracts (prompt, response) from one parsed JSON line, or says why it cannot.
pub fn parse_record(v: &Value) -> std::result::Result<(String, Option<String>), String> {
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if let Some(conv) = v.get("conversations") {
        let turns = conv.as_array().ok_or("\"conversations\" is not an array")?;
        let mut prompt = None;
        for t in turns {
            let from = str_field(t, "from").ok_or("a conversation turn has no string \"from\"")?;
            let value = str_field(t, "value").ok_or("a conversation turn has no string \"value\"")?;
            match (from, &prompt) {
                ("human" | "user", None) => prompt = Some(value.to_string()),
                ("gpt" | "assistant" | "bing" | "chatgpt", Some(p)) => {
                    return Ok((format!("{p}\n"), Some(value.to_string())));
                }
                _ => {}
            }
        }
        return match prompt {
            Some(p) => Ok((format!("{p}\n"), None)),
            None => Err("\"conversations\" has no human turn".into()),
        };
    }
    if let Some(q) = str_field(v, "question") {
        return Ok((format!("{q}\n"), str_field(v, "answer").map(str::to_string)));
    }
    if let Some(p) = str_field(v, "prompt") {
        let resp = str_field(v, "response").or_else(|| str_field(v, "canonical_solution"));
        return Ok((p.to_string(), resp.map(str::to_string)));
    }
    if let Some(turns) = v.get("turns").and_then(|t| t.as_array()) {
        if let Some(first) = turns.first().and_then(|t| t.as_str()) {
            return Ok((first.to_string(), None));
        }
    }
    Err("unknown format: expected keys question/answer, prompt/canonical_solution, prompt/response, \
         conversations or turns"
        .into())
}

/// Reads records from JSONL files. With `need_response`, lines without a response count as
/// malformed. Blank lines are ignored. Returns the records and the number of skipped lines.
pub fn read_records(paths: &[PathBuf], need_response: bool, bad: BadLines) -> Result<(Vec<Record>, usize)> {
    if paths.is_empty() {
        return Err(Error::InvalidArg { name: "--data", reason: "no data files given".into() });
    }
    let mut out = Vec::new();
    let mut skipped = 0;
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let origin = format!("{}:{}", path.display(), i + 1);
            let parsed = serde_json::from_str::<Value>(line)
                .map_err(|e| format!("invalid JSON: {e}"))
                .and_then(|v| parse_record(&v))
                .and_then(|(p, r)| {
                    if need_response && r.is_none() {
                        Err("no response field (answer, canonical_solution, response or an assistant turn)".into())
                    } else {
                        Ok((p, r))
                    }
                });
            match parsed {
                Ok((prompt, response)) => out.push(Record { prompt, response, origin }),
                Err(reason) => match bad {
                    BadLines::Stop => {
                        return Err(Error::InvalidArg {
                            name: "--data",
                            reason: format!("{origin}: {reason} (pass --on-bad-line skip to skip such lines)"),
                        })
                    }
                    BadLines::Skip => {
                        tracing::warn!("skipping {origin}: {reason}");
                        skipped += 1;
                    }
                },
            }
        }
    }
    Ok((out, skipped))
}

/// How records become token sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeOptions {
    /// Wrap prompts in the model's chat template (one user turn, assistant header appended).
    pub chat: bool,
    /// Optional system message in chat mode.
    pub system: Option<String>,
    /// Maximum sequence length in tokens (prompt + response); longer responses are cut,
    /// examples whose prompt alone fills it are dropped.
    pub max_len: usize,
    /// Append the model's EOS after the response.
    pub append_eos: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { chat: false, system: None, max_len: 512, append_eos: true }
    }
}

/// A tokenized training sequence: `tokens[..prompt_len]` is the prompt, the rest the response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<i32>,
    pub prompt_len: usize,
}

impl Example {
    /// Positions whose next-token prediction is a response token (the loss positions): the
    /// logits at position t predict `tokens[t + 1]`.
    pub fn loss_positions(&self) -> Range<usize> {
        self.prompt_len.saturating_sub(1)..self.tokens.len().saturating_sub(1)
    }

    /// Number of loss positions.
    pub fn n_loss(&self) -> usize {
        self.loss_positions().len()
    }
}

/// The prompt text as the model sees it (chat template applied when asked).
pub fn render_prompt(model: &Model, prompt: &str, opts: &TokenizeOptions) -> Result<String> {
    if !opts.chat {
        return Ok(prompt.to_string());
    }
    let mut msgs = Vec::new();
    if let Some(s) = &opts.system {
        msgs.push(ChatMessage::new("system", s.clone()));
    }
    msgs.push(ChatMessage::new("user", prompt));
    Ok(model.apply_chat_template(&msgs, true)?)
}

/// Tokenizes a prompt as [`tokenize_records`] does (BOS when the model adds one).
pub fn tokenize_prompt(model: &Model, prompt: &str, opts: &TokenizeOptions) -> Result<Vec<i32>> {
    let text = render_prompt(model, prompt, opts)?;
    Ok(model.tokenize(&text, true, opts.chat)?)
}

/// Counts of what tokenization dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizeStats {
    pub examples: usize,
    pub dropped_no_response: usize,
    pub dropped_too_long: usize,
    pub truncated: usize,
}

/// Tokenizes records that have responses into [`Example`]s. Errors when nothing is left.
pub fn tokenize_records(
    model: &Model,
    records: &[Record],
    opts: &TokenizeOptions,
) -> Result<(Vec<Example>, TokenizeStats)> {
    if opts.max_len < 2 {
        return Err(Error::InvalidArg { name: "--max-len", reason: format!("must be >= 2, got {}", opts.max_len) });
    }
    let mut stats = TokenizeStats::default();
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let Some(resp) = &r.response else {
            stats.dropped_no_response += 1;
            continue;
        };
        let mut tokens = tokenize_prompt(model, &r.prompt, opts)?;
        if tokens.is_empty() {
            // A sequence needs one position before the first response token.
            tokens.push(model.bos());
        }
        let prompt_len = tokens.len();
        tokens.extend(model.tokenize(resp, false, false)?);
        if opts.append_eos {
            tokens.push(model.eos());
        }
        if tokens.len() == prompt_len {
            stats.dropped_no_response += 1;
            continue;
        }
        if prompt_len >= opts.max_len {
            stats.dropped_too_long += 1;
            continue;
        }
        if tokens.len() > opts.max_len {
            tokens.truncate(opts.max_len);
            stats.truncated += 1;
        }
        out.push(Example { tokens, prompt_len });
    }
    stats.examples = out.len();
    if out.is_empty() {
        return Err(Error::InvalidArg {
            name: "--data",
            reason: format!(
                "no usable examples after filtering ({} records; {} without a response, {} with a prompt \
                 of --max-len {} tokens or more)",
                records.len(),
                stats.dropped_no_response,
                stats.dropped_too_long,
                opts.max_len
            ),
        });
    }
    Ok((out, stats))
}

/// A seeded shuffle of 0..n: `rand`'s Fisher–Yates with ChaCha8, whose output rand_chacha
/// keeps value-stable across platforms and versions (resume depends on it).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    v
}

/// The order of examples in `epoch` (a fresh seeded shuffle each epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    permutation(n, seed ^ (epoch as u64).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// Splits off a validation set: a seeded random `val_fraction` (at least one example when
/// the fraction is > 0 and two or more examples exist). Returns (train, validation).
pub fn split_validation(examples: Vec<Example>, val_fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::InvalidArg {
            name: "--val-fraction",
            reason: format!("must be in [0, 1), got {val_fraction}"),
        });
    }
    let n = examples.len();
    let mut n_val = (n as f64 * val_fraction).round() as usize;
    if val_fraction > 0.0 && n >= 2 {
        n_val = n_val.clamp(1, n - 1);
    }
    let order = permutation(n, seed ^ 0x005e_ed0f_5a11);
    let val_set: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let mut train = Vec::with_capacity(n - n_val);
    let mut val = Vec::with_capacity(n_val);
    for (i, e) in examples.into_iter().enumerate() {
        if val_set.contains(&i) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, val))
}

/// 64-bit FNV-1a, for cache keys (stable across runs and platforms).
#[derive(Debug, Clone)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash of the token sequences and their prompt lengths (the teacher cache key's data part).
pub fn examples_hash(examples: &[Example]) -> u64 {
    let mut h = Fnv64::default();
    h.write(&(examples.len() as u64).to_le_bytes());
    for e in examples {
        h.write(&(e.tokens.len() as u64).to_le_bytes());
        h.write(&(e.prompt_len as u64).to_le_bytes());
        for t in &e.tokens {
            h.write(&t.to_le_bytes());
        }
    }
    h.finish()
}

/// Right-padded micro-batch of examples, as flat row-major arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    /// Indices of the examples (into the list the batch was built from).
    pub examples: Vec<usize>,
    /// Rows and padded length.
    pub batch: usize,
    pub seq: usize,
    /// (batch × seq) token ids, padding = `pad`.
    pub ids: Vec<u32>,
    /// (batch × seq) 1.0 for real tokens, 0.0 for padding.
    pub attention: Vec<f32>,
    /// Flat indices (row × seq + t) of the loss positions, row by row, t increasing.
    pub loss_rows: Vec<usize>,
}

impl PaddedBatch {
    /// Builds a batch from `examples[idx]` for each idx in `which`.
    pub fn new(examples: &[Example], which: &[usize], pad: u32) -> Result<PaddedBatch> {
        let mut seq = 0;
        for &i in which {
            let e = examples.get(i).ok_or_else(|| Error::InvalidArg {
                name: "batch",
                reason: format!("example index {i} out of range ({} examples)", examples.len()),
            })?;
            seq = seq.max(e.tokens.len());
        }
        let b = which.len();
        let mut ids = vec![pad; b * seq];
        let mut attention = vec![0.0f32; b * seq];
        let mut loss_rows = Vec::new();
        for (r, &i) in which.iter().enumerate() {
            let e = &examples[i];
            for (t, &tok) in e.tokens.iter().enumerate() {
                ids[r * seq + t] = tok.max(0) as u32;
                attention[r * seq + t] = 1.0;
            }
            loss_rows.extend(e.loss_positions().map(|t| r * seq + t));
        }
        Ok(PaddedBatch { examples: which.to_vec(), batch: b, seq, ids, attention, loss_rows })
    }

    /// Number of real (non-padding) tokens.
    pub fn n_tokens(&self) -> usize {
        self.attention.iter().filter(|&&a| a > 0.0).count()
    }
}

/// Reads `paths` and tokenizes them with `model`: the usual front door for training data.
pub fn load_examples(
    model: &Model,
    paths: &[PathBuf],
    opts: &TokenizeOptions,
    bad: BadLines,
) -> Result<(Vec<Example>, TokenizeStats)> {
    let (records, skipped) = read_records(paths, true, bad)?;
    if records.is_empty() {
        return Err(Error::InvalidArg {
            name: "--data",
            reason: format!("no records in {} ({skipped} malformed lines skipped)", join_paths(paths)),
        });
    }
    tokenize_records(model, &records, opts)
}

pub(crate) fn join_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Groups loss positions of a batch by example: `example index → range into loss_rows`.
pub fn loss_row_ranges(batch: &PaddedBatch, examples: &[Example]) -> HashMap<usize, Range<usize>> {
    let mut m = HashMap::new();
    let mut start = 0;
    for &i in &batch.examples {
        let n = examples.get(i).map(|e| e.n_loss()).unwrap_or(0);
        m.insert(i, start..start + n);
        start += n;
    }
    m
}

/// Writes JSONL lines atomically (temp file in the same folder, then rename).
pub fn write_jsonl_atomic(path: &Path, lines: &[Value]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Writes bytes to `path` through a temp file in the same folder that is then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = super::gguf_import::temp_path_for(path)?;
    let r = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Writes the folder `dir` atomically: `fill` writes into a temp folder beside it, which then
/// replaces `dir` (an older folder of that name is removed); on failure the temp folder goes.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let res = fill(&tmp).and_then(|_| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected() {
        let v: Value = serde_json::json!({"question": "q?", "answer": "a"});
        assert_eq!(parse_record(&v).unwrap(), ("q?\n".into(), Some("a".into())));
        let v: Value = serde_json::json!({"prompt": "def f():", "canonical_solution": " return 1"});
        assert_eq!(parse_record(&v).unwrap(), ("def f():".into(), Some(" return 1".into())));
        let v: Value = serde_json::json!({"prompt": "p", "response": "r"});
        assert_eq!(parse_record(&v).unwrap(), ("p".into(), Some("r".into())));
        let v: Value = serde_json::json!({"conversations": [
            {"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}, {"from": "human", "value": "more"}]});
        assert_eq!(parse_record(&v).unwrap(), ("hi\n".into(), Some("hello".into())));
        let v: Value = serde_json::json!({"turns": ["t1", "t2"]});
        assert_eq!(parse_record(&v).unwrap(), ("t1".into(), None));
        assert!(parse_record(&serde_json::json!({"x": 1})).is_err());
        assert!(parse_record(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn bad_lines_are_reported_with_file_and_line() {
        let dir = std::env::temp_dir().join(format!("adaspec-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(&p, "{\"prompt\":\"a\",\"response\":\"b\"}\n\n{broken\n{\"prompt\":\"c\"}\n").unwrap();
        let err = read_records(std::slice::from_ref(&p), true, BadLines::Stop).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:3"), "{err}");
        let (r, skipped) = read_records(std::slice::from_ref(&p), true, BadLines::Skip).unwrap();
        assert_eq!((r.len(), skipped), (1, 2));
        let (r, skipped) = read_records(&[p], false, BadLines::Skip).unwrap();
        assert_eq!((r.len(), skipped), (2, 1));
        assert!(r[1].origin.ends_with("d.jsonl:4"));
    }

    #[test]
    fn shuffles_are_seeded_permutations_and_split_is_disjoint() {
        let p = permutation(50, 7);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(p, permutation(50, 7));
        assert_ne!(p, permutation(50, 8));
        assert_ne!(epoch_order(50, 7, 0), epoch_order(50, 7, 1));
        let ex: Vec<Example> = (0..20).map(|i| Example { tokens: vec![i, i + 1, i + 2], prompt_len: 1 }).collect();
        let (tr, va) = split_validation(ex.clone(), 0.25, 3).unwrap();
        assert_eq!((tr.len(), va.len()), (15, 5));
        assert!(va.iter().all(|v| !tr.contains(v)));
        assert!(split_validation(ex, 1.0, 3).is_err());
    }

    #[test]
    fn padding_and_loss_positions() {
        let ex =
            vec![Example { tokens: vec![5, 6, 7, 8], prompt_len: 2 }, Example { tokens: vec![1, 2], prompt_len: 1 }];
        assert_eq!(ex[0].loss_positions(), 1..3);
        let b = PaddedBatch::new(&ex, &[1, 0], 0).unwrap();
        assert_eq!((b.batch, b.seq), (2, 4));
        assert_eq!(b.ids, vec![1, 2, 0, 0, 5, 6, 7, 8]);
        assert_eq!(b.attention, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(b.loss_rows, vec![0, 5, 6]);
        assert_eq!(b.n_tokens(), 6);
        assert!(PaddedBatch::new(&ex, &[2], 0).is_err());
    }
}
