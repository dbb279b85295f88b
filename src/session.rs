//! A speculative generation session: the target and draft contexts, the committed history and
//! both KV caches, the round loop (draft → verify → commit → roll back), streaming, stop
//! conditions and statistics.
//!
//! Invariants between rounds (n = history.len()):
//! - the target's KV holds history[..n-1] in seq 0; history[n-1] (the *root*) is verified next
//!   round together with the draft tree;
//! - the draft's KV holds history[..draft_past] in seq 0, draft_past <= n-1.
//!
//! This module must never return a result that differs from what the target alone would
//! produce (up to `fast` mode's documented rounding).

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::backend::{Batch, ChatMessage, Context, ContextParams, Model, Token};
use crate::cost::{self, BatchCost, CostModel};
use crate::error::{Error, Result};
use crate::sampling::{argmax, log_sum_exp, sample_from, top_k_indices, warp, SamplingParams};
use crate::strategy::{NumericMode, Strategy};
use crate::tree::{DraftTree, Proposal, StaticShape};
use crate::verify::{verify_greedy, verify_sampled, Verdict};

/// Session settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionParams {
    /// KV-cache size in tokens (prompt + generated + one draft tree).
    pub n_ctx: u32,
    /// CPU threads for both models (0 = all cores).
    pub n_threads: i32,
    /// How the draft proposes tokens.
    pub strategy: Strategy,
    /// Numeric mode of the verification passes.
    pub mode: NumericMode,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self { n_ctx: 4096, n_threads: 0, strategy: Strategy::Auto, mode: NumericMode::Fast }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Greedy or sampling settings.
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks with fixed lengths).
    pub ignore_eog: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_tokens: 128, sampling: SamplingParams::default(), stop: Vec::new(), ignore_eog: false }
    }
}

/// What to append to the session before generating.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text (special tokens in it are parsed).
    Text(String),
    /// Token ids.
    Tokens(Vec<Token>),
    /// New chat messages, formatted with the model's chat template together with the earlier
    /// turns of this session; the assistant's reply is appended to the conversation.
    Chat(Vec<ChatMessage>),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    Eog,
    StopString,
    Callback,
}

/// Counters and timings of one generation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Tokens generated.
    pub tokens: usize,
    /// Prompt tokens processed (not cached from earlier turns).
    pub prompt_tokens: usize,
    /// Draft-verify rounds (= target verification passes).
    pub rounds: usize,
    /// Draft tokens sent to the target for verification.
    pub draft_proposed: usize,
    /// Draft tokens the target accepted.
    pub draft_accepted: usize,
    /// draft_accepted / draft_proposed.
    pub acceptance_rate: f64,
    /// Generated tokens per target verification pass.
    pub tokens_per_pass: f64,
    /// Largest verification batch used.
    pub max_batch: usize,
    pub prefill_ms: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub sample_ms: f64,
    pub total_ms: f64,
    /// Generated tokens per second, prompt processing excluded.
    pub tokens_per_second: f64,
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<Token>,
    pub text: String,
    pub stop_reason: StopReason,
    pub stats: Stats,
}

/// Target + optional draft with their KV caches and the conversation so far.
pub struct Session {
    target: Context,
    draft: Option<Context>,
    params: SessionParams,
    history: Vec<Token>,
    /// Tokens of `history` in the target's KV (seq 0).
    target_past: usize,
    /// Tokens of `history` in the draft's KV (seq 0).
    draft_past: usize,
    messages: Vec<ChatMessage>,
    cost: CostModel,
    /// Largest verification batch (root + draft tokens).
    max_verify: usize,
    /// Running mean acceptance of the draft's first child, for the auto skip decision.
    mean_accept: f64,
    rounds_total: usize,
    /// Realized tokens per ms of `auto`'s drafting rounds and of plain rounds (EMAs): the
    /// guard that keeps `auto` from trusting a cost model measured in a noisy moment.
    spec_rate: Option<f64>,
    plain_rate: Option<f64>,
    /// Whether this round ran the draft model.
    round_used_draft: bool,
    batch: Batch,
}

/// Largest number of draft tokens per round, whatever the strategy.
const MAX_DRAFT: usize = 254;
/// Longest chain `auto` will draft.
const AUTO_MAX_DEPTH: usize = 12;
/// Largest batch size the exact-mode self-check tries.
const EXACT_PROBE_MAX: usize = 8;

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Session {
    /// Creates a session. With a draft, checks vocabulary compatibility; in `exact` mode the
    /// target must be loaded with `repack = false` and the verification batch is capped at the
    /// largest size the self-check finds bit-identical to one-token decoding.
    pub fn new(target: Arc<Model>, draft: Option<Arc<Model>>, params: SessionParams) -> Result<Session> {
        if params.n_ctx < 16 {
            return Err(Error::InvalidParam { name: "n_ctx", reason: format!("{} is below 16", params.n_ctx) });
        }
        if params.n_threads < 0 {
            return Err(Error::InvalidParam { name: "n_threads", reason: "must be >= 0".into() });
        }
        if params.mode == NumericMode::Exact && target.params().repack {
            return Err(Error::InvalidParam {
                name: "mode",
                reason: "exact mode needs the target loaded with repack = false (weight repacking makes \
                         batched logits differ from one-token logits)"
                    .into(),
            });
        }
        if let Some(d) = &draft {
            crate::backend::check_vocab_compat(&target, d)?;
        }
        let draft = if params.strategy == Strategy::None { None } else { draft };
        // Sequence ids: the target needs one per tree leaf, the draft one per decoded node.
        // llama.cpp allocates n_vocab logits per possible sequence, so size them tightly.
        let (t_seq, d_seq) = seq_budget(&params.strategy);
        if t_seq.max(d_seq) > params.n_ctx as usize {
            return Err(Error::InvalidParam {
                name: "n_ctx",
                reason: format!(
                    "{} is too small for strategy {} (needs {})",
                    params.n_ctx,
                    params.strategy,
                    t_seq.max(d_seq)
                ),
            });
        }
        let n_batch = (512u32.min(params.n_ctx)).max(t_seq.max(d_seq) as u32);
        let target_ctx = Context::new(
            target.clone(),
            &ContextParams {
                n_ctx: params.n_ctx,
                n_batch,
                n_seq_max: t_seq as u32,
                n_threads: params.n_threads,
                flash_attn: false,
            },
        )?;
        let draft_ctx = match &draft {
            Some(d) => Some(Context::new(
                d.clone(),
                &ContextParams {
                    n_ctx: params.n_ctx,
                    n_batch,
                    n_seq_max: d_seq as u32,
                    n_threads: params.n_threads,
                    flash_attn: false,
                },
            )?),
            None => None,
        };
        let mut s = Session {
            target: target_ctx,
            draft: draft_ctx,
            params,
            history: Vec::new(),
            target_past: 0,
            draft_past: 0,
            messages: Vec::new(),
            cost: CostModel::default(),
            max_verify: MAX_DRAFT + 1,
            mean_accept: 0.7,
            rounds_total: 0,
            spec_rate: None,
            plain_rate: None,
            round_used_draft: false,
            batch: Batch::new(n_batch as usize, t_seq.max(d_seq)),
        };
        if s.params.mode == NumericMode::Exact && s.draft.is_some() {
            s.max_verify = s.measure_exact_cap()?;
            tracing::info!("exact mode: verification batches capped at {}", s.max_verify);
        }
        if s.params.strategy == Strategy::Auto && s.draft.is_some() {
            s.measure_costs()?;
        }
        Ok(s)
    }

    /// The committed tokens (prompt and generated) of this session.
    pub fn history(&self) -> &[Token] {
        &self.history
    }

    /// The session settings.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The cost model `auto` uses (for reports).
    pub fn cost_model(&self) -> &CostModel {
        &self.cost
    }

    /// Largest verification batch (root + draft tokens) this session will use.
    pub fn max_verify_batch(&self) -> usize {
        self.max_verify
    }

    /// The target model.
    pub fn target_model(&self) -> &Arc<Model> {
        self.target.model()
    }

    /// Forgets the conversation and empties both KV caches.
    pub fn reset(&mut self) {
        self.history.clear();
        self.messages.clear();
        self.target.clear();
        if let Some(d) = &mut self.draft {
            d.clear();
        }
        self.target_past = 0;
        self.draft_past = 0;
    }

    // ---------------------------------------------------------------- start-up measurements

    fn probe_tokens(&self, n: usize) -> Vec<Token> {
        let model = self.target.model();
        let text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nThe quick brown fox jumps over the lazy dog while 17 + 25 = 42.";
        let mut t = model.tokenize(text, false, false).unwrap_or_default();
        if t.is_empty() {
            t.push(0);
        }
        let base = t.clone();
        while t.len() < n {
            t.extend_from_slice(&base);
        }
        t.truncate(n);
        t
    }

    /// Measures target (and draft) decode time per batch size for `auto`, once per process
    /// per model and setting.
    fn measure_costs(&mut self) -> Result<()> {
        let threads = self.params.n_threads;
        let key = |m: &Model| format!("{}|{}|{}|{}", m.path().display(), threads, m.params().repack, self.params.mode);
        let tkey = key(self.target.model());
        let target_sizes: Vec<usize> =
            [1, 2, 3, 4, 5, 6, 7, 8, 12, 16].into_iter().filter(|&b| b <= self.max_verify).collect();
        self.cost.target = match cost::cached(&tkey) {
            Some(c) => c,
            None => {
                let probe = self.probe_tokens(32);
                let c = measure_batch_costs(&mut self.target, &probe, &target_sizes, &mut self.batch)?;
                cost::store(&tkey, &c);
                c
            }
        };
        if let Some(d) = self.draft.as_mut() {
            let dkey = key(d.model());
            self.cost.draft = match cost::cached(&dkey) {
                Some(c) => c,
                None => {
                    let probe = {
                        let model = d.model().clone();
                        let mut t =
                            model.tokenize("def main():\n    print('hello world')\n", false, false).unwrap_or_default();
                        while t.len() < 24 {
                            t.push(t.first().copied().unwrap_or(0));
                        }
                        t
                    };
                    let c = measure_batch_costs(d, &probe, &[1, 2, 4], &mut self.batch)?;
                    cost::store(&dkey, &c);
                    c
                }
            };
        }
        tracing::debug!("cost model: target {:?} draft {:?}", self.cost.target.points(), self.cost.draft.points());
        Ok(())
    }

    /// Largest verification batch whose logits are bit-identical to one-token decoding of the
    /// same tokens (SPEC §7). Never less than 1.
    fn measure_exact_cap(&mut self) -> Result<usize> {
        let prefix = 8;
        let probe = self.probe_tokens(prefix + EXACT_PROBE_MAX);
        let ctx = &mut self.target;
        let batch = &mut self.batch;
        ctx.clear();
        decode_span(ctx, batch, &probe[..prefix], 0, false)?;
        let mut reference: Vec<Vec<f32>> = Vec::new();
        for (j, &t) in probe[prefix..].iter().enumerate() {
            batch.clear();
            batch.add(t, (prefix + j) as i32, &[0], true)?;
            ctx.decode(batch)?;
            reference.push(ctx.logits(0)?.to_vec());
        }
        let mut cap = 1;
        for b in 2..=EXACT_PROBE_MAX {
            ctx.seq_rm(0, prefix as i32, -1);
            batch.clear();
            for j in 0..b {
                batch.add(probe[prefix + j], (prefix + j) as i32, &[0], true)?;
            }
            ctx.decode(batch)?;
            let mut same = true;
            for (j, r) in reference.iter().enumerate().take(b) {
                let l = ctx.logits(j)?;
                if l.iter().zip(r.iter()).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    same = false;
                    break;
                }
            }
            if !same {
                break;
            }
            cap = b;
        }
        ctx.clear();
        Ok(cap)
    }

    // ---------------------------------------------------------------- prompt handling

    /// Turns the prompt into tokens to append, rolling back cached tokens that a re-rendered
    /// chat no longer shares.
    fn prepare_prompt(&mut self, prompt: &Prompt) -> Result<Vec<Token>> {
        let model = self.target.model().clone();
        match prompt {
            Prompt::Tokens(t) => {
                let n = model.n_vocab() as Token;
                if let Some(bad) = t.iter().find(|&&x| x < 0 || x >= n) {
                    return Err(Error::InvalidParam {
                        name: "tokens",
                        reason: format!("token id {bad} outside the vocabulary (0..{n})"),
                    });
                }
                Ok(t.clone())
            }
            Prompt::Text(s) => model.tokenize(s, self.history.is_empty(), true),
            Prompt::Chat(msgs) => {
                if msgs.is_empty() {
                    return Err(Error::InvalidParam { name: "messages", reason: "no messages".into() });
                }
                let mut all = self.messages.clone();
                all.extend(msgs.iter().cloned());
                let text = model.apply_chat_template(&all, true)?;
                let full = model.tokenize(&text, true, true)?;
                let common = self.history.iter().zip(full.iter()).take_while(|(a, b)| a == b).count();
                if common < self.history.len() {
                    self.truncate_history(common);
                }
                self.messages = all;
                Ok(full[common..].to_vec())
            }
        }
    }

    /// Drops history from `len` on, in both KV caches.
    fn truncate_history(&mut self, len: usize) {
        self.history.truncate(len);
        let keep = len.saturating_sub(1);
        if self.target_past > keep {
            self.target.seq_rm(0, keep as i32, -1);
            self.target_past = keep;
        }
        if self.draft_past > keep {
            if let Some(d) = &mut self.draft {
                d.seq_rm(0, keep as i32, -1);
            }
            self.draft_past = keep;
        }
    }

    // ---------------------------------------------------------------- generation

    /// Appends `prompt` to the session and generates. `on_commit(tokens, text)` is called for
    /// each committed batch of tokens with the new text (held back while it could still turn
    /// into a stop string); returning false stops generation.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerateParams,
        on_commit: &mut dyn FnMut(&[Token], &str) -> bool,
    ) -> Result<Generation> {
        params.sampling.validate()?;
        let t_start = Instant::now();
        let new_tokens = self.prepare_prompt(prompt)?;
        if self.history.is_empty() && new_tokens.is_empty() {
            return Err(Error::InvalidParam { name: "prompt", reason: "empty prompt".into() });
        }
        let needed = self.history.len() + new_tokens.len() + 2;
        if needed > self.target.n_ctx() {
            return Err(Error::ContextFull { needed, n_ctx: self.target.n_ctx() });
        }
        let mut stats = Stats { prompt_tokens: new_tokens.len(), ..Default::default() };
        self.history.extend_from_slice(&new_tokens);

        // Prefill the target with everything but the root.
        let t0 = Instant::now();
        let n = self.history.len();
        if self.target_past < n - 1 {
            let span = self.history[self.target_past..n - 1].to_vec();
            decode_span(&mut self.target, &mut self.batch, &span, self.target_past, false)?;
            self.target_past = n - 1;
        }
        // The draft reads the prompt now too (unless `auto` already knows it will not draft),
        // so its prefill is billed as prompt processing, not to the first round.
        let drafts = match self.params.strategy {
            Strategy::None => false,
            Strategy::Auto => self.auto_should_draft(),
            _ => true,
        };
        if drafts && self.draft_past < n - 1 {
            if let Some(d) = self.draft.as_mut() {
                let span = self.history[self.draft_past..n - 1].to_vec();
                decode_span(d, &mut self.batch, &span, self.draft_past, false)?;
                self.draft_past = n - 1;
            }
        }
        stats.prefill_ms = ms_since(t0);

        let mut rng = StdRng::seed_from_u64(params.sampling.seed);
        let mut out_tokens: Vec<Token> = Vec::new();
        let mut text = TextStream::new(params.stop.clone());
        let mut stop_reason = StopReason::MaxTokens;
        let t_gen = Instant::now();

        while out_tokens.len() < params.max_tokens {
            let remaining_ctx = self.target.n_ctx().saturating_sub(self.history.len() + 1);
            if remaining_ctx == 0 {
                return Err(Error::ContextFull { needed: self.history.len() + 2, n_ctx: self.target.n_ctx() });
            }
            let budget = (params.max_tokens - out_tokens.len()).min(remaining_ctx);
            // Draft.
            let t_draft = Instant::now();
            self.round_used_draft = false;
            let tree = self.build_tree(&params.sampling, &mut rng, budget)?;
            stats.draft_ms += ms_since(t_draft);
            // Verify.
            let (verdict, verify_ms, sample_ms) = self.verify(&tree, &params.sampling, &mut rng)?;
            stats.verify_ms += verify_ms;
            stats.sample_ms += sample_ms;
            stats.rounds += 1;
            stats.max_batch = stats.max_batch.max(tree.len());
            stats.draft_proposed += tree.n_draft();
            stats.draft_accepted += verdict.accepted.len();
            self.learn(&tree, &verdict);
            let round_ms = ms_since(t_draft);
            let rate = (verdict.accepted.len() + 1) as f64 / round_ms.max(1e-3);
            // A round that ran the draft counts as a drafting round even if it ended up
            // verifying the root alone: its draft time was spent.
            let slot = if self.round_used_draft { &mut self.spec_rate } else { &mut self.plain_rate };
            *slot = Some(slot.map_or(rate, |r| 0.8 * r + 0.2 * rate));

            // Commit accepted tokens + bonus, cut at the budget and at end-of-generation.
            let model = self.target.model().clone();
            let mut commit: Vec<Token> = verdict.accepted.iter().map(|&i| tree.nodes[i].token).collect();
            commit.push(verdict.bonus);
            commit.truncate(budget);
            let mut hit_eog = false;
            if let Some(k) = commit.iter().position(|&t| model.is_eog(t) && !params.ignore_eog) {
                commit.truncate(k + 1);
                hit_eog = true;
            }
            self.commit_kv(&tree, &verdict, commit.len())?;
            self.history.extend_from_slice(&commit);
            out_tokens.extend_from_slice(&commit);

            let visible: Vec<u8> =
                commit.iter().filter(|&&t| !model.is_eog(t)).flat_map(|&t| model.token_to_piece(t)).collect();
            let (piece, hit_stop) = text.push(&visible);
            let keep_going = on_commit(&commit, &piece);
            if hit_stop {
                stop_reason = StopReason::StopString;
                break;
            }
            if hit_eog {
                stop_reason = StopReason::Eog;
                break;
            }
            if !keep_going {
                stop_reason = StopReason::Callback;
                break;
            }
        }
        let tail = text.finish();
        if !tail.is_empty() && stop_reason != StopReason::Callback {
            on_commit(&[], &tail);
        }
        if let Prompt::Chat(_) = prompt {
            self.messages.push(ChatMessage::new("assistant", text.text()));
        }
        stats.tokens = out_tokens.len();
        stats.total_ms = ms_since(t_start);
        let gen_ms = ms_since(t_gen);
        stats.tokens_per_second = if gen_ms > 0.0 { stats.tokens as f64 * 1e3 / gen_ms } else { 0.0 };
        stats.acceptance_rate =
            if stats.draft_proposed > 0 { stats.draft_accepted as f64 / stats.draft_proposed as f64 } else { 0.0 };
        stats.tokens_per_pass = if stats.rounds > 0 { stats.tokens as f64 / stats.rounds as f64 } else { 0.0 };
        Ok(Generation { tokens: out_tokens, text: text.text(), stop_reason, stats })
    }

    // ---------------------------------------------------------------- drafting

    /// Builds this round's tree (root only when not speculating).
    fn build_tree(&mut self, sp: &SamplingParams, rng: &mut StdRng, budget: usize) -> Result<DraftTree> {
        let root = *self.history.last().unwrap_or(&0);
        let mut tree = DraftTree::new(root);
        if self.draft.is_none() || budget <= 1 {
            return Ok(tree);
        }
        let max_nodes = (self.max_verify - 1).min(MAX_DRAFT).min(budget.saturating_sub(1).max(1) + 8);
        if max_nodes == 0 {
            return Ok(tree);
        }
        let exact = self.params.mode == NumericMode::Exact;
        let strategy = match (&self.params.strategy, exact) {
            // Exact mode verifies chains only: the self-check measured chain-shaped batches.
            (Strategy::Tree { depth, .. }, true) => Strategy::Chain(*depth),
            (Strategy::Static(s), true) => Strategy::Chain(s.depth()),
            (s, _) => s.clone(),
        };
        match strategy {
            Strategy::None => {}
            Strategy::Chain(g) => {
                let logits = self.draft_catch_up()?;
                self.draft_chain(&mut tree, logits, g.min(max_nodes), sp, rng)?;
            }
            Strategy::Tree { top_k, depth, nodes } => {
                let logits = self.draft_catch_up()?;
                self.draft_dynamic(&mut tree, logits, top_k, depth, nodes.min(max_nodes))?;
            }
            Strategy::Static(shape) => {
                let logits = self.draft_catch_up()?;
                self.draft_static(&mut tree, logits, &shape, max_nodes)?;
            }
            Strategy::Auto => {
                if !self.auto_should_draft() {
                    return Ok(tree);
                }
                tracing::debug!(
                    "auto round {}: drafting (mean acceptance {:.2}, spec {:?} vs plain {:?} tok/ms)",
                    self.rounds_total,
                    self.mean_accept,
                    self.spec_rate,
                    self.plain_rate
                );
                let logits = self.draft_catch_up()?;
                tree = self.draft_auto(tree, logits, max_nodes.min(AUTO_MAX_DEPTH + 8), sp, rng)?;
            }
        }
        Ok(tree)
    }

    /// Feeds the draft the committed tokens it has not seen; returns its logits at the root.
    fn draft_catch_up(&mut self) -> Result<Vec<f32>> {
        let n = self.history.len();
        let Some(d) = self.draft.as_mut() else {
            return Err(Error::InvalidParam { name: "draft", reason: "no draft model".into() });
        };
        self.round_used_draft = true;
        let t = Instant::now();
        let span = self.history[self.draft_past..n].to_vec();
        let logits = decode_span(d, &mut self.batch, &span, self.draft_past, true)?;
        if span.len() <= 4 {
            self.cost.draft.observe(span.len(), ms_since(t));
        }
        self.draft_past = n;
        Ok(logits)
    }

    /// Decodes tree nodes in the draft, each attending to its own path; returns their logits.
    /// Node i uses seq id i (its identity); seq 0 holds the committed prefix.
    fn draft_decode(&mut self, tree: &mut DraftTree, nodes: &[usize]) -> Result<Vec<Vec<f32>>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let base = self.history.len() - 1;
        let Some(d) = self.draft.as_mut() else {
            return Ok(Vec::new());
        };
        let t = Instant::now();
        self.batch.clear();
        for &i in nodes {
            if i >= d.n_seq_max() {
                return Err(Error::InvalidParam {
                    name: "tree",
                    reason: format!("draft node {i} exceeds the draft's {} sequence ids", d.n_seq_max()),
                });
            }
            let parent_seq = tree.nodes[tree.nodes[i].parent].draft_seq;
            if parent_seq < 0 {
                return Err(Error::InvalidParam { name: "tree", reason: "parent not decoded by the draft".into() });
            }
            d.seq_cp(parent_seq, i as i32, -1, -1);
            self.batch.add(tree.nodes[i].token, (base + tree.nodes[i].depth) as i32, &[i as i32], true)?;
        }
        d.decode(&self.batch)?;
        let mut out = Vec::with_capacity(nodes.len());
        for (j, &i) in nodes.iter().enumerate() {
            out.push(d.logits(j)?.to_vec());
            tree.nodes[i].draft_seq = i as i32;
        }
        self.cost.draft.observe(nodes.len(), ms_since(t));
        Ok(out)
    }

    fn draft_chain(
        &mut self,
        tree: &mut DraftTree,
        mut logits: Vec<f32>,
        gamma: usize,
        sp: &SamplingParams,
        rng: &mut StdRng,
    ) -> Result<()> {
        let mut node = 0;
        for d in 1..=gamma {
            let child = self.add_child_from_logits(tree, node, &logits, sp, rng);
            node = child;
            if d < gamma {
                logits = self.draft_decode(tree, &[child])?.pop().unwrap_or_default();
            }
        }
        Ok(())
    }

    /// Adds the draft's choice below `parent`: argmax (greedy) or a sample from the warped
    /// draft distribution (sampling), recording how it was proposed.
    fn add_child_from_logits(
        &self,
        tree: &mut DraftTree,
        parent: usize,
        logits: &[f32],
        sp: &SamplingParams,
        rng: &mut StdRng,
    ) -> usize {
        let lse = log_sum_exp(logits);
        if sp.is_greedy() {
            let t = argmax(logits);
            let logq = logits[t] - lse;
            let a = self.cost.first_choice.estimate(logq.exp());
            tree.add(parent, t as Token, logq, a, Proposal::Deterministic)
        } else {
            let q = warp(logits, sp);
            let t = sample_from(&q, rng);
            let top = q.iter().copied().fold(0.0f32, f32::max);
            let a = self.cost.first_choice.estimate(top);
            tree.add(parent, t as Token, logits[t] - lse, a, Proposal::Sampled(Arc::new(q)))
        }
    }

    /// EAGLE-2: expand the top-k children of each frontier node, keep the global top-k by path
    /// score as the next frontier, for `depth` levels; then keep the best `nodes`.
    fn draft_dynamic(
        &mut self,
        tree: &mut DraftTree,
        root_logits: Vec<f32>,
        k: usize,
        depth: usize,
        nodes: usize,
    ) -> Result<()> {
        let seq_cap = self.draft.as_ref().map_or(1, Context::n_seq_max);
        let mut frontier: Vec<(usize, Vec<f32>)> = vec![(0, root_logits)];
        for level in 1..=depth {
            let mut cands: Vec<usize> = Vec::new();
            for (parent, logits) in &frontier {
                let lse = log_sum_exp(logits);
                for (rank, (t, v)) in top_k_indices(logits, k).into_iter().enumerate() {
                    if tree.len() >= seq_cap {
                        break;
                    }
                    let logq = v - lse;
                    let est = if rank == 0 { &self.cost.first_choice } else { &self.cost.second_choice };
                    let a = est.estimate(logq.exp());
                    let c = tree.add(*parent, t as Token, logq, a, Proposal::Deterministic);
                    tree.nodes[c].rank = rank;
                    cands.push(c);
                }
            }
            if level == depth || cands.is_empty() || tree.len() >= seq_cap {
                break;
            }
            cands.sort_by(|&a, &b| tree.nodes[b].score.total_cmp(&tree.nodes[a].score));
            cands.truncate(k);
            let logits = self.draft_decode(tree, &cands)?;
            frontier = cands.into_iter().zip(logits).collect();
        }
        *tree = tree.top_n(nodes);
        Ok(())
    }

    /// A fixed shape: node for path p is the p.last()-th best child of the node for p[..-1].
    fn draft_static(
        &mut self,
        tree: &mut DraftTree,
        root_logits: Vec<f32>,
        shape: &StaticShape,
        max_nodes: usize,
    ) -> Result<()> {
        let width = shape.max_width();
        // (path, node index, logits) of nodes to expand at the current level
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
                    let logq = v - lse;
                    let est = if rank == 0 { &self.cost.first_choice } else { &self.cost.second_choice };
                    let a = est.estimate(logq.exp());
                    let c = tree.add(*node, t as Token, logq, a, Proposal::Deterministic);
                    tree.nodes[c].rank = rank;
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
            let logits = self.draft_decode(tree, &ids)?;
            level = expand.into_iter().zip(logits).map(|((p, c), l)| (p, c, l)).collect();
        }
        Ok(())
    }

    /// Whether `auto` should draft this round: the best chain under the running mean
    /// acceptance must beat plain decoding. When it does not, every 16th round drafts anyway
    /// to re-measure acceptance, but only if an optimistic acceptance could make drafting pay;
    /// when even that cannot (a draft too slow for this machine), `auto` is plain decoding.
    fn auto_should_draft(&self) -> bool {
        let probe = self.rounds_total % 16 == 0;
        // What actually happened beats what the model predicts: if drafting rounds have
        // been slower than plain ones, stop drafting (re-try on probe rounds); and while
        // drafting, run a plain round now and then to keep the plain rate current.
        if let (Some(spec), Some(plain)) = (self.spec_rate, self.plain_rate) {
            if spec < plain * 0.97 {
                let optimistic = (self.mean_accept as f32 + 0.15).min(0.98);
                return self.rounds_total % 64 == 0 && self.chain_beats_plain(optimistic);
            }
        }
        if self.rounds_total % 16 == 8 || self.plain_rate.is_none() && self.rounds_total > 0 {
            return false;
        }
        let a = self.mean_accept as f32;
        if self.chain_beats_plain(a) {
            return true;
        }
        let optimistic = (a + 0.15).min(0.98);
        probe && self.chain_beats_plain(optimistic)
    }

    /// Whether some chain length beats plain decoding at i.i.d. acceptance `a`.
    fn chain_beats_plain(&self, a: f32) -> bool {
        let plain = 1.0 / self.cost.target.estimate(1);
        let d1 = self.cost.draft.estimate(1);
        let mut reach = 1.0f32;
        let mut sum = 0.0f32;
        for g in 1..=AUTO_MAX_DEPTH.min(self.max_verify - 1) {
            reach *= a;
            sum += reach;
            if self.cost.rate(sum, d1 * g as f64, g + 1) > plain {
                return true;
            }
        }
        false
    }

    /// `auto`: draft a chain token by token, stopping when one more token is not expected to
    /// raise tokens per second (calibrated acceptance × measured costs); then (greedy only) add
    /// the draft's second choices as extra leaves where a larger verification batch pays.
    fn draft_auto(
        &mut self,
        mut tree: DraftTree,
        mut logits: Vec<f32>,
        max_nodes: usize,
        sp: &SamplingParams,
        rng: &mut StdRng,
    ) -> Result<DraftTree> {
        let d1 = self.cost.draft.estimate(1);
        let catch_up = self.cost.draft.estimate(1);
        let max_depth = AUTO_MAX_DEPTH.min(max_nodes);
        let mut chain: Vec<usize> = Vec::new();
        // (parent, token, logq, value-if-added) for second choices
        let mut siblings: Vec<(usize, Token, f32, f32)> = Vec::new();
        let mut reach = 1.0f32;
        let mut sum = 0.0f32;
        let mut best = (1.0 / self.cost.target.estimate(1), 0usize, 0.0f32);
        let mut node = 0;
        for d in 1..=max_depth {
            let child = self.add_child_from_logits(&mut tree, node, &logits, sp, rng);
            if sp.is_greedy() {
                let lse = log_sum_exp(&logits);
                if let Some(&(t2, v2)) = top_k_indices(&logits, 2).get(1) {
                    let q2 = (v2 - lse).exp();
                    let a2 = self.cost.second_choice.estimate(q2);
                    siblings.push((node, t2 as Token, v2 - lse, reach * a2));
                }
            }
            let a = tree.nodes[child].accept_p;
            reach *= a;
            sum += reach;
            chain.push(child);
            node = child;
            let draft_ms = catch_up + d1 * (d - 1) as f64;
            let rate = self.cost.rate(sum, draft_ms, d + 1);
            if rate > best.0 {
                best = (rate, d, sum);
            }
            let next_rate = self.cost.rate(sum + reach * a, draft_ms + d1, d + 2);
            if d == max_depth || (next_rate <= rate && next_rate <= best.0) {
                break;
            }
            logits = self.draft_decode(&mut tree, &[child])?.pop().unwrap_or_default();
        }
        let (mut best_rate, keep_len, mut kept_sum) = best;
        let mut keep: Vec<usize> = chain[..keep_len].to_vec();
        let draft_ms = catch_up + d1 * keep_len.saturating_sub(1) as f64;
        // Second choices below kept chain nodes (or the root), most valuable first.
        siblings.retain(|s| s.0 == 0 || keep.contains(&s.0));
        siblings.sort_by(|a, b| b.3.total_cmp(&a.3));
        let mut extra: Vec<(usize, Token, f32)> = Vec::new();
        for (parent, t, logq, value) in siblings {
            if keep.len() + extra.len() >= max_nodes {
                break;
            }
            let batch = 1 + keep.len() + extra.len() + 1;
            let rate = self.cost.rate(kept_sum + value, draft_ms, batch);
            if rate > best_rate {
                best_rate = rate;
                kept_sum += value;
                extra.push((parent, t, logq));
            }
        }
        if keep.is_empty() && extra.is_empty() {
            return Ok(tree.restrict(&[]));
        }
        let base_len = tree.len();
        for (parent, t, logq) in extra {
            let a = self.cost.second_choice.estimate(logq.exp());
            let c = tree.add(parent, t, logq, a, Proposal::Deterministic);
            tree.nodes[c].rank = 1;
            keep.push(c);
        }
        let _ = base_len;
        Ok(tree.restrict(&keep))
    }

    // ---------------------------------------------------------------- verification

    /// One target pass over root + tree; returns the verdict and (verify ms, sample ms).
    fn verify(&mut self, tree: &DraftTree, sp: &SamplingParams, rng: &mut StdRng) -> Result<(Verdict, f64, f64)> {
        let base = self.history.len() - 1;
        let sets: Vec<Vec<i32>> = if tree.is_chain() { vec![vec![0]; tree.len()] } else { tree.seq_sets() };
        let n_leaves = sets[0].len();
        for s in 1..n_leaves {
            self.target.seq_cp(0, s as i32, -1, -1);
        }
        let t = Instant::now();
        self.batch.clear();
        for (i, n) in tree.nodes.iter().enumerate() {
            self.batch.add(n.token, (base + n.depth) as i32, &sets[i], true)?;
        }
        self.target.decode(&self.batch)?;
        let verify_ms = ms_since(t);
        self.cost.target.observe(tree.len(), verify_ms);

        let t = Instant::now();
        let verdict = if sp.is_greedy() {
            let mut am = Vec::with_capacity(tree.len());
            for i in 0..tree.len() {
                am.push(argmax(self.target.logits(i)?) as Token);
            }
            verify_greedy(tree, &am)
        } else {
            let ctx = &self.target;
            verify_sampled(tree, |i| ctx.logits(i).map(|l| warp(l, sp)).unwrap_or_default(), rng)
        };
        let sample_ms = ms_since(t);

        // Keep only the accepted path in seq 0.
        let last = verdict.last_node();
        if n_leaves > 1 {
            let s = sets[last][0];
            self.target.seq_keep(s);
            if s != 0 {
                self.target.seq_cp(s, 0, -1, -1);
                self.target.seq_rm(s, -1, -1);
            }
        }
        let past = base + tree.nodes[last].depth + 1;
        self.target.seq_rm(0, past as i32, -1);
        self.target_past = past;
        Ok((verdict, verify_ms, sample_ms))
    }

    /// After committing `n_commit` tokens of the verdict, trims both caches to the history.
    fn commit_kv(&mut self, tree: &DraftTree, verdict: &Verdict, n_commit: usize) -> Result<()> {
        let n = self.history.len(); // before extending
        let valid = n + n_commit - 1; // tokens of the new history that may be cached
        if self.target_past > valid {
            self.target.seq_rm(0, valid as i32, -1);
            self.target_past = valid;
        }
        if let Some(d) = self.draft.as_mut() {
            let decoded: Vec<usize> =
                verdict.accepted.iter().copied().take_while(|&i| tree.nodes[i].draft_decoded()).collect();
            if let Some(&last) = decoded.last() {
                d.seq_cp(tree.nodes[last].draft_seq, 0, -1, -1);
            }
            d.seq_keep(0);
            let past = if self.draft_past == n { n + decoded.len() } else { self.draft_past };
            let past = past.min(valid);
            d.seq_rm(0, past as i32, -1);
            self.draft_past = past;
        }
        Ok(())
    }

    /// Updates acceptance statistics from a verified tree.
    fn learn(&mut self, tree: &DraftTree, verdict: &Verdict) {
        self.rounds_total += 1;
        if tree.is_empty() {
            return;
        }
        let mut on_path = vec![false; tree.len()];
        on_path[0] = true;
        for &i in &verdict.accepted {
            on_path[i] = true;
        }
        for i in 1..tree.len() {
            let n = &tree.nodes[i];
            if !on_path[n.parent] {
                continue; // never reached: says nothing
            }
            let q = n.logq.exp();
            let cal = if n.rank == 0 { &mut self.cost.first_choice } else { &mut self.cost.second_choice };
            cal.observe(q, on_path[i]);
            if n.rank == 0 {
                self.mean_accept = 0.9 * self.mean_accept + 0.1 * f64::from(u8::from(on_path[i]));
            }
        }
    }
}

/// (target, draft) sequence ids a strategy can use in one round.
fn seq_budget(strategy: &Strategy) -> (usize, usize) {
    match strategy {
        Strategy::None => (1, 1),
        Strategy::Chain(g) => (1, g + 1),
        Strategy::Tree { top_k, depth, nodes } => {
            let candidates = top_k + top_k * top_k * depth.saturating_sub(1) + 1;
            ((nodes + 1).min(256), candidates.min(256))
        }
        Strategy::Static(s) => ((s.paths.len() + 1).min(256), (s.paths.len() + 1).min(256)),
        Strategy::Auto => (AUTO_MAX_DEPTH + 10, AUTO_MAX_DEPTH + 2),
    }
}

/// Decodes `tokens` at positions start.. in seq 0, in chunks; returns the last row's logits
/// if `want_last`.
fn decode_span(
    ctx: &mut Context,
    batch: &mut Batch,
    tokens: &[Token],
    start: usize,
    want_last: bool,
) -> Result<Vec<f32>> {
    if start + tokens.len() > ctx.n_ctx() {
        return Err(Error::ContextFull { needed: start + tokens.len(), n_ctx: ctx.n_ctx() });
    }
    let chunk = ctx.n_batch().min(512);
    let mut last = Vec::new();
    let n_chunks = tokens.len().div_ceil(chunk);
    for (c, part) in tokens.chunks(chunk).enumerate() {
        batch.clear();
        let final_chunk = c + 1 == n_chunks;
        for (j, &t) in part.iter().enumerate() {
            let is_last = final_chunk && j + 1 == part.len();
            batch.add(t, (start + c * chunk + j) as i32, &[0], want_last && is_last)?;
        }
        ctx.decode(batch)?;
        if want_last && final_chunk {
            last = ctx.logits(part.len() - 1)?.to_vec();
        }
    }
    Ok(last)
}

/// Times one decode per batch size on scratch positions (warm-up first); leaves the cache empty.
fn measure_batch_costs(ctx: &mut Context, probe: &[Token], sizes: &[usize], batch: &mut Batch) -> Result<BatchCost> {
    let mut cost = BatchCost::default();
    ctx.clear();
    let prefix = 8.min(probe.len());
    decode_span(ctx, batch, &probe[..prefix], 0, false)?;
    let mut run = |ctx: &mut Context, b: usize| -> Result<f64> {
        ctx.seq_rm(0, prefix as i32, -1);
        batch.clear();
        for j in 0..b {
            batch.add(probe[(prefix + j) % probe.len()], (prefix + j) as i32, &[0], true)?;
        }
        let t = Instant::now();
        ctx.decode(batch)?;
        Ok(ms_since(t))
    };
    run(ctx, 1)?;
    // Two interleaved passes, keeping each size's faster run, so a moment of machine noise
    // does not skew one batch size against the others.
    let mut best = vec![f64::INFINITY; sizes.len()];
    for _ in 0..2 {
        for (k, &b) in sizes.iter().enumerate() {
            best[k] = best[k].min(run(ctx, b)?);
        }
    }
    for (&b, &ms) in sizes.iter().zip(&best) {
        cost.observe(b, ms);
    }
    ctx.clear();
    Ok(cost)
}

/// Turns committed bytes into text pieces: whole UTF-8 characters only, and text that could
/// still become a stop string is held back until it cannot.
struct TextStream {
    stops: Vec<String>,
    bytes: Vec<u8>,
    /// Valid text decoded so far.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Where a stop string was found (text is cut there).
    cut: Option<usize>,
}

impl TextStream {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            bytes: Vec::new(),
            text: String::new(),
            emitted: 0,
            cut: None,
        }
    }

    /// Adds bytes; returns the text that can be shown now and whether a stop string appeared.
    fn push(&mut self, new: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(new);
        // Decode like String::from_utf8_lossy over the whole stream, but keep an incomplete
        // trailing character for the next push, so chunking never changes the text.
        let mut decoded = String::new();
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    decoded.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    decoded.push_str(&String::from_utf8_lossy(&self.bytes[..ok]));
                    match e.error_len() {
                        Some(bad) => {
                            decoded.push(char::REPLACEMENT_CHARACTER);
                            self.bytes.drain(..ok + bad);
                        }
                        None => {
                            self.bytes.drain(..ok);
                            break;
                        }
                    }
                }
            }
        }
        let search_from = self.text.len().saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        self.text.push_str(&decoded);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| {
                let mut from = search_from;
                while !self.text.is_char_boundary(from) {
                    from -= 1;
                }
                self.text[from..].find(s.as_str()).map(|p| p + from)
            })
            .min()
        {
            self.text.truncate(pos);
            self.cut = Some(pos);
            let piece = self.text[self.emitted.min(pos)..].to_string();
            self.emitted = pos;
            return (piece, true);
        }
        // Hold back a suffix that is a prefix of some stop string.
        let mut safe = self.text.len();
        for (i, _) in self.text.char_indices().rev().take(64) {
            let suffix = &self.text[i..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                safe = i;
            }
        }
        let safe = safe.max(self.emitted);
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (piece, false)
    }

    /// Text not yet handed out (held-back stop-string prefixes, when no stop string followed).
    fn finish(&mut self) -> String {
        if self.cut.is_none() && !self.bytes.is_empty() {
            let rest = String::from_utf8_lossy(&self.bytes).into_owned();
            self.text.push_str(&rest);
            self.bytes.clear();
        }
        let end = self.cut.unwrap_or(self.text.len());
        let piece = self.text[self.emitted.min(end)..end].to_string();
        self.emitted = end;
        piece
    }

    fn text(&self) -> String {
        self.text.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_holds_back_possible_stop_strings() {
        let mut s = TextStream::new(vec!["\n\n".into()]);
        assert_eq!(s.push(b"abc\n"), ("abc".to_string(), false));
        assert_eq!(s.push(b"d"), ("\nd".to_string(), false));
        let (piece, stop) = s.push(b"e\n\nf");
        assert!(stop);
        assert_eq!(piece, "e");
        assert_eq!(s.text(), "abc\nde");
    }

    #[test]
    fn text_stream_waits_for_whole_utf8_characters() {
        let mut s = TextStream::new(vec![]);
        let euro = "€".as_bytes();
        assert_eq!(s.push(&euro[..1]).0, "");
        assert_eq!(s.push(&euro[1..]).0, "€");
        assert_eq!(s.finish(), "");
    }
}
