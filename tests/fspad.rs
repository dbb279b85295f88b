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
    SessionParams { n_ctx: 1024, n_threads: 2, strategy, mode: NumericMode::Fast, lookup: false }
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
        let c_logits: Vec<Vec<Vec<f32>>> = outs.iter().map(|o| model.logits(&o.tok).unwrap().to_vec2().unwrap()).collect();
        let c_hidden: Vec<Vec<f32>> = outs[0].hidden.to_vec2::<f32>().unwrap().concat().chunks(h).map(|c| c.to_vec()).collect();

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
