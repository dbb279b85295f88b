//! A speculative generation session: the committed history, the round loop (policy drafts →
//! verifier checks → commit) and its stop conditions. The parts live by role: proposers in
//! [`crate::proposer`], the target pass in [`crate::verifier`], `auto` in [`crate::policy`],
//! prompts and chat here in `prompt`, streaming in `stream`, counters in `stats`.
//!
//! Invariants between calls (n = history.len()): every KV cache holds a prefix of the history
//! in seq 0 and nothing else, the target's at most n - 1 tokens (history[n-1], the *root*, is
//! verified with the next tree). A call that fails leaves history, conversation and caches as
//! they were before it. This module must never return tokens that differ from what the target
//! alone would produce (up to `fast` mode's documented rounding).

mod prompt;
mod stats;
mod stream;

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::backend::{ms_since, ChatMessage, Model, Token};
use crate::cost::{self, CostModel};
use crate::eagle::{check_head_compat, head_info};
use crate::error::{Error, Result};
use crate::features::FeatureTap;
use crate::fspad::FspadHead;
use crate::policy::{Drafters, Limits, Policy, RoundRecord, TestVariant, AUTO_MAX_DEPTH};
use crate::probe;
use crate::proposer::{FeatureHead, FspadDraft, HeadDraft, LookupDraft, ModelDraft, ModelProposer, Proposer};
use crate::sampling::SamplingParams;
use crate::strategy::{NumericMode, Strategy};
use crate::verifier::Verifier;

pub use stats::{Generation, Stats, StopReason};
use stream::TextStream;

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
    /// Let `auto` add n-gram lookups of the prompt and output (zero-cost drafts) where they pay.
    /// Fixed strategies without a draft model always draft with lookups.
    pub lookup: bool,
    /// Let `auto` start from what the last session of the same setup (models, threads, mode,
    /// drafts) in this process learned — costs, acceptance calibrations, how its predictions
    /// turned out — as a reset session does, instead of learning again from priors.
    pub share_learning: bool,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_threads: 0,
            strategy: Strategy::Auto,
            mode: NumericMode::Fast,
            lookup: true,
            share_learning: true,
        }
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

/// Where a test makes a round fail once, to check that the session recovers.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After the draft built the tree (draft cells of the tree are in its cache).
    AfterDraft,
    /// After the target's verification pass (tree cells in the target's cache), before commit.
    AfterVerify,
}

/// A feature-level head as a session takes it.
#[derive(Clone)]
pub enum HeadFile {
    /// An `eagle3` GGUF loaded by llama.cpp.
    Eagle3(Arc<Model>),
    /// An FSPAD-family head ([`crate::fspad`]).
    Fspad(Arc<FspadHead>),
}

impl HeadFile {
    /// Loads a head GGUF of either kind, told apart by `general.architecture`.
    pub fn load(path: &std::path::Path, params: &crate::backend::ModelParams) -> Result<HeadFile> {
        if crate::fspad::file_architecture(path)? == crate::fspad::ARCH {
            Ok(HeadFile::Fspad(Arc::new(FspadHead::load(path)?)))
        } else {
            Ok(HeadFile::Eagle3(Arc::new(Model::load(path, params)?)))
        }
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &std::path::Path {
        match self {
            HeadFile::Eagle3(m) => m.path(),
            HeadFile::Fspad(h) => h.path(),
        }
    }
}

/// Target + optional draft with their KV caches and the conversation so far.
pub struct Session {
    params: SessionParams,
    verifier: Verifier,
    draft: Option<ModelDraft>,
    head: Option<Box<dyn FeatureHead>>,
    lookup: Option<LookupDraft>,
    policy: Policy,
    /// The setup key under which `auto`'s learning is shared ([`SessionParams::share_learning`]).
    learned_key: Option<String>,
    history: Vec<Token>,
    messages: Vec<ChatMessage>,
    fail_point: Option<FailPoint>,
}

/// Largest number of draft tokens per round, whatever the strategy.
const MAX_DRAFT: usize = 254;
/// Largest context a session accepts (tokens).
const MAX_CTX: u32 = 1 << 20;
/// Most CPU threads a session accepts.
const MAX_THREADS: i32 = 1024;
/// Largest batch size the exact-mode self-check tries.
const EXACT_PROBE_MAX: usize = 8;

impl Session {
    /// Creates a session. With a draft, checks vocabulary compatibility; in `exact` mode the
    /// target must be loaded with `repack = false` and the verification batch is capped at the
    /// largest size the self-check finds bit-identical to one-token decoding.
    pub fn new(target: Arc<Model>, draft: Option<Arc<Model>>, params: SessionParams) -> Result<Session> {
        Self::build(target, draft, None, params)
    }

    /// A session that drafts with a feature-level head (an `eagle3` GGUF, [`crate::eagle`])
    /// reading the target's hidden states, instead of a separate draft model. Checks that the
    /// head was made for this target (hidden size, layers, vocabulary).
    pub fn with_head(target: Arc<Model>, head: Arc<Model>, params: SessionParams) -> Result<Session> {
        Self::build(target, None, Some(HeadFile::Eagle3(head)), params)
    }

    /// A session that drafts with an FSPAD-family head ([`crate::fspad`]: EAGLE-2-style, FSPAD,
    /// or an ablation) reading the target's final-norm hidden states.
    pub fn with_fspad_head(target: Arc<Model>, head: Arc<FspadHead>, params: SessionParams) -> Result<Session> {
        Self::build(target, None, Some(HeadFile::Fspad(head)), params)
    }

    /// A session drafting with a head of either kind ([`HeadFile::load`]).
    pub fn with_head_file(target: Arc<Model>, head: HeadFile, params: SessionParams) -> Result<Session> {
        Self::build(target, None, Some(head), params)
    }

    /// A session holding both a draft model and a head (of either kind): `auto` plans every
    /// round with whichever of the two its estimates say pays more (each with its own measured
    /// costs and calibration, lookups added where they pay); fixed strategies draft with the
    /// draft model.
    pub fn with_draft_and_head(
        target: Arc<Model>,
        draft: Arc<Model>,
        head: HeadFile,
        params: SessionParams,
    ) -> Result<Session> {
        Self::build(target, Some(draft), Some(head), params)
    }

    fn build(
        target: Arc<Model>,
        draft: Option<Arc<Model>>,
        head: Option<HeadFile>,
        params: SessionParams,
    ) -> Result<Session> {
        if params.n_ctx < 16 {
            return Err(Error::InvalidParam { name: "n_ctx", reason: format!("{} is below 16", params.n_ctx) });
        }
        if params.n_ctx > MAX_CTX {
            return Err(Error::InvalidParam {
                name: "n_ctx",
                reason: format!("{} is above {MAX_CTX} (llama.cpp would try to allocate it)", params.n_ctx),
            });
        }
        if !(0..=MAX_THREADS).contains(&params.n_threads) {
            return Err(Error::InvalidParam {
                name: "n_threads",
                reason: format!("{} is outside 0..={MAX_THREADS}", params.n_threads),
            });
        }
        for (name, m) in [("target", Some(&target)), ("draft", draft.as_ref())] {
            if let Some(m) = m {
                if m.meta("general.architecture").as_deref() == Some("eagle3") {
                    return Err(Error::InvalidParam {
                        name,
                        reason: format!(
                            "{} is an eagle3 head, which drafts from a target's features and cannot decode on its \
                             own; pass it as the head",
                            m.path().display()
                        ),
                    });
                }
            }
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
        let head_info = match &head {
            Some(HeadFile::Eagle3(h)) => {
                let info = head_info(h)?;
                check_head_compat(&target, h, &info)?;
                Some(info)
            }
            Some(HeadFile::Fspad(h)) => {
                h.check_target(&target)?;
                None
            }
            None => None,
        };
        let draft = if params.strategy == Strategy::None { None } else { draft };
        let head = if params.strategy == Strategy::None { None } else { head };
        let has_model = draft.is_some() || head.is_some();
        // Lookups draft for `auto` when enabled, and for fixed strategies without a model.
        let lookup = match params.strategy {
            Strategy::None => false,
            Strategy::Auto => params.lookup,
            _ => !has_model,
        };
        // Sequence ids: the target needs one per tree leaf, the draft one per decoded node.
        // llama.cpp allocates n_vocab logits per possible sequence, so size them tightly.
        let (mut t_seq, d_seq) = seq_budget(&params.strategy, lookup);
        if params.mode == NumericMode::Exact {
            t_seq = t_seq.max(2); // the self-check makes holes with a second sequence
        }
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
        let exact = params.mode == NumericMode::Exact;
        let tap = match (&head, &head_info) {
            (Some(HeadFile::Eagle3(_)), Some(info)) => {
                Some(Arc::new(FeatureTap::new(info.target_layers, target.n_layer(), target.n_embd())?))
            }
            (Some(HeadFile::Fspad(_)), _) => Some(Arc::new(FeatureTap::final_norm(target.n_embd()))),
            _ => None,
        };
        let verifier =
            Verifier::new(target.clone(), params.n_ctx, n_batch, t_seq as u32, params.n_threads, exact, tap.clone())?;
        let draft = match draft {
            Some(d) => {
                Some(ModelDraft::new(d, target.n_vocab(), params.n_ctx, n_batch, d_seq as u32, params.n_threads)?)
            }
            None => None,
        };
        let head: Option<Box<dyn FeatureHead>> = match (head, head_info, tap) {
            (Some(HeadFile::Eagle3(h)), Some(info), Some(tap)) => Some(Box::new(HeadDraft::new(
                h,
                &info,
                target.clone(),
                tap,
                params.n_ctx,
                d_seq as u32,
                params.n_threads,
            )?)),
            (Some(HeadFile::Fspad(h)), _, Some(tap)) => {
                Some(Box::new(FspadDraft::new(h, &target, tap, params.n_ctx, params.n_threads)?))
            }
            _ => None,
        };
        let policy = Policy::new(params.strategy.clone(), params.mode, MAX_DRAFT + 1);
        let mut s = Session {
            params,
            verifier,
            draft,
            head,
            lookup: lookup.then(LookupDraft::default),
            policy,
            learned_key: None,
            history: Vec::new(),
            messages: Vec::new(),
            fail_point: None,
        };
        let speculates = s.draft.is_some() || s.head.is_some() || s.lookup.is_some();
        if s.params.mode == NumericMode::Exact && speculates {
            let (ctx, batch) = s.verifier.context_mut();
            s.policy.max_verify = probe::exact_cap(ctx, batch, &target, EXACT_PROBE_MAX)?;
            tracing::info!("exact mode: verification batches capped at {}", s.policy.max_verify);
        }
        // auto plans with the measured curves; in fast mode every speculating session also gets
        // the cheaper kernels per batch size that the same measurement finds.
        if speculates && (s.params.strategy == Strategy::Auto || s.params.mode == NumericMode::Fast) {
            s.measure_costs()?;
        }
        if s.params.strategy == Strategy::Auto && s.params.share_learning && speculates {
            let key = s.setup_key();
            if let Some(l) = crate::policy::learned(&key) {
                s.policy.adopt(l);
            }
            s.learned_key = Some(key);
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
        &self.policy.cost
    }

    /// Largest verification batch (root + draft tokens) this session will use.
    pub fn max_verify_batch(&self) -> usize {
        self.policy.max_verify
    }

    /// The target model.
    pub fn target_model(&self) -> &Arc<Model> {
        self.verifier.model()
    }

    /// The policy, for tests that fix its costs or select a test variant.
    #[doc(hidden)]
    pub fn policy_mut(&mut self) -> &mut Policy {
        &mut self.policy
    }

    /// Makes the next round fail at `point` (once), for recovery tests.
    #[doc(hidden)]
    pub fn inject_failure(&mut self, point: FailPoint) {
        self.fail_point = Some(point);
    }

    /// Selects a test-only policy variant (negative controls of the lossless tests).
    #[doc(hidden)]
    pub fn set_test_variant(&mut self, v: TestVariant) {
        self.policy.set_test_variant(v);
    }

    /// Forgets the conversation and empties every cache.
    pub fn reset(&mut self) {
        self.history.clear();
        self.messages.clear();
        self.verifier.reset();
        self.policy.forget_shadows();
        for p in self.proposers() {
            p.reset();
        }
    }

    fn proposers(&mut self) -> Vec<&mut dyn Proposer> {
        let mut v: Vec<&mut dyn Proposer> = Vec::new();
        if let Some(d) = self.draft.as_mut() {
            v.push(d);
        }
        if let Some(h) = self.head.as_mut() {
            v.push(h.as_proposer());
        }
        if let Some(l) = self.lookup.as_mut() {
            v.push(l);
        }
        v
    }

    /// Drops history from `len` on; every cache keeps at most the first `len - 1` tokens
    /// (the invariant between calls: the last token is the next round's root).
    fn truncate_history(&mut self, len: usize) {
        self.history.truncate(len);
        let keep = len.saturating_sub(1);
        self.verifier.rollback(keep);
        for p in self.proposers() {
            p.rollback(keep);
        }
    }

    /// Tokens of the history held by the target's and the draft's caches, for tests of the
    /// invariant (both at most `history().len() - 1` between calls).
    #[doc(hidden)]
    pub fn cached_tokens(&self) -> (usize, Option<usize>) {
        (self.verifier.cached(), self.draft.as_ref().map(ModelDraft::cached))
    }

    /// Identifies what `auto` learns about: the models (and how they were loaded), threads,
    /// numeric mode and which drafts it may use.
    fn setup_key(&self) -> String {
        let model = |m: &Model| format!("{}|{}", m.path().display(), m.params().repack);
        format!(
            "{}|{}|{}|{}|{}|lookup={}",
            model(self.verifier.model()),
            self.draft.as_ref().map(|d| model(d.model())).unwrap_or_default(),
            self.head.as_ref().map(|h| h.cost_key()).unwrap_or_default(),
            self.params.n_threads,
            self.params.mode,
            self.lookup.is_some()
        )
    }

    /// Measures target (and draft) decode time per batch size for `auto`, once per process
    /// per model and setting.
    fn measure_costs(&mut self) -> Result<()> {
        let threads = self.params.n_threads;
        let mode = self.params.mode;
        let key = |m: &Model| format!("{}|{}|{}|{}", m.path().display(), threads, m.params().repack, mode);
        let model = self.verifier.model().clone();
        let tkey = key(&model);
        let sizes: Vec<usize> =
            [1, 2, 3, 4, 6, 8, 12, 16, 32, 48].into_iter().filter(|&b| b <= self.policy.max_verify).collect();
        let (ctx, batch) = self.verifier.context_mut();
        self.policy.cost.target = measured(&tkey, ctx, batch, &probe::probe_tokens(&model, 32), &sizes)?;
        if let Some(d) = self.draft.as_mut() {
            let dkey = key(d.model());
            let probe = probe::probe_tokens(d.model(), 24);
            let (ctx, batch) = d.context_mut();
            self.policy.cost.draft = measured(&dkey, ctx, batch, &probe, &[1, 2, 3, 4, 6, 8])?;
        }
        if let Some(h) = self.head.as_mut() {
            let hkey = format!("{}|{threads}|{mode}", h.cost_key());
            let c = match cost::cached(&hkey) {
                Some((c, _)) => c,
                None => {
                    let c = h.measure_costs(&[1, 2, 3, 4, 6, 8])?;
                    cost::store(&hkey, &c, &Default::default());
                    c
                }
            };
            // With a draft model too, the head is the policy's second drafting model.
            if self.draft.is_some() {
                self.policy.set_second_model_cost(c);
            } else {
                self.policy.cost.draft = c;
            }
        }
        tracing::debug!(
            "cost model: target {:?} draft {:?}",
            self.policy.cost.target.points(),
            self.policy.cost.draft.points()
        );
        Ok(())
    }

    // ---------------------------------------------------------------- generation

    /// Appends `prompt` to the session and generates. `on_commit(tokens, text)` is called for
    /// each committed batch of tokens with the new text (held back while it could still turn
    /// into a stop string); returning false stops generation.
    ///
    /// On error the session is left as it was before the call (history, conversation, caches).
    /// After a stop string, the history ends with the tokens of the returned text: generated
    /// tokens are kept while their text lies inside it, and a partial token's returned text is
    /// re-tokenized ([`Generation::tokens`] are those tokens).
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerateParams,
        on_commit: &mut dyn FnMut(&[Token], &str) -> bool,
    ) -> Result<Generation> {
        params.sampling.validate()?;
        let saved = (self.history.clone(), self.messages.clone());
        self.policy.forget_shadows();
        let result = self.generate_inner(prompt, params, on_commit);
        if let (Some(key), Some(l)) = (&self.learned_key, self.policy.learned()) {
            crate::policy::store_learned(key, l);
        }
        if result.is_err() {
            let (history, messages) = saved;
            let common = history.iter().zip(&self.history).take_while(|(a, b)| a == b).count();
            self.truncate_history(common);
            self.history = history;
            self.messages = messages;
        }
        result
    }

    fn generate_inner(
        &mut self,
        prompt: &Prompt,
        params: &GenerateParams,
        on_commit: &mut dyn FnMut(&[Token], &str) -> bool,
    ) -> Result<Generation> {
        let t_start = Instant::now();
        let new_tokens = self.prepare_prompt(prompt)?;
        if self.history.is_empty() && new_tokens.is_empty() {
            return Err(Error::InvalidParam { name: "prompt", reason: "empty prompt".into() });
        }
        let n_ctx = self.verifier.n_ctx();
        // The root must fit: at least one token can then be generated.
        let needed = self.history.len() + new_tokens.len();
        if needed > n_ctx {
            return Err(Error::ContextFull { needed: needed + 1, n_ctx });
        }
        let mut stats = Stats { prompt_tokens: new_tokens.len(), ..Default::default() };
        let n_before = self.history.len();
        self.history.extend_from_slice(&new_tokens);

        // Prefill the target with everything but the root; the draft reads the prompt now too
        // (unless `auto` already knows it will not draft), so its prefill is billed as prompt
        // processing, not to the first round.
        let t0 = Instant::now();
        if let Some(h) = &self.head {
            // The head needs the target's features of every cached token: if it lost some (a
            // failed round), the target reads those tokens again.
            if self.verifier.cached() > h.features_len() {
                self.verifier.rollback(h.features_len());
            }
        }
        self.verifier.prefill(&self.history)?;
        if let Some(h) = self.head.as_mut() {
            h.prefill(&self.history)?;
        }
        let model_prefill = self.policy.wants_model_prefill();
        if let Some(d) = self.draft.as_mut().filter(|_| model_prefill) {
            d.prefill(&self.history)?;
        }
        if let Some(l) = self.lookup.as_mut() {
            l.prefill(&self.history)?;
        }
        stats.prefill_ms = ms_since(t0);

        let mut rng = StdRng::seed_from_u64(params.sampling.seed);
        let mut out_tokens: Vec<Token> = Vec::new();
        let mut text = TextStream::new(params.stop.clone());
        let mut stop_reason = StopReason::MaxTokens;
        let model = self.verifier.model().clone();
        let t_gen = Instant::now();

        while out_tokens.len() < params.max_tokens {
            let n = self.history.len();
            if n > n_ctx {
                stop_reason = StopReason::ContextFull;
                break;
            }
            let budget = params.max_tokens - out_tokens.len();
            // Root + draft nodes must fit in the free cells (the tree shrinks near the end).
            let free = n_ctx - (n - 1);
            let lim = Limits { max_nodes: (free - 1).min(MAX_DRAFT), max_depth: budget - 1 };
            let commit = self.round(&lim, params.ignore_eog, &params.sampling, &mut rng, &mut stats)?;
            let hit_eog = !params.ignore_eog && commit.last().is_some_and(|&t| model.is_eog(t));
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
        let text = text.text();
        if stop_reason == StopReason::StopString {
            out_tokens = self.cut_at_stop(n_before + new_tokens.len(), &out_tokens, &text)?;
        }
        if let Prompt::Chat(_) = prompt {
            self.messages.push(ChatMessage::new("assistant", text.clone()));
        }
        stats.tokens = out_tokens.len();
        stats.total_ms = ms_since(t_start);
        stats.finish(ms_since(t_gen));
        Ok(Generation { tokens: out_tokens, text, stop_reason, stats })
    }

    /// One round: draft, verify, keep the accepted path. Returns the tokens to commit (the
    /// accepted ones and the bonus, cut at the budget and after an end-of-generation token
    /// unless `ignore_eog`); the caches hold them except the last. On error every cache is back
    /// at the committed history.
    fn round(
        &mut self,
        lim: &Limits,
        ignore_eog: bool,
        sp: &SamplingParams,
        rng: &mut StdRng,
        stats: &mut Stats,
    ) -> Result<Vec<Token>> {
        let r = self.round_inner(lim, ignore_eog, sp, rng, stats);
        if r.is_err() {
            let n = self.history.len();
            self.truncate_history(n);
        }
        r
    }

    fn round_inner(
        &mut self,
        lim: &Limits,
        ignore_eog: bool,
        sp: &SamplingParams,
        rng: &mut StdRng,
        stats: &mut Stats,
    ) -> Result<Vec<Token>> {
        let t_round = Instant::now();
        // The draft model first, the head second (`auto` plans each round with the one that
        // pays more; fixed strategies use the first).
        let (model, second): (Option<&mut dyn ModelProposer>, Option<&mut dyn ModelProposer>) =
            match (self.draft.as_mut(), self.head.as_mut()) {
                (Some(d), h) => (Some(d), h.map(|h| h.as_model())),
                (None, h) => (h.map(|h| h.as_model()), None),
            };
        let drafters = Drafters { model, second, lookup: self.lookup.as_mut() };
        let (tree, used_model) = self.policy.draft(drafters, &self.history, lim, sp, rng)?;
        let draft_ms = ms_since(t_round);
        stats.draft_ms += draft_ms;
        self.fail_at(FailPoint::AfterDraft)?;

        let n = self.history.len();
        let v = self.verifier.verify(&tree, n, sp, rng)?;
        self.fail_at(FailPoint::AfterVerify)?;
        stats.verify_ms += v.verify_ms;
        stats.sample_ms += v.sample_ms;
        stats.rounds += 1;
        stats.max_batch = stats.max_batch.max(tree.len());
        stats.draft_proposed += tree.n_draft();
        stats.draft_accepted += v.verdict.accepted.len();

        let mut commit: Vec<Token> = v.verdict.accepted.iter().map(|&i| tree.nodes[i].token).collect();
        commit.push(v.verdict.bonus);
        // Nothing after the budget or an end-of-generation token may stay in any cache.
        let model = self.verifier.model().clone();
        let mut keep = commit.len().min(lim.max_depth + 1);
        if let Some(k) = commit[..keep].iter().position(|&t| !ignore_eog && model.is_eog(t)) {
            keep = k + 1;
        }
        let full = commit.clone();
        commit.truncate(keep);
        let n_commit = commit.len();
        self.verifier.commit(&tree, &v, n, n_commit);
        // The decode timings of the model the policy planned with (index as in `Drafters`).
        let planned = self.policy.active_model();
        let mut timings = Vec::new();
        if let Some(d) = self.draft.as_mut() {
            d.accept(&tree, &v.verdict.accepted, n_commit, n);
            let t = d.take_timings();
            if planned == 0 {
                timings = t;
            }
        }
        let head_index = usize::from(self.draft.is_some());
        if let Some(h) = self.head.as_mut() {
            h.accept(&tree, &v.verdict.accepted, n_commit, n);
            let t = h.take_timings();
            if planned == head_index {
                timings = t;
            }
        }
        tracing::trace!(
            target: "adaspec::round",
            "round: {} nodes ({} lookup), model {used_model} (#{}), expected {:.2}, accepted {}, verify {:.1} ms, draft {:.1} ms, \
             drafted {:?}",
            tree.n_draft(),
            tree.nodes[1..].iter().filter(|n| matches!(n.origin, crate::tree::Origin::Lookup(_))).count(),
            planned,
            tree.expected_accepted(),
            v.verdict.accepted.len(),
            v.verify_ms,
            draft_ms,
            tree.nodes[1..].iter().map(|n| n.token).collect::<Vec<_>>(),
        );
        self.policy.learn(&RoundRecord {
            tree: &tree,
            verdict: &v.verdict,
            committed: &full,
            used_model,
            draft_timings: &timings,
            draft_ms,
            verify_ms: v.verify_ms,
            round_ms: ms_since(t_round),
        });
        Ok(commit)
    }

    fn fail_at(&mut self, point: FailPoint) -> Result<()> {
        if self.fail_point == Some(point) {
            self.fail_point = None;
            return Err(Error::Decode { code: -100, what: format!("injected failure at {point:?}") });
        }
        Ok(())
    }
}

/// (target, draft) sequence ids a strategy can use in one round.
fn seq_budget(strategy: &Strategy, lookup: bool) -> (usize, usize) {
    let lookup_leaves = if lookup { 3 } else { 0 };
    match strategy {
        Strategy::None => (1, 1),
        Strategy::Chain(g) => (1, g + 1),
        Strategy::Tree { top_k, depth, nodes } => {
            let candidates = top_k + top_k * top_k * depth.saturating_sub(1) + 1;
            ((nodes + 1).min(256), candidates.min(256))
        }
        Strategy::Static(s) => ((s.paths.len() + 1).min(256), (s.paths.len() + 1).min(256)),
        Strategy::Auto => (AUTO_MAX_DEPTH + 10 + lookup_leaves, AUTO_MAX_DEPTH + 2),
    }
}

/// The decode-cost curve of a context, measured once per process and key; installs the kernel
/// choice per batch size that goes with it.
fn measured(
    key: &str,
    ctx: &mut crate::backend::Context,
    batch: &mut crate::backend::Batch,
    probe: &[crate::backend::Token],
    sizes: &[usize],
) -> Result<crate::cost::BatchCost> {
    if let Some((c, plan)) = cost::cached(key) {
        ctx.set_kernel_plan(plan);
        return Ok(c);
    }
    let c = probe::measure_batch_costs(ctx, batch, probe, sizes)?;
    cost::store(key, &c, ctx.kernel_plan());
    if !ctx.kernel_plan().reference_sizes().is_empty() {
        tracing::info!(
            "{}: reference kernels measured cheaper for batch sizes {:?}",
            ctx.model().path().display(),
            ctx.kernel_plan().reference_sizes()
        );
    }
    Ok(c)
}
