//! The target side of a round: prompt processing, one batched pass over root + draft tree,
//! the lossless verdict (greedy walk or the sampling rule of [`crate::verify`]) and the KV
//! bookkeeping that keeps only the accepted path.
//!
//! KV invariant between rounds: seq 0 of the target's cache holds `history[..past]` with
//! `past = seq_pos_max(0) + 1 <= history.len() - 1` and no other sequence holds cells. Every
//! way out of a round, errors included, must restore it ([`Verifier::rollback`]).

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;

use crate::backend::{decode_span, ms_since, Batch, Context, ContextExtras, ContextParams, Model, Token};
use crate::error::{Error, Result};
use crate::features::FeatureTap;
use crate::sampling::{argmax, warp, SamplingParams};
use crate::tree::DraftTree;
use crate::verify::{verify_greedy, verify_sampled, Verdict};

/// A verified round, before commit.
pub struct Verified {
    pub verdict: Verdict,
    /// Sequence-id set of every node (a single `[0]` per node for chains).
    sets: Vec<Vec<i32>>,
    pub verify_ms: f64,
    pub sample_ms: f64,
}

/// The target model's context.
pub struct Verifier {
    ctx: Context,
    batch: Batch,
}

impl Verifier {
    /// A unified-KV context with `n_seq` sequence ids (tree leaves); `reference_kernels` for
    /// batch-invariant logits (exact mode); `tap` collects target features for a head (the rows
    /// of the last prefill or verification pass).
    pub fn new(
        model: Arc<Model>,
        n_ctx: u32,
        n_batch: u32,
        n_seq: u32,
        n_threads: i32,
        reference_kernels: bool,
        tap: Option<Arc<FeatureTap>>,
    ) -> Result<Self> {
        let cp = ContextParams { n_ctx, n_batch, n_seq_max: n_seq, n_threads, reference_kernels, ..Default::default() };
        let ctx = Context::with_extras(model, &cp, ContextExtras { tap, ..Default::default() })?;
        let batch = Batch::new(ctx.n_batch(), n_seq as usize);
        Ok(Verifier { ctx, batch })
    }

    pub fn model(&self) -> &Arc<Model> {
        self.ctx.model()
    }

    pub fn n_ctx(&self) -> usize {
        self.ctx.n_ctx()
    }

    /// Sequence ids available to one tree (its leaves).
    pub fn n_seq_max(&self) -> usize {
        self.ctx.n_seq_max()
    }

    /// The context and batch, for start-up measurements (which leave the cache empty).
    pub(crate) fn context_mut(&mut self) -> (&mut Context, &mut Batch) {
        (&mut self.ctx, &mut self.batch)
    }

    /// Tokens of the history in the cache.
    pub fn cached(&self) -> usize {
        self.ctx.prefix_len()
    }

    fn clear_tap(&self) {
        if let Some(t) = self.ctx.tap() {
            t.clear();
        }
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.ctx.clear();
    }

    /// The history was cut to `len` tokens (or a round failed): keep seq 0's first `len`
    /// cells at most, drop every other sequence.
    pub fn rollback(&mut self, len: usize) {
        self.ctx.keep_prefix(len);
    }

    /// Brings the cache to `history[..n-1]` (the root is verified with the next tree).
    pub fn prefill(&mut self, history: &[Token]) -> Result<()> {
        let n = history.len();
        self.rollback(n.saturating_sub(1));
        let past = self.ctx.prefix_len();
        self.clear_tap();
        if past + 1 < n {
            if self.ctx.tap().is_some_and(|t| t.needs_output_rows()) {
                // A final-norm tap sees output rows only: every prompt token is an output, in
                // chunks small enough that llama.cpp's logits buffer stays modest.
                self.prefill_outputs(&history[past..n - 1], past)?;
            } else {
                decode_span(&mut self.ctx, &mut self.batch, &history[past..n - 1], past, false)?;
            }
        }
        Ok(())
    }

    fn prefill_outputs(&mut self, tokens: &[Token], start: usize) -> Result<()> {
        const CHUNK: usize = 64;
        if start + tokens.len() > self.ctx.n_ctx() {
            return Err(Error::ContextFull { needed: start + tokens.len(), n_ctx: self.ctx.n_ctx() });
        }
        for (c, part) in tokens.chunks(CHUNK.min(self.ctx.n_batch())).enumerate() {
            self.batch.clear();
            for (j, &t) in part.iter().enumerate() {
                self.batch.add(t, (start + c * CHUNK.min(self.ctx.n_batch()) + j) as i32, &[0], true)?;
            }
            self.ctx.decode(&self.batch)?;
        }
        Ok(())
    }

    /// One target pass over the tree (root = last history token) and the verdict.
    pub fn verify(
        &mut self,
        tree: &DraftTree,
        n_history: usize,
        sp: &SamplingParams,
        rng: &mut StdRng,
    ) -> Result<Verified> {
        let base = n_history - 1;
        let sets: Vec<Vec<i32>> = if tree.is_chain() { vec![vec![0]; tree.len()] } else { tree.seq_sets() };
        if sets[0].len() > self.ctx.n_seq_max() {
            return Err(Error::InvalidParam {
                name: "tree",
                reason: format!("{} leaves exceed the target's {} sequence ids", sets[0].len(), self.ctx.n_seq_max()),
            });
        }
        for s in 1..sets[0].len() {
            self.ctx.seq_cp(0, s as i32, -1, -1);
        }
        let t = Instant::now();
        self.clear_tap();
        self.batch.clear();
        for (i, n) in tree.nodes.iter().enumerate() {
            self.batch.add(n.token, (base + n.depth) as i32, &sets[i], true)?;
        }
        self.ctx.decode(&self.batch)?;
        let verify_ms = ms_since(t);

        let t = Instant::now();
        let verdict = if sp.is_greedy() {
            let mut am = Vec::with_capacity(tree.len());
            for i in 0..tree.len() {
                am.push(argmax(self.ctx.logits(i)?) as Token);
            }
            verify_greedy(tree, &am)
        } else {
            let ctx = &self.ctx;
            verify_sampled(tree, |i| ctx.logits(i).map(|l| warp(l, sp)).unwrap_or_default(), rng)
        };
        Ok(Verified { verdict, sets, verify_ms, sample_ms: ms_since(t) })
    }

    /// Keeps the accepted path in seq 0, then the first `n_commit - 1` committed tokens after
    /// the old history (`n_history` tokens): the new root stays out of the cache.
    pub fn commit(&mut self, tree: &DraftTree, v: &Verified, n_history: usize, n_commit: usize) {
        let last = v.verdict.last_node();
        let s = v.sets[last][0];
        if v.sets[0].len() > 1 {
            self.ctx.seq_keep(s);
            if s != 0 {
                self.ctx.seq_cp(s, 0, -1, -1);
                self.ctx.seq_rm(s, -1, -1);
            }
        }
        let past = (n_history - 1 + tree.nodes[last].depth + 1).min(n_history + n_commit - 1);
        self.ctx.seq_rm(0, past as i32, -1);
    }
}
