//! Trainer speed: one KD optimizer step (forward + backward + AdamW) of the pruned Qwen2.5
//! 0.5B draft (14 blocks, 6 trained, embeddings and LM head frozen, FKL against a K + 1-bin
//! sparse teacher) and of an EAGLE-3 head for the 1.5B target (H 1536, FFN 4096, draft
//! vocabulary 8192, 3 TTT steps), through the trainer's own loops (`train`, `train_head`),
//! with the time split into teacher / forward / backward / optimizer. Weights are random (the
//! speed does not depend on their values); every step has the same shape: `BATCH` sequences
//! of `SEQ` tokens, every position trained. `scripts/train_step_torch.py` runs the same steps
//! in PyTorch; `scripts/train-speed.sh` runs both and prints the ratios.
//!
//! cargo run --release --features train --example train_speed -- TARGET.gguf \
//!     [STEPS=6] [BATCH=4] [SEQ=256] [TOP_K=64] [THREADS]
//! TARGET.gguf only supplies the vocabulary (151,936 tokens for Qwen2.5) the teacher rows
//! index; a number in its place is taken as the vocabulary size. Prints one JSON object; the first step is a warm-up and not counted.
//! `TRAIN_SPEED_ONLY=draft` or `=head` runs one of the two.

/// The allocator of the `adaspec` binary with `train` (see Cargo.toml).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;

use adaspec::tiny_model::TinyModelConfig;
use adaspec::train::data::Example;
use adaspec::train::head::HeadConfig;
use adaspec::train::head_model::HeadModel;
use adaspec::train::head_train::{train_head, HeadExample, HeadTrainConfig};
use adaspec::train::model::{Arch, Config, Weights};
use adaspec::train::teacher::{SparseRows, Teacher};
use adaspec::train::trainer::{train, PhaseTimes, TrainConfig, TrainData};
use adaspec::{Model, ModelParams};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Random weights for `shapes`: norms 1, everything else N(0, 0.02).
fn random_weights(shapes: &[(String, Vec<usize>)]) -> anyhow::Result<Weights> {
    let mut w = Weights::new();
    for (name, shape) in shapes {
        let t = if name.ends_with("norm.weight") || name.contains("_norm") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            Tensor::randn(0f32, 0.02, shape.as_slice(), &Device::Cpu)?
        };
        w.insert(name.clone(), t);
    }
    Ok(w)
}

/// Median of each phase over the counted steps, and the median step time.
fn summarize(phases: &[PhaseTimes], tokens_per_step: usize) -> serde_json::Value {
    let med = |f: &dyn Fn(&PhaseTimes) -> f64| {
        let mut v: Vec<f64> = phases.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step = med(&|p| p.teacher_s + p.forward_s + p.backward_s + p.optimizer_s);
    serde_json::json!({
        "steps_counted": phases.len(),
        "step_s": step,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step as f64 / step,
        "teacher_s": med(&|p| p.teacher_s),
        "forward_s": med(&|p| p.forward_s),
        "backward_s": med(&|p| p.backward_s),
        "optimizer_s": med(&|p| p.optimizer_s),
    })
}

fn phases_of(v: &serde_json::Value) -> PhaseTimes {
    serde_json::from_value(v["phases"].clone()).expect("phases in the metrics line")
}

fn main() -> anyhow::Result<()> {
    adaspec::train::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let target =
        PathBuf::from(args.get(1).ok_or_else(|| {
            anyhow::anyhow!("usage: train_speed TARGET.gguf [STEPS] [BATCH] [SEQ] [TOP_K] [THREADS]")
        })?);
    let steps: usize = arg(&args, 2, 6);
    let batch: usize = arg(&args, 3, 4);
    let seq: usize = arg(&args, 4, 256);
    let top_k: usize = arg(&args, 5, 64);
    if let Some(t) = args.get(6) {
        std::env::set_var("RAYON_NUM_THREADS", t);
    }
    anyhow::ensure!(steps >= 2, "STEPS must be >= 2 (the first is a warm-up)");
    let dir = std::env::temp_dir().join(format!("adaspec-train-speed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // A number instead of a GGUF: a tiny model with that many tokens stands in for the target
    // (where the model file is not at hand, e.g. on another machine).
    let target = match target.to_str().and_then(|s| s.parse::<usize>().ok()) {
        Some(n) => {
            let base = adaspec::tiny_model::tiny_vocab().tokens.len();
            anyhow::ensure!(n >= base, "a vocabulary of at least {base} tokens");
            let cfg = TinyModelConfig { n_embd: 16, n_ff: 32, extra_tokens: n - base, ..Default::default() };
            let path = dir.join("vocab.gguf");
            adaspec::tiny_model::write_tiny_model(&path, &cfg)?;
            path
        }
        None => target,
    };
    let model = Arc::new(Model::load(&target, &ModelParams::default())?);
    let vocab = model.n_vocab();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);

    // The pruned draft: Qwen2.5-0.5B shapes, 14 blocks.
    let cfg = Config {
        arch: Arch::Qwen2,
        vocab_size: vocab,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 14,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 32768,
        attention_bias: true,
        rope_style: Arch::Qwen2.rope_style(),
        tie_word_embeddings: false,
    };
    let weights = random_weights(&cfg.tensor_shapes())?;
    let n_seq = batch * steps;
    let examples: Vec<Example> = (0..n_seq)
        .map(|_| Example { tokens: (0..seq).map(|_| rng.random_range(0..vocab as i32)).collect(), prompt_len: 1 })
        .collect();
    let rows: Vec<SparseRows> = examples
        .iter()
        .map(|e| {
            let n = e.n_loss();
            let mut r =
                SparseRows { k: top_k, ids: Vec::with_capacity(n * top_k), probs: Vec::new(), rest: Vec::new() };
            for _ in 0..n {
                let mut ids: Vec<u32> = Vec::with_capacity(top_k);
                while ids.len() < top_k {
                    let id = rng.random_range(0..vocab as u32);
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                r.ids.extend(ids);
                r.probs.extend(std::iter::repeat(0.9 / top_k as f32).take(top_k));
                r.rest.push(0.1);
            }
            r
        })
        .collect();
    let teacher = Teacher::from_rows(model.clone(), &examples, rows)?;
    let data = TrainData { train: &examples, val: &[], teacher_train: &teacher, teacher_val: &teacher };
    let tc = TrainConfig {
        batch_size: batch,
        steps,
        progress: false,
        freeze_embeddings: true,
        freeze_lm_head: true,
        train_blocks: Some((8..14).collect()),
        ..Default::default()
    };
    let only = std::env::var("TRAIN_SPEED_ONLY").unwrap_or_default();
    let mut out = serde_json::json!({
        "impl": "adaspec (candle)",
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "batch": batch, "seq": seq, "top_k": top_k,
    });
    if only != "head" {
        eprintln!("draft: {steps} steps of {batch} × {seq} tokens …");
        let report = train(&tc, (cfg, weights), None, &data, &dir.join("draft"), None)?;
        let draft_phases: Vec<PhaseTimes> = report.steps.iter().skip(1).map(|s| s.phases).collect();
        out["draft"] = summarize(&draft_phases, batch * (seq - 1));
    }
    if only == "draft" {
        println!("{out}");
        return Ok(());
    }

    // The head: EAGLE-3 layout for Qwen2.5-Coder 1.5B.
    let h = 1536;
    let hc = HeadConfig {
        hidden_size: h,
        num_attention_heads: 12,
        num_key_value_heads: 2,
        head_dim: 128,
        intermediate_size: 4096,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 32768,
        target_layers: [2, 14, 25],
        target_hidden_size: h,
        target_vocab: vocab,
        draft_vocab: (0..8192).collect(),
    };
    let hw = random_weights(&hc.tensor_shapes())?;
    let head = HeadModel::new(&hc, &hw)?;
    let n = seq - 1;
    let dv = hc.draft_vocab.len() as u32;
    let head_examples: Vec<HeadExample> = (0..batch * steps + 1)
        .map(|_| -> anyhow::Result<HeadExample> {
            let tid: Vec<u32> = (0..n * top_k)
                .map(|i| (i % top_k) as u32 * (dv / top_k as u32) + rng.random_range(0..dv / top_k as u32))
                .collect();
            Ok(HeadExample {
                emb: Tensor::randn(0f32, 1.0, (n, h), &Device::Cpu)?.to_dtype(DType::F16)?,
                feat: Tensor::randn(0f32, 1.0, (n, 3 * h), &Device::Cpu)?.to_dtype(DType::F16)?,
                tid: Tensor::from_vec(tid, (n, top_k), &Device::Cpu)?,
                tp: Tensor::full(0.9f32 / top_k as f32, (n, top_k), &Device::Cpu)?,
                other: Tensor::full(0.1f32, n, &Device::Cpu)?,
                mask: Tensor::ones(n, DType::F32, &Device::Cpu)?,
                argmax: Tensor::zeros(n, DType::U32, &Device::Cpu)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let (train_ex, val_ex) = head_examples.split_at(batch * steps);
    let log = dir.join("head-metrics.jsonl");
    let hcfg = HeadTrainConfig {
        steps,
        batch,
        ttt_steps: 3,
        warmup_steps: 1,
        progress: false,
        log: Some(log.clone()),
        ..Default::default()
    };
    eprintln!("head: {steps} steps of {batch} × {n} positions, 3 TTT steps …");
    train_head(&head, None, train_ex, val_ex, &hcfg, 0)?;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .collect();
    let head_phases: Vec<PhaseTimes> = lines.iter().skip(1).map(phases_of).collect();
    out["head"] = summarize(&head_phases, batch * n);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{out}");
    Ok(())
}
