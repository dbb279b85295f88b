//! The policy: which proposer drafts how much each round. Fixed strategies map straight to a
//! proposer shape; `auto` plans every round from one estimate — measured target cost per
//! verification batch size, measured draft cost per step, calibrated acceptance per proposer —
//! and learns all three online. It may propose nothing (plain decoding) when that is fastest.
//!
//! Lossless rule it must keep (SPEC §3): a sampled draft token is proposed only by a decision
//! made before it was drawn; sampled chains are never truncated or pruned afterwards.
//! Deterministic nodes (greedy drafts, lookups, second choices) may be pruned freely.

use rand::rngs::StdRng;

use crate::backend::Token;
use crate::cost::{CostModel, ModelCosts, ProcessMap};
use crate::error::Result;
use crate::proposer::{lookup, Alternative, ChainStep, LookupDraft, ModelProposer, Proposer, Request, Shape};
use crate::sampling::SamplingParams;
use crate::strategy::{NumericMode, Strategy};
use crate::tree::{DraftTree, Origin, Proposal};
use crate::verify::Verdict;

/// Longest chain `auto` drafts.
pub const AUTO_MAX_DEPTH: usize = 12;
/// Most lookup nodes `auto` adds to a round.
pub const AUTO_MAX_LOOKUP: usize = 48;
/// Acceptance assumed for a draft before anything was measured.
const PRIOR_ACCEPT: f32 = 0.7;
/// Draft tokens judged before `auto` stops trying the draft at its optimistic acceptance.
const EXPLORE_OBSERVATIONS: f64 = 16.0;
/// Rounds over which a session with two drafting models spreads the catch-up of the one that
/// sat out: the catch-up buys every later round with that model, so charging it all to the
/// first would keep the model that drafted last in charge for good (the other's lag only grows).
const CATCH_UP_ROUNDS: f64 = 8.0;
/// Chain-step confidences kept to price a decode before its confidence is known.
const MAX_TOP_QS: usize = 64;
/// Confidences seen before a chain may stop without decoding its last token.
const MIN_TOP_QS: usize = 8;
/// Weight kept by a [`Realization`]'s sums per new round of its kind.
const REALIZED_DECAY: f64 = 0.9;
/// Pseudo-rounds at "as predicted" in a [`Realization`] (its prior).
const REALIZED_PRIOR: f64 = 4.0;
/// Most a single round's time may count as, in multiples of its predicted time: one hiccup
/// (a page fault, another process) must not outweigh the rounds around it.
const REALIZED_MAX_SLOWDOWN: f64 = 2.0;

/// How rounds of one kind (drafting with the model; verifying lookups only) turned out against
/// what the cost model predicted for them: decayed sums of predicted and realized tokens and
/// milliseconds. Its factor corrects that kind's predicted rate in `auto`'s decisions, so a
/// cost model that is wrong (a probe measured in a noisy moment, per-round overhead it does not
/// see, acceptance estimates that look best exactly where they are too high because those are
/// the rounds picked) is outvoted by what happened, without ever switching a kind off.
#[derive(Debug, Clone, Copy, Default)]
struct Realization {
    tokens_predicted: f64,
    tokens: f64,
    ms_predicted: f64,
    ms: f64,
    rounds: f64,
}

impl Realization {
    fn observe(&mut self, predicted: (f64, f64), tokens: usize, ms: f64) {
        let d = REALIZED_DECAY;
        self.tokens_predicted = self.tokens_predicted * d + predicted.0;
        self.tokens = self.tokens * d + tokens as f64;
        self.ms_predicted = self.ms_predicted * d + predicted.1;
        self.ms = self.ms * d + ms.clamp(1e-3, REALIZED_MAX_SLOWDOWN * predicted.1.max(1e-3));
        self.rounds = self.rounds * d + 1.0;
    }

    /// Realized tokens / predicted tokens of its rounds, starting from 1 with the weight of
    /// [`REALIZED_PRIOR`] rounds like the average one seen.
    fn token_factor(&self) -> f64 {
        let tok = if self.rounds > 0.0 { self.tokens_predicted / self.rounds } else { 1.0 };
        let p = REALIZED_PRIOR;
        (self.tokens + p * tok) / (self.tokens_predicted + p * tok)
    }

    /// Realized rate / predicted rate, starting from 1 (as predicted) with the weight of
    /// [`REALIZED_PRIOR`] rounds like the average one seen (or like `typical_ms` before any).
    /// Without `tokens`, only the time: how far the costs were off.
    fn factor(&self, typical_ms: f64, tokens: bool) -> f64 {
        let (tok, ms) = if self.rounds > 0.0 {
            (self.tokens_predicted / self.rounds, self.ms_predicted / self.rounds)
        } else {
            (1.0, typical_ms)
        };
        let p = REALIZED_PRIOR;
        let time = (self.ms_predicted + p * ms) / (self.ms + p * ms);
        if tokens {
            time * (self.tokens + p * tok) / (self.tokens_predicted + p * tok)
        } else {
            time
        }
    }
}

/// What `auto` learned in a session (costs, calibrations, how its predictions turned out,
/// rounds played): a new session of the same setup starts from it ([`Policy::adopt`]), as a
/// session that is reset keeps it, so a host that runs many generations learns once.
#[derive(Debug, Clone)]
pub struct Learned {
    cost: CostModel,
    rounds: usize,
    model_fit: Realization,
    lookup_fit: Realization,
    other: OtherModel,
    active: usize,
}

/// What sessions of a process learned, keyed by their setup (models, threads, mode, drafts).
static LEARNED: ProcessMap<Learned> = ProcessMap::new();

/// What the last session of setup `key` had learned when it last finished a generation.
pub fn learned(key: &str) -> Option<Learned> {
    LEARNED.get(key)
}

/// Stores what a session of setup `key` learned, for the next one.
pub fn store_learned(key: &str, l: Learned) {
    LEARNED.insert(key, l);
}

/// The acceptance a probe round assumes: what was measured, plus a margin for a draft
/// whose acceptance was measured on little data.
fn optimistic(a: f32) -> f32 {
    (a + 0.15).min(0.98)
}

/// What a round may use.
pub struct Drafters<'a> {
    /// The draft model or the head.
    pub model: Option<&'a mut dyn ModelProposer>,
    /// A second drafting model (the head, when `model` is a draft model): `auto` plans each
    /// round with whichever of the two pays more; fixed strategies use `model`.
    pub second: Option<&'a mut dyn ModelProposer>,
    pub lookup: Option<&'a mut LookupDraft>,
}

/// The drafting model `auto` is not planning with, in a session that has two: its costs and
/// calibrations, how its drafting rounds turned out, its latest chain-step confidences. Swapped
/// with the policy's own ([`Policy`]'s `cost`, `model_fit`, `top_qs`) when the other is chosen.
#[derive(Debug, Clone, Default)]
struct OtherModel {
    costs: ModelCosts,
    fit: Realization,
    top_qs: Vec<f32>,
}

/// Limits of one round.
pub struct Limits {
    /// Most draft nodes (free KV cells, verification cap).
    pub max_nodes: usize,
    /// Deepest useful node (tokens left to generate - 1).
    pub max_depth: usize,
}

/// Lookup branches chosen for a round: (tokens, confidence, expected accepted tokens).
type LookupPlan = Vec<(Vec<Token>, f32, f32)>;

/// A lookup plan's expected accepted tokens and node count.
fn plan_value(plan: &LookupPlan) -> (f32, usize) {
    (plan.iter().map(|p| p.2).sum(), plan.iter().map(|p| p.0.len()).sum())
}
/// A round's best lookup candidate, judged against the tokens this and the following rounds
/// commit: (tokens, confidence, how many of its first tokens the round verifies in its tree,
/// which the tree's own verdict judges).
type Shadow = (Vec<Token>, f32, usize);
/// Most lookup candidates followed at once.
const MAX_SHADOWS: usize = 32;

/// What a verified round tells the policy.
#[derive(Clone, Copy)]
pub struct RoundRecord<'a> {
    pub tree: &'a DraftTree,
    pub verdict: &'a Verdict,
    /// Accepted tokens and the bonus.
    pub committed: &'a [Token],
    /// Whether the draft model ran this round.
    pub used_model: bool,
    /// (batch size, ms) of the draft's decodes.
    pub draft_timings: &'a [(usize, f64)],
    /// Wall time of drafting (policy, proposers, the draft's decodes).
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub round_ms: f64,
}

/// Test-only behaviour, to show that the tests catch what they guard against.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestVariant {
    /// Truncate sampled `auto` chains after drafting to the prefix whose expected rate looked
    /// best once deeper tokens were seen (the biased rule this project once had).
    pub truncate_sampled_chains: bool,
}

/// The per-session policy state.
pub struct Policy {
    strategy: Strategy,
    mode: NumericMode,
    /// Costs and calibrations.
    pub cost: CostModel,
    /// Largest verification batch (root + draft tokens).
    pub max_verify: usize,
    /// Rounds planned so far (all generations).
    rounds: usize,
    /// Drafting rounds and lookup-only rounds against their predictions.
    model_fit: Realization,
    lookup_fit: Realization,
    /// This round's prediction (`auto` only): (tokens, ms).
    predicted: Option<(f64, f64)>,
    /// The draft's top probabilities at the latest chain steps: what the next one may be.
    top_qs: Vec<f32>,
    /// Draft decodes of this round's model chain (the root's catch-up included).
    decodes: usize,
    /// How many history tokens the model had not read when this round's draft started (a
    /// round with a long catch-up says little about the per-step cost).
    lag: usize,
    /// Costs fixed by a test: no online timing, no correction by realized rounds.
    fixed_costs: bool,
    /// This round's best lookup candidate: whether the target would have accepted its tokens
    /// the tree does not verify is read off the committed tokens, for free.
    shadow: Option<Shadow>,
    /// Shadows still being judged: (candidate, confidence, tokens followed so far, first
    /// token to judge).
    shadows: Vec<(Vec<Token>, f32, usize, usize)>,
    variant: TestVariant,
    /// The second drafting model's state (sessions with a draft model and a head).
    other: OtherModel,
    /// Which drafting model (0: `Drafters::model`, 1: `Drafters::second`) `cost`, `model_fit`
    /// and `top_qs` describe.
    active: usize,
    /// Whether rounds choose between two drafting models.
    two_models: bool,
}

impl Policy {
    pub fn new(strategy: Strategy, mode: NumericMode, max_verify: usize) -> Self {
        Policy {
            strategy,
            mode,
            cost: CostModel::default(),
            max_verify,
            rounds: 0,
            model_fit: Realization::default(),
            lookup_fit: Realization::default(),
            predicted: None,
            top_qs: Vec::new(),
            decodes: 0,
            lag: 0,
            fixed_costs: false,
            shadow: None,
            shadows: Vec::new(),
            variant: TestVariant::default(),
            other: OtherModel::default(),
            active: 0,
            two_models: false,
        }
    }

    /// Sets the second drafting model's measured decode curve (sessions with two).
    pub fn set_second_model_cost(&mut self, draft: crate::cost::BatchCost) {
        if self.active == 1 {
            self.cost.draft = draft;
        } else {
            self.other.costs = ModelCosts::new(draft);
        }
    }

    /// The drafting model the last round planned with (0: `Drafters::model`, 1: `second`).
    pub fn active_model(&self) -> usize {
        self.active
    }

    /// Makes the other drafting model the one `cost`, `model_fit` and `top_qs` describe.
    fn switch_model(&mut self) {
        self.cost.swap_model(&mut self.other.costs);
        std::mem::swap(&mut self.model_fit, &mut self.other.fit);
        std::mem::swap(&mut self.top_qs, &mut self.other.top_qs);
        self.active ^= 1;
    }

    /// Replaces the measured costs (target ms by batch size from 1, draft ms per step), takes
    /// every proposal's confidence as its acceptance and stops learning either, so `auto`
    /// decides the same on any machine. For tests.
    #[doc(hidden)]
    pub fn fix_costs(&mut self, target_ms: &[f64], draft_ms: f64) {
        self.cost = CostModel::default();
        for (i, &ms) in target_ms.iter().enumerate() {
            self.cost.target.observe(i + 1, ms);
        }
        self.cost.draft.observe(1, draft_ms);
        self.rounds = 0;
        self.model_fit = Realization::default();
        self.lookup_fit = Realization::default();
        self.fixed_costs = true;
    }

    #[doc(hidden)]
    pub fn set_test_variant(&mut self, v: TestVariant) {
        self.variant = v;
    }

    /// What this policy learned, for a later session of the same setup; `None` for fixed
    /// strategies and costs fixed by a test (nothing to carry).
    pub fn learned(&self) -> Option<Learned> {
        (self.strategy == Strategy::Auto && !self.fixed_costs).then(|| Learned {
            cost: self.cost.clone(),
            rounds: self.rounds,
            model_fit: self.model_fit,
            lookup_fit: self.lookup_fit,
            other: self.other.clone(),
            active: self.active,
        })
    }

    /// Continues from what an earlier session of the same setup learned (its measured curves
    /// included, refined online since the start-up measurement).
    pub fn adopt(&mut self, l: Learned) {
        self.cost = l.cost;
        self.rounds = l.rounds;
        self.model_fit = l.model_fit;
        self.lookup_fit = l.lookup_fit;
        self.other = l.other;
        self.active = l.active;
    }

    /// Longest chain the verification cap allows `auto`.
    fn max_chain(&self) -> usize {
        AUTO_MAX_DEPTH.min(self.max_verify.saturating_sub(1))
    }

    fn exact(&self) -> bool {
        self.mode == NumericMode::Exact
    }

    /// Whether the draft model should read the prompt with the target (billed as prompt
    /// processing): whenever `auto` might draft with it at all, so that a later round never
    /// pays for catching the draft up on the whole prompt.
    /// In a session with two drafting models this is about the first (`Drafters::model`).
    pub fn wants_model_prefill(&self) -> bool {
        match self.strategy {
            Strategy::None => false,
            Strategy::Auto if self.active != 0 => {
                let mut first = self.clone_costs();
                first.switch_model();
                first.wants_model_prefill()
            }
            Strategy::Auto => {
                let optimistic = optimistic(self.cost.first_choice.mean(PRIOR_ACCEPT));
                let max = self.max_chain();
                self.fixed_costs || self.best_chain_rate(optimistic, max, 0.0, 0) > self.rate(0.0, 0.0, 1)
            }
            _ => true,
        }
    }

    /// A policy with this one's costs and what it learned (for what-if estimates).
    fn clone_costs(&self) -> Policy {
        let mut p = Policy::new(self.strategy.clone(), self.mode, self.max_verify);
        p.cost = self.cost.clone();
        p.rounds = self.rounds;
        p.model_fit = self.model_fit;
        p.lookup_fit = self.lookup_fit;
        p.other = self.other.clone();
        p.active = self.active;
        p.fixed_costs = self.fixed_costs;
        p
    }

    /// Forgets the lookup candidates still being judged: the history they continue changed
    /// (a new prompt, or a failed call rolled it back).
    pub fn forget_shadows(&mut self) {
        self.shadow = None;
        self.shadows.clear();
    }

    /// Builds this round's tree (root only when not speculating).
    pub fn draft(
        &mut self,
        d: Drafters<'_>,
        history: &[Token],
        lim: &Limits,
        sp: &SamplingParams,
        rng: &mut StdRng,
    ) -> Result<(DraftTree, bool)> {
        self.rounds += 1;
        self.shadow = None; // a failed round's candidate must not be judged against this one
        self.predicted = None;
        let mut tree = DraftTree::new(*history.last().unwrap_or(&0));
        let max_nodes = lim.max_nodes.min(self.max_verify.saturating_sub(1));
        if max_nodes == 0 || lim.max_depth == 0 {
            return Ok((tree, false));
        }
        let lim = Limits { max_nodes, max_depth: lim.max_depth };
        let used_model = match self.strategy.clone() {
            Strategy::None => false,
            Strategy::Auto => self.auto(d, history, &lim, sp, rng, &mut tree)?,
            fixed => {
                // Exact mode verifies chains only: the self-check measured chain-shaped batches.
                let fixed = match (fixed, self.exact()) {
                    (Strategy::Tree { depth, .. }, true) => Strategy::Chain(depth),
                    (Strategy::Static(s), true) => Strategy::Chain(s.depth()),
                    (s, _) => s,
                };
                let mut always = |_: ChainStep| true;
                let shape = match &fixed {
                    Strategy::Chain(g) => Shape::Chain { max_len: (*g).min(lim.max_depth), extend: &mut always },
                    Strategy::Tree { top_k, depth, nodes } => {
                        Shape::Dynamic { top_k: *top_k, depth: (*depth).min(lim.max_depth), nodes: *nodes }
                    }
                    Strategy::Static(s) => Shape::Static(s),
                    Strategy::None | Strategy::Auto => return Ok((tree, false)),
                };
                let req = Request { history, shape, max_nodes, sampling: sp, rng, alternatives: None };
                match (d.model, d.lookup) {
                    (Some(m), _) => {
                        m.propose(req, &mut tree)?;
                        true
                    }
                    (None, Some(l)) => {
                        l.propose(req, &mut tree)?;
                        false
                    }
                    (None, None) => false,
                }
            }
        };
        self.annotate(&mut tree);
        // What this round is expected to give, to be held against what it gives.
        self.predicted = (self.strategy == Strategy::Auto).then(|| {
            let draft_ms = if used_model {
                self.catch_up_ms(self.lag) + self.cost.draft_step_ms() * self.decodes as f64
            } else {
                0.0
            };
            (1.0 + tree.expected_accepted() as f64, draft_ms + self.cost.target.estimate(tree.len()))
        });
        Ok((tree, used_model))
    }

    /// Estimated acceptance of a node of `origin` with confidence `conf`.
    fn estimate(&self, origin: Origin, conf: f32) -> f32 {
        if self.fixed_costs {
            conf
        } else {
            self.cost.estimate(origin, conf)
        }
    }

    /// Sets every node's estimated acceptance from its origin's calibration.
    fn annotate(&self, tree: &mut DraftTree) {
        for n in &mut tree.nodes[1..] {
            n.accept_p = self.estimate(n.origin, n.conf);
        }
    }

    /// Expected tokens per ms of a round.
    fn rate(&self, expected_accepted: f32, draft_ms: f64, batch: usize) -> f64 {
        self.cost.rate(expected_accepted, draft_ms, batch)
    }

    /// Draft ms of a model chain of `len` tokens: the root's catch-up and one decode per
    /// drafted token (the last one's logits decide that the chain stops), priced at the
    /// per-step wall time measured on this session's rounds (decodes, sampling, bookkeeping),
    /// before that at the start-up probe's decode time.
    fn chain_ms(&self, len: usize) -> f64 {
        self.cost.draft_step_ms() * (len + 1) as f64
    }

    /// Extra draft ms of a root catch-up over `lag` tokens (the draft skipped rounds) beyond
    /// the one-token catch-up that [`Policy::chain_ms`] includes.
    fn catch_up_ms(&self, lag: usize) -> f64 {
        if lag > 1 {
            (self.cost.draft.estimate(lag) - self.cost.draft.estimate(1)).max(0.0)
        } else {
            0.0
        }
    }

    /// Best expected rate of a model chain at i.i.d. acceptance `a`, over lengths up to `max`,
    /// on top of `extra` expected tokens from `extra_nodes` free nodes (lookups).
    fn best_chain_rate(&self, a: f32, max: usize, extra: f32, extra_nodes: usize) -> f64 {
        self.best_chain_rate_after(a, max, extra, extra_nodes, 0.0)
    }

    /// [`Policy::best_chain_rate`] when the draft first needs `catch_up_ms` to read history
    /// it has not seen.
    fn best_chain_rate_after(&self, a: f32, max: usize, extra: f32, extra_nodes: usize, catch_up_ms: f64) -> f64 {
        let (mut reach, mut sum) = (1.0f32, 0.0f32);
        let mut best = 0.0f64;
        for g in 1..=max {
            reach *= a;
            sum += reach;
            best = best.max(self.rate(sum + extra, catch_up_ms + self.chain_ms(g), 1 + g + extra_nodes));
        }
        best
    }

    /// Whether the guard and the probe schedule allow a model-drafting round now.
    fn model_allowed(&self) -> bool {
        if self.fixed_costs {
            return true;
        }
        let probe = self.probing();
        let a = self.cost.first_choice.mean(PRIOR_ACCEPT);
        let optimistic = optimistic(a);
        let max = self.max_chain();
        let plain = self.rate(0.0, 0.0, 1);
        // A probe ignores how earlier drafting rounds went, so a bad start is re-tried.
        self.model_factor() * self.best_chain_rate(a, max, 0.0, 0) > plain
            || probe && self.best_chain_rate(optimistic, max, 0.0, 0) > plain
    }

    /// Realized / predicted time of drafting rounds (1 until some ran): how far the draft's
    /// and the verification's costs were off. Their tokens are the calibration's business.
    fn model_factor(&self) -> f64 {
        if self.fixed_costs {
            1.0
        } else {
            self.model_fit.factor(self.cost.target.estimate(2) + self.chain_ms(1), false)
        }
    }

    /// Realized / predicted rate of rounds that verified lookups only, tokens included: a
    /// lookup's confidence is a coarse key, and the buckets that look best are the ones picked.
    fn lookup_factor(&self) -> f64 {
        if self.fixed_costs {
            1.0
        } else {
            self.lookup_fit.factor(self.cost.target.estimate(2), true)
        }
    }

    /// Whether this round may try the draft at its optimistic acceptance: every 16th round, and
    /// every round until the draft's acceptance rests on some data (a session's first rounds;
    /// the draft read the prompt, so trying it then costs no catch-up). Only where drafting
    /// would pay at that optimistic acceptance, so a draft that cannot pay is never tried.
    fn probing(&self) -> bool {
        self.rounds % 16 == 0 || self.cost.first_choice.count() < EXPLORE_OBSERVATIONS
    }

    /// Lookup nodes worth verifying on their own: the best prefix of each candidate (fast mode:
    /// up to three branches; exact mode: the best chain), as (tokens, confidence, value); and
    /// the best candidate itself, for shadow evaluation.
    fn lookup_plan(&self, l: &mut LookupDraft, history: &[Token], lim: &Limits) -> (LookupPlan, Option<Shadow>) {
        let branches = if self.exact() { 1 } else { 3 };
        let mut out = Vec::new();
        let (mut nodes, mut value) = (0, 0.0f32);
        let k = self.lookup_factor();
        // A round's rate with `v` expected tokens from `n` lookup nodes, as lookup rounds have
        // turned out (a plain round is what the cost model says).
        let rate = |v: f32, n: usize| if n == 0 { self.rate(v, 0.0, 1) } else { k * self.rate(v, 0.0, 1 + n) };
        let cands = l.candidates(history);
        let shadow = cands.first().map(|c| (c.tokens.clone(), lookup::confidence(c), 0));
        for c in cands.into_iter().take(branches) {
            let conf = lookup::confidence(&c);
            let (mut reach, mut sum) = (1.0f32, 0.0f32);
            let (mut best_len, mut best_rate, mut best_sum) = (0, rate(value, nodes), 0.0);
            let max = c.tokens.len().min(lim.max_depth).min(lim.max_nodes.saturating_sub(nodes)).min(AUTO_MAX_LOOKUP);
            for len in 1..=max {
                reach *= self.estimate(Origin::Lookup(len - 1), conf);
                sum += reach;
                let r = rate(value + sum, nodes + len);
                if r > best_rate {
                    (best_len, best_rate, best_sum) = (len, r, sum);
                }
            }
            if best_len > 0 {
                nodes += best_len;
                value += best_sum;
                out.push((c.tokens[..best_len].to_vec(), conf, best_sum));
            }
        }
        (out, shadow)
    }

    /// `auto`: plain, lookup only, or a calibrated model chain (plus second choices and lookup
    /// branches where a wider batch pays). Returns whether the model drafted.
    fn auto(
        &mut self,
        d: Drafters<'_>,
        history: &[Token],
        lim: &Limits,
        sp: &SamplingParams,
        rng: &mut StdRng,
        tree: &mut DraftTree,
    ) -> Result<bool> {
        // The session creates a lookup proposer exactly when lookups are on.
        let (plan, shadow) = match d.lookup {
            Some(l) => self.lookup_plan(l, history, lim),
            None => (Vec::new(), None),
        };
        // With two drafting models, plan with the one whose best chain is worth more this round
        // (each judged by its own costs and calibration; one still unexplored at its
        // optimistic acceptance, as a single model is).
        let model = match (d.model, d.second) {
            (Some(first), Some(second)) => {
                self.two_models = true;
                self.pick_model([&*first, &*second], history, lim, &plan);
                Some(if self.active == 0 { first } else { second })
            }
            (first, None) => first,
            (None, second) => second,
        };
        let used = self.auto_tree(model, history, lim, sp, rng, tree, &plan)?;
        // Whatever part of the best candidate the tree verifies is judged by the verdict; the
        // rest by the tokens committed from now on (learning how long copies go on while only
        // their beginnings are verified).
        self.shadow = shadow.map(|(tokens, conf, _)| {
            let mut node = 0;
            let in_tree =
                tokens.iter().take_while(|&&t| tree.child_with(node, t).inspect(|&c| node = c).is_some()).count();
            (tokens, conf, in_tree)
        });
        Ok(used)
    }

    /// Makes the drafting model whose chain `auto` credits with the higher rate this round the
    /// active one (ties keep the current one).
    fn pick_model(&mut self, models: [&dyn ModelProposer; 2], history: &[Token], lim: &Limits, plan: &LookupPlan) {
        // Each model's credited rate, corrected by how many tokens its own rounds delivered
        // against their predictions: one model's calibration can be too kind where the other's
        // is not (a head's acceptance falls with depth faster than its confidences say).
        let (value, nodes) = plan_value(plan);
        let mine = self.model_rate(models[self.active], history, lim, value, nodes) * self.model_fit.token_factor();
        let my_lag = self.lag;
        self.switch_model();
        let theirs = self.model_rate(models[self.active], history, lim, value, nodes) * self.model_fit.token_factor();
        tracing::trace!(
            target: "adaspec::round",
            "models: #{} {mine:.5} tok/ms (lag {my_lag}), #{} {theirs:.5} tok/ms (lag {}, judged {:.0})",
            1 - self.active,
            self.active,
            self.lag,
            self.cost.first_choice.count()
        );
        if mine >= theirs {
            self.switch_model();
        }
    }

    /// The rate `auto` credits a model chain with this round (0 where the guard rules the model
    /// out): the best chain at the calibrated acceptance, corrected by how drafting rounds
    /// turned out; while probing, at least the best chain at the optimistic acceptance
    /// (a probe ignores how earlier drafting rounds went). Sets `lag`: the history tokens the
    /// model has not read, which it reads first in one batch.
    fn model_rate(
        &mut self,
        m: &dyn ModelProposer,
        history: &[Token],
        lim: &Limits,
        lookup_value: f32,
        lookup_nodes: usize,
    ) -> f64 {
        let max_len = AUTO_MAX_DEPTH.min(lim.max_depth).min(lim.max_nodes);
        if max_len == 0 || !self.model_allowed() {
            return 0.0;
        }
        // In exact mode the model chain replaces the lookup chain (no trees).
        let (extra, extra_nodes) = if self.exact() { (0.0, 0) } else { (lookup_value, lookup_nodes) };
        self.lag = m.lag(history);
        let share = if self.two_models { 1.0 / CATCH_UP_ROUNDS } else { 1.0 };
        let catch_up = share * self.catch_up_ms(self.lag);
        let a_bar = self.cost.first_choice.mean(PRIOR_ACCEPT);
        let rate = |a: f32| self.best_chain_rate_after(a, max_len, extra, extra_nodes, catch_up);
        let calibrated = self.model_factor() * rate(a_bar);
        if self.probing() {
            calibrated.max(rate(optimistic(a_bar)))
        } else {
            calibrated
        }
    }

    /// The tree of an `auto` round given its lookup plan; returns whether the model drafted.
    #[allow(clippy::too_many_arguments)]
    fn auto_tree(
        &mut self,
        model: Option<&mut dyn ModelProposer>,
        history: &[Token],
        lim: &Limits,
        sp: &SamplingParams,
        rng: &mut StdRng,
        tree: &mut DraftTree,
        plan: &LookupPlan,
    ) -> Result<bool> {
        let (lookup_value, lookup_nodes) = plan_value(plan);
        let lookup_k = if lookup_nodes > 0 { self.lookup_factor() } else { 1.0 };
        let without_model = lookup_k * self.rate(lookup_value, 0.0, 1 + lookup_nodes);
        let a_bar = self.cost.first_choice.mean(PRIOR_ACCEPT);
        let max_len = AUTO_MAX_DEPTH.min(lim.max_depth).min(lim.max_nodes);
        let use_model = match &model {
            Some(m) => {
                let rate = self.model_rate(&**m, history, lim, lookup_value, lookup_nodes);
                self.fixed_costs && rate > 0.0 || rate > without_model
            }
            None => false,
        };
        let Some(model) = model.filter(|_| use_model) else {
            for (tokens, conf, _) in plan {
                LookupDraft::insert(tree, tokens, *conf, lim.max_nodes.saturating_sub(tree.n_draft()));
            }
            return Ok(false);
        };

        // The chain: before each token, draft it only if some longer chain beats stopping,
        // judged from what is known then (the next token's confidence, the mean beyond).
        let greedy = sp.is_greedy();
        let (extra, extra_nodes) = if self.exact() { (0.0, 0) } else { (lookup_value, lookup_nodes) };
        let (mut reach, mut sum) = (1.0f32, 0.0f32);
        let this = &*self;
        let explore = this.variant.truncate_sampled_chains;
        let mut seen: Vec<f32> = Vec::new();
        let mut decodes = 1; // the root's catch-up
        let mut extend = |s: ChainStep| -> bool {
            if explore {
                decodes += usize::from(s.top_q.is_none());
                return true; // the biased variant drafts deep, then truncates (below)
            }
            let Some(q) = s.top_q else {
                let go = this.worth_decoding(s.drafted, reach, sum, extra, extra_nodes, max_len, a_bar);
                decodes += usize::from(go);
                return go;
            };
            seen.push(q);
            let a_next = this.estimate(Origin::Draft(0), q);
            let (go, _) = this.go_on(s.drafted, reach, sum, a_next, extra, extra_nodes, max_len, a_bar);
            if go {
                reach *= a_next;
                sum += reach;
            }
            go
        };
        let mut alts: Vec<Alternative> = Vec::new();
        let want_alts = greedy && !self.exact();
        let req = Request {
            history,
            shape: Shape::Chain { max_len, extend: &mut extend },
            max_nodes: lim.max_nodes,
            sampling: sp,
            rng,
            alternatives: want_alts.then_some(&mut alts),
        };
        model.propose(req, tree)?;
        self.decodes = decodes;
        self.top_qs.extend(seen);
        let surplus = self.top_qs.len().saturating_sub(MAX_TOP_QS);
        self.top_qs.drain(..surplus);
        self.annotate(tree);

        // Deterministic chains may be cut to their best prefix now that it is known; sampled
        // ones must not be (their tokens decided their fate) — except in the test variant.
        if greedy || self.variant.truncate_sampled_chains {
            let keep = self.best_prefix(tree, extra, extra_nodes);
            *tree = tree.restrict(&keep);
        }
        if want_alts {
            self.add_alternatives(tree, &alts, lim, extra, extra_nodes);
        }
        if self.exact() {
            // One chain only: the lookup chain replaces the model's if it is worth more.
            if let Some((tokens, conf, value)) = plan.first() {
                let model_rate = self.rate(tree.expected_accepted(), self.chain_ms(tree.n_draft()), tree.len());
                let lookup_rate = self.rate(*value, self.chain_ms(tree.n_draft()), 1 + tokens.len());
                if lookup_rate > model_rate && (greedy || tree.is_empty()) {
                    *tree = DraftTree::new(tree.nodes[0].token);
                    LookupDraft::insert(tree, tokens, *conf, lim.max_nodes);
                }
            }
        } else {
            for (tokens, conf, _) in plan {
                LookupDraft::insert(tree, tokens, *conf, lim.max_nodes.saturating_sub(tree.n_draft()));
            }
        }
        Ok(true)
    }

    /// Whether a chain of `drafted` tokens (reached with probability `reach`, `sum` expected
    /// accepted), its last one decoded, should draft one more whose acceptance is `a_next`:
    /// some longer chain (later tokens at `a_bar`) beats stopping. Also the rate of the better
    /// of the two.
    #[allow(clippy::too_many_arguments)]
    fn go_on(
        &self,
        drafted: usize,
        reach: f32,
        sum: f32,
        a_next: f32,
        extra: f32,
        extra_nodes: usize,
        max_len: usize,
        a_bar: f32,
    ) -> (bool, f64) {
        // Spent so far: the catch-up and one decode per drafted token.
        let now = self.rate(sum + extra, self.chain_ms(drafted), 1 + drafted + extra_nodes);
        let (mut r, mut acc, mut best) = (reach * a_next, sum + reach * a_next, 0.0f64);
        for len in drafted + 1..=max_len {
            best = best.max(self.rate(acc + extra, self.chain_ms(len), 1 + len + extra_nodes));
            r *= a_bar;
            acc += r;
        }
        (best > now, best.max(now))
    }

    /// Before decoding a chain's last drafted token (a decode only a further token needs):
    /// whether paying for it is expected to beat stopping here, over the next confidences seen
    /// on earlier rounds. Stopping undecoded leaves the draft one more token to catch up next
    /// round if the whole chain is accepted.
    #[allow(clippy::too_many_arguments)]
    fn worth_decoding(
        &self,
        drafted: usize,
        reach: f32,
        sum: f32,
        extra: f32,
        extra_nodes: usize,
        max_len: usize,
        a_bar: f32,
    ) -> bool {
        if self.fixed_costs || self.top_qs.len() < MIN_TOP_QS {
            return true;
        }
        let step = self.cost.draft_step_ms();
        let catch_up = (self.cost.draft.estimate(2) - self.cost.draft.estimate(1)).max(0.0);
        let undecoded = step * drafted as f64 + reach as f64 * catch_up;
        let stop = self.rate(sum + extra, undecoded, 1 + drafted + extra_nodes);
        let decode: f64 = self
            .top_qs
            .iter()
            .map(|&q| {
                let a_next = self.estimate(Origin::Draft(0), q);
                self.go_on(drafted, reach, sum, a_next, extra, extra_nodes, max_len, a_bar).1
            })
            .sum::<f64>()
            / self.top_qs.len() as f64;
        decode > stop
    }

    /// The chain prefix (node indices) with the best expected rate.
    fn best_prefix(&self, tree: &DraftTree, extra: f32, extra_nodes: usize) -> Vec<usize> {
        let chain: Vec<usize> = (1..tree.len()).collect();
        let drafted = chain.len();
        let (mut reach, mut sum) = (1.0f32, 0.0f32);
        let (mut best, mut best_len) = (self.rate(extra, self.chain_ms(drafted), 1 + extra_nodes), 0);
        for (k, &i) in chain.iter().enumerate() {
            reach *= tree.nodes[i].accept_p;
            sum += reach;
            let r = self.rate(sum + extra, self.chain_ms(drafted), 2 + k + extra_nodes);
            if r > best {
                (best, best_len) = (r, k + 1);
            }
        }
        chain[..best_len].to_vec()
    }

    /// Adds the draft's second choices below kept chain nodes, most valuable first, while a
    /// wider batch raises the expected rate.
    fn add_alternatives(
        &self,
        tree: &mut DraftTree,
        alts: &[Alternative],
        lim: &Limits,
        extra: f32,
        extra_nodes: usize,
    ) {
        let draft_ms = self.chain_ms(tree.n_draft());
        // Map each alternative's parent (an index in the unrestricted chain) to the kept tree:
        // the kept chain is a prefix, so chain node k keeps index k.
        let mut reach = vec![1.0f32; tree.len()];
        for i in 1..tree.len() {
            reach[i] = reach[tree.nodes[i].parent] * tree.nodes[i].accept_p;
        }
        let mut cands: Vec<(usize, Token, f32, f32)> = alts
            .iter()
            .filter(|a| a.parent < tree.len())
            .map(|a| {
                let conf = a.logq.exp();
                let v = reach[a.parent] * self.estimate(Origin::Draft(1), conf);
                (a.parent, a.token, a.logq, v)
            })
            .collect();
        cands.sort_by(|a, b| b.3.total_cmp(&a.3));
        let mut sum = tree.expected_accepted() + extra;
        let mut best = self.rate(sum, draft_ms, tree.len() + extra_nodes);
        for (parent, token, logq, v) in cands {
            if tree.n_draft() + extra_nodes >= lim.max_nodes {
                break;
            }
            let r = self.rate(sum + v, draft_ms, tree.len() + 1 + extra_nodes);
            if r > best {
                best = r;
                sum += v;
                let c = tree.add(parent, token, logq, 0.0, Proposal::Deterministic);
                tree.nodes[c].origin = Origin::Draft(1);
                tree.nodes[c].accept_p = self.estimate(Origin::Draft(1), tree.nodes[c].conf);
            }
        }
    }

    /// Learns from a verified round: acceptance per origin, verification cost, realized rate.
    pub fn learn(&mut self, r: &RoundRecord<'_>) {
        let RoundRecord { tree, verdict, committed, used_model, draft_timings, draft_ms, verify_ms, round_ms } = *r;
        let mut on_path = vec![false; tree.len()];
        on_path[0] = true;
        for &i in &verdict.accepted {
            on_path[i] = true;
        }
        let shadow = self.shadow.take();
        if self.fixed_costs {
            return;
        }
        // A deterministic proposal x is accepted with probability p(x), the chance that the
        // target's own next token is x: the committed tokens tell, at no cost. A candidate's
        // later tokens are judged by the following rounds' tokens (a plain round commits one),
        // so the acceptance of long lookups is learned while none is verified.
        if let Some((tokens, conf, verified)) = shadow {
            if self.shadows.len() >= MAX_SHADOWS {
                self.shadows.remove(0);
            }
            self.shadows.push((tokens, conf, 0, verified));
        }
        for (tokens, conf, followed, from) in &mut self.shadows {
            for &t in committed {
                let Some(&x) = tokens.get(*followed) else { break };
                if *followed >= *from {
                    self.cost.calibration_mut(Origin::Lookup(*followed)).observe(*conf, x == t);
                }
                *followed = if x == t { *followed + 1 } else { usize::MAX };
            }
        }
        self.shadows.retain(|(tokens, _, followed, _)| *followed < tokens.len());
        for i in 1..tree.len() {
            let n = &tree.nodes[i];
            if on_path[n.parent] {
                self.cost.calibration_mut(n.origin).observe(n.conf, on_path[i]);
            }
        }
        self.cost.target.observe(tree.len(), verify_ms);
        for &(b, ms) in draft_timings {
            self.cost.draft.observe(b, ms);
        }
        if used_model && self.lag <= 2 {
            self.cost.observe_draft_round(draft_timings.len().max(1), draft_ms);
        }
        if let Some(p) = self.predicted.take() {
            let tokens = verdict.accepted.len() + 1;
            if used_model {
                self.model_fit.observe(p, tokens, round_ms);
            } else if tree.n_draft() > 0 {
                self.lookup_fit.observe(p, tokens, round_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::BatchCost;

    /// `auto` on a curve where drafting pays: verification nearly flat, a draft step a fifth of
    /// a target decode, the draft's tokens accepted 80% of the time.
    fn drafting_pays() -> Policy {
        let mut p = Policy::new(Strategy::Auto, NumericMode::Fast, 16);
        for (b, ms) in [(1, 100.0), (2, 102.0), (3, 104.0), (4, 110.0), (6, 120.0), (8, 140.0)] {
            p.cost.target.observe(b, ms);
        }
        p.cost.draft.observe(1, 20.0);
        for i in 0..40 {
            p.cost.first_choice.observe(0.85, i % 5 != 0);
        }
        p.rounds = 1; // not a probing round
        p
    }

    /// Feeds one drafting round of three draft tokens whose verification took `slowdown` times
    /// its predicted time (the draft as predicted), none accepted.
    fn slow_round(p: &mut Policy, slowdown: f64) {
        let mut tree = DraftTree::new(1);
        let mut parent = 0;
        for t in 2..5 {
            parent = tree.add(parent, t, -0.1, 0.0, Proposal::Deterministic);
            tree.nodes[parent].conf = 0.85;
        }
        let predicted_ms = p.chain_ms(3) + p.cost.target.estimate(4);
        p.predicted = Some((3.4, predicted_ms));
        p.lag = 1;
        let verdict = Verdict { accepted: Vec::new(), bonus: 9 };
        p.learn(&RoundRecord {
            tree: &tree,
            verdict: &verdict,
            committed: &[9],
            used_model: true,
            draft_timings: &[(1, 20.0); 4],
            draft_ms: p.chain_ms(3),
            verify_ms: p.cost.target.estimate(4),
            round_ms: predicted_ms * slowdown,
        });
        p.rounds += 1;
        if p.rounds % 16 == 0 {
            p.rounds += 1;
        }
    }

    #[test]
    fn one_slow_drafting_round_does_not_switch_the_draft_off() {
        let mut p = drafting_pays();
        assert!(p.model_allowed());
        slow_round(&mut p, 3.0);
        assert!(p.model_allowed(), "factor {}", p.model_factor());
    }

    #[test]
    fn drafting_rounds_that_keep_running_slow_outvote_the_cost_model() {
        let mut p = drafting_pays();
        for _ in 0..12 {
            slow_round(&mut p, 4.0);
        }
        let k = p.model_factor();
        assert!(k < 0.7, "factor {k}");
        assert!(!p.model_allowed(), "drafting is 3x slower than predicted: plain decoding pays");
        // A probe round still tries the draft (the machine may have been busy).
        p.rounds = 32;
        assert!(p.model_allowed());
    }

    #[test]
    fn a_chain_stops_before_a_decode_only_unlikely_tokens_would_use() {
        let mut p = drafting_pays();
        let a_bar = p.cost.first_choice.mean(PRIOR_ACCEPT);
        // Too few confidences seen: decode, as before.
        assert!(p.worth_decoding(4, 0.2, 2.0, 0.0, 0, 12, a_bar));
        // The draft has mostly been unsure at its chain steps: after a long chain whose end is
        // unlikely to be reached, the next token's decode is not worth its cost...
        p.top_qs = vec![0.05; 32];
        assert!(!p.worth_decoding(6, 0.05, 2.5, 0.0, 0, 12, a_bar));
        // ...while early in a chain a sure draft's next token is.
        p.top_qs = vec![0.95; 32];
        assert!(p.worth_decoding(1, 0.9, 0.9, 0.0, 0, 12, a_bar));
    }

    #[test]
    fn the_draft_step_cost_is_learned_from_drafting_rounds() {
        let mut p = drafting_pays();
        assert!((p.cost.draft_step_ms() - 20.0).abs() < 1e-9);
        for _ in 0..30 {
            // Three tokens in 160 ms: four steps (catch-up + one per token) of 40 ms.
            p.cost.observe_draft_round(4, 160.0);
        }
        let step = p.cost.draft_step_ms();
        assert!((step - 40.0).abs() < 1.0, "{step}");
        assert!((p.chain_ms(3) - 4.0 * step).abs() < 1e-9);
    }

    /// A drafting model for the choice between two: only its lag (the history tokens it has
    /// not read) matters there.
    struct Behind(usize);

    impl Proposer for Behind {
        fn name(&self) -> &'static str {
            "behind"
        }
        fn reset(&mut self) {}
        fn rollback(&mut self, _: usize) {}
        fn prefill(&mut self, _: &[Token]) -> Result<()> {
            Ok(())
        }
        fn propose(&mut self, _: Request<'_>, _: &mut DraftTree) -> Result<()> {
            Ok(())
        }
        fn accept(&mut self, _: &DraftTree, _: &[usize], _: usize, _: usize) {}
    }

    impl ModelProposer for Behind {
        fn lag(&self, _: &[Token]) -> usize {
            self.0
        }
        fn take_timings(&mut self) -> Vec<(usize, f64)> {
            Vec::new()
        }
    }

    #[test]
    fn with_two_drafting_models_each_round_plans_with_the_one_that_pays_more() {
        // Model 0: the 20 ms draft of `drafting_pays`, accepted 80%. Model 1: a 2 ms head,
        // not yet judged (probing at its optimistic acceptance).
        let mut p = drafting_pays();
        let mut head = BatchCost::default();
        head.observe(1, 2.0);
        p.set_second_model_cost(head.clone());
        let lim = Limits { max_nodes: 12, max_depth: 12 };
        let (m0, m1) = (Behind(1), Behind(1));
        p.pick_model([&m0, &m1], &[1, 2, 3], &lim, &Vec::new());
        assert_eq!(p.active_model(), 1, "the cheap head, at its optimistic acceptance");
        assert!((p.cost.draft.estimate(1) - 2.0).abs() < 1e-9, "its costs are the ones in use");
        // The head turns out to be rarely right: the draft model is the better bet again, with
        // its own costs and calibration intact.
        for _ in 0..200 {
            p.cost.first_choice.observe(0.85, false);
        }
        p.pick_model([&m0, &m1], &[1, 2, 3], &lim, &Vec::new());
        assert_eq!(p.active_model(), 0);
        assert!((p.cost.draft.estimate(1) - 20.0).abs() < 1e-9);
        assert!(p.cost.first_choice.mean(PRIOR_ACCEPT) > 0.7);
        // What each learned travels to a later session of the same setup.
        let mut q = Policy::new(Strategy::Auto, NumericMode::Fast, 16);
        q.adopt(p.learned().unwrap());
        q.switch_model();
        assert!(q.cost.first_choice.mean(PRIOR_ACCEPT) < 0.1, "the head's calibration");
        // Whether the draft model reads the prompt is decided by its own costs, whichever model
        // is active: a draft too slow to ever pay does not, next to a head that would.
        let mut r = drafting_pays();
        r.cost.draft = BatchCost::default();
        r.cost.draft.observe(1, 1000.0);
        r.set_second_model_cost(head);
        assert!(!r.wants_model_prefill());
        r.switch_model();
        assert!(r.best_chain_rate(0.9, 4, 0.0, 0) > r.rate(0.0, 0.0, 1), "the head would pay");
        assert!(!r.wants_model_prefill());
    }

    #[test]
    fn a_model_that_sat_out_is_not_priced_out_by_its_catch_up() {
        // The draft model (accepted 80%, 20 ms a step, 10 ms more per token it reads in one
        // batch) sat out 40 rounds while a head that is right 10% of the time drafted.
        let mut p = drafting_pays();
        p.cost.draft.observe(40, 410.0);
        let mut head = BatchCost::default();
        head.observe(1, 2.0);
        p.set_second_model_cost(head);
        p.switch_model();
        for i in 0..200 {
            p.cost.first_choice.observe(0.85, i % 10 == 0);
        }
        let lim = Limits { max_nodes: 12, max_depth: 12 };
        let plan = Vec::new();
        p.two_models = true;
        p.pick_model([&Behind(40), &Behind(1)], &[1, 2, 3], &lim, &plan);
        assert_eq!(p.active_model(), 0, "the catch-up is spread over the rounds it buys");
        // Charged to one round, the same catch-up would keep the head in charge for good.
        p.two_models = false;
        p.switch_model();
        p.pick_model([&Behind(40), &Behind(1)], &[1, 2, 3], &lim, &plan);
        assert_eq!(p.active_model(), 1);
    }
}
