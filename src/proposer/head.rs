//! The feature-level head proposer (EAGLE-3 layout, [`crate::eagle`]): chains, EAGLE-2 dynamic
//! trees and static trees drafted from the target's own hidden states.
//!
//! Input convention (as llama.cpp's eagle3 driver and the EAGLE reference): the head's entry at
//! position P reads (token h[P+1], g[P]) and predicts h[P+2]. For committed positions
//! g[P] = fc(target features of h[P]); inside a draft tree a node's entry reads its parent
//! entry's pre-norm output instead. The root r = h[n-1] is not processed by the target before
//! verification, so the round's first entry E(root) sits at position n-2 and reads
//! (r, fc(f[n-2])); a node at depth d has its entry at n-2+d.
//!
//! State between rounds (n = history.len()):
//! * g rows and not yet encoded feature rows cover positions 0..features_len() where
//!   features_len() equals the tokens the target's cache holds (n-1): every row the target
//!   computed for a committed token, taken from the [`FeatureTap`] after prefill and, in
//!   `accept`, for the root and the accepted nodes only (rejected nodes' rows are dropped with
//!   their KV cells);
//! * seq 0 of the head's KV holds committed entries 0..kv_len with kv_len <= n-2; no other
//!   sequence holds cells. Tree node i is decoded under seq id i.

use std::sync::Arc;
use std::time::Instant;

use super::shapes::{self, NodeDecoder};
use super::{FeatureHead, ModelProposer, Proposer, Request};
use crate::backend::{ms_since, Model, Token};
use crate::cost::BatchCost;
use crate::eagle::{Entry, HeadContext, HeadInfo};
use crate::error::{Error, Result};
use crate::features::FeatureTap;
use crate::tree::DraftTree;

/// A head, its KV cache and the target features it has been given.
pub struct HeadDraft {
    head: HeadContext,
    tap: Arc<FeatureTap>,
    /// g = fc(features) for positions 0..n_g (n_embd floats each).
    g: Vec<f32>,
    /// Target feature rows for positions n_g.. (n_enc floats each), encoded when needed.
    pending: Vec<f32>,
    /// This round's pre-norm output of each decoded tree node (index = node).
    prenorm: Vec<Option<Vec<f32>>>,
    /// Proposable vocabulary (the target's).
    n_vocab: usize,
    timings: Vec<(usize, f64)>,
}

impl HeadDraft {
    /// A head context with `n_seq` node sequence ids reading features from `tap` (attached
    /// to the target's verification context).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        head: Arc<Model>,
        info: &HeadInfo,
        target: Arc<Model>,
        tap: Arc<FeatureTap>,
        n_ctx: u32,
        n_seq: u32,
        n_threads: i32,
    ) -> Result<HeadDraft> {
        let n_vocab = target.n_vocab();
        // Every head entry is an output row of n_vocab logits: keep batches modest.
        let n_batch = 64.max(n_seq).min(n_ctx);
        let head = HeadContext::new(head, info, target, n_ctx, n_batch, n_seq, n_threads)?;
        Ok(HeadDraft {
            head,
            tap,
            g: Vec::new(),
            pending: Vec::new(),
            prenorm: Vec::new(),
            n_vocab,
            timings: Vec::new(),
        })
    }

    /// The head model.
    pub fn model(&self) -> &Arc<Model> {
        self.head.ctx().model()
    }

    fn n_g(&self) -> usize {
        self.g.len() / self.head.n_embd()
    }

    /// Positions whose target features the head holds (encoded or not).
    fn n_features(&self) -> usize {
        self.n_g() + self.pending.len() / self.head.n_enc()
    }

    /// Committed entries in the head's cache.
    pub fn cached(&self) -> usize {
        self.head.ctx().prefix_len()
    }

    /// Keeps features of positions 0..len only.
    fn truncate_features(&mut self, len: usize) {
        let (h, e) = (self.head.n_embd(), self.head.n_enc());
        let n_g = self.n_g();
        if len <= n_g {
            self.g.truncate(len * h);
            self.pending.clear();
        } else {
            self.pending.truncate((len - n_g) * e);
        }
    }

    fn encode_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let mut g = std::mem::take(&mut self.g);
        let r = self.head.encode(&pending, &mut g);
        self.g = g;
        if r.is_err() {
            // Nothing half-encoded stays: g holds whole rows only.
            let whole = self.g.len() / self.head.n_embd() * self.head.n_embd();
            self.g.truncate(whole);
            self.pending = pending;
        }
        r
    }

    /// Decodes committed entries kv_len..end (exclusive) of `history`; returns the last one's
    /// logits and pre-norm output when `want_last`.
    fn decode_committed(
        &mut self,
        history: &[Token],
        end: usize,
        want_last: bool,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let start = self.cached();
        if start >= end {
            return Ok(None);
        }
        self.encode_pending()?;
        if self.n_g() < end {
            return Err(Error::InvalidParam {
                name: "head",
                reason: format!("target features cover {} positions, {end} needed", self.n_g()),
            });
        }
        let h = self.head.n_embd();
        let chunk = self.head.ctx().n_batch();
        let mut last = None;
        let mut p = start;
        while p < end {
            let q = (p + chunk).min(end);
            let t = Instant::now();
            let g = std::mem::take(&mut self.g);
            let entries: Vec<Entry<'_>> = (p..q)
                .map(|pos| Entry {
                    token: history[pos + 1],
                    pos: pos as i32,
                    seqs: &[0],
                    g: &g[pos * h..(pos + 1) * h],
                })
                .collect();
            let r = self.head.decode(&entries);
            drop(entries);
            self.g = g;
            r?;
            if q - p <= 4 {
                self.timings.push((q - p, ms_since(t)));
            }
            if want_last && q == end {
                let i = q - p - 1;
                let mut logits = self.head.logits(i)?.to_vec();
                logits.truncate(self.n_vocab);
                last = Some((logits, self.head.prenorm(i)?));
            }
            p = q;
        }
        Ok(last)
    }

    /// Times head decodes of each batch size on scratch positions (zero features); leaves the
    /// cache empty. The curve `auto` plans head drafting with.
    fn measure_decode_costs(&mut self, sizes: &[usize]) -> Result<BatchCost> {
        let mut cost = BatchCost::default();
        let h = self.head.n_embd();
        let zeros = vec![0.0f32; h];
        let sizes: Vec<usize> = sizes.iter().copied().filter(|&b| b <= self.head.ctx().n_batch()).collect();
        self.head.ctx_mut().clear();
        let run = |head: &mut HeadContext, b: usize| -> Result<f64> {
            head.ctx_mut().clear();
            let entries: Vec<Entry<'_>> =
                (0..b).map(|j| Entry { token: 0, pos: j as i32, seqs: &[0], g: &zeros }).collect();
            let t = Instant::now();
            head.decode(&entries)?;
            Ok(ms_since(t))
        };
        let mut best = vec![f64::INFINITY; sizes.len()];
        for _ in 0..2 {
            for (k, &b) in sizes.iter().enumerate() {
                run(&mut self.head, b)?;
                best[k] = best[k].min(run(&mut self.head, b)?);
            }
        }
        for (k, &b) in sizes.iter().enumerate() {
            cost.observe(b, best[k]);
        }
        self.head.ctx_mut().clear();
        Ok(cost)
    }
}

impl FeatureHead for HeadDraft {
    fn features_len(&self) -> usize {
        self.n_features()
    }

    fn cost_key(&self) -> String {
        format!("head|{}", self.model().path().display())
    }

    fn measure_costs(&mut self, sizes: &[usize]) -> Result<BatchCost> {
        self.measure_decode_costs(sizes)
    }

    fn as_model(&mut self) -> &mut dyn ModelProposer {
        self
    }

    fn as_proposer(&mut self) -> &mut dyn Proposer {
        self
    }
}

impl ModelProposer for HeadDraft {
    /// Entries the head decodes before it can draft at this history (the root's included).
    fn lag(&self, history: &[Token]) -> usize {
        history.len().saturating_sub(1).saturating_sub(self.cached())
    }

    fn take_timings(&mut self) -> Vec<(usize, f64)> {
        std::mem::take(&mut self.timings)
    }
}

impl NodeDecoder for HeadDraft {
    fn decode_nodes(&mut self, tree: &mut DraftTree, nodes: &[usize], base: usize) -> Result<Vec<Vec<f32>>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        let mut gs: Vec<Vec<f32>> = Vec::with_capacity(nodes.len());
        let seqs: Vec<[i32; 1]> = nodes.iter().map(|&i| [i as i32]).collect();
        for &i in nodes {
            if i >= self.head.ctx().n_seq_max() {
                return Err(Error::InvalidParam {
                    name: "tree",
                    reason: format!("draft node {i} exceeds the head's {} sequence ids", self.head.ctx().n_seq_max()),
                });
            }
            let parent = tree.nodes[i].parent;
            let parent_seq = tree.nodes[parent].draft_seq;
            let g = self.prenorm.get(parent).and_then(Option::as_ref);
            let (Some(g), true) = (g, parent_seq >= 0) else {
                return Err(Error::InvalidParam { name: "tree", reason: "parent not decoded by the head".into() });
            };
            gs.push(g.clone());
            self.head.ctx_mut().seq_cp(parent_seq, i as i32, -1, -1);
        }
        // The root is at `base`; its entry one position earlier, a depth-d node's at base-1+d.
        let entries: Vec<Entry<'_>> = nodes
            .iter()
            .zip(&gs)
            .zip(&seqs)
            .map(|((&i, g), s)| Entry {
                token: tree.nodes[i].token,
                pos: (base - 1 + tree.nodes[i].depth) as i32,
                seqs: s,
                g,
            })
            .collect();
        self.head.decode(&entries)?;
        let mut out = Vec::with_capacity(nodes.len());
        for (j, &i) in nodes.iter().enumerate() {
            out.push(self.head.logits(j)?[..self.n_vocab].to_vec());
            if self.prenorm.len() <= i {
                self.prenorm.resize(i + 1, None);
            }
            self.prenorm[i] = Some(self.head.prenorm(j)?);
            tree.nodes[i].draft_seq = i as i32;
        }
        self.timings.push((nodes.len(), ms_since(t)));
        Ok(out)
    }

    fn node_capacity(&self) -> usize {
        let ctx = self.head.ctx();
        ctx.n_seq_max().min(ctx.n_ctx().saturating_sub(ctx.prefix_len()))
    }
}

impl Proposer for HeadDraft {
    fn name(&self) -> &'static str {
        "head"
    }

    fn reset(&mut self) {
        self.head.ctx_mut().clear();
        self.g.clear();
        self.pending.clear();
        self.prenorm.clear();
    }

    fn rollback(&mut self, len: usize) {
        // Entry P reads h[P+1] and features of h[P]: valid while P + 1 < len.
        self.head.ctx_mut().keep_prefix(len.saturating_sub(1));
        self.truncate_features(len);
        self.prenorm.clear();
    }

    fn prefill(&mut self, history: &[Token]) -> Result<()> {
        // The target has just read history[start..n-1]; its rows are in the tap.
        let n = history.len();
        let rows = self.tap.n_rows();
        let start = (n - 1).saturating_sub(rows);
        if start > self.n_features() {
            return Err(Error::InvalidParam {
                name: "head",
                reason: format!(
                    "target features missing for positions {}..{start} (the session keeps them in step)",
                    self.n_features()
                ),
            });
        }
        self.truncate_features(start);
        let idx: Vec<usize> = (0..rows).collect();
        self.tap.gather(&idx, &mut self.pending)?;
        // Read the prompt now (billed as prompt processing), all but the root's entry.
        self.decode_committed(history, n.saturating_sub(2), false)?;
        Ok(())
    }

    fn propose(&mut self, req: Request<'_>, tree: &mut DraftTree) -> Result<()> {
        let n = req.history.len();
        if req.max_nodes == 0 || n < 2 || self.n_features() < n - 1 {
            return Ok(());
        }
        let max_nodes = req.max_nodes.min(self.head.ctx().n_ctx().saturating_sub(n));
        if max_nodes == 0 {
            return Ok(());
        }
        // The root's entry may be cached from an earlier attempt at this history.
        if self.cached() > n - 2 {
            self.head.ctx_mut().seq_rm(0, (n - 2) as i32, -1);
        }
        let Request { history, shape, sampling, rng, alternatives, .. } = req;
        let Some((logits, root_g)) = self.decode_committed(history, n - 1, true)? else {
            return Ok(());
        };
        self.prenorm.clear();
        self.prenorm.push(Some(root_g));
        let base = n - 1;
        shapes::build(self, tree, logits, base, shape, max_nodes, sampling, rng, alternatives)
    }

    fn accept(&mut self, _tree: &DraftTree, accepted: &[usize], n_commit: usize, n_before: usize) {
        // Tree entries read the head's own outputs: only committed entries (up to the root's,
        // at n_before - 2) stay.
        self.head.ctx_mut().keep_prefix(n_before.saturating_sub(1));
        self.prenorm.clear();
        // The target cached the root and the first n_commit - 1 accepted nodes: their rows.
        if self.n_features() != n_before - 1 {
            return; // features already out of step (an earlier failure): the session resyncs
        }
        let rows: Vec<usize> = std::iter::once(0).chain(accepted.iter().copied()).take(n_commit).collect();
        if let Err(e) = self.tap.gather(&rows, &mut self.pending) {
            tracing::warn!("head: {e}; drafting resumes at the next prompt");
            self.truncate_features(n_before - 1);
        }
    }
}
