//! The draft shapes every model-like proposer (a draft model, a feature-level head) builds from
//! its logits: chains, EAGLE-2 dynamic trees and static trees. The proposer only says how to
//! decode a set of tree nodes ([`NodeDecoder`]).

use std::sync::Arc;

use super::{Alternative, ChainStep, Shape};
use crate::backend::Token;
use crate::error::Result;
use crate::sampling::{argmax, log_sum_exp, sample_from, top_k_indices, warp, SamplingParams};
use crate::tree::{DraftTree, Origin, Proposal, StaticShape};

/// How a proposer decodes tree nodes.
pub(crate) trait NodeDecoder {
    /// Decodes `nodes` (whose parents are decoded), each attending to its own path; returns
    /// their logits (cut to the proposable vocabulary) and marks them decoded. `base` is the
    /// root's position.
    fn decode_nodes(&mut self, tree: &mut DraftTree, nodes: &[usize], base: usize) -> Result<Vec<Vec<f32>>>;
    /// Most tree nodes (root included) the proposer can decode this round.
    fn node_capacity(&self) -> usize;
}

// The request's parts, split so the shape's `extend` closure can be borrowed alongside.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chain(
    d: &mut impl NodeDecoder,
    tree: &mut DraftTree,
    mut logits: Vec<f32>,
    base: usize,
    max_len: usize,
    extend: &mut dyn FnMut(ChainStep) -> bool,
    sp: &SamplingParams,
    rng: &mut rand::rngs::StdRng,
    mut alternatives: Option<&mut Vec<Alternative>>,
) -> Result<()> {
    let mut node = 0;
    for step in 0..max_len {
        let lse = log_sum_exp(&logits);
        let top = top_k_indices(&logits, 2);
        let top_q = top.first().map_or(0.0, |&(_, v)| (v - lse).exp());
        if !extend(ChainStep { drafted: step, top_q: Some(top_q) }) {
            break;
        }
        if let (Some(alts), Some(&(t2, v2))) = (alternatives.as_deref_mut(), top.get(1)) {
            if sp.is_greedy() {
                alts.push(Alternative { parent: node, token: t2 as Token, logq: v2 - lse });
            }
        }
        let child = add_choice(tree, node, &logits, lse, sp, rng);
        node = child;
        if step + 1 < max_len {
            // Only a further token needs this one's logits: ask before paying for them.
            if !extend(ChainStep { drafted: step + 1, top_q: None }) {
                break;
            }
            logits = d.decode_nodes(tree, &[child], base)?.pop().unwrap_or_default();
        }
    }
    Ok(())
}

pub(crate) fn dynamic(
    d: &mut impl NodeDecoder,
    tree: &mut DraftTree,
    root_logits: Vec<f32>,
    base: usize,
    k: usize,
    depth: usize,
    nodes: usize,
) -> Result<()> {
    // Candidates decoded by the draft need cells of their own (one per node).
    let seq_cap = d.node_capacity();
    let mut frontier: Vec<(usize, Vec<f32>)> = vec![(0, root_logits)];
    for level in 1..=depth {
        let mut cands: Vec<usize> = Vec::new();
        for (parent, logits) in &frontier {
            let lse = log_sum_exp(logits);
            for (rank, (t, v)) in top_k_indices(logits, k).into_iter().enumerate() {
                if tree.len() >= seq_cap {
                    break;
                }
                let c = tree.add(*parent, t as Token, v - lse, 0.0, Proposal::Deterministic);
                tree.nodes[c].origin = Origin::Draft(rank);
                cands.push(c);
            }
        }
        if level == depth || cands.is_empty() || tree.len() >= seq_cap {
            break;
        }
        cands.sort_by(|&a, &b| tree.nodes[b].score.total_cmp(&tree.nodes[a].score));
        cands.truncate(k);
        let logits = d.decode_nodes(tree, &cands, base)?;
        frontier = cands.into_iter().zip(logits).collect();
    }
    *tree = tree.top_n(nodes);
    Ok(())
}

/// A fixed shape: the node for path p is the p.last()-th best child of the node for p[..-1].
pub(crate) fn static_tree(
    d: &mut impl NodeDecoder,
    tree: &mut DraftTree,
    root_logits: Vec<f32>,
    base: usize,
    shape: &StaticShape,
    max_nodes: usize,
) -> Result<()> {
    let width = shape.max_width();
    let mut level: Vec<(Vec<usize>, usize, Vec<f32>)> = vec![(Vec::new(), 0, root_logits)];
    for _ in 0..shape.depth() {
        let mut next: Vec<(Vec<usize>, usize)> = Vec::new();
        for (path, node, logits) in &level {
            let lse = log_sum_exp(logits);
            for (rank, (t, v)) in top_k_indices(logits, width).into_iter().enumerate() {
                let mut p = path.clone();
                p.push(rank);
                if !shape.paths.contains(&p) || tree.n_draft() >= max_nodes {
                    continue;
                }
                let c = tree.add(*node, t as Token, v - lse, 0.0, Proposal::Deterministic);
                tree.nodes[c].origin = Origin::Draft(rank);
                next.push((p, c));
            }
        }
        // Decode only nodes that have children in the shape.
        let expand: Vec<(Vec<usize>, usize)> = next
            .into_iter()
            .filter(|(p, _)| shape.paths.iter().any(|q| q.len() == p.len() + 1 && q.starts_with(p)))
            .collect();
        if expand.is_empty() {
            break;
        }
        let ids: Vec<usize> = expand.iter().map(|(_, c)| *c).collect();
        let logits = d.decode_nodes(tree, &ids, base)?;
        level = expand.into_iter().zip(logits).map(|((p, c), l)| (p, c, l)).collect();
    }
    Ok(())
}

/// Adds the draft's choice below `parent`: its argmax (greedy) or a sample from its warped
/// distribution (sampling), recording how it was proposed.
pub(crate) fn add_choice(
    tree: &mut DraftTree,
    parent: usize,
    logits: &[f32],
    lse: f32,
    sp: &SamplingParams,
    rng: &mut rand::rngs::StdRng,
) -> usize {
    if sp.is_greedy() {
        let t = argmax(logits);
        tree.add(parent, t as Token, logits[t] - lse, 0.0, Proposal::Deterministic)
    } else {
        let q = warp(logits, sp);
        let t = sample_from(&q, rng);
        let top = q.iter().copied().fold(0.0f32, f32::max);
        let c = tree.add(parent, t as Token, logits[t] - lse, 0.0, Proposal::Sampled(Arc::new(q)));
        tree.nodes[c].conf = top;
        c
    }
}

/// Builds the requested `shape` below the root from its logits (the root at position `base`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    d: &mut impl NodeDecoder,
    tree: &mut DraftTree,
    root_logits: Vec<f32>,
    base: usize,
    shape: Shape<'_>,
    max_nodes: usize,
    sp: &SamplingParams,
    rng: &mut rand::rngs::StdRng,
    alternatives: Option<&mut Vec<Alternative>>,
) -> Result<()> {
    match shape {
        Shape::Chain { max_len, extend } => {
            chain(d, tree, root_logits, base, max_len.min(max_nodes), extend, sp, rng, alternatives)
        }
        Shape::Dynamic { top_k, depth, nodes } => {
            dynamic(d, tree, root_logits, base, top_k, depth, nodes.min(max_nodes))
        }
        Shape::Static(s) => static_tree(d, tree, root_logits, base, s, max_nodes),
    }
}
