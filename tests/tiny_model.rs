//! The generated tiny GGUFs load and run in real llama.cpp: tokenizer round trips, chat
//! template, varied greedy generation, draft/target agreement in a useful band, determinism.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use adaspec::tiny_model::{
    tiny_model_tensors, write_tiny_model, write_tiny_pair, TinyArch, TinyModelConfig, DEFAULT_DRAFT_NOISE,
};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;

fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().expect("llama backend init");
        if std::env::var_os("TINY_LOGS").is_none() {
            b.void_logs();
        }
        b
    })
}

/// A fresh folder under the temp dir, removed when dropped.
struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn test_dir(name: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("adaspec-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TestDir(d)
}

fn load(path: &std::path::Path) -> LlamaModel {
    LlamaModel::load_from_file(backend(), path, &LlamaModelParams::default())
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn context(model: &LlamaModel, n_ctx: u32) -> LlamaContext<'_> {
    let p = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_ubatch(n_ctx)
        .with_n_threads(1)
        .with_n_threads_batch(1);
    model.new_context(backend(), p).expect("context")
}

fn argmax(logits: &[f32]) -> (i32, f32) {
    let mut best = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.1 {
            best = (i, l, best.1);
        } else if l > best.2 {
            best.2 = l;
        }
    }
    (best.0 as i32, best.1 - best.2)
}

/// Greedy one-token-at-a-time generation; returns the tokens and the top-2 margins.
fn greedy(model: &LlamaModel, prompt: &[LlamaToken], n: usize) -> (Vec<LlamaToken>, Vec<f32>) {
    let mut ctx = context(model, 512);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, &t) in prompt.iter().enumerate() {
        batch.add(t, i as i32, &[0], i + 1 == prompt.len()).unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut out = Vec::new();
    let mut margins = Vec::new();
    let mut last = batch.n_tokens() - 1;
    for _ in 0..n {
        let (tok, margin) = argmax(ctx.get_logits_ith(last));
        out.push(LlamaToken(tok));
        margins.push(margin);
        batch.clear();
        batch.add(LlamaToken(tok), (prompt.len() + out.len() - 1) as i32, &[0], true).unwrap();
        ctx.decode(&mut batch).unwrap();
        last = 0;
    }
    (out, margins)
}

/// Teacher-forced argmax at every position of `tokens` (one batch).
fn teacher_forced_argmax(model: &LlamaModel, tokens: &[LlamaToken]) -> Vec<i32> {
    let mut ctx = context(model, 512);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, &t) in tokens.iter().enumerate() {
        batch.add(t, i as i32, &[0], true).unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    (0..tokens.len()).map(|i| argmax(ctx.get_logits_ith(i as i32)).0).collect()
}

#[test]
fn both_archs_load_tokenize_and_chat() {
    let dir = test_dir("load");
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        for f16 in [false, true] {
            let path = dir.join(format!("{arch:?}-{f16}.gguf"));
            let cfg = TinyModelConfig { arch, f16, ..Default::default() };
            let t = Instant::now();
            write_tiny_model(&path, &cfg).unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            let written = t.elapsed();
            let model = load(&path);
            println!("{arch:?} f16={f16}: {size} bytes, written in {written:?}, loaded in {:?}", t.elapsed() - written);
            assert!(size < 1_000_000, "{size} bytes");
            let vocab = model.vocab();
            assert_eq!(model.n_vocab(), 512);
            assert_eq!(model.n_embd(), 64);
            assert_eq!(model.n_layer(), 2);
            assert_eq!(model.n_ctx_train(), 4096);
            assert_eq!(
                model.meta_val_str("general.architecture").unwrap(),
                match arch {
                    TinyArch::Llama => "llama",
                    TinyArch::Qwen2 => "qwen2",
                }
            );

            for text in [
                "Hello, world! The quick brown fox jumps over the lazy dog.",
                "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
                "  leading spaces, tabs\tand\r\nnewlines  ",
                "UTF-8: héllo wörld — 日本語 🙂 ∑",
                "",
            ] {
                let toks = vocab.tokenize(text.as_bytes(), false, false);
                let back = vocab.detokenize(&toks, false, false);
                assert_eq!(String::from_utf8(back).unwrap(), text, "{arch:?} round trip");
                if text.starts_with("Hello") {
                    // Merges do their job: far fewer tokens than bytes.
                    assert!(toks.len() * 10 < text.len() * 6, "{} tokens", toks.len());
                }
            }
            // Special tokens: parsed with parse_special, end of generation.
            let toks = vocab.tokenize(b"<|im_start|>user\nhi<|im_end|>", false, true);
            assert_eq!(toks[0].0, 510);
            assert_eq!(toks.last().unwrap().0, 511);
            assert!(vocab.is_eog(LlamaToken(511)));
            assert!(vocab.is_eog(vocab.eos()));
            assert_eq!(vocab.eos().0, 509);
            assert!(!vocab.should_add_bos());

            // Decoding works for f16 weights too, and stays varied.
            let prompt = vocab.tokenize(b"Once upon a time", false, false);
            let (gen, _) = greedy(&model, &prompt, 40);
            let distinct: std::collections::HashSet<i32> = gen.iter().map(|t| t.0).collect();
            assert!(distinct.len() >= 10, "{arch:?} f16={f16}: {gen:?}");

            let tmpl = model.chat_template(None).unwrap();
            let msgs = [
                LlamaChatMessage::new("system".into(), "Be brief.".into()).unwrap(),
                LlamaChatMessage::new("user".into(), "Hi!".into()).unwrap(),
            ];
            let s = model.apply_chat_template(&tmpl, &msgs, true).unwrap();
            assert_eq!(
                s,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
            );
        }
    }
}

#[test]
fn greedy_generation_is_varied_and_pair_agrees_partly() {
    let prompt_text = "The quick brown fox jumps over the lazy dog. Once upon a time";
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let dir = test_dir(&format!("pair-{arch:?}"));
        let (tp, dp) = write_tiny_pair(&dir, arch, DEFAULT_DRAFT_NOISE, 7).unwrap();
        let target = load(&tp);
        let draft = load(&dp);
        let prompt = target.vocab().tokenize(prompt_text.as_bytes(), false, false);

        let t = Instant::now();
        let (gen, margins) = greedy(&target, &prompt, 300);
        let elapsed = t.elapsed();
        let distinct: std::collections::HashSet<i32> = gen.iter().map(|t| t.0).collect();
        let mut sorted = margins.clone();
        sorted.sort_by(f32::total_cmp);
        let text = String::from_utf8_lossy(&target.vocab().detokenize(&gen, false, false)).into_owned();
        println!(
            "{arch:?}: 300 tokens in {elapsed:?}, {} distinct, top-2 margin min {:.3} p10 {:.3} median {:.3}\n{text:?}",
            distinct.len(),
            sorted[0],
            sorted[sorted.len() / 10],
            sorted[sorted.len() / 2]
        );
        assert!(distinct.len() >= 20, "collapsed: {} distinct tokens", distinct.len());
        // The last 200 tokens too (no late collapse into a short loop).
        let tail: std::collections::HashSet<i32> = gen[100..].iter().map(|t| t.0).collect();
        assert!(tail.len() >= 10, "tail collapsed: {} distinct", tail.len());
        assert!(sorted[sorted.len() / 2] > 0.5, "near-uniform model");
        // Speed is measured by `cargo bench --bench tiny_decode`, not asserted here.

        // Batched teacher forcing reproduces one-token decoding on the target itself.
        let mut seq = prompt.clone();
        seq.extend(&gen[..200]);
        let tf_target = teacher_forced_argmax(&target, &seq);
        let n_p = prompt.len();
        let same = (0..200).filter(|&i| tf_target[n_p - 1 + i] == gen[i].0).count();
        assert_eq!(same, 200, "batched vs one-token decoding disagree");

        // Draft vs target greedy agreement, teacher-forced on the target's continuation.
        // Measured with DEFAULT_DRAFT_NOISE = 0.03, seed 7: llama 153/200 = 0.765,
        // qwen2 170/200 = 0.850; over seeds 1..=8 (`draft_noise_sweep`): llama 0.74..0.83
        // (mean 0.78), qwen2 0.775..0.85 (mean 0.80). Random nets are chaotic in their
        // weights: noise 0.01 gives ~0.92, 0.1 already ~0.45, 0.35 ~0.13.
        let tf_draft = teacher_forced_argmax(&draft, &seq);
        let agree = (0..200).filter(|&i| tf_draft[n_p - 1 + i] == gen[i].0).count();
        let rate = agree as f32 / 200.0;
        println!("{arch:?}: draft agreement {agree}/200 = {rate:.3} (noise {DEFAULT_DRAFT_NOISE})");
        assert!((0.5..=0.95).contains(&rate), "agreement {rate}");
    }
}

#[test]
fn same_seed_same_bytes() {
    let dir = test_dir("det");
    let cfg = TinyModelConfig { arch: TinyArch::Qwen2, seed: 3, ..Default::default() };
    let (a, b, c) = (dir.join("a.gguf"), dir.join("b.gguf"), dir.join("c.gguf"));
    write_tiny_model(&a, &cfg).unwrap();
    write_tiny_model(&b, &cfg).unwrap();
    write_tiny_model(&c, &TinyModelConfig { seed: 4, ..cfg.clone() }).unwrap();
    let (ba, bb, bc) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(ba, bb);
    assert_eq!(ba.len(), bc.len());
    assert_ne!(ba, bc);
    // No temp files left behind.
    let names: Vec<_> =
        std::fs::read_dir(&*dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");

    let (t1, d1) = write_tiny_pair(&dir.join("p1"), TinyArch::Llama, 0.3, 9).unwrap();
    let (t2, d2) = write_tiny_pair(&dir.join("p2"), TinyArch::Llama, 0.3, 9).unwrap();
    assert_eq!(std::fs::read(&t1).unwrap(), std::fs::read(&t2).unwrap());
    assert_eq!(std::fs::read(&d1).unwrap(), std::fs::read(&d2).unwrap());
    assert_ne!(std::fs::read(&t1).unwrap(), std::fs::read(&d1).unwrap());

    // The exposed tensors are exactly the file's (f32) data, in file order.
    let tensors = tiny_model_tensors(&cfg);
    let last = tensors.last().unwrap();
    assert_eq!(last.0, "output.weight");
    let tail: Vec<u8> = last.2.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(&ba[ba.len() - tail.len()..], &tail[..]);
}

#[test]
fn invalid_configs_are_rejected() {
    let dir = test_dir("bad");
    let bad = TinyModelConfig { n_head: 3, ..Default::default() };
    assert!(write_tiny_model(&dir.join("x.gguf"), &bad).is_err());
    assert!(!dir.join("x.gguf").exists());
    assert!(write_tiny_pair(&dir, TinyArch::Qwen2, f32::NAN, 1).is_err());
}

/// Prints draft agreement, variety and top-2 margins over noises and seeds (for tuning):
/// `cargo test --release --test tiny_model draft_noise_sweep -- --ignored --nocapture`.
#[test]
#[ignore]
fn draft_noise_sweep() {
    let prompt_text = "The quick brown fox jumps over the lazy dog. Once upon a time";
    for noise in [0.01f32, 0.03, 0.1] {
        for arch in [TinyArch::Llama, TinyArch::Qwen2] {
            for seed in 1u64..=8 {
                let dir = test_dir(&format!("sweep-{arch:?}-{noise}-{seed}"));
                let (tp, dp) = write_tiny_pair(&dir, arch, noise, seed).unwrap();
                let target = load(&tp);
                let draft = load(&dp);
                let prompt = target.vocab().tokenize(prompt_text.as_bytes(), false, false);
                let (gen, margins) = greedy(&target, &prompt, 200);
                let mut seq = prompt.clone();
                seq.extend(&gen);
                let n_p = prompt.len();
                let tf_draft = teacher_forced_argmax(&draft, &seq);
                let agree = (0..200).filter(|&i| tf_draft[n_p - 1 + i] == gen[i].0).count();
                let distinct: std::collections::HashSet<i32> = gen.iter().map(|t| t.0).collect();
                let mut sorted = margins.clone();
                sorted.sort_by(f32::total_cmp);
                println!(
                    "noise {noise} {arch:?} seed {seed}: agree {agree}/200 distinct {} \
                     margin p1 {:.3} p10 {:.3} median {:.3}",
                    distinct.len(),
                    sorted[2],
                    sorted[20],
                    sorted[100]
                );
            }
        }
    }
}
