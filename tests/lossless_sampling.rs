//! High-power distribution tests of the whole session loop under sampling, through real
//! llama.cpp on the tiny generated pair: the joint distribution of the first two generated
//! tokens of every proposer and strategy must equal the target's own (computed exactly from
//! its logits), by a chi-square test over thousands of generations. `auto` is made to draft
//! on any machine by fixing its cost model; a negative control (the biased "explore, then
//! truncate the sampled chain" rule, kept as a test-only variant) must fail the same test.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use adaspec::backend::sequence_logits;
use adaspec::ngram::{NgramConfig, NgramIndex};
use adaspec::policy::TestVariant;
use adaspec::sampling::warp;
use adaspec::tiny_model::{write_tiny_pair, TinyArch, DEFAULT_DRAFT_NOISE};
use adaspec::{GenerateParams, Model, ModelParams, Prompt, SamplingParams, Session, SessionParams, Strategy, Token};
use common::dist::chi_square;

struct Pair {
    target: Arc<Model>,
    draft: Arc<Model>,
    _dir: PathBuf,
}

fn pair() -> &'static Pair {
    static P: OnceLock<Pair> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("adaspec-lossless-{}", std::process::id()));
        let (t, d) = write_tiny_pair(&dir, TinyArch::Qwen2, DEFAULT_DRAFT_NOISE, 11).expect("write tiny pair");
        let target = Arc::new(Model::load(&t, &ModelParams::default()).expect("load target"));
        let draft = Arc::new(Model::load(&d, &ModelParams::default()).expect("load draft"));
        Pair { target, draft, _dir: dir }
    })
}

/// Flat enough that the draft is unsure (acceptance well below 1), few enough outcomes for a
/// chi-square test of the joint of two tokens (at most 16 cells).
fn sampling(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 1.5, top_k: 4, top_p: 1.0, min_p: 0.0, seed }
}

/// A prompt whose n-gram lookups the target tends to accept: the target's own greedy text,
/// cut where a lookup proposes the two tokens that the target's greedy continuation has next.
fn prompt_tokens(m: &Model) -> Vec<Token> {
    static PROMPT: OnceLock<Vec<Token>> = OnceLock::new();
    PROMPT
        .get_or_init(|| {
            let p = m.tokenize("one two three", false, false).expect("tokenize");
            let mut s = Session::new(
                pair().target.clone(),
                None,
                SessionParams { n_ctx: 512, n_threads: 1, strategy: Strategy::None, ..Default::default() },
            )
            .expect("session");
            let gp = GenerateParams { max_tokens: 300, ignore_eog: true, ..Default::default() };
            let g = s.generate(&Prompt::Tokens(p.clone()), &gp, &mut |_, _| true).expect("generate").tokens;
            let text = [p, g].concat();
            let mut index = NgramIndex::new(NgramConfig::default());
            for cut in 24..text.len() - 2 {
                let head = &text[..cut];
                index.sync(head);
                if let Some(c) = index.propose(head).first() {
                    if c.tokens.len() >= 2 && c.tokens[..2] == text[cut..cut + 2] {
                        return head.to_vec();
                    }
                }
            }
            panic!("the tiny target's greedy text never repeats itself: no prompt for lookup tests");
        })
        .clone()
}

/// The target's exact joint distribution of the next two tokens after `prompt`.
fn exact_joint(target: &Arc<Model>, prompt: &[Token]) -> HashMap<(Token, Token), f64> {
    let n_vocab = target.n_vocab();
    let last_row = |tokens: &[Token]| -> Vec<f32> {
        let all = sequence_logits(target, tokens, 1).expect("logits");
        all[(tokens.len() - 1) * n_vocab..].to_vec()
    };
    let sp = sampling(0);
    let p1 = warp(&last_row(prompt), &sp);
    let mut joint = HashMap::new();
    for (t1, &a) in p1.iter().enumerate().filter(|(_, &a)| a > 0.0) {
        let mut seq = prompt.to_vec();
        seq.push(t1 as Token);
        let p2 = warp(&last_row(&seq), &sp);
        for (t2, &b) in p2.iter().enumerate().filter(|(_, &b)| b > 0.0) {
            joint.insert((t1 as Token, t2 as Token), a as f64 * b as f64);
        }
    }
    joint
}

/// A verification curve on which whether a sampled chain of two pays depends on the draft's
/// confidence after its first token — exactly where a truncation rule biases the output: one
/// extra token is dear, two cost the same as one, and the price is set so that the biased rule
/// keeps the chain for about half of the draft's first tokens (weighted by their probability).
/// Acceptance estimates are the draft's own confidences (`fix_costs`).
fn split_costs(prompt: &[Token]) -> Vec<f64> {
    let p = pair();
    let n_vocab = p.draft.n_vocab();
    let dist = |tokens: &[Token]| {
        let all = sequence_logits(&p.draft, tokens, 1).expect("draft logits");
        warp(&all[(tokens.len() - 1) * n_vocab..], &sampling(0))
    };
    let q1 = dist(prompt);
    let a1 = q1.iter().copied().fold(0.0f32, f32::max) as f64;
    let mut a2: Vec<(f64, f64)> = q1
        .iter()
        .enumerate()
        .filter(|(_, &q)| q > 0.0)
        .map(|(t, &q)| {
            let next = dist(&[prompt, &[t as Token]].concat());
            (next.iter().copied().fold(0.0f32, f32::max) as f64, q as f64)
        })
        .collect();
    a2.sort_by(|x, y| x.0.total_cmp(&y.0));
    // Threshold halfway between the two a2 values around the weighted median.
    let mut mass = 0.0;
    let k = a2.iter().position(|&(_, w)| {
        mass += w;
        mass >= 0.5
    });
    let k = k.unwrap_or(0).min(a2.len() - 2);
    let t = (a2[k].0 + a2[k + 1].0) / 2.0;
    // The biased rule keeps two tokens iff (1 + a1 + a1·a2) / (d + x) > 1 / (d + t1), with the
    // chain's draft time d already spent in both: the root's catch-up and one decode per
    // drafted token, 3 × 0.5 ms.
    let (t1, d) = (10.0, 1.5);
    let x = (d + t1) * (1.0 + a1 + a1 * t) - d;
    eprintln!("split costs: a1 {a1:.3}, a2 {a2:?}, threshold {t:.3}, T(2..) = {x:.2} ms");
    let mut curve = vec![t1];
    curve.extend((0..15).map(|i| x + 0.01 * i as f64));
    curve
}

/// A nearly flat curve (a GPU's): every proposal pays, lookups included.
fn flat_costs() -> Vec<f64> {
    (0..16).map(|i| 10.0 + 0.1 * i as f64).collect()
}

fn session(strategy: Strategy, with_model: bool, lookup: bool, variant: TestVariant, flat: bool) -> Session {
    let p = pair();
    let draft = with_model.then(|| p.draft.clone());
    let mut s = Session::new(
        p.target.clone(),
        draft,
        SessionParams { n_ctx: 256, n_threads: 1, strategy, lookup, ..Default::default() },
    )
    .expect("session");
    static COSTS: OnceLock<Vec<f64>> = OnceLock::new();
    let costs = if flat { flat_costs() } else { COSTS.get_or_init(|| split_costs(&prompt_tokens(&p.target))).clone() };
    s.policy_mut().fix_costs(&costs, 0.5);
    s.set_test_variant(variant);
    s
}

/// Joint counts of the first two tokens over `n` seeded generations of `max_tokens`, with the
/// session's mean tokens per pass and acceptance.
fn histogram(s: &mut Session, n: usize, max_tokens: usize) -> (HashMap<(Token, Token), usize>, f64, f64) {
    let prompt = prompt_tokens(s.target_model());
    let mut h = HashMap::new();
    let (mut passes, mut tokens, mut proposed, mut accepted) = (0usize, 0usize, 0usize, 0usize);
    for seed in 0..n {
        s.reset();
        let gp =
            GenerateParams { max_tokens, sampling: sampling(10_000 + seed as u64), stop: vec![], ignore_eog: true };
        let g = s.generate(&Prompt::Tokens(prompt.clone()), &gp, &mut |_, _| true).expect("generate");
        *h.entry((g.tokens[0], g.tokens[1])).or_default() += 1;
        passes += g.stats.rounds;
        tokens += g.stats.tokens;
        proposed += g.stats.draft_proposed;
        accepted += g.stats.draft_accepted;
    }
    (h, tokens as f64 / passes as f64, accepted as f64 / proposed.max(1) as f64)
}

const N: usize = 6000;
/// Generations per case in the every-proposer test (each case is its own chi-square test).
const N_CASE: usize = 4000;

fn check(name: &str, s: &mut Session, n: usize, max_tokens: usize) -> (f64, f64, f64) {
    let expected = exact_joint(&pair().target, &prompt_tokens(s.target_model()));
    let (h, tpp, acc) = histogram(s, n, max_tokens);
    let (stat, crit) = chi_square(&h, &expected, n);
    eprintln!("{name:<40} chi2 {stat:8.1} (critical {crit:.1})  tokens/pass {tpp:.2}  acceptance {acc:.2}");
    (stat, crit, tpp)
}

#[test]
fn auto_under_sampling_matches_target_distribution_and_truncation_is_caught() {
    let mut good = session(Strategy::Auto, true, false, TestVariant::default(), false);
    let (stat, crit, tpp) = check("auto (model)", &mut good, N, 3);
    assert!(tpp > 1.3, "auto barely drafted ({tpp:.2} tokens per pass): the test would prove nothing");
    assert!(stat < crit, "auto: chi-square {stat:.1} above {crit:.1}");

    // Negative control: the same test must reject the biased rule.
    let mut bad = session(Strategy::Auto, true, false, TestVariant { truncate_sampled_chains: true }, false);
    let (stat, crit, _) = check("auto, truncating sampled chains (wrong)", &mut bad, N, 3);
    assert!(stat > crit, "the test no longer detects truncation of sampled chains: chi-square {stat:.1} <= {crit:.1}");
}

#[test]
fn every_proposer_under_sampling_matches_target_distribution() {
    let cases: Vec<(&str, Strategy, bool, bool, bool)> = vec![
        ("target alone", Strategy::None, false, false, false),
        ("chain:3 (model)", Strategy::Chain(3), true, false, false),
        ("tree:3,3,8 (model)", "tree:3,3,8".parse().unwrap(), true, false, false),
        ("static (model)", "static:0;1;0,0;0,1".parse().unwrap(), true, false, false),
        ("auto (model + lookup), flat costs", Strategy::Auto, true, true, true),
        ("auto (model + lookup), split costs", Strategy::Auto, true, true, false),
        ("auto (lookup only), flat costs", Strategy::Auto, false, true, true),
        ("chain:3 (lookup only)", Strategy::Chain(3), false, true, false),
    ];
    for (name, st, model, lookup, flat) in cases {
        let mut s = session(st.clone(), model, lookup, TestVariant::default(), flat);
        let (stat, crit, tpp) = check(name, &mut s, N_CASE, 4);
        assert!(stat < crit, "{name}: chi-square {stat:.1} above {crit:.1}");
        // Only meaningful if the proposer proposed and the target accepted some of it.
        if st != Strategy::None {
            assert!(tpp > 1.05, "{name}: {tpp:.2} tokens per pass, so nothing was verified");
        }
    }
}
