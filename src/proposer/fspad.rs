//! The FSPAD-family head proposer ([`crate::fspad`]: EAGLE-2-style, FSPAD and its two
//! ablations): chains, EAGLE-2 dynamic trees and static trees drafted from the target's
//! final-norm hidden states, with the head's own KV cache and an explicit tree mask.
//!
//! Input convention (as [`super::HeadDraft`] and the EAGLE-2 reference): the entry at position P
//! reads (token h[P+1], f[P]) and predicts h[P+2]; committed entries read the target's feature
//! f[P], a tree node reads its parent entry's hidden output (the feature half under partial
//! alignment). The root r = h[n-1]'s entry sits at n-2; a depth-d node's at n-2+d.
//!
//! State between rounds (n = history.len()): features of positions 0..features_len() with
//! features_len() equal to the tokens in the target's cache (n-1); keys and values of committed
//! entries 0..cached() with cached() <= n-2. Tree nodes' keys live only during their round.

use std::sync::Arc;
use std::time::Instant;

use super::shapes::{self, NodeDecoder};
use super::{FeatureHead, ModelProposer, Proposer, Request};
use crate::backend::{ms_since, Model, Token};
use crate::cost::BatchCost;
use crate::error::{Error, Result};
use crate::features::FeatureTap;
use crate::fspad::{EntryIn, FspadHead, FspadRunner};
use crate::tree::DraftTree;

/// Committed entries decoded per head call.
const CHUNK: usize = 64;
/// Bound on entries × visible keys of one committed-entry call.
const KEYS_PER_CALL: usize = 1 << 21;
/// Most tree nodes one round decodes.
const MAX_NODES: usize = 256;

/// An FSPAD-family head, its KV cache and the target features it has been given.
pub struct FspadDraft {
    run: FspadRunner,
    tap: Arc<FeatureTap>,
    hidden: usize,
    kv_dim: usize,
    n_ctx: usize,
    /// Target vocabulary size (logits handed to the tree builder).
    n_vocab: usize,
    /// Target features f[P] of positions 0..features_len().
    feats: Vec<f32>,
    /// Keys and values of committed entries 0..cached().
    k: Vec<f32>,
    v: Vec<f32>,
    /// This round: keys/values of decoded tree nodes (decode order), each node's row there,
    /// and each node's hidden output (index 0: the root entry's).
    node_k: Vec<f32>,
    node_v: Vec<f32>,
    node_row: Vec<Option<usize>>,
    node_hidden: Vec<Option<Vec<f32>>>,
    timings: Vec<(usize, f64)>,
}

impl FspadDraft {
    pub fn new(
        head: Arc<FspadHead>,
        target: &Model,
        tap: Arc<FeatureTap>,
        n_ctx: u32,
        n_threads: i32,
    ) -> Result<FspadDraft> {
        let (hidden, kv_dim) = (head.config().hidden, head.config().kv_dim());
        let run = FspadRunner::new(head, target, n_threads)?;
        Ok(FspadDraft {
            run,
            tap,
            hidden,
            kv_dim,
            n_ctx: n_ctx as usize,
            n_vocab: target.n_vocab(),
            feats: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            node_k: Vec::new(),
            node_v: Vec::new(),
            node_row: Vec::new(),
            node_hidden: Vec::new(),
            timings: Vec::new(),
        })
    }

    /// The head.
    pub fn head(&self) -> &Arc<FspadHead> {
        self.run.head()
    }

    /// Committed entries in the head's cache.
    pub fn cached(&self) -> usize {
        self.k.len() / self.kv_dim
    }

    fn keep_entries(&mut self, n: usize) {
        let n = n.min(self.cached());
        self.k.truncate(n * self.kv_dim);
        self.v.truncate(n * self.kv_dim);
    }

    fn clear_round(&mut self) {
        self.node_k.clear();
        self.node_v.clear();
        self.node_row.clear();
        self.node_hidden.clear();
    }

    /// Logits over the target's vocabulary (-inf outside the head's draft vocabulary).
    fn to_target(&self, logits: &[f32]) -> Vec<f32> {
        let d2t = self.run.head().draft_vocab();
        if d2t.is_empty() {
            return logits[..self.n_vocab].to_vec();
        }
        let mut out = vec![f32::NEG_INFINITY; self.n_vocab];
        for (&t, &l) in d2t.iter().zip(logits) {
            out[t as usize] = l;
        }
        out
    }

    /// Decodes committed entries cached()..end of `history`; returns the last one's logits
    /// (target vocabulary) and hidden output when `want_last`.
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
        if self.features_len() < end {
            return Err(Error::InvalidParam {
                name: "head",
                reason: format!("target features cover {} positions, {end} needed", self.features_len()),
            });
        }
        let (h, nv) = (self.hidden, self.run.n_vocab_out());
        let mut last = None;
        let mut p = start;
        while p < end {
            // Each entry scores every cached key: keep entries × keys (the attention scores'
            // size) bounded on long contexts.
            let chunk = (KEYS_PER_CALL / (p + CHUNK)).clamp(1, CHUNK);
            let q = (p + chunk).min(end);
            let t = Instant::now();
            let b = q - p;
            let entries: Vec<EntryIn<'_>> = (p..q)
                .map(|pos| EntryIn {
                    token: history[pos + 1],
                    pos: pos as i32,
                    hidden: &self.feats[pos * h..(pos + 1) * h],
                })
                .collect();
            // Every cached entry is visible; the new ones causally.
            let mut mask = vec![0.0f32; b * (p + b)];
            for r in 0..b {
                for j in r + 1..b {
                    mask[r * (p + b) + p + j] = f32::NEG_INFINITY;
                }
            }
            let out = self.run.run(&entries, &self.k, &self.v, &mask)?;
            drop(entries);
            self.k.extend_from_slice(&out.k);
            self.v.extend_from_slice(&out.v);
            if b <= 4 {
                self.timings.push((b, ms_since(t)));
            }
            if want_last && q == end {
                let logits = self.to_target(&out.logits[(b - 1) * nv..b * nv]);
                last = Some((logits, out.hidden[(b - 1) * h..b * h].to_vec()));
            }
            p = q;
        }
        Ok(last)
    }
}

impl FeatureHead for FspadDraft {
    fn features_len(&self) -> usize {
        self.feats.len() / self.hidden
    }

    fn cost_key(&self) -> String {
        format!("fspad|{}", self.run.head().path().display())
    }

    /// Times head calls of each batch size over 64 cached entries (zero features); leaves the
    /// cache as it was.
    fn measure_costs(&mut self, sizes: &[usize]) -> Result<BatchCost> {
        let s = 64usize;
        let kc = vec![0.0f32; s * self.kv_dim];
        let zeros = vec![0.0f32; self.hidden];
        let mut cost = BatchCost::default();
        for &b in sizes {
            let entries: Vec<EntryIn<'_>> =
                (0..b).map(|j| EntryIn { token: 0, pos: (s + j) as i32, hidden: &zeros }).collect();
            let mut mask = vec![0.0f32; b * (s + b)];
            for r in 0..b {
                for j in 0..b {
                    if j != r {
                        mask[r * (s + b) + s + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                self.run.run(&entries, &kc, &kc, &mask)?;
                best = best.min(ms_since(t));
            }
            cost.observe(b, best);
        }
        Ok(cost)
    }

    fn as_model(&mut self) -> &mut dyn ModelProposer {
        self
    }

    fn as_proposer(&mut self) -> &mut dyn Proposer {
        self
    }
}

impl ModelProposer for FspadDraft {
    fn lag(&self, history: &[Token]) -> usize {
        history.len().saturating_sub(1).saturating_sub(self.cached())
    }

    fn take_timings(&mut self) -> Vec<(usize, f64)> {
        std::mem::take(&mut self.timings)
    }
}

impl NodeDecoder for FspadDraft {
    fn decode_nodes(&mut self, tree: &mut DraftTree, nodes: &[usize], base: usize) -> Result<Vec<Vec<f32>>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        let (kvd, nv) = (self.kv_dim, self.run.n_vocab_out());
        let s_c = self.cached();
        let s_n = self.node_k.len() / kvd;
        let s = s_c + s_n;
        let b = nodes.len();
        let mut mask = vec![f32::NEG_INFINITY; b * (s + b)];
        let mut parents_hidden: Vec<Vec<f32>> = Vec::with_capacity(b);
        for (r, &i) in nodes.iter().enumerate() {
            let parent = tree.nodes[i].parent;
            let Some(ph) = self.node_hidden.get(parent).and_then(Option::as_ref) else {
                return Err(Error::InvalidParam { name: "tree", reason: "parent not decoded by the head".into() });
            };
            parents_hidden.push(ph.clone());
            let row = &mut mask[r * (s + b)..(r + 1) * (s + b)];
            row[..s_c].fill(0.0);
            // Ancestors below the root (the root's entry is committed).
            let mut a = parent;
            while a != 0 {
                let Some(slot) = self.node_row.get(a).copied().flatten() else {
                    return Err(Error::InvalidParam { name: "tree", reason: "ancestor not decoded".into() });
                };
                row[s_c + slot] = 0.0;
                a = tree.nodes[a].parent;
            }
            row[s + r] = 0.0;
        }
        let entries: Vec<EntryIn<'_>> = nodes
            .iter()
            .zip(&parents_hidden)
            .map(|(&i, ph)| EntryIn {
                token: tree.nodes[i].token,
                pos: (base - 1 + tree.nodes[i].depth) as i32,
                hidden: ph,
            })
            .collect();
        let (kc, vc) = if s_n == 0 {
            (std::borrow::Cow::Borrowed(&self.k[..]), std::borrow::Cow::Borrowed(&self.v[..]))
        } else {
            (
                std::borrow::Cow::Owned([&self.k[..], &self.node_k[..]].concat()),
                std::borrow::Cow::Owned([&self.v[..], &self.node_v[..]].concat()),
            )
        };
        let out = self.run.run(&entries, &kc, &vc, &mask)?;
        drop(entries);
        self.node_k.extend_from_slice(&out.k);
        self.node_v.extend_from_slice(&out.v);
        let h = self.hidden;
        let mut logits = Vec::with_capacity(b);
        for (r, &i) in nodes.iter().enumerate() {
            logits.push(self.to_target(&out.logits[r * nv..(r + 1) * nv]));
            if self.node_hidden.len() <= i {
                self.node_hidden.resize(i + 1, None);
                self.node_row.resize(i + 1, None);
            }
            self.node_hidden[i] = Some(out.hidden[r * h..(r + 1) * h].to_vec());
            self.node_row[i] = Some(s_n + r);
            tree.nodes[i].draft_seq = i as i32;
        }
        self.timings.push((b, ms_since(t)));
        Ok(logits)
    }

    fn node_capacity(&self) -> usize {
        MAX_NODES.min(self.n_ctx.saturating_sub(self.cached()))
    }
}

impl Proposer for FspadDraft {
    fn name(&self) -> &'static str {
        "fspad-head"
    }

    fn reset(&mut self) {
        self.feats.clear();
        self.k.clear();
        self.v.clear();
        self.clear_round();
    }

    fn rollback(&mut self, len: usize) {
        // Entry P reads h[P+1] and the feature of h[P]: valid while P + 1 < len.
        self.keep_entries(len.saturating_sub(1));
        self.feats.truncate(len * self.hidden);
        self.clear_round();
    }

    fn prefill(&mut self, history: &[Token]) -> Result<()> {
        // The target has just read history[start..n-1] as outputs; their rows are in the tap.
        let n = history.len();
        let rows = self.tap.n_rows();
        let start = (n - 1).saturating_sub(rows);
        if start > self.features_len() {
            return Err(Error::InvalidParam {
                name: "head",
                reason: format!(
                    "target features missing for positions {}..{start} (the session keeps them in step)",
                    self.features_len()
                ),
            });
        }
        self.feats.truncate(start * self.hidden);
        self.keep_entries(start.saturating_sub(1));
        let idx: Vec<usize> = (0..rows).collect();
        self.tap.gather(&idx, &mut self.feats)?;
        // Read the prompt now (billed as prompt processing), all but the root's entry.
        self.decode_committed(history, n.saturating_sub(2), false)?;
        Ok(())
    }

    fn propose(&mut self, req: Request<'_>, tree: &mut DraftTree) -> Result<()> {
        let n = req.history.len();
        if req.max_nodes == 0 || n < 2 || self.features_len() < n - 1 {
            return Ok(());
        }
        let max_nodes = req.max_nodes.min(self.n_ctx.saturating_sub(n));
        if max_nodes == 0 {
            return Ok(());
        }
        // The root's entry may be cached from an earlier attempt at this history.
        self.keep_entries(n - 2);
        self.clear_round();
        let Request { history, shape, sampling, rng, alternatives, .. } = req;
        let Some((logits, root_hidden)) = self.decode_committed(history, n - 1, true)? else {
            return Ok(());
        };
        self.node_hidden.push(Some(root_hidden));
        self.node_row.push(None);
        let base = n - 1;
        shapes::build(self, tree, logits, base, shape, max_nodes, sampling, rng, alternatives)
    }

    fn accept(&mut self, _tree: &DraftTree, accepted: &[usize], n_commit: usize, n_before: usize) {
        // Tree entries read the head's own outputs: only committed entries (up to the root's,
        // at n_before - 2) stay.
        self.keep_entries(n_before.saturating_sub(1));
        self.clear_round();
        if self.features_len() != n_before - 1 {
            return; // features already out of step (an earlier failure): the session resyncs
        }
        let rows: Vec<usize> = std::iter::once(0).chain(accepted.iter().copied()).take(n_commit).collect();
        if let Err(e) = self.tap.gather(&rows, &mut self.feats) {
            tracing::warn!("fspad head: {e}; drafting resumes at the next prompt");
            self.feats.truncate((n_before - 1) * self.hidden);
        }
    }
}
