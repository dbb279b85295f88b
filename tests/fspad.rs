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
