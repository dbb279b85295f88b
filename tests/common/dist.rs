//! Distribution tests: Pearson's chi-square of observed token pairs against a target's exact
//! joint distribution.

use std::collections::HashMap;

use adaspec::Token;

/// Pearson's chi-square of the observed joint against `expected` (cells with expected count
/// below 5 pooled) and the critical value at p = 1e-4 for its degrees of freedom.
pub fn chi_square(
    counts: &HashMap<(Token, Token), usize>,
    expected: &HashMap<(Token, Token), f64>,
    n: usize,
) -> (f64, f64) {
    let mut stat = 0.0;
    let (mut pool_obs, mut pool_exp, mut cells) = (0.0, 0.0, 0usize);
    for (k, &p) in expected {
        let e = p * n as f64;
        let o = *counts.get(k).unwrap_or(&0) as f64;
        if e < 5.0 {
            pool_obs += o;
            pool_exp += e;
        } else {
            stat += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    // Outcomes the target cannot produce are an error by themselves.
    let impossible: usize = counts.iter().filter(|(k, _)| !expected.contains_key(k)).map(|(_, c)| c).sum();
    assert_eq!(impossible, 0, "generated token pairs the target's warp gives probability 0");
    if pool_exp > 0.0 {
        stat += (pool_obs - pool_exp).powi(2) / pool_exp.max(1e-9);
        cells += 1;
    }
    let df = (cells.max(2) - 1) as f64;
    // Wilson–Hilferty approximation of the chi-square quantile; z(1 - 1e-4) = 3.719.
    let z = 3.719;
    let crit = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (stat, crit)
}

/// The exact joint distribution of the first two tokens the target samples after `prompt`
/// under `sp` (warped logits, as the session samples).
pub fn exact_first_two(
    target: &std::sync::Arc<adaspec::Model>,
    prompt: &[Token],
    sp: &adaspec::SamplingParams,
) -> HashMap<(Token, Token), f64> {
    use adaspec::backend::sequence_logits;
    use adaspec::sampling::warp;
    let nv = target.n_vocab();
    let last = |toks: &[Token]| {
        let all = sequence_logits(target, toks, 1).unwrap();
        warp(&all[(toks.len() - 1) * nv..], sp)
    };
    let mut expected = HashMap::new();
    for (t1, &a) in last(prompt).iter().enumerate().filter(|(_, &a)| a > 0.0) {
        let p2 = last(&[prompt.to_vec(), vec![t1 as Token]].concat());
        for (t2, &b) in p2.iter().enumerate().filter(|(_, &b)| b > 0.0) {
            expected.insert((t1 as Token, t2 as Token), a as f64 * b as f64);
        }
    }
    expected
}

/// Counts of the first two tokens over `n` generations of 4 tokens after `prompt` with seeds
/// `sp.seed + 1000 + i`, and the mean tokens per target pass.
pub fn sampled_first_two(
    s: &mut adaspec::Session,
    prompt: &[Token],
    sp: &adaspec::SamplingParams,
    n: usize,
) -> (HashMap<(Token, Token), usize>, f64) {
    use adaspec::{GenerateParams, Prompt};
    let mut counts = HashMap::new();
    let (mut passes, mut tokens) = (0, 0);
    for i in 0..n {
        s.reset();
        let sampling = adaspec::SamplingParams { seed: sp.seed + 1000 + i as u64, ..sp.clone() };
        let gp = GenerateParams { max_tokens: 4, sampling, stop: vec![], ignore_eog: true };
        let g = s.generate(&Prompt::Tokens(prompt.to_vec()), &gp, &mut |_, _| true).unwrap();
        *counts.entry((g.tokens[0], g.tokens[1])).or_insert(0usize) += 1;
        passes += g.stats.rounds;
        tokens += g.stats.tokens;
    }
    (counts, tokens as f64 / passes.max(1) as f64)
}

/// The head sampling test: sessions made by `session` for a chain of 3, a dynamic tree 3/3/8
/// and `auto` (all on flat costs, so drafts pay) must give the target's own joint of the first
/// two tokens after a fixed prompt (temperature 1.5, top-k 4; chi-square at p = 1e-4 over 3000
/// generations each), with more than 1.05 tokens per target pass.
pub fn check_head_sampling(
    target: &std::sync::Arc<adaspec::Model>,
    session: &dyn Fn(adaspec::Strategy) -> adaspec::Session,
) {
    use adaspec::{SamplingParams, Strategy};
    let sp = SamplingParams { temperature: 1.5, top_k: 4, top_p: 1.0, min_p: 0.0, seed: 0 };
    let prompt = target.tokenize("Natalia sold clips to 48 of her friends in April, and then", false, false).unwrap();
    let expected = exact_first_two(target, &prompt, &sp);
    let n = 3000;
    for strategy in [Strategy::Chain(3), "tree:3,3,8".parse().unwrap(), Strategy::Auto] {
        let mut s = session(strategy.clone());
        s.policy_mut().fix_costs(&(0..16).map(|i| 10.0 + 0.1 * i as f64).collect::<Vec<_>>(), 0.5);
        let (counts, tpp) = sampled_first_two(&mut s, &prompt, &sp, n);
        let (stat, crit) = chi_square(&counts, &expected, n);
        eprintln!("{strategy}: chi2 {stat:.1} (critical {crit:.1}), tokens/pass {tpp:.2}");
        assert!(stat < crit, "{strategy}: chi-square {stat:.1} above {crit:.1}");
        assert!(tpp > 1.05, "{strategy}: {tpp:.2} tokens per pass: the head's drafts were hardly accepted");
    }
}
