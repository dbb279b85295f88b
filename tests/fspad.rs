//! FSPAD-family heads (EAGLE-2-style, FSPAD, feature sampling only, partial alignment only)
//! through real llama.cpp on tiny generated targets: random-weight heads run by the engine's
//! ggml graph, drafting from the target's final-norm hidden states (captured with `cb_eval`),
//! must give exactly the target-alone output with every strategy, with the target's LM head
//! and with a reduced draft vocabulary, and keep their features in step across turns and
//! failed rounds.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use adaspec::fspad::{FspadHead, Variant};
use adaspec::tiny_model::{write_tiny_fspad_head, write_tiny_model, TinyArch, TinyHeadConfig, TinyModelConfig};
use adaspec::{Model, ModelParams, NumericMode, Prompt, Session, SessionParams, Strategy};

use common::gen::{greedy, run, PROMPTS};

struct Fixture {
    target: Arc<Model>,
    /// (variant, reduced vocabulary?, head).
    heads: Vec<(Variant, bool, Arc<FspadHead>)>,
    dir: PathBuf,
}

fn fixture(arch: TinyArch) -> &'static Fixture {
    static LLAMA: OnceLock<Fixture> = OnceLock::new();
    static QWEN: OnceLock<Fixture> = OnceLock::new();
    let cell = match arch {
        TinyArch::Llama => &LLAMA,
        TinyArch::Qwen2 => &QWEN,
    };
    cell.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("adaspec-fspad-{}-{}", arch.name(), std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The seed the eagle3 head tests use: greedy margins far above fast-mode rounding.
        let cfg = TinyModelConfig { arch, n_layer: 6, seed: 3, ..Default::default() };
        let t = dir.join("target.gguf");
        write_tiny_model(&t, &cfg).expect("write target");
        let mut heads = Vec::new();
        for v in Variant::ALL {
            for d2t in [false, true] {
                let p = dir.join(format!("{}-{d2t}.gguf", v.name()));
                let hc = TinyHeadConfig { draft_vocab: d2t.then_some(200), ..Default::default() };
                write_tiny_fspad_head(&p, &cfg, v, &hc).expect("write head");
                heads.push((v, d2t, Arc::new(FspadHead::load(&p).expect("load head"))));
            }
        }
        Fixture { target: Arc::new(Model::load(&t, &ModelParams::default()).expect("load")), heads, dir }
    })
}

fn params(strategy: Strategy) -> SessionParams {
    SessionParams { n_ctx: 1024, n_threads: 2, strategy, mode: NumericMode::Fast, lookup: false, share_learning: false }
}

fn strategies() -> Vec<Strategy> {
    vec![
        Strategy::Chain(1),
        Strategy::Chain(4),
        Strategy::Tree { top_k: 3, depth: 3, nodes: 12 },
        "static:0;1;0,0;0,1;1,0".parse().unwrap(),
        Strategy::Auto,
    ]
}

#[test]
fn every_variant_and_strategy_is_token_identical_to_target_alone() {
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let f = fixture(arch);
        let gp = greedy(60);
        let mut alone = Session::new(f.target.clone(), None, params(Strategy::None)).unwrap();
        let want: Vec<Vec<adaspec::Token>> = PROMPTS
            .iter()
            .map(|p| {
                alone.reset();
                run(&mut alone, p, &gp).tokens
            })
            .collect();
        for (v, d2t, head) in &f.heads {
            for strategy in strategies() {
                let mut s = Session::with_fspad_head(f.target.clone(), head.clone(), params(strategy.clone())).unwrap();
                let mut proposed = 0;
                for (p, want) in PROMPTS.iter().zip(&want) {
                    s.reset();
                    let g = run(&mut s, p, &gp);
                    assert_eq!(&g.tokens, want, "{arch:?} {v} d2t={d2t} {strategy} {p}: output differs");
                    proposed += g.stats.draft_proposed;
                }
                if strategy != Strategy::Auto {
                    assert!(proposed > 0, "{arch:?} {v} {strategy}: the head proposed nothing");
                }
            }
        }
    }
}

#[test]
fn features_stay_in_step_across_turns_and_failed_rounds() {
    let f = fixture(TinyArch::Qwen2);
    let head = f.heads.iter().find(|(v, d, _)| *v == Variant::Fspad && !d).unwrap().2.clone();
    let gp = greedy(40);
    let mut s = Session::with_fspad_head(f.target.clone(), head.clone(), params(Strategy::Chain(3))).unwrap();
    let a = run(&mut s, PROMPTS[0], &gp);
    let b = run(&mut s, " and then", &gp);
    let mut alone = Session::new(f.target.clone(), None, params(Strategy::None)).unwrap();
    assert_eq!(a.tokens, run(&mut alone, PROMPTS[0], &gp).tokens);
    assert_eq!(b.tokens, run(&mut alone, " and then", &gp).tokens);
    assert_eq!(s.history(), alone.history());
    for point in [adaspec::session::FailPoint::AfterDraft, adaspec::session::FailPoint::AfterVerify] {
        let mut s = Session::with_fspad_head(f.target.clone(), head.clone(), params(Strategy::Chain(3))).unwrap();
        run(&mut s, PROMPTS[1], &gp);
        s.inject_failure(point);
        assert!(s.generate(&Prompt::Text(" more".into()), &gp, &mut |_, _| true).is_err());
        let got = run(&mut s, " more", &gp);
        let mut alone = Session::new(f.target.clone(), None, params(Strategy::None)).unwrap();
        run(&mut alone, PROMPTS[1], &gp);
        assert_eq!(got.tokens, run(&mut alone, " more", &gp).tokens, "after a failure at {point:?}");
    }
}

#[test]
fn bad_head_files_are_errors() {
    let f = fixture(TinyArch::Llama);
    // A target model is not a head.
    let e = FspadHead::load(&f.dir.join("target.gguf")).err().expect("a target is not a head");
    assert!(e.to_string().contains("not an FSPAD-family head"), "{e}");
    // Truncated head file.
    let src = std::fs::read(f.dir.join("fspad-false.gguf")).unwrap();
    let cut = f.dir.join("cut.gguf");
    std::fs::write(&cut, &src[..src.len() / 2]).unwrap();
    assert!(FspadHead::load(&cut).is_err());
    // A head for another target (different hidden size).
    let other_cfg = TinyModelConfig { n_embd: 96, n_layer: 2, ..Default::default() };
    let other = f.dir.join("other-head.gguf");
    write_tiny_fspad_head(&other, &other_cfg, Variant::Eagle2, &TinyHeadConfig::default()).unwrap();
    let h = Arc::new(FspadHead::load(&other).unwrap());
    let e = Session::with_fspad_head(f.target.clone(), h, params(Strategy::Chain(2))).err().expect("refused");
    assert!(e.to_string().contains("hidden size"), "{e}");
}

/// The trainer's candle model and the engine's ggml graph compute the same function: logits
/// and hidden outputs of committed entries (step 0) and of depth-1 draft entries reading their
/// parent's hidden output (step 1), for every variant, with the target's LM head and with a
/// reduced vocabulary.
#[cfg(feature = "train")]
#[test]
fn candle_model_matches_the_engine_graph() {
    use adaspec::fspad::{EntryIn, FspadRunner};
    use adaspec::train::fspad_model::FspadModel;
    use adaspec::train::fspad_train::{load_fspad_gguf, target_embedding, target_lm};
    use candle_core::{Device, Tensor};

    let f = fixture(TinyArch::Qwen2);
    let tp = f.dir.join("target.gguf");
    let emb_all = target_embedding(&tp).unwrap();
    let t = 12usize;
    let tokens: Vec<u32> = (0..t as u32 + 1).map(|i| (i * 37 + 5) % 400).collect();
    for (v, d2t, head) in &f.heads {
        let path = head.path().to_path_buf();
        let (cfg, w, lm, _) = load_fspad_gguf(&path).unwrap();
        let h = cfg.hidden;
        let lm = lm.unwrap_or_else(|| target_lm(&tp, &[]).unwrap());
        let model = FspadModel::new(&cfg, &w, lm).unwrap();
        let feat: Vec<f32> = (0..t * h).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 2.0).collect();
        let feat_t = Tensor::from_vec(feat.clone(), (t, h), &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(tokens[1..].to_vec(), t, &Device::Cpu).unwrap();
        let emb = emb_all.index_select(&ids, 0).unwrap();
        let outs = model.forward(&emb, &feat_t, 2).unwrap();
        let c_logits: Vec<Vec<Vec<f32>>> =
            outs.iter().map(|o| model.logits(&o.tok).unwrap().to_vec2().unwrap()).collect();
        let c_hidden: Vec<Vec<f32>> =
            outs[0].hidden.to_vec2::<f32>().unwrap().concat().chunks(h).map(|c| c.to_vec()).collect();

        let mut run = FspadRunner::new(head.clone(), &f.target, 2).unwrap();
        let nv = run.n_vocab_out();
        let entries: Vec<EntryIn<'_>> = (0..t)
            .map(|p| EntryIn { token: tokens[p + 1] as i32, pos: p as i32, hidden: &feat[p * h..(p + 1) * h] })
            .collect();
        let mut mask = vec![0.0f32; t * t];
        for r in 0..t {
            for j in r + 1..t {
                mask[r * t + j] = f32::NEG_INFINITY;
            }
        }
        let out = run.run(&entries, &[], &[], &mask).unwrap();
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let err = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err / scale < 2e-3, "{v} d2t={d2t} {what}: max error {err} at scale {scale}");
        };
        for p in 0..t {
            close(&out.logits[p * nv..(p + 1) * nv], &c_logits[0][p], &format!("step 0 logits at {p}"));
            close(&out.hidden[p * h..(p + 1) * h], &c_hidden[p], &format!("step 0 hidden at {p}"));
        }
        // Depth 1 at position p: the parent's (entry p-1's) hidden output, every committed key
        // before p visible.
        let kvd = cfg.n_head_kv * cfg.head_dim;
        for p in [1usize, 5, t - 1] {
            let e = [EntryIn { token: tokens[p + 1] as i32, pos: p as i32, hidden: &out.hidden[(p - 1) * h..p * h] }];
            let m = vec![0.0f32; p + 1];
            let o = run.run(&e, &out.k[..p * kvd], &out.v[..p * kvd], &m).unwrap();
            close(&o.logits, &c_logits[1][p], &format!("step 1 logits at {p}"));
        }
    }
}

/// FSPAD and EAGLE-2-style heads trained for a tiny, nearly bigram qwen2 target with the real
/// tools (features through llama.cpp, FSPAD loss in candle), exported as `fspad` GGUFs, with
/// held-out α per depth before and after.
#[cfg(feature = "train")]
struct Trained {
    target: Arc<Model>,
    heads: Vec<TrainedHead>,
}

/// (variant, head, held-out α per depth before and after training).
#[cfg(feature = "train")]
type TrainedHead = (Variant, Arc<FspadHead>, Vec<f64>, Vec<f64>);

#[cfg(feature = "train")]
fn trained() -> &'static Trained {
    use adaspec::train::data::split_validation;
    use adaspec::train::fspad_model::FspadModel;
    use adaspec::train::fspad_train::{
        evaluate, extract, fspad_config_for, init_fspad, target_lm, train_fspad, write_fspad_gguf, FspadTrainConfig,
    };
    use adaspec::train::head::top_vocab;
    use adaspec::train::ExportType;
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let f = fixture(TinyArch::Qwen2);
        let (target_path, target, examples, freq) = common::gen::bigram_target_data(TinyArch::Qwen2, 6, &f.dir);
        let vocab = top_vocab(&freq, 400);
        let (train, val) = split_validation(examples, 0.15, 0).unwrap();
        let train = extract(&target, &train, 2, false).unwrap();
        let val = extract(&target, &val, 2, false).unwrap();
        let lm = target_lm(&target_path, &vocab).unwrap();
        let mut heads = Vec::new();
        for v in [Variant::Fspad, Variant::Eagle2] {
            let cfg = fspad_config_for(&target_path, v, Some(128)).unwrap();
            let model = FspadModel::new(&cfg, &init_fspad(&cfg, 1).unwrap(), lm.clone()).unwrap();
            let a0 = evaluate(&model, &val, 3).unwrap().alpha;
            // Short sequences: the FSPAD noise scale (0.1·512/L) would swamp these features.
            let tc = FspadTrainConfig { steps: 150, lr: 2e-3, noise: 0.005, progress: false, ..Default::default() };
            let summary = train_fspad(&model, None, &train, &val, &tc, 3).unwrap();
            let a1: Vec<f64> = serde_json::from_value(summary["alpha"].clone()).unwrap();
            // τ measured position by position: a chain of depth 3 accepts at most 3 tokens, a
            // full top-2 / top-4 tree at least what the chain does; the first depth alone gives
            // the chain at least 1 + α_1 · (the share of starts whose depth-1 token is right).
            let t = |k: &str| summary["tau_measured"][k].as_f64().unwrap();
            assert!(1.0 <= t("chain") && t("chain") <= t("top2") && t("top2") <= t("top4") && t("top4") <= 4.0);
            assert!(t("chain") > 1.0 + 0.5 * a1[0], "{summary}");
            let out = f.dir.join(format!("trained-{}.gguf", v.name()));
            write_fspad_gguf(&cfg, &model.to_weights(), Some(&lm), &vocab, &out, &target_path, ExportType::F32)
                .unwrap();
            heads.push((v, Arc::new(FspadHead::load(&out).unwrap()), a0, a1));
        }
        Trained { target, heads }
    })
}

/// Training raises held-out greedy agreement far above the untrained head's at every depth;
/// the exported heads draft in the engine with accepted tokens and target-identical output.
#[cfg(feature = "train")]
#[test]
fn trained_heads_learn_and_draft_in_the_engine() {
    let t = trained();
    let gp = greedy(60);
    let mut alone = Session::new(t.target.clone(), None, params(Strategy::None)).unwrap();
    for (v, head, a0, a1) in &t.heads {
        eprintln!("{v}: held-out α per depth {a0:.3?} -> {a1:.3?}");
        assert!(a1[0] > a0[0] + 0.2 && a1[0] > 0.5, "{v}: depth-1 α did not rise: {a0:?} -> {a1:?}");
        assert!(a1[2] > a0[2] + 0.1, "{v}: depth-3 α did not rise: {a0:?} -> {a1:?}");
        for strategy in [Strategy::Chain(3), Strategy::Tree { top_k: 3, depth: 3, nodes: 12 }] {
            let mut s = Session::with_fspad_head(t.target.clone(), head.clone(), params(strategy.clone())).unwrap();
            let (mut accepted, mut rounds, mut tokens) = (0, 0, 0);
            for p in PROMPTS {
                alone.reset();
                s.reset();
                let want = run(&mut alone, p, &gp);
                let got = run(&mut s, p, &gp);
                assert_eq!(got.tokens, want.tokens, "{v} {strategy} {p}");
                accepted += got.stats.draft_accepted;
                rounds += got.stats.rounds;
                tokens += got.stats.tokens;
            }
            let tpp = tokens as f64 / rounds as f64;
            eprintln!("{v} {strategy}: {accepted} accepted, {tpp:.2} tokens per target pass");
            assert!(tpp > 1.3, "{v} {strategy}: {tpp:.2} tokens per pass");
        }
    }
}

/// Under sampling, sessions drafting with the trained FSPAD head (chain, dynamic tree, `auto`
/// on flat costs) give the target's own joint distribution of the first two tokens
/// (chi-square at p = 1e-4 over thousands of seeded generations), with drafts accepted often
/// enough that the acceptance rule is what is tested.
#[cfg(feature = "train")]
#[test]
fn fspad_drafting_under_sampling_matches_target_distribution() {
    let t = trained();
    let (target, head) = (t.target.clone(), t.heads[0].1.clone());
    common::dist::check_head_sampling(&target, &|st| {
        Session::with_fspad_head(target.clone(), head.clone(), params(st)).unwrap()
    });
}

/// `adaspec head fspad` as a user runs it: a few steps on a JSONL file for a tiny target, a
/// JSON summary, an `fspad` GGUF that `adaspec inspect` describes and checks against the target
/// and `adaspec generate --head` drafts with (output identical to `--strategy none`); bad input
/// is a one-line error.
#[cfg(feature = "train")]
#[test]
fn fspad_commands_train_inspect_generate() {
    let f = fixture(TinyArch::Llama);
    let dir = f.dir.join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let target = f.dir.join("target.gguf");
    let data = dir.join("data.jsonl");
    let lines: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"prompt": format!("Question {i}: what is {i} plus {i}?"), "response": format!("It is {}.", 2 * i)})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let adaspec = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_adaspec")).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (t, d) = (target.to_str().unwrap(), data.to_str().unwrap());
    let out = dir.join("pad.gguf");
    let o = out.to_str().unwrap();
    let (ok, stdout, err) = adaspec(&[
        "head",
        "fspad",
        "--variant",
        "pad",
        "--target",
        t,
        "--data",
        d,
        "--raw",
        "--draft-vocab",
        "100",
        "--ffn",
        "64",
        "--steps",
        "5",
        "--warmup",
        "2",
        "--lr",
        "1e-3",
        "--depth",
        "3",
        "-o",
        o,
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["variant"], "pad");
    assert_eq!(v["alpha"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["draft_vocab"], 100);
    assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    let (ok, stdout, err) = adaspec(&["inspect", o, "--compat", t, "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["file"]["architecture"], "fspad", "{stdout}");
    assert_eq!(r["file"]["head"]["variant"], "pad");
    assert_eq!(r["file"]["head"]["draft_vocab"], 100);
    assert_eq!(r["compat"]["compatible"], true, "{stdout}");
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "--target", t, "--prompt", "Question 3: what is", "--max-tokens", "24", "--json"];
        a.extend_from_slice(extra);
        let (ok, stdout, err) = adaspec(&a);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    assert_eq!(gen(&["--head", o, "--strategy", "tree:3,3,8"]), gen(&["--strategy", "none", "--draft", "none"]));
    // Errors: a missing data file, selection without a reference's shape.
    let (ok, _, err) = adaspec(&["head", "fspad", "--target", t, "--data", "/nonexistent.jsonl", "-o", o]);
    assert!(!ok && err.lines().filter(|l| !l.trim().is_empty()).count() <= 3, "{err}");
    let (ok, _, err) = adaspec(&[
        "head",
        "fspad",
        "--variant",
        "fspad",
        "--target",
        t,
        "--data",
        d,
        "--raw",
        "--draft-vocab",
        "100",
        "--ffn",
        "64",
        "--steps",
        "1",
        "--reference",
        o,
        "-o",
        dir.join("x.gguf").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("another variant"), "{err}");
}
