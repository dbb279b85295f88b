//! The real pair (Qwen2.5-Coder 1.5B target + 0.5B draft): exact mode must be token-identical
//! to target-alone decoding; fast mode's departures are measured and must sit at near-ties.
//! A missing model fails the test (scripts/fetch-models.sh fetches them; see tests/common for
//! the opt-out); the prompts are the first HumanEval and held-out GSM8K records built into the crate.

mod common;

use std::sync::Arc;

use adaspec::backend::sequence_logits;
use adaspec::models::{DEFAULT_DRAFT, DEFAULT_TARGET};
use adaspec::{ChatMessage, GenerateParams, Model, ModelParams, NumericMode, Prompt, Session, SessionParams, Strategy};
use common::real_models;

fn pair(repack: bool) -> Option<(Arc<Model>, Arc<Model>)> {
    let [t, d] = real_models([DEFAULT_TARGET, DEFAULT_DRAFT])?;
    let target = Arc::new(Model::load(&t, &ModelParams { repack, ..Default::default() }).unwrap());
    let draft = Arc::new(Model::load(&d, &ModelParams::default()).unwrap());
    Some((target, draft))
}

fn prompts() -> Vec<String> {
    let mut v = adaspec::dataset::load_prompts("humaneval", 3).unwrap();
    v.extend(adaspec::dataset::load_prompts("gsm8k", 3).unwrap());
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

/// Exact mode past 512 cells of context (where llama.cpp's attention steps to a larger n_kv)
/// with many rollbacks: a conversation of several long turns, chain and `auto` (model + lookups).
#[test]
fn exact_mode_past_600_tokens_of_context_is_token_identical() {
    let Some((target, draft)) = pair(false) else { return };
    let gp = GenerateParams { max_tokens: 96, ignore_eog: true, ..Default::default() };
    let turns: Vec<String> = prompts().into_iter().take(4).collect();
    let run = |s: &mut Session| -> Vec<Vec<i32>> {
        turns.iter().map(|p| s.generate(&chat(p), &gp, &mut |_, _| true).unwrap().tokens).collect()
    };
    let mut base = Session::new(target.clone(), None, params(Strategy::None, NumericMode::Exact)).unwrap();
    let want = run(&mut base);
    assert!(base.history().len() > 600, "context reached only {} tokens", base.history().len());
    for st in [Strategy::Chain(3), Strategy::Auto] {
        let mut s = Session::new(target.clone(), Some(draft.clone()), params(st.clone(), NumericMode::Exact)).unwrap();
        let got = run(&mut s);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "exact mode {st} departed in turn {i} (context {} tokens)", s.history().len());
        }
        eprintln!("exact {st}: {} tokens of context, cap {}", s.history().len(), s.max_verify_batch());
    }
}
