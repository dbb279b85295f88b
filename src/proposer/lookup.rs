//! The lookup proposer: n-gram matches in the prompt and the generated text propose what
//! followed them before (prompt-lookup decoding). It costs no model time, so the policy adds
//! its branches wherever a wider verification batch pays.
//!
//! Its proposals are deterministic (q is one-hot), so they are verified with the target's own
//! probability and may be pruned freely; it never touches a KV cache.

use super::{Proposer, Request, Shape};
use crate::backend::Token;
use crate::error::Result;
use crate::ngram::{Candidate, NgramConfig, NgramIndex};
use crate::tree::{DraftTree, Origin, Proposal};

/// An n-gram index over the session's history.
pub struct LookupDraft {
    index: NgramIndex,
}

impl Default for LookupDraft {
    /// Continuations up to the longest lookup chain `auto` verifies: copied text often runs
    /// long, and on a CPU one 16-token batch costs far less than 16 one-token passes.
    fn default() -> Self {
        let cfg = NgramConfig { max_len: crate::policy::AUTO_MAX_LOOKUP, ..NgramConfig::default() };
        LookupDraft { index: NgramIndex::new(cfg) }
    }
}

/// Confidence of a lookup candidate: the key under which `auto` calibrates its acceptance,
/// ordered from least to most reliable. Two things tell copied text from a chance repeat: how
/// far back the match reaches ([`Candidate::context_len`]: under 4, 4–7, 8–15, 16 and more
/// tokens) and whether every earlier occurrence agrees on the next token. Each of the eight
/// classes is its own calibration bucket (0.25, 0.35, …, 0.95: a tenth apart), so a long copy's
/// acceptance is learned apart from short matches'; the value is half of the prior its bucket
/// starts from (the other half: what lookups achieved so far).
pub fn confidence(c: &Candidate) -> f32 {
    let reach = match c.context_len {
        0..=3 => 0,
        4..=7 => 1,
        8..=15 => 2,
        _ => 3,
    };
    let unanimous = usize::from(c.support == c.occurrences);
    0.25 + (2 * reach + unanimous) as f32 / 10.0
}

impl LookupDraft {
    /// Continuations of the history, best first.
    pub fn candidates(&mut self, history: &[Token]) -> Vec<Candidate> {
        self.index.sync(history);
        self.index.propose(history)
    }

    /// Puts `tokens` into the tree below the root, sharing the nodes that already carry the
    /// same tokens; returns the nodes added (at most `max_new`).
    pub fn insert(tree: &mut DraftTree, tokens: &[Token], conf: f32, max_new: usize) -> Vec<usize> {
        let mut node = 0;
        let mut added = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            if let Some(c) = tree.child_with(node, t) {
                node = c;
                continue;
            }
            if added.len() >= max_new {
                break;
            }
            let c = tree.add(node, t, 0.0, 0.0, Proposal::Deterministic);
            tree.nodes[c].origin = Origin::Lookup(i);
            tree.nodes[c].conf = conf;
            added.push(c);
            node = c;
        }
        added
    }
}

impl Proposer for LookupDraft {
    fn name(&self) -> &'static str {
        "lookup"
    }

    fn reset(&mut self) {
        self.index.clear();
    }

    fn rollback(&mut self, _len: usize) {
        // The index re-syncs with the history on the next lookup.
    }

    fn prefill(&mut self, history: &[Token]) -> Result<()> {
        self.index.sync(history);
        Ok(())
    }

    /// Fixed strategies without a draft model: the best continuation for a chain, several for
    /// trees, up to the shape's depth.
    fn propose(&mut self, req: Request<'_>, tree: &mut DraftTree) -> Result<()> {
        // Leaves and nodes stay within what the shape promised (the target's sequence ids
        // were sized for it).
        let (max_len, branches, nodes) = match req.shape {
            Shape::Chain { max_len, .. } => (max_len, 1, max_len),
            Shape::Dynamic { top_k, depth, nodes } => (depth, top_k.min(nodes), nodes),
            Shape::Static(s) => (s.depth(), s.leaves(), s.paths.len()),
        };
        let mut left = req.max_nodes.min(nodes);
        if left == 0 {
            return Ok(());
        }
        for c in self.candidates(req.history).iter().take(branches) {
            let len = c.tokens.len().min(max_len);
            left -= Self::insert(tree, &c.tokens[..len], confidence(c), left).len();
            if left == 0 {
                break;
            }
        }
        Ok(())
    }

    fn accept(&mut self, _tree: &DraftTree, _accepted: &[usize], _n_commit: usize, _n_before: usize) {}
}
