//! Tiny random-weight GGUF models (llama / qwen2) that real llama.cpp loads and runs in
//! milliseconds, for tests across the project (engine, plugin, trainer parity).
//!
//! Everything here is deterministic for a seed: the same config gives a byte-identical file.
//! This module must never download anything or depend on files outside what it writes.
//!
//! The files are written with `gguf_rs::writer::GGUFWriter` (it writes every value type
//! llama.cpp needs here: u32/f32/bool/string scalars and string/i32 arrays).
//!
//! Layout notes for users of [`tiny_model_tensors`]:
//! * shapes are row-major (PyTorch convention, `[out_features, in_features]`); the GGUF file
//!   stores the same bytes with the dims reversed (`ne0` = innermost = `in_features`).
//! * llama.cpp applies RoPE to the GGUF `attn_q`/`attn_k` as stored: `llama` uses the
//!   "normal" (adjacent pairs) rotation, `qwen2` the NeoX (half-split) rotation. A candle model
//!   reading these tensors must use the matching rotation (no HF permutation is involved,
//!   the weights are random).
//! * with `f16: true`, 2-D tensors are stored as f16 and the returned values are the
//!   f16-rounded ones (exactly what llama.cpp reads); 1-D tensors (norms, biases) stay f32.

use std::path::{Path, PathBuf};

use gguf_rs::writer::{GGUFWriter, MetadataValue, TensorInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// GGML tensor type ids.
const GGML_TYPE_F32: u32 = 0;
const GGML_TYPE_F16: u32 = 1;
const GGML_TYPE_I64: u32 = 27;

/// Number of BPE merge rules the tiny tokenizer is trained for; with the 256 byte tokens and
/// 3 special tokens the vocabulary has (at most) 512 entries.
const TARGET_VOCAB: usize = 512;
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, recognised by llama.cpp's built-in template matcher (`<|im_start|>`).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A good `draft_noise` for [`write_tiny_pair`]: teacher-forced greedy agreement of the
/// draft with the target is ~0.78 (llama) / ~0.80 (qwen2), range 0.74..0.85 over seeds 1..=8.
/// Agreement is steep in the noise: 0.01 gives ~0.92, 0.1 ~0.45 (tests/tiny_model.rs).
pub const DEFAULT_DRAFT_NOISE: f32 = 0.03;

/// Architecture of a tiny model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// `llama`: no attention biases, "normal" RoPE.
    Llama,
    /// `qwen2`: q/k/v biases, NeoX RoPE.
    Qwen2,
}

impl TinyArch {
    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            TinyArch::Llama => "llama",
            TinyArch::Qwen2 => "qwen2",
        }
    }
}

/// Shape and seed of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelConfig {
    pub arch: TinyArch,
    /// Hidden size (default 64).
    pub n_embd: usize,
    /// Transformer blocks (default 2).
    pub n_layer: usize,
    /// Attention heads (default 4); `n_embd` must be a multiple.
    pub n_head: usize,
    /// KV heads (default 2); `n_head` must be a multiple.
    pub n_head_kv: usize,
    /// FFN hidden size (default 128).
    pub n_ff: usize,
    /// `{arch}.context_length` (default 4096).
    pub n_ctx_train: usize,
    /// Seed of the weight RNG (default 42).
    pub seed: u64,
    /// Standard deviation of the logits for a unit-RMS hidden state (default 6.0): large
    /// enough that greedy top-2 margins dwarf float noise.
    pub logit_scale: f32,
    /// Store 2-D weights as f16 (default false: f32).
    pub f16: bool,
    /// Control tokens `<|extra_i|>` appended to the vocabulary (default 0): a model pair whose
    /// vocabulary sizes differ, as llama.cpp allows up to 128.
    pub extra_tokens: usize,
    /// Scale of the blocks' output projections (`attn_output`, `ffn_down`; default 1.0). Small
    /// values make the next token depend mostly on the current one (a nearly bigram model that a
    /// small head can learn).
    pub block_scale: f32,
}

impl Default for TinyModelConfig {
    fn default() -> Self {
        TinyModelConfig {
            arch: TinyArch::Llama,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx_train: 4096,
            seed: 42,
            logit_scale: 6.0,
            f16: false,
            extra_tokens: 0,
            block_scale: 1.0,
        }
    }
}

impl TinyModelConfig {
    /// Checks the head arithmetic llama.cpp relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(Error::InvalidParam { name, reason });
        if self.n_embd == 0 || self.n_layer == 0 || self.n_ff == 0 || self.n_ctx_train == 0 {
            return bad("TinyModelConfig", format!("all sizes must be > 0, got {self:?}"));
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return bad("n_head", format!("must divide n_embd={}, got {}", self.n_embd, self.n_head));
        }
        if (self.n_embd / self.n_head) % 2 != 0 {
            return bad(
                "n_head",
                format!("head size n_embd/n_head must be even for RoPE, got {}", self.n_embd / self.n_head),
            );
        }
        if self.n_head_kv == 0 || self.n_head % self.n_head_kv != 0 {
            return bad("n_head_kv", format!("must divide n_head={}, got {}", self.n_head, self.n_head_kv));
        }
        if !(self.block_scale.is_finite() && self.block_scale >= 0.0) {
            return bad("block_scale", format!("must be finite and >= 0, got {}", self.block_scale));
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return bad("logit_scale", format!("must be finite and > 0, got {}", self.logit_scale));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer: GPT-2 byte-level BPE trained deterministically on a small built-in corpus.
// ---------------------------------------------------------------------------------------------

/// English prose and code the merges are learnt from.
const CORPUS: &str = r#"The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away into the forest.
Once upon a time there was a little girl who lived in a village near the forest. Whenever she went out, the little girl wore a red riding cloak, so everyone in the village called her Little Red Riding Hood.
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.
In the beginning of the year, the company reported that the number of users had increased by twenty percent, and that the new product would be released in the spring.
Speculative decoding uses a small draft model to propose tokens that the large target model then verifies in a single forward pass. When the draft is right, several tokens are accepted at once; when it is wrong, the target's own token is used instead, so the output is exactly the same as without the draft.
The weather today is sunny with a chance of rain in the afternoon. Temperatures will reach twenty degrees in the city and fifteen degrees near the coast.
She said that she would come to the meeting on Monday, but she did not say when she would leave. They were waiting for her at the station, and then they went home together.
What is the capital of France? The capital of France is Paris. What is the largest planet in the solar system? It is Jupiter, which is much larger than the Earth.
Please write a function that returns the sum of all the numbers in a list, and then explain how it works step by step.
fn main() {
    let mut total = 0;
    for i in 0..10 {
        total += i;
    }
    println!("total = {}", total);
}
pub fn add(a: i32, b: i32) -> i32 {
    a + b
}
impl Default for Config {
    fn default() -> Self {
        Self { name: String::new(), value: 0 }
    }
}
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")

class Model:
    def __init__(self, name, size):
        self.name = name
        self.size = size

    def forward(self, input):
        return self.layer(input)

import numpy as np
x = np.array([1, 2, 3])
print(x.mean())
const result = items.filter((item) => item.value > 0).map((item) => item.name);
function hello(name) { return "Hello, " + name + "!"; }
if (error) { console.log("error: " + error.message); return null; }
#include <stdio.h>
int main(void) { printf("hello, world\n"); return 0; }
The model was trained on a large dataset of text and code, and it can answer questions, write stories, and generate programs in many languages.
There are many ways to solve this problem. The first one is to use a loop, and the second one is to use recursion. Both of them return the same result.
He thought about what she had said for a long time, and then he decided that she was right after all.
The results of the experiment show that the new method is faster than the old one, while the quality of the output is the same.
"#;

/// GPT-2's reversible byte -> printable unicode mapping.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

/// Rough GPT-2 style pre-tokenisation: ` ?letters`, ` ?digit`, ` ?punctuation`, whitespace.
fn pre_split(text: &str) -> Vec<&str> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Digit,
        Space,
        Other,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = chars[i].0;
        let mut j = i;
        // A single space attaches to the following non-space chunk.
        if chars[j].1 == ' ' && j + 1 < chars.len() && class(chars[j + 1].1) != Class::Space {
            j += 1;
        }
        let cls = class(chars[j].1);
        j += 1;
        if cls != Class::Digit {
            while j < chars.len() && class(chars[j].1) == cls {
                j += 1;
            }
        }
        let end = chars.get(j).map_or(text.len(), |c| c.0);
        out.push(&text[start..end]);
        i = j;
    }
    out
}

/// The tiny tokenizer: token texts (ids = positions), token types and merge rules.
#[derive(Debug, Clone)]
pub struct TinyVocab {
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// Id of `<|endoftext|>` (bos and eos).
    pub eos: u32,
    pub im_start: u32,
    pub im_end: u32,
}

/// The deterministic tiny vocabulary (identical for every config and seed; built once).
pub fn tiny_vocab() -> &'static TinyVocab {
    static VOCAB: std::sync::OnceLock<TinyVocab> = std::sync::OnceLock::new();
    VOCAB.get_or_init(build_vocab)
}

fn build_vocab() -> TinyVocab {
    use std::collections::{BTreeMap, HashSet};

    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut known: HashSet<String> = tokens.iter().cloned().collect();

    // Word frequencies, words as sequences of symbols.
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for piece in pre_split(CORPUS) {
        let syms: Vec<String> = piece.bytes().map(|b| table[b as usize].to_string()).collect();
        *words.entry(syms).or_insert(0) += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();

    let n_merged = TARGET_VOCAB - 256 - SPECIAL_TOKENS.len();
    let mut merges = Vec::new();
    while tokens.len() < 256 + n_merged {
        let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (syms, n) in &words {
            for w in syms.windows(2) {
                *pairs.entry((w[0].as_str(), w[1].as_str())).or_insert(0) += n;
            }
        }
        // Most frequent pair; ties go to the lexicographically smallest (BTreeMap order).
        let mut best: Option<((&str, &str), usize)> = None;
        for (p, n) in pairs {
            if best.map_or(true, |(_, bn)| n > bn) {
                best = Some((p, n));
            }
        }
        let Some(((a, b), n)) = best else { break };
        if n < 2 {
            break;
        }
        let (a, b) = (a.to_string(), b.to_string());
        let merged = format!("{a}{b}");
        merges.push(format!("{a} {b}"));
        if known.insert(merged.clone()) {
            tokens.push(merged.clone());
        }
        for (syms, _) in words.iter_mut() {
            let mut out = Vec::with_capacity(syms.len());
            let mut k = 0;
            while k < syms.len() {
                if k + 1 < syms.len() && syms[k] == a && syms[k + 1] == b {
                    out.push(merged.clone());
                    k += 2;
                } else {
                    out.push(std::mem::take(&mut syms[k]));
                    k += 1;
                }
            }
            *syms = out;
        }
    }
    let mut token_types = vec![1i32; tokens.len()];
    let eos = tokens.len() as u32;
    for s in SPECIAL_TOKENS {
        tokens.push(s.to_string());
        token_types.push(3);
    }
    TinyVocab { tokens, token_types, merges, eos, im_start: eos + 1, im_end: eos + 2 }
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// Standard normal samples (Box-Muller on the seeded generator; no extra crate needed).
struct Normal {
    rng: StdRng,
    spare: Option<f32>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Normal { rng: StdRng::seed_from_u64(seed), spare: None }
    }

    fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1: f64 = 1.0 - self.rng.random::<f64>(); // (0, 1]
        let u2: f64 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }

    fn vec(&mut self, n: usize, std: f32, mean: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.sample()).collect()
    }
}

/// f32 -> IEEE half bits, round to nearest even (the `half` crate; bit-identical to the
/// hand-written conversion it replaced for every non-NaN f32, so the tiny models did not change).
fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// IEEE half bits -> f32.
fn f16_bits_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Raw weights of the model `cfg` describes: `(gguf tensor name, row-major shape, values)`,
/// in file order. See the module docs for the layout conventions.
pub fn tiny_model_tensors(cfg: &TinyModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let n_vocab = tiny_vocab().tokens.len() + cfg.extra_tokens;
    let mut rng = Normal::new(cfg.seed);
    let d = cfg.n_embd;
    let hd = cfg.head_dim();
    let q_dim = cfg.n_head * hd;
    let kv_dim = cfg.n_head_kv * hd;
    let lin = |n_in: usize| 1.0 / (n_in as f32).sqrt();

    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    t.push(("token_embd.weight".into(), vec![n_vocab, d], rng.vec(n_vocab * d, 1.0, 0.0)));
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        t.push((p("attn_norm.weight"), vec![d], rng.vec(d, 0.1, 1.0)));
        // Larger q/k scale: peaky attention makes the next token depend on the context.
        t.push((p("attn_q.weight"), vec![q_dim, d], rng.vec(q_dim * d, 2.0 * lin(d), 0.0)));
        t.push((p("attn_k.weight"), vec![kv_dim, d], rng.vec(kv_dim * d, 2.0 * lin(d), 0.0)));
        t.push((p("attn_v.weight"), vec![kv_dim, d], rng.vec(kv_dim * d, lin(d), 0.0)));
        if cfg.arch == TinyArch::Qwen2 {
            t.push((p("attn_q.bias"), vec![q_dim], rng.vec(q_dim, 0.2, 0.0)));
            t.push((p("attn_k.bias"), vec![kv_dim], rng.vec(kv_dim, 0.2, 0.0)));
            t.push((p("attn_v.bias"), vec![kv_dim], rng.vec(kv_dim, 0.2, 0.0)));
        }
        t.push((p("attn_output.weight"), vec![d, q_dim], rng.vec(d * q_dim, cfg.block_scale * lin(q_dim), 0.0)));
        t.push((p("ffn_norm.weight"), vec![d], rng.vec(d, 0.1, 1.0)));
        t.push((p("ffn_gate.weight"), vec![cfg.n_ff, d], rng.vec(cfg.n_ff * d, lin(d), 0.0)));
        t.push((p("ffn_up.weight"), vec![cfg.n_ff, d], rng.vec(cfg.n_ff * d, lin(d), 0.0)));
        t.push((p("ffn_down.weight"), vec![d, cfg.n_ff], rng.vec(d * cfg.n_ff, cfg.block_scale * lin(cfg.n_ff), 0.0)));
    }
    t.push(("output_norm.weight".into(), vec![d], rng.vec(d, 0.1, 1.0)));
    t.push(("output.weight".into(), vec![n_vocab, d], rng.vec(n_vocab * d, cfg.logit_scale * lin(d), 0.0)));
    if cfg.f16 {
        for (_, shape, data) in t.iter_mut() {
            if shape.len() == 2 {
                for v in data.iter_mut() {
                    *v = f16_bits_to_f32(f32_to_f16_bits(*v));
                }
            }
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

fn gguf_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Gguf(format!("{}: {what}: {e}", path.display()))
}

fn write_gguf(path: &Path, cfg: &TinyModelConfig, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    write_gguf_as(path, cfg, cfg.arch.name(), &|_| {}, tensors)
}

/// [`write_gguf`] under another architecture name with extra metadata; a tensor named `d2t` is
/// stored as I64 (its values are whole numbers).
fn write_gguf_as(
    path: &Path,
    cfg: &TinyModelConfig,
    arch: &str,
    extra: &dyn Fn(&mut GGUFWriter),
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<()> {
    cfg.validate()?;
    let vocab = tiny_vocab();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidParam { name: "path", reason: format!("{} has no file name", path.display()) })?;
    // Unique per process and call, so concurrent writers never share a temp file.
    static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}-{n}", std::process::id()));

    let result = (|| -> Result<()> {
        let mut w = GGUFWriter::new(&tmp, 3).map_err(|e| gguf_err(&tmp, "create", e))?;
        let u32v = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        w.add_metadata("general.architecture", arch);
        w.add_metadata("general.name", &format!("adaspec-tiny-{arch}"));
        w.add_metadata_u32("general.alignment", 32);
        w.add_metadata_u32("general.file_type", if cfg.f16 { 1 } else { 0 });
        w.add_metadata_u32(&format!("{arch}.context_length"), u32v(cfg.n_ctx_train));
        w.add_metadata_u32(&format!("{arch}.embedding_length"), u32v(cfg.n_embd));
        w.add_metadata_u32(&format!("{arch}.block_count"), u32v(cfg.n_layer));
        w.add_metadata_u32(&format!("{arch}.feed_forward_length"), u32v(cfg.n_ff));
        w.add_metadata_u32(&format!("{arch}.attention.head_count"), u32v(cfg.n_head));
        w.add_metadata_u32(&format!("{arch}.attention.head_count_kv"), u32v(cfg.n_head_kv));
        w.add_metadata_u32(&format!("{arch}.rope.dimension_count"), u32v(cfg.head_dim()));
        w.add_metadata_u32(&format!("{arch}.vocab_size"), u32v(vocab.tokens.len() + cfg.extra_tokens));
        w.add_metadata_f32(&format!("{arch}.rope.freq_base"), 10000.0);
        w.add_metadata_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-6);

        w.add_metadata("tokenizer.ggml.model", "gpt2");
        w.add_metadata("tokenizer.ggml.pre", "qwen2");
        w.add_metadata_array(
            "tokenizer.ggml.tokens",
            vocab
                .tokens
                .iter()
                .cloned()
                .chain((0..cfg.extra_tokens).map(|i| format!("<|extra_{i}|>")))
                .map(MetadataValue::String)
                .collect(),
        );
        w.add_metadata_array(
            "tokenizer.ggml.token_type",
            vocab
                .token_types
                .iter()
                .copied()
                .chain(std::iter::repeat(3).take(cfg.extra_tokens))
                .map(MetadataValue::Int32)
                .collect(),
        );
        w.add_metadata_array(
            "tokenizer.ggml.merges",
            vocab.merges.iter().map(|s| MetadataValue::String(s.clone())).collect(),
        );
        w.add_metadata_u32("tokenizer.ggml.bos_token_id", vocab.eos);
        w.add_metadata_u32("tokenizer.ggml.eos_token_id", vocab.eos);
        w.add_metadata_u32("tokenizer.ggml.padding_token_id", vocab.eos);
        w.add_metadata_bool("tokenizer.ggml.add_bos_token", false);
        w.add_metadata_bool("tokenizer.ggml.add_eos_token", false);
        w.add_metadata("tokenizer.chat_template", CHATML_TEMPLATE);
        extra(&mut w);

        let mut payloads = Vec::with_capacity(tensors.len());
        for (name, shape, data) in tensors {
            let f16 = cfg.f16 && shape.len() == 2;
            let i64 = name == "d2t";
            // gguf-rs 0.1.8 sizes I64 tensors as if they had 256-element blocks: write `d2t` as
            // an f32 tensor of twice the length (the same bytes), patched to I64 below.
            let dims: Vec<u64> = if i64 {
                vec![2 * shape[0] as u64]
            } else {
                // GGUF dims are innermost first.
                shape.iter().rev().map(|&x| x as u64).collect()
            };
            w.add_tensor(TensorInfo {
                name: name.clone(),
                shape: dims,
                dtype: if f16 { GGML_TYPE_F16 } else { GGML_TYPE_F32 },
            });
            let bytes: Vec<u8> = if i64 {
                data.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect()
            } else if f16 {
                data.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()).collect()
            } else {
                data.iter().flat_map(|v| v.to_le_bytes()).collect()
            };
            payloads.push(bytes);
        }
        w.write().map_err(|e| gguf_err(&tmp, "write header", e))?;
        for (i, bytes) in payloads.iter().enumerate() {
            w.write_tensor_data(i, bytes).map_err(|e| gguf_err(&tmp, &format!("write tensor {}", tensors[i].0), e))?;
        }
        w.finalize().map_err(|e| gguf_err(&tmp, "flush", e))?;
        drop(w);
        if let Some((_, shape, _)) = tensors.iter().find(|(n, _, _)| n == "d2t") {
            patch_f32_to_i64(&tmp, "d2t", shape[0] as u64)?;
        }
        std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Rewrites the tensor info of the 1-D f32 tensor `name` (written with 2·`n` elements) as an
/// I64 tensor of `n` elements: the same data bytes, fixed-width header fields patched in place.
pub fn patch_f32_to_i64(path: &Path, name: &str, n: u64) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut bytes = std::fs::read(path).map_err(io)?;
    // Tensor info: u64 name length, name, u32 n_dims (1), u64 ne0, u32 type, u64 offset.
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    key.extend_from_slice(&1u32.to_le_bytes());
    key.extend_from_slice(&(2 * n).to_le_bytes());
    key.extend_from_slice(&GGML_TYPE_F32.to_le_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .ok_or_else(|| Error::Gguf(format!("{}: tensor info of {name} not found", path.display())))?;
    let ne0 = at + 8 + name.len() + 4;
    bytes[ne0..ne0 + 8].copy_from_slice(&n.to_le_bytes());
    bytes[ne0 + 8..ne0 + 12].copy_from_slice(&GGML_TYPE_I64.to_le_bytes());
    std::fs::write(path, bytes).map_err(io)
}

/// Writes a complete GGUF (metadata + tokenizer + random f32 (or f16) weights) to `path`,
/// through a temporary file in the same folder that is then renamed.
pub fn write_tiny_model(path: &Path, cfg: &TinyModelConfig) -> Result<()> {
    cfg.validate()?;
    write_gguf(path, cfg, &tiny_model_tensors(cfg))
}

/// A tensor as the writers take it: (GGUF name, row-major shape, values).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Shape of a tiny `eagle3` head for a tiny target.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyHeadConfig {
    /// FFN width (default 128).
    pub n_ff: usize,
    /// A reduced draft vocabulary of this many target tokens (every other id from 0) with its
    /// own LM head and `d2t`; `None` (default) shares the target's LM head.
    pub draft_vocab: Option<usize>,
    /// Seed of the head's weights (default 7).
    pub seed: u64,
}

impl Default for TinyHeadConfig {
    fn default() -> Self {
        TinyHeadConfig { n_ff: 128, draft_vocab: None, seed: 7 }
    }
}

/// Writes a random-weight `eagle3` head (EAGLE-3 layout, llama.cpp's `eagle3` architecture) for
/// the tiny target `target`: hidden size and heads as the target's, one decoder layer, features
/// of the target layers [`crate::features::eagle3_layers`], the target's tokenizer, embedding
/// shared with the target.
pub fn write_tiny_head(path: &Path, target: &TinyModelConfig, head: &TinyHeadConfig) -> Result<()> {
    let t = tiny_head_tensors(target, head)?;
    let layers = crate::features::eagle3_layers(target.n_layer);
    let cfg = TinyModelConfig { n_layer: 1, n_ff: head.n_ff, f16: false, ..target.clone() };
    let target_hidden = target.n_embd as u32;
    let extra = move |w: &mut GGUFWriter| {
        w.add_metadata_array("eagle3.target_layers", layers.iter().map(|&l| MetadataValue::Int32(l as i32)).collect());
        w.add_metadata_u32("eagle3.target_hidden_size", target_hidden);
    };
    write_gguf_as(path, &cfg, "eagle3", &extra, &t)
}

/// The tensors [`write_tiny_head`] writes (row-major shapes; `d2t` as whole-number floats).
pub fn tiny_head_tensors(target: &TinyModelConfig, head: &TinyHeadConfig) -> Result<Vec<NamedTensor>> {
    target.validate()?;
    let h = target.n_embd;
    let hd = target.head_dim();
    let (q_dim, kv_dim) = (target.n_head * hd, target.n_head_kv * hd);
    let n_vocab = tiny_vocab().tokens.len() + target.extra_tokens;
    let mut rng = Normal::new(head.seed ^ 0xea61e3);
    let lin = |n_in: usize| 1.0 / (n_in as f32).sqrt();
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    t.push(("fc.weight".into(), vec![h, 3 * h], rng.vec(3 * h * h, lin(3 * h), 0.0)));
    let p = |s: &str| format!("blk.0.{s}");
    t.push((p("attn_norm.weight"), vec![h], rng.vec(h, 0.1, 1.0)));
    t.push((p("attn_norm_2.weight"), vec![h], rng.vec(h, 0.1, 1.0)));
    t.push((p("attn_q.weight"), vec![q_dim, 2 * h], rng.vec(q_dim * 2 * h, 2.0 * lin(2 * h), 0.0)));
    t.push((p("attn_k.weight"), vec![kv_dim, 2 * h], rng.vec(kv_dim * 2 * h, 2.0 * lin(2 * h), 0.0)));
    t.push((p("attn_v.weight"), vec![kv_dim, 2 * h], rng.vec(kv_dim * 2 * h, lin(2 * h), 0.0)));
    t.push((p("attn_output.weight"), vec![h, q_dim], rng.vec(h * q_dim, lin(q_dim), 0.0)));
    t.push((p("ffn_norm.weight"), vec![h], rng.vec(h, 0.1, 1.0)));
    t.push((p("ffn_gate.weight"), vec![head.n_ff, h], rng.vec(head.n_ff * h, lin(h), 0.0)));
    t.push((p("ffn_up.weight"), vec![head.n_ff, h], rng.vec(head.n_ff * h, lin(h), 0.0)));
    t.push((p("ffn_down.weight"), vec![h, head.n_ff], rng.vec(h * head.n_ff, lin(head.n_ff), 0.0)));
    t.push(("output_norm.weight".into(), vec![h], rng.vec(h, 0.1, 1.0)));
    if let Some(v) = head.draft_vocab {
        if v == 0 || 2 * (v - 1) >= n_vocab {
            return Err(Error::InvalidParam {
                name: "draft_vocab",
                reason: format!("{v} every-other ids do not fit a vocabulary of {n_vocab}"),
            });
        }
        t.push(("output.weight".into(), vec![v, h], rng.vec(v * h, target.logit_scale * lin(h), 0.0)));
        // Draft id i is target id 2i. llama.cpp's graph scatters draft logit i to target row
        // d2t[i] (ggml_set_rows): the GGUF holds absolute target ids, not EAGLE-3's offsets.
        t.push(("d2t".into(), vec![v], (0..v).map(|i| (2 * i) as f32).collect()));
    }
    Ok(t)
}

/// Writes a random-weight FSPAD-family head ([`crate::fspad`], variant `variant`) for the tiny
/// target `target`: its hidden size, heads and tokenizer, FFN width `head.n_ff` (the
/// feature-sampling MLP as wide), optionally its own LM head over a reduced vocabulary.
pub fn write_tiny_fspad_head(
    path: &Path,
    target: &TinyModelConfig,
    variant: crate::fspad::Variant,
    head: &TinyHeadConfig,
) -> Result<()> {
    let t = tiny_fspad_tensors(target, variant, head)?;
    let cfg = TinyModelConfig { n_layer: 1, n_ff: head.n_ff, f16: false, ..target.clone() };
    let n_vocab = (tiny_vocab().tokens.len() + target.extra_tokens) as u32;
    let (hd, fs) = (target.head_dim() as u32, if variant.sampling() { head.n_ff as u32 } else { 0 });
    let extra = move |w: &mut GGUFWriter| {
        w.add_metadata("fspad.variant", variant.name());
        w.add_metadata_u32("fspad.attention.key_length", hd);
        w.add_metadata_u32("fspad.sampling_length", fs);
        w.add_metadata_u32("fspad.target_vocab_size", n_vocab);
    };
    write_gguf_as(path, &cfg, crate::fspad::ARCH, &extra, &t)
}

/// The tensors [`write_tiny_fspad_head`] writes.
pub fn tiny_fspad_tensors(
    target: &TinyModelConfig,
    variant: crate::fspad::Variant,
    head: &TinyHeadConfig,
) -> Result<Vec<NamedTensor>> {
    target.validate()?;
    let cfg = crate::fspad::FspadConfig {
        variant,
        hidden: target.n_embd,
        n_head: target.n_head,
        n_head_kv: target.n_head_kv,
        head_dim: target.head_dim(),
        ffn: head.n_ff,
        fs_ffn: if variant.sampling() { head.n_ff } else { 0 },
        rope_theta: 10000.0,
        rms_eps: 1e-6,
        target_vocab: tiny_vocab().tokens.len() + target.extra_tokens,
    };
    let mut rng = Normal::new(head.seed ^ 0xf5bad);
    let mut t: Vec<NamedTensor> = Vec::new();
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data = if shape.len() == 1 && name.ends_with("norm.weight") {
            rng.vec(n, 0.1, 1.0)
        } else if shape.len() == 1 {
            rng.vec(n, 0.02, 0.0)
        } else {
            rng.vec(n, 1.0 / (shape[1] as f32).sqrt(), 0.0)
        };
        t.push((name, shape, data));
    }
    if let Some(v) = head.draft_vocab {
        let h = target.n_embd;
        if v == 0 || 2 * (v - 1) >= cfg.target_vocab {
            return Err(Error::InvalidParam {
                name: "draft_vocab",
                reason: format!("{v} every-other ids do not fit a vocabulary of {}", cfg.target_vocab),
            });
        }
        t.push(("output.weight".into(), vec![v, h], rng.vec(v * h, target.logit_scale / (h as f32).sqrt(), 0.0)));
        t.push(("d2t".into(), vec![v], (0..v).map(|i| (2 * i) as f32).collect()));
    }
    Ok(t)
}

/// The draft's weights: the target's plus seeded Gaussian noise of `draft_noise` times each
/// tensor's RMS (norm weights are perturbed around their mean of 1 the same way).
pub fn perturb_tensors(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    draft_noise: f32,
    seed: u64,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Normal::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    tensors
        .iter()
        .map(|(name, shape, data)| {
            let n = data.len().max(1) as f32;
            let mean = data.iter().sum::<f32>() / n;
            let rms = (data.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt();
            // Norm weights hover around 1: scale by their magnitude, not their spread.
            let scale = if name.contains("norm") { mean.abs() * 0.1 } else { rms };
            let out = data.iter().map(|v| v + draft_noise * scale * rng.sample()).collect();
            (name.clone(), shape.clone(), out)
        })
        .collect()
}

/// Writes `dir/target.gguf` and `dir/draft.gguf` (default shape of `arch`, same tokenizer).
/// The draft is the target's weights plus seeded noise of relative size `draft_noise`
/// (see [`DEFAULT_DRAFT_NOISE`]), so greedy agreement is high but imperfect.
pub fn write_tiny_pair(dir: &Path, arch: TinyArch, draft_noise: f32, seed: u64) -> Result<(PathBuf, PathBuf)> {
    if !(draft_noise.is_finite() && draft_noise >= 0.0) {
        return Err(Error::InvalidParam {
            name: "draft_noise",
            reason: format!("must be finite and >= 0, got {draft_noise}"),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let cfg = TinyModelConfig { arch, seed, ..TinyModelConfig::default() };
    cfg.validate()?;
    let target = dir.join("target.gguf");
    let draft = dir.join("draft.gguf");
    let tensors = tiny_model_tensors(&cfg);
    write_gguf(&target, &cfg, &tensors)?;
    write_gguf(&draft, &cfg, &perturb_tensors(&tensors, draft_noise, seed))?;
    Ok((target, draft))
}

/// A tiny pair whose vocabulary sizes differ: the target has `target_extra` and the draft
/// `draft_extra` control tokens beyond the shared 512. The draft's head favours its extra
/// tokens (their output rows are scaled up), so without masking it would propose ids the
/// target does not have.
pub fn write_tiny_pair_vocab(
    dir: &Path,
    arch: TinyArch,
    seed: u64,
    target_extra: usize,
    draft_extra: usize,
) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let tcfg = TinyModelConfig { arch, seed, extra_tokens: target_extra, ..TinyModelConfig::default() };
    let dcfg = TinyModelConfig { extra_tokens: draft_extra, ..tcfg.clone() };
    let base = tiny_vocab().tokens.len();
    let t_tensors = tiny_model_tensors(&tcfg);
    // The draft: the target's weights on the shared vocabulary, plus noise, plus its own rows.
    let mut d_tensors = perturb_tensors(&t_tensors, DEFAULT_DRAFT_NOISE, seed);
    let mut rng = Normal::new(seed ^ 0x5eed);
    let d = tcfg.n_embd;
    for (name, shape, data) in d_tensors.iter_mut() {
        if name == "token_embd.weight" || name == "output.weight" {
            let scale = if name == "output.weight" { 3.0 * tcfg.logit_scale / (d as f32).sqrt() } else { 1.0 };
            data.truncate(base * d);
            data.extend(rng.vec(draft_extra * d, scale, 0.0));
            shape[0] = base + draft_extra;
        }
    }
    let target = dir.join("target.gguf");
    let draft = dir.join("draft.gguf");
    write_gguf(&target, &tcfg, &t_tensors)?;
    write_gguf(&draft, &dcfg, &d_tensors)?;
    Ok((target, draft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_is_512_unique_tokens_and_valid_merges() {
        let v = tiny_vocab();
        assert_eq!(v.tokens.len(), TARGET_VOCAB);
        let set: std::collections::HashSet<&String> = v.tokens.iter().collect();
        assert_eq!(set.len(), v.tokens.len());
        for m in &v.merges {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(set.contains(&a.to_string()) && set.contains(&b.to_string()), "{m}");
            assert!(set.contains(&format!("{a}{b}")), "{m}");
        }
        assert_eq!(v.tokens[v.eos as usize], "<|endoftext|>");
        assert_eq!(v.tokens[v.im_end as usize], "<|im_end|>");
    }

    #[test]
    fn f16_roundtrip() {
        for x in [0.0f32, 1.0, -2.5, 0.333, 65504.0, 1e-5, -1e-7, 6.1e-5] {
            let y = f16_bits_to_f32(f32_to_f16_bits(x));
            assert!((x - y).abs() <= x.abs() * 1e-3 + 6e-8, "{x} -> {y}");
        }
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(-2.0), 0xc000);
        assert_eq!(f32_to_f16_bits(1e6), 0x7c00);
    }

    #[test]
    fn tensors_are_deterministic_and_shaped() {
        let cfg = TinyModelConfig { arch: TinyArch::Qwen2, ..Default::default() };
        let a = tiny_model_tensors(&cfg);
        assert_eq!(a, tiny_model_tensors(&cfg));
        for (name, shape, data) in &a {
            assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        }
        assert!(a.iter().any(|t| t.0 == "blk.1.attn_k.bias"));

        // f16: 2-D values are exactly the stored halves; 1-D ones are the f32 originals.
        let h = tiny_model_tensors(&TinyModelConfig { f16: true, ..cfg });
        for ((name, shape, vh), (_, _, vf)) in h.iter().zip(&a) {
            if shape.len() == 2 {
                assert!(vh.iter().all(|&v| f16_bits_to_f32(f32_to_f16_bits(v)) == v), "{name}");
            } else {
                assert_eq!(vh, vf, "{name}");
            }
        }
    }
}
