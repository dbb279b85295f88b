//! The separate-draft-model proposer: a small GGUF model with its own KV cache drafts chains,
//! EAGLE-2 dynamic trees and static trees.
//!
//! KV invariant between rounds: seq 0 of the draft's cache holds `history[..past]` with
//! `past = seq_pos_max(0) + 1 <= history.len() - 1`; no other sequence holds cells. Tree node i
//! is decoded under seq id `i` (its `draft_seq`), attending to its own path only.
//! Draft logits outside the target's vocabulary are never proposed (they are cut off).

use std::sync::Arc;
use std::time::Instant;

use super::shapes::{self, NodeDecoder};
use super::{ModelProposer, Proposer, Request};
use crate::backend::{decode_span, ms_since, Batch, Context, ContextParams, Model, Token};
use crate::error::{Error, Result};
use crate::tree::DraftTree;

/// A draft model and its KV cache.
pub struct ModelDraft {
    ctx: Context,
    batch: Batch,
    /// Proposable vocabulary: min(draft vocab, target vocab).
    n_vocab: usize,
    /// The draft's own vocabulary size and what it reads in place of a target token it lacks.
    draft_vocab: usize,
    stand_in: Token,
    /// (batch size, ms) of the decodes since the last [`ModelDraft::take_timings`].
    timings: Vec<(usize, f64)>,
}

impl ModelDraft {
    /// A context over `model` with room for `n_seq` node sequence ids.
    pub fn new(
        model: Arc<Model>,
        target_vocab: usize,
        n_ctx: u32,
        n_batch: u32,
        n_seq: u32,
        n_threads: i32,
    ) -> Result<Self> {
        let draft_vocab = model.n_vocab();
        let n_vocab = draft_vocab.min(target_vocab);
        let stand_in = model.eos();
        let ctx =
            Context::new(model, &ContextParams { n_ctx, n_batch, n_seq_max: n_seq, n_threads, ..Default::default() })?;
        let batch = Batch::new(ctx.n_batch(), n_seq as usize);
        Ok(ModelDraft { ctx, batch, n_vocab, draft_vocab, stand_in, timings: Vec::new() })
    }

    /// The draft model.
    pub fn model(&self) -> &Arc<Model> {
        self.ctx.model()
    }

    /// The draft's context (start-up measurements).
    pub(crate) fn context_mut(&mut self) -> (&mut Context, &mut Batch) {
        (&mut self.ctx, &mut self.batch)
    }

    /// History tokens as the draft reads them: a target token beyond the draft's vocabulary
    /// (they may differ by up to 128) becomes the draft's EOS — proposals get worse there,
    /// never wrong, since the target verifies everything.
    fn readable(&self, tokens: &[Token]) -> Vec<Token> {
        tokens.iter().map(|&t| if (t as usize) < self.draft_vocab { t } else { self.stand_in }).collect()
    }

    /// Tokens of the history in the draft's cache.
    pub fn cached(&self) -> usize {
        self.ctx.prefix_len()
    }

    /// Free cells for draft nodes this round.
    fn free_cells(&self) -> usize {
        self.ctx.n_ctx().saturating_sub(self.ctx.prefix_len())
    }

    /// Feeds the draft the committed tokens it has not seen; returns its logits at the root.
    fn catch_up(&mut self, history: &[Token]) -> Result<Vec<f32>> {
        let n = history.len();
        let mut past = self.ctx.prefix_len();
        if past >= n {
            // The root itself is cached (after a rollback): decode it again for its logits.
            past = n - 1;
            self.ctx.seq_rm(0, past as i32, -1);
        }
        let t = Instant::now();
        let span = self.readable(&history[past..n]);
        let mut logits = decode_span(&mut self.ctx, &mut self.batch, &span, past, true)?;
        logits.truncate(self.n_vocab);
        if span.len() <= 4 {
            self.timings.push((span.len(), ms_since(t)));
        }
        Ok(logits)
    }

    /// Decodes tree nodes, each attending to its own path; returns their (cut) logits.
    fn decode_nodes(&mut self, tree: &mut DraftTree, nodes: &[usize], base: usize) -> Result<Vec<Vec<f32>>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        self.batch.clear();
        for &i in nodes {
            if i >= self.ctx.n_seq_max() {
                return Err(Error::InvalidParam {
                    name: "tree",
                    reason: format!("draft node {i} exceeds the draft's {} sequence ids", self.ctx.n_seq_max()),
                });
            }
            let parent_seq = tree.nodes[tree.nodes[i].parent].draft_seq;
            if parent_seq < 0 {
                return Err(Error::InvalidParam { name: "tree", reason: "parent not decoded by the draft".into() });
            }
            self.ctx.seq_cp(parent_seq, i as i32, -1, -1);
            self.batch.add(tree.nodes[i].token, (base + tree.nodes[i].depth) as i32, &[i as i32], true)?;
        }
        self.ctx.decode(&self.batch)?;
        let mut out = Vec::with_capacity(nodes.len());
        for (j, &i) in nodes.iter().enumerate() {
            out.push(self.ctx.logits(j)?[..self.n_vocab].to_vec());
            tree.nodes[i].draft_seq = i as i32;
        }
        self.timings.push((nodes.len(), ms_since(t)));
        Ok(out)
    }
}

impl ModelProposer for ModelDraft {
    /// History tokens the draft has not read yet (the root included).
    fn lag(&self, history: &[Token]) -> usize {
        history.len().saturating_sub(self.ctx.prefix_len())
    }

    fn take_timings(&mut self) -> Vec<(usize, f64)> {
        std::mem::take(&mut self.timings)
    }
}

impl NodeDecoder for ModelDraft {
    fn decode_nodes(&mut self, tree: &mut DraftTree, nodes: &[usize], base: usize) -> Result<Vec<Vec<f32>>> {
        ModelDraft::decode_nodes(self, tree, nodes, base)
    }

    fn node_capacity(&self) -> usize {
        self.ctx.n_seq_max().min(self.free_cells())
    }
}

impl Proposer for ModelDraft {
    fn name(&self) -> &'static str {
        "draft model"
    }

    fn reset(&mut self) {
        self.ctx.clear();
    }

    fn rollback(&mut self, len: usize) {
        self.ctx.keep_prefix(len);
    }

    fn prefill(&mut self, history: &[Token]) -> Result<()> {
        let n = history.len();
        let past = self.ctx.prefix_len();
        if past + 1 < n {
            let span = self.readable(&history[past..n - 1]);
            decode_span(&mut self.ctx, &mut self.batch, &span, past, false)?;
        }
        Ok(())
    }

    fn propose(&mut self, req: Request<'_>, tree: &mut DraftTree) -> Result<()> {
        if req.max_nodes == 0 {
            return Ok(());
        }
        let base = req.history.len() - 1;
        // Draft nodes need draft cells too: the root's catch-up takes what the cache lacks.
        let max_nodes = req.max_nodes.min(self.ctx.n_ctx().saturating_sub(req.history.len()));
        if max_nodes == 0 {
            return Ok(());
        }
        let Request { history, shape, sampling, rng, alternatives, .. } = req;
        let logits = self.catch_up(history)?;
        shapes::build(self, tree, logits, base, shape, max_nodes, sampling, rng, alternatives)
    }

    fn accept(&mut self, tree: &DraftTree, accepted: &[usize], n_commit: usize, n_before: usize) {
        // The draft may cache the new history except its last token (the next root).
        let valid = n_before + n_commit - 1;
        let decoded = accepted.iter().take_while(|&&i| tree.nodes[i].draft_decoded()).last();
        if let Some(&last) = decoded {
            self.ctx.seq_cp(tree.nodes[last].draft_seq, 0, -1, -1);
        }
        self.ctx.keep_prefix(valid);
    }
}
