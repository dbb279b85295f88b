//! Lossless verification of a draft tree against the target's distributions (SPEC §3).
//! Pure: slices in, plain structs out, deterministic for a given RNG state.

use rand::Rng;

use crate::backend::Token;
use crate::sampling::sample_from;
use crate::tree::{DraftTree, Proposal};

/// The outcome of verifying one tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Accepted draft nodes, root's child first (indices into the tree).
    pub accepted: Vec<usize>,
    /// The token the target adds after the accepted path (always present).
    pub bonus: Token,
}

impl Verdict {
    /// The node whose logits produced the bonus: the last accepted node, or the root.
    pub fn last_node(&self) -> usize {
        self.accepted.last().copied().unwrap_or(0)
    }
}

/// Greedy walk: at each node take the target's argmax; descend to the child carrying it.
/// `target_argmax[i]` is the argmax of the target's logits at node i.
pub fn verify_greedy(tree: &DraftTree, target_argmax: &[Token]) -> Verdict {
    let mut node = 0;
    let mut accepted = Vec::new();
    loop {
        let t = target_argmax[node];
        match tree.children(node).into_iter().find(|&c| tree.nodes[c].token == t) {
            Some(c) => {
                accepted.push(c);
                node = c;
            }
            None => return Verdict { accepted, bonus: t },
        }
    }
}

/// Stochastic walk. `target_probs(i)` returns the warped target distribution at node i.
/// Children are tried in order; a deterministic child is accepted with probability p(x),
/// a sampled one with min(1, p(x)/q(x)); each rejection replaces p by the residual.
pub fn verify_sampled<R: Rng + ?Sized>(
    tree: &DraftTree,
    mut target_probs: impl FnMut(usize) -> Vec<f32>,
    rng: &mut R,
) -> Verdict {
    let mut node = 0;
    let mut accepted = Vec::new();
    loop {
        let mut p = target_probs(node);
        let mut next = None;
        // Duplicate children are not skipped: a rejected token has residual mass 0, so a
        // duplicate is rejected again, but its residual update must still happen for
        // with-replacement proposals to stay lossless.
        for c in tree.children(node) {
            // A token outside the target's vocabulary (a draft vocabulary may be larger) has
            // p = 0: it is rejected, and a sampled one still updates the residual.
            let xi = usize::try_from(tree.nodes[c].token).unwrap_or(usize::MAX);
            let px = p.get(xi).copied().unwrap_or(0.0);
            match &tree.nodes[c].proposal {
                Proposal::Deterministic => {
                    if px > 0.0 && rng.random::<f32>() < px {
                        next = Some(c);
                        break;
                    }
                    if px > 0.0 {
                        p[xi] = 0.0;
                        normalize(&mut p);
                    }
                }
                Proposal::Sampled(q) => {
                    let qx = q.get(xi).copied().unwrap_or(0.0);
                    let ratio = if qx > 0.0 { (px / qx).min(1.0) } else { 0.0 };
                    if px > 0.0 && rng.random::<f32>() < ratio {
                        next = Some(c);
                        break;
                    }
                    for (pi, &qi) in p.iter_mut().zip(q.iter()) {
                        *pi = (*pi - qi).max(0.0);
                    }
                    normalize(&mut p);
                }
            }
        }
        match next {
            Some(c) => {
                accepted.push(c);
                node = c;
            }
            None => {
                let bonus = sample_from(&p, rng) as Token;
                return Verdict { accepted, bonus };
            }
        }
    }
}

fn normalize(p: &mut [f32]) {
    let s: f64 = p.iter().map(|&x| x as f64).sum();
    if s > 0.0 {
        for x in p.iter_mut() {
            *x = (*x as f64 / s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::sync::Arc;

    #[test]
    fn greedy_walk_accepts_matching_path_and_adds_bonus() {
        let mut t = DraftTree::new(9);
        let a = t.add(0, 1, 0.0, 1.0, Proposal::Deterministic);
        let b = t.add(0, 2, 0.0, 1.0, Proposal::Deterministic);
        let c = t.add(b, 3, 0.0, 1.0, Proposal::Deterministic);
        // target: root→2, at b→3, at c→7
        let argmax = vec![2, 0, 3, 7];
        let v = verify_greedy(&t, &argmax);
        assert_eq!(v.accepted, vec![b, c]);
        assert_eq!(v.bonus, 7);
        let _ = a;
        // mismatch at the root: nothing accepted, bonus is the target's token
        let v = verify_greedy(&t, &[5, 0, 0, 0]);
        assert!(v.accepted.is_empty());
        assert_eq!(v.bonus, 5);
    }

    #[test]
    fn zero_probability_child_is_never_accepted() {
        let mut t = DraftTree::new(0);
        t.add(0, 1, 0.0, 1.0, Proposal::Deterministic);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let v = verify_sampled(&t, |_| vec![0.5, 0.0, 0.5], &mut rng);
            assert!(v.accepted.is_empty());
            assert_ne!(v.bonus, 1);
        }
    }

    /// Which acceptance rule the Monte-Carlo harness uses.
    #[derive(Clone, Copy, PartialEq)]
    enum Rule {
        Correct,
        /// Deliberately wrong: accept sampled children with probability q(x).
        AcceptWithQ,
    }

    fn random_dist(rng: &mut StdRng, n: usize, sparsity: f32) -> Vec<f32> {
        let mut v: Vec<f32> =
            (0..n).map(|_| if rng.random::<f32>() < sparsity { 0.0 } else { rng.random::<f32>().powi(2) }).collect();
        if v.iter().all(|&x| x == 0.0) {
            v[0] = 1.0;
        }
        normalize(&mut v);
        v
    }

    /// Emits the first token after the root following the rule, by running a real tree.
    fn first_token(tree: &DraftTree, ps: &[Vec<f32>], rng: &mut StdRng, rule: Rule) -> Token {
        if rule == Rule::Correct {
            let v = verify_sampled(tree, |i| ps[i].clone(), rng);
            return v.accepted.first().map_or(v.bonus, |&c| tree.nodes[c].token);
        }
        let mut p = ps[0].clone();
        for c in tree.children(0) {
            let x = tree.nodes[c].token as usize;
            if let Proposal::Sampled(q) = &tree.nodes[c].proposal {
                if rng.random::<f32>() < q[x] {
                    return x as Token;
                }
                for (pi, &qi) in p.iter_mut().zip(q.iter()) {
                    *pi = (*pi - qi).max(0.0);
                }
                normalize(&mut p);
            }
        }
        sample_from(&p, rng) as Token
    }

    /// Total-variation distance between the empirical first-token distribution and the
    /// target's p at the root, worst over random cases. Each case fixes a tree structure, a
    /// target p per node and a draft q per parent; every trial re-draws the sampled children.
    fn mc_error(rule: Rule, sampled: bool) -> f64 {
        let n = 6;
        let trials = 40_000;
        let mut rng = StdRng::seed_from_u64(42);
        let mut worst: f64 = 0.0;
        for _case in 0..6 {
            // structure: 1..=3 root children, each with 0..=2 children
            let mut parents = Vec::new();
            let kids = 1 + (rng.random::<u32>() % 3) as usize;
            parents.extend(std::iter::repeat_n(0usize, kids));
            for c in 1..=kids {
                for _ in 0..(rng.random::<u32>() % 3) {
                    parents.push(c);
                }
            }
            let len = parents.len() + 1;
            let ps: Vec<Vec<f32>> = (0..len).map(|_| random_dist(&mut rng, n, 0.3)).collect();
            let qs: Vec<Arc<Vec<f32>>> = (0..len).map(|_| Arc::new(random_dist(&mut rng, n, 0.2))).collect();
            let mut counts = vec![0usize; n];
            for _ in 0..trials {
                let mut tree = DraftTree::new(0);
                for (k, &par) in parents.iter().enumerate() {
                    let (tok, prop) = if sampled {
                        (sample_from(&qs[par], &mut rng) as Token, Proposal::Sampled(qs[par].clone()))
                    } else {
                        (((k * 5 + par) % n) as Token, Proposal::Deterministic)
                    };
                    tree.add(par, tok, 0.0, 0.5, prop);
                }
                counts[first_token(&tree, &ps, &mut rng, rule) as usize] += 1;
            }
            let tv: f64 = (0..n).map(|x| (counts[x] as f64 / trials as f64 - ps[0][x] as f64).abs()).sum::<f64>() / 2.0;
            worst = worst.max(tv);
        }
        worst
    }

    #[test]
    fn monte_carlo_first_token_follows_target_distribution() {
        // With 40k trials the sampling error of TV over 6 outcomes is ~0.01.
        let det = mc_error(Rule::Correct, false);
        assert!(det < 0.02, "deterministic children: TV {det}");
        let smp = mc_error(Rule::Correct, true);
        assert!(smp < 0.02, "sampled children: TV {smp}");
    }

    #[test]
    fn monte_carlo_detects_a_wrong_rule() {
        let wrong = mc_error(Rule::AcceptWithQ, true);
        assert!(wrong > 0.05, "the wrong rule should be detected, TV {wrong}");
    }

    #[test]
    fn monte_carlo_second_token_conditional() {
        // Chain of two sampled nodes: given the first emitted token is the draft's first
        // child x, the second emitted token must follow p at that child.
        let n = 5;
        let mut rng = StdRng::seed_from_u64(3);
        let p0 = random_dist(&mut rng, n, 0.0);
        let p1 = random_dist(&mut rng, n, 0.2);
        let q0 = Arc::new(random_dist(&mut rng, n, 0.0));
        let q1 = Arc::new(random_dist(&mut rng, n, 0.0));
        let mut counts = vec![0usize; n];
        let mut total = 0usize;
        let target_first: Token = 2;
        let mut first_counts = vec![0usize; n];
        let trials = 200_000;
        for _ in 0..trials {
            let mut t = DraftTree::new(0);
            let a = t.add(0, sample_from(&q0, &mut rng) as Token, 0.0, 0.5, Proposal::Sampled(q0.clone()));
            let x1 = sample_from(&q1, &mut rng) as Token;
            t.add(a, x1, 0.0, 0.5, Proposal::Sampled(q1.clone()));
            let first_tok = t.nodes[a].token;
            let v = verify_sampled(&t, |i| if i == 0 { p0.clone() } else { p1.clone() }, &mut rng);
            let first = v.accepted.first().map_or(v.bonus, |&c| t.nodes[c].token);
            first_counts[first as usize] += 1;
            if first == target_first && !v.accepted.is_empty() && first_tok == target_first {
                let second = if v.accepted.len() >= 2 { t.nodes[v.accepted[1]].token } else { v.bonus };
                counts[second as usize] += 1;
                total += 1;
            }
        }
        let tv0: f64 = (0..n).map(|x| (first_counts[x] as f64 / trials as f64 - p0[x] as f64).abs()).sum::<f64>() / 2.0;
        assert!(tv0 < 0.01, "first token TV {tv0}");
        assert!(total > 5000);
        let tv1: f64 = (0..n).map(|x| (counts[x] as f64 / total as f64 - p1[x] as f64).abs()).sum::<f64>() / 2.0;
        assert!(tv1 < 0.02, "second token TV {tv1}");
    }
}
