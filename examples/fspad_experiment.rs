//! The FSPAD experiment (issue: FSPAD heads): EAGLE-2-style, FSPAD, FS-only and PAD-only heads
//! for one target at an equal training budget, then held-out α per draft depth on the target's
//! own continuations (MT-bench, GSM8K, HumanEval) and τ (tokens per target pass) end to end in
//! the engine with the FSPAD evaluation tree (60 nodes with the root, 6 levels, top-k 10) and a
//! chain of 4, plus the head's cost per draft step.
//!
//! Resumes: every stage whose output exists in $OUT is skipped. Configure with environment
//! variables (defaults in brackets): TARGET [$ADASPEC_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf],
//! OUT [/tmp/adaspec-fspad], SHARED_DATA (a folder with sharegpt/train.jsonl: added to the
//! training data), VARIANTS [eagle2,fspad,fs,pad], SEEDS [0], STEPS [150], BATCH [4], LR [5e-4],
//! FFN [2048], VOCAB [8192], MAX_LEN [192], MAX_TRAIN [300], EVAL_PROMPTS [8], EVAL_TOKENS [64],
//! BENCH_PROMPTS [3], BENCH_TOKENS [48], THREADS [2]; EAGLE3=1 adds the EAGLE-3-layout head
//! (`adaspec head` trainer) at the same data, steps, batch, lr, FFN width and vocabulary.
//!
//! `cargo run --release --features train --example fspad_experiment`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use adaspec::fspad::{EntryIn, FspadHead, FspadRunner, Variant};
use adaspec::train::data::{load_examples, read_records, split_validation, BadLines, Example, TokenizeOptions};
use adaspec::train::fspad_model::FspadModel;
use adaspec::train::fspad_train::{
    evaluate, extract, fspad_config_for, init_fspad, load_saved_examples, save_examples, target_lm, train_fspad,
    write_fspad_gguf, FspadExample, FspadTrainConfig,
};
use adaspec::train::head::top_vocab;
use adaspec::train::ExportType;
use adaspec::{ChatMessage, GenerateParams, Model, ModelParams, NumericMode, Prompt, Session, SessionParams, Strategy};
use serde_json::json;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

const TASKS: [(&str, &str); 3] = [
    ("mt_bench", "data/mt_bench/questions.jsonl"),
    ("gsm8k", "data/gsm8k/heldout.jsonl"),
    ("humaneval", "data/humaneval/dev.jsonl"),
];

fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn main() -> anyhow::Result<()> {
    let models = std::env::var("ADASPEC_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/adaspec/models"));
    let target_path: PathBuf = std::env::var("TARGET")
        .map(PathBuf::from)
        .unwrap_or_else(|_| models.join("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"));
    let out = PathBuf::from(std::env::var("OUT").unwrap_or_else(|_| "/tmp/adaspec-fspad".into()));
    std::fs::create_dir_all(&out)?;
    let threads: i32 = env("THREADS", 2);
    let variants: Vec<Variant> = std::env::var("VARIANTS")
        .unwrap_or_else(|_| "eagle2,fspad,fs,pad".into())
        .split(',')
        .map(|s| Variant::parse(s.trim()).ok_or_else(|| anyhow::anyhow!("unknown variant {s}")))
        .collect::<anyhow::Result<_>>()?;
    let seeds: Vec<u64> = std::env::var("SEEDS")
        .unwrap_or_else(|_| "0".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let (steps, batch, lr) = (env("STEPS", 150usize), env("BATCH", 4usize), env("LR", 5e-4f64));
    let (ffn, vocab_n, max_len, max_train) =
        (env("FFN", 2048usize), env("VOCAB", 8192usize), env("MAX_LEN", 192usize), env("MAX_TRAIN", 300usize));
    let (eval_prompts, eval_tokens) = (env("EVAL_PROMPTS", 8usize), env("EVAL_TOKENS", 64usize));
    let (bench_prompts, bench_tokens) = (env("BENCH_PROMPTS", 3usize), env("BENCH_TOKENS", 48usize));
    let target = Arc::new(Model::load(&target_path, &ModelParams::default())?);
    let log = |m: String| eprintln!("[{}] {m}", chrono_now());

    // 1. Training data: dataset responses of the dev splits (as FSPAD trains), never the
    //    held-out prompts: GSM8K train, HumanEval problems 21.., ShareGPT when given.
    let he_train = out.join("humaneval-train.jsonl");
    if !he_train.exists() {
        let lines: Vec<&str> = include_str!("../data/humaneval/dev.jsonl").lines().skip(20).collect();
        std::fs::write(&he_train, lines.join("\n"))?;
    }
    let mut data = vec![PathBuf::from("data/gsm8k/train.jsonl"), he_train.clone()];
    if let Ok(s) = std::env::var("SHARED_DATA") {
        let p = Path::new(&s).join("sharegpt/train.jsonl");
        if p.exists() {
            data.push(p);
        }
    }
    // The training sequences: a seeded sample of the data (the same in every run).
    let train_examples = || -> anyhow::Result<Vec<Example>> {
        let opts = TokenizeOptions { chat: true, max_len, ..Default::default() };
        let (examples, _) = load_examples(&target, &data, &opts, BadLines::Skip)?;
        let order = adaspec::train::data::permutation(examples.len(), 7);
        Ok(order.into_iter().take(max_train).map(|i| examples[i].clone()).collect())
    };
    let train_cache = out.join("train-features.safetensors");
    let vocab_path = out.join("draft-vocab.json");
    let (train, val) = if train_cache.exists() && vocab_path.exists() {
        let all = load_saved_examples(&train_cache)?;
        let n_val = (all.len() / 10).max(1);
        let mut all = all;
        let val = all.split_off(all.len() - n_val);
        (all, val)
    } else {
        let examples = train_examples()?;
        let mut freq = vec![0u64; target.n_vocab()];
        for e in &examples {
            for &t in &e.tokens {
                freq[t as usize] += 1;
            }
        }
        write_json(&vocab_path, &json!(top_vocab(&freq, vocab_n)))?;
        let (tr, va) = split_validation(examples, 0.1, 0)?;
        let all: Vec<Example> = tr.iter().chain(&va).cloned().collect();
        let t0 = Instant::now();
        let n_tok: usize = all.iter().map(|e| e.tokens.len()).sum();
        let mut feats = extract(&target, &all, threads, true)?;
        log(format!("extracted {} sequences, {n_tok} tokens in {:.0} s", feats.len(), t0.elapsed().as_secs_f64()));
        save_examples(&train_cache, &feats)?;
        let n_val = (feats.len() / 10).max(1);
        let val = feats.split_off(feats.len() - n_val);
        (feats, val)
    };
    let vocab: Vec<u32> = serde_json::from_value(read_json(&vocab_path).unwrap_or_default())?;
    let lm = target_lm(&target_path, &vocab)?;
    log(format!("{} training / {} validation sequences, draft vocabulary {}", train.len(), val.len(), vocab.len()));

    // 2. Held-out prompts per task and the target's own greedy continuations (chat).
    let prompts_of = |file: &str, n: usize| -> anyhow::Result<Vec<String>> {
        let (recs, _) = read_records(&[PathBuf::from(file)], false, BadLines::Skip)?;
        Ok(recs.into_iter().take(n).map(|r| r.prompt).collect())
    };
    let chat_tokens = |p: &str| -> anyhow::Result<Vec<i32>> {
        let text = target.apply_chat_template(&[ChatMessage::new("user", p)], true)?;
        Ok(target.tokenize(&text, false, true)?)
    };
    // The target's greedy continuations of each task's held-out prompts (saved as tokens).
    let continuations = |task: &str, file: &str| -> anyhow::Result<Vec<Example>> {
        let path = out.join(format!("eval-{task}.tokens.json"));
        if let Some(v) = read_json(&path) {
            let v: Vec<(usize, Vec<i32>)> = serde_json::from_value(v)?;
            return Ok(v.into_iter().map(|(prompt_len, tokens)| Example { prompt_len, tokens }).collect());
        }
        let mut alone = Session::new(target.clone(), None, sp(Strategy::None, threads))?;
        let mut ex = Vec::new();
        for p in prompts_of(file, eval_prompts)? {
            let toks = chat_tokens(&p)?;
            alone.reset();
            let gp = GenerateParams { max_tokens: eval_tokens, ..Default::default() };
            let g = alone.generate(&Prompt::Tokens(toks.clone()), &gp, &mut |_, _| true)?;
            ex.push(Example { prompt_len: toks.len(), tokens: [toks, g.tokens].concat() });
        }
        let v: Vec<(usize, &Vec<i32>)> = ex.iter().map(|e| (e.prompt_len, &e.tokens)).collect();
        write_json(&path, &json!(v))?;
        Ok(ex)
    };
    let mut eval_sets: Vec<(&str, Vec<FspadExample>)> = Vec::new();
    for (task, file) in TASKS {
        let cache = out.join(format!("eval-{task}.safetensors"));
        if !cache.exists() {
            let feats = extract(&target, &continuations(task, file)?, threads, false)?;
            save_examples(&cache, &feats)?;
            log(format!("{task}: {} held-out continuations", feats.len()));
        }
        eval_sets.push((task, load_saved_examples(&cache)?));
    }

    // 3. Train each variant and seed at the same budget.
    for &seed in &seeds {
        for &v in &variants {
            let tag = format!("{}-s{seed}", v.name());
            let gguf = out.join(format!("head-{tag}.gguf"));
            let summary_path = out.join(format!("train-{tag}.json"));
            if !(gguf.exists() && summary_path.exists()) {
                let cfg = fspad_config_for(&target_path, v, Some(ffn))?;
                let model = FspadModel::new(&cfg, &init_fspad(&cfg, seed)?, lm.clone())?;
                let tc = FspadTrainConfig {
                    lr,
                    steps,
                    batch,
                    seed,
                    progress: true,
                    log: Some(out.join(format!("train-{tag}.jsonl"))),
                    ..Default::default()
                };
                log(format!("training {tag}"));
                let summary = train_fspad(&model, None, &train, &val, &tc, 5)?;
                write_fspad_gguf(&cfg, &model.to_weights(), Some(&lm), &vocab, &gguf, &target_path, ExportType::Q8_0)?;
                let mut summary = summary;
                summary["params"] =
                    json!(cfg.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>());
                let mut per_task = serde_json::Map::new();
                for (task, set) in &eval_sets {
                    per_task.insert(task.to_string(), evaluate(&model, set, 6)?.to_json());
                }
                summary["heldout"] = json!(per_task);
                write_json(&summary_path, &summary)?;
                log(format!("{tag}: {}", serde_json::to_string(&summary["heldout"])?));
            }
        }
    }

    // 3b. With EAGLE3=1: the EAGLE-3-layout head of the heads issue on the same data, steps,
    //     batch, learning rate, FFN width and draft vocabulary (3 TTT steps).
    let eagle3 = env("EAGLE3", 0u32) == 1;
    if eagle3 {
        use adaspec::train::head::{head_config_for, init_head, write_head_gguf};
        use adaspec::train::head_model::HeadModel;
        use adaspec::train::head_train::{evaluate as evaluate3, extract as extract3, train_head, HeadTrainConfig};
        for &seed in &seeds {
            let tag = format!("eagle3-s{seed}");
            let gguf = out.join(format!("head-{tag}.gguf"));
            let summary_path = out.join(format!("train-{tag}.json"));
            if gguf.exists() && summary_path.exists() {
                continue;
            }
            let cfg = head_config_for(&target_path, Some(ffn), vocab.clone())?;
            let (tr, va) = split_validation(train_examples()?, 0.1, 0)?;
            let all: Vec<Example> = tr.iter().chain(&va).cloned().collect();
            let cache = out.join("eagle3-features.safetensors");
            let mut feats = extract3(&target, &cfg, &all, threads, Some(&cache), true)?;
            let val3 = feats.split_off(tr.len());
            let model = HeadModel::new(&cfg, &init_head(&cfg, &target_path, seed)?)?;
            let tc = HeadTrainConfig {
                ttt_steps: 3,
                lr,
                steps,
                batch,
                seed,
                log: Some(out.join(format!("train-{tag}.jsonl"))),
                ..Default::default()
            };
            log(format!("training {tag}"));
            let t0 = Instant::now();
            let evals = train_head(&model, None, &feats, &val3, &tc, 0)?;
            let secs = t0.elapsed().as_secs_f64();
            let tokens: usize =
                steps * batch * feats.iter().map(|e| e.emb.dims()[0]).sum::<usize>() / feats.len().max(1);
            write_head_gguf(&cfg, &model.to_weights()?, &gguf, &target_path, ExportType::Q8_0)?;
            let mut per_task = serde_json::Map::new();
            for (task, file) in TASKS {
                let ex = continuations(task, file)?;
                let f3 = extract3(&target, &cfg, &ex, threads, None, false)?;
                per_task.insert(task.to_string(), evaluate3(&model, &f3, 3)?.to_json());
            }
            let summary = json!({"variant": "eagle3", "steps": steps, "train_seconds": secs,
                "train_tokens_per_s": tokens as f64 / secs.max(1e-9), "params": cfg.n_params(),
                "evals": evals, "heldout": per_task});
            write_json(&summary_path, &summary)?;
            log(format!("{tag}: {}", serde_json::to_string(&summary["heldout"])?));
        }
    }

    // 4. End to end in the engine: τ with the FSPAD tree and a chain of 4, head cost per step.
    let bench_path = out.join("bench.json");
    let mut bench = read_json(&bench_path).unwrap_or_else(|| json!({}));
    let alone_key = "target-alone";
    let mut task_prompts = Vec::new();
    for (task, file) in TASKS {
        let ps: Vec<Vec<i32>> =
            prompts_of(file, bench_prompts)?.iter().map(|p| chat_tokens(p)).collect::<anyhow::Result<_>>()?;
        task_prompts.push((task, ps));
    }
    let gp = GenerateParams { max_tokens: bench_tokens, ..Default::default() };
    let run_all = |s: &mut Session| -> anyhow::Result<serde_json::Value> {
        let mut per = serde_json::Map::new();
        for (task, ps) in &task_prompts {
            let (mut tokens, mut rounds, mut ms, mut outs) = (0usize, 0usize, 0.0f64, Vec::new());
            for p in ps {
                s.reset();
                let g = s.generate(&Prompt::Tokens(p.clone()), &gp, &mut |_, _| true)?;
                tokens += g.stats.tokens;
                rounds += g.stats.rounds;
                ms += g.stats.total_ms - g.stats.prefill_ms;
                outs.push(g.tokens);
            }
            per.insert(
                task.to_string(),
                json!({"tau": tokens as f64 / rounds.max(1) as f64, "tok_per_s": tokens as f64 / (ms / 1e3).max(1e-9), "outputs": outs}),
            );
        }
        Ok(json!(per))
    };
    if bench.get(alone_key).is_none() {
        let mut s = Session::new(target.clone(), None, sp(Strategy::None, threads))?;
        bench[alone_key] = run_all(&mut s)?;
        write_json(&bench_path, &bench)?;
    }
    let mut names: Vec<String> = variants.iter().map(|v| v.name().to_string()).collect();
    if eagle3 {
        names.push("eagle3".into());
    }
    for &seed in &seeds {
        for name in &names {
            let tag = format!("{name}-s{seed}");
            if bench.get(&tag).is_some() {
                continue;
            }
            let head = adaspec::session::HeadFile::load(&out.join(format!("head-{tag}.gguf")), target.params())?;
            let mut rec = json!({});
            for (name, strategy) in
                [("tree_60_6_10", Strategy::Tree { top_k: 10, depth: 6, nodes: 59 }), ("chain_4", Strategy::Chain(4))]
            {
                let mut s = Session::with_head_file(target.clone(), head.clone(), sp(strategy, threads))?;
                let r = run_all(&mut s)?;
                // Lossless: every output equals target alone's.
                for (task, _) in &task_prompts {
                    let same = r[task]["outputs"] == bench[alone_key][task]["outputs"];
                    rec[format!("{name}_identical_{task}")] = json!(same);
                }
                rec[name] = r;
                log(format!("{tag} {name} done"));
            }
            if let adaspec::session::HeadFile::Fspad(h) = &head {
                rec["head_ms_per_step"] = head_cost(h, &target, threads)?;
            }
            bench[&tag] = rec;
            write_json(&bench_path, &bench)?;
        }
    }
    // Strip token lists from the printed summary.
    let mut summary = json!({});
    for (k, v) in bench.as_object().cloned().unwrap_or_default() {
        let mut v = v;
        strip_outputs(&mut v);
        summary[k] = v;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn strip_outputs(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("outputs");
        for (_, x) in o.iter_mut() {
            strip_outputs(x);
        }
    }
}

fn sp(strategy: Strategy, threads: i32) -> SessionParams {
    SessionParams {
        n_ctx: 2048,
        n_threads: threads,
        strategy,
        mode: NumericMode::Fast,
        lookup: false,
        share_learning: false,
    }
}

/// Milliseconds of one head call over 256 cached entries with 1 and with 10 new entries (a
/// chain step and an EAGLE-2 tree level), best of 5.
fn head_cost(head: &Arc<FspadHead>, target: &Model, threads: i32) -> anyhow::Result<serde_json::Value> {
    let mut run = FspadRunner::new(head.clone(), target, threads)?;
    let c = head.config();
    let (h, kvd, s) = (c.hidden, c.kv_dim(), 256usize);
    let kc = vec![0.01f32; s * kvd];
    let hid = vec![0.1f32; h];
    let mut out = json!({});
    for b in [1usize, 10] {
        let entries: Vec<EntryIn<'_>> =
            (0..b).map(|j| EntryIn { token: 100 + j as i32, pos: (s + j) as i32, hidden: &hid }).collect();
        let mask = vec![0.0f32; b * (s + b)];
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            run.run(&entries, &kc, &kc, &mask)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        out[format!("batch_{b}")] = json!(best);
    }
    Ok(out)
}

fn chrono_now() -> String {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}
