//! The real pair (Qwen2.5-Coder 1.5B target + 0.5B draft): exact mode must be token-identical
//! to target-alone decoding; fast mode's departures are measured and must sit at near-ties.
//! Skipped with a notice when the models are absent (scripts/fetch-models.sh fetches them).

use std::sync::Arc;

use adaspec::backend::sequence_logits;
use adaspec::models::{models_dir, DEFAULT_DRAFT, DEFAULT_TARGET};
use adaspec::{ChatMessage, GenerateParams, Model, ModelParams, NumericMode, Prompt, Session, SessionParams, Strategy};

fn pair(repack: bool) -> Option<(Arc<Model>, Arc<Model>)> {
    let t = models_dir().join(DEFAULT_TARGET);
    let d = models_dir().join(DEFAULT_DRAFT);
    if !t.exists() || !d.exists() {
        eprintln!("real pair not found in {}; run scripts/fetch-models.sh — skipping", models_dir().display());
        return None;
    }
    let target = Arc::new(Model::load(&t, &ModelParams { repack, ..Default::default() }).unwrap());
    let draft = Arc::new(Model::load(&d, &ModelParams::default()).unwrap());
    Some((target, draft))
}

fn prompts() -> Vec<String> {
    let (Ok(mut v), Ok(g)) =
        (adaspec::dataset::load_prompts("humaneval", 3), adaspec::dataset::load_prompts("gsm8k", 3))
    else {
        // The data sets live in ../shared/data (or $ADASPEC_DATA); fall back to fixed prompts.
        eprintln!("data sets not found under {}; using built-in prompts", adaspec::dataset::data_dir().display());
        return vec![
            "def has_close_elements(numbers, threshold):\n    \"\"\"Return True if any two numbers are closer than threshold.\"\"\"\n".into(),
            "def below_zero(operations):\n    \"\"\"Detect if a bank balance ever falls below zero.\"\"\"\n".into(),
            "def truncate_number(number: float) -> float:\n    \"\"\"Return the decimal part of a positive float.\"\"\"\n".into(),
            "Janet's ducks lay 16 eggs per day. She eats three and bakes muffins with four. She sells the rest at $2 each. How much does she make?".into(),
            "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?".into(),
            "Josh buys a house for $80,000 and puts in $50,000 in repairs, which increased the value by 150%. How much profit did he make?".into(),
        ];
    };
    v.extend(g);
    v
}

fn params(strategy: Strategy, mode: NumericMode) -> SessionParams {
    SessionParams { n_ctx: 1024, n_threads: 2, strategy, mode, ..Default::default() }
}

fn chat(p: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage::new("user", p)])
}

#[test]
fn exact_mode_is_token_identical_to_target_alone() {
    let Some((target, draft)) = pair(false) else { return };
    let gp = GenerateParams { max_tokens: 64, ignore_eog: true, ..Default::default() };
    let mut base = Session::new(target.clone(), None, params(Strategy::None, NumericMode::Exact)).unwrap();
    let mut chain =
        Session::new(target.clone(), Some(draft.clone()), params(Strategy::Chain(3), NumericMode::Exact)).unwrap();
    eprintln!("exact mode verification cap on the real target: {}", chain.max_verify_batch());
    let mut accepted = 0;
    for p in prompts() {
        base.reset();
        chain.reset();
        let want = base.generate(&chat(&p), &gp, &mut |_, _| true).unwrap();
        let got = chain.generate(&chat(&p), &gp, &mut |_, _| true).unwrap();
        assert_eq!(got.tokens, want.tokens, "exact mode departed on {:?}", &p[..40.min(p.len())]);
        accepted += got.stats.draft_accepted;
        eprintln!(
            "exact: {} tokens, tok/pass {:.2}, acceptance {:.2}",
            got.stats.tokens, got.stats.tokens_per_pass, got.stats.acceptance_rate
        );
    }
    if chain.max_verify_batch() > 1 {
        assert!(accepted > 0, "speculation never happened");
    }
}

#[test]
fn fast_mode_departures_are_measured_and_only_at_near_ties() {
    let Some((target, draft)) = pair(true) else { return };
    let gp = GenerateParams { max_tokens: 64, ignore_eog: true, ..Default::default() };
    let mut base = Session::new(target.clone(), None, params(Strategy::None, NumericMode::Fast)).unwrap();
    let mut spec =
        Session::new(target.clone(), Some(draft.clone()), params(Strategy::Chain(3), NumericMode::Fast)).unwrap();
    let mut departures = 0;
    let ps = prompts();
    for p in &ps {
        base.reset();
        spec.reset();
        let want = base.generate(&chat(p), &gp, &mut |_, _| true).unwrap();
        let got = spec.generate(&chat(p), &gp, &mut |_, _| true).unwrap();
        if let Some(i) = got.tokens.iter().zip(&want.tokens).position(|(a, b)| a != b) {
            departures += 1;
            // Top-2 margin of the target (one-token evaluation) where the outputs split.
            let mut seq = base.history()[..base.history().len() - want.tokens.len()].to_vec();
            seq.extend_from_slice(&want.tokens[..i]);
            let logits = sequence_logits(&target, &seq, 2).unwrap();
            let row = &logits[(seq.len() - 1) * target.n_vocab()..];
            let mut top: Vec<f32> = row.to_vec();
            top.sort_by(|a, b| b.total_cmp(a));
            let margin = top[0] - top[1];
            eprintln!("fast mode departed at token {i}: top-2 margin {margin:.4}");
            assert!(margin < 1.0, "a departure at a clear decision (margin {margin}) is a bug, not rounding");
        }
    }
    eprintln!("fast mode: {departures} of {} prompts departed from target alone within 64 tokens", ps.len());
}
