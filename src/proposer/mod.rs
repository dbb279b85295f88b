//! Proposers: what puts draft tokens into a round's tree. A separate draft model and a
//! feature-level head (chains, EAGLE-2 dynamic trees, static trees; [`shapes`]) and n-gram
//! lookups in the history.
//!
//! A proposer only proposes: it never verifies, never commits to the session's history and
//! never decides on its own whether speculation pays (that is the policy's job). Under sampling
//! it must record every sampled token's proposal distribution ([`crate::tree::Proposal`]) and
//! must never drop a sampled token after it was drawn (SPEC §3).

pub mod fspad;
pub mod head;
pub mod lookup;
pub mod model;
mod shapes;

use rand::rngs::StdRng;

use crate::backend::Token;
use crate::error::Result;
use crate::sampling::SamplingParams;
use crate::tree::{DraftTree, StaticShape};

pub use fspad::FspadDraft;
pub use head::HeadDraft;
pub use lookup::LookupDraft;
pub use model::ModelDraft;

/// What the draft knows before it chooses its next chain token: the policy's "draft one more?"
/// question is answered from this alone, so under sampling the decision never depends on the
/// token it leads to.
#[derive(Debug, Clone, Copy)]
pub struct ChainStep {
    /// Chain tokens drafted so far.
    pub drafted: usize,
    /// The draft's largest probability at the node the next token would hang below; `None`
    /// before the last drafted token is decoded: would another token be wanted at all, given
    /// only what is known before paying for the decode that would tell its confidence?
    pub top_q: Option<f32>,
}

/// The shape a model-like proposer drafts this round.
pub enum Shape<'a> {
    /// A chain below the root of up to `max_len` tokens; `extend` is asked before each token
    /// (with its confidence) and before each decode a further token would need (without).
    Chain { max_len: usize, extend: &'a mut dyn FnMut(ChainStep) -> bool },
    /// EAGLE-2: top-`top_k` children per frontier node for `depth` levels, best `nodes` kept.
    Dynamic { top_k: usize, depth: usize, nodes: usize },
    /// A fixed tree of child-rank paths.
    Static(&'a StaticShape),
}

/// A draft token that was not put in the tree but could be: the draft's second choice below
/// a chain node (greedy only; the policy adds it when a wider tree pays).
#[derive(Debug, Clone, Copy)]
pub struct Alternative {
    pub parent: usize,
    pub token: Token,
    pub logq: f32,
}

/// One round's request to a proposer.
pub struct Request<'a> {
    /// The committed history; its last token is the tree's root.
    pub history: &'a [Token],
    pub shape: Shape<'a>,
    /// Most draft (non-root) nodes this round: free KV cells, the verification cap, budget.
    pub max_nodes: usize,
    pub sampling: &'a SamplingParams,
    pub rng: &'a mut StdRng,
    /// Collect [`Alternative`]s (greedy chains only).
    pub alternatives: Option<&'a mut Vec<Alternative>>,
}

/// A source of draft tokens with its own state (a KV cache, an index) kept in step with the
/// session's committed history.
pub trait Proposer {
    /// Short name for logs and reports.
    fn name(&self) -> &'static str;
    /// Forgets everything (new conversation).
    fn reset(&mut self);
    /// The history was cut to its first `len` tokens (later tokens may change): drop state
    /// beyond them and any per-round leftovers. Also the recovery path after a failed round.
    fn rollback(&mut self, len: usize);
    /// Reads `history` ahead of the first round (prompt processing), if the proposer needs to.
    fn prefill(&mut self, history: &[Token]) -> Result<()>;
    /// Adds draft nodes to `tree` (whose root is the last history token).
    fn propose(&mut self, req: Request<'_>, tree: &mut DraftTree) -> Result<()>;
    /// After verification: `accepted` are the accepted nodes (root's child first); `n_commit`
    /// tokens (a prefix of the accepted tokens and the bonus) join a history of `n_before`.
    fn accept(&mut self, tree: &DraftTree, accepted: &[usize], n_commit: usize, n_before: usize);
}

/// A proposer that runs a model each draft step (a draft model or a head): the policy plans it
/// with its measured step cost and its catch-up before a round.
pub trait ModelProposer: Proposer {
    /// Entries it must decode at this history before drafting (the root's included).
    fn lag(&self, history: &[Token]) -> usize;
    /// (batch size, ms) of its decodes since the last call.
    fn take_timings(&mut self) -> Vec<(usize, f64)>;
}

/// A feature-level head proposer, whatever its kind (`eagle3` through llama.cpp,
/// FSPAD-family through its own graph): what the session needs beyond a [`ModelProposer`].
pub trait FeatureHead: ModelProposer + Send {
    /// Positions whose target features the head holds: equal to the tokens of the target's
    /// cache between rounds.
    fn features_len(&self) -> usize;
    /// Identifies the head for the per-process cost cache.
    fn cost_key(&self) -> String;
    /// Times head calls per batch size: the curve `auto` plans head drafting with.
    fn measure_costs(&mut self, sizes: &[usize]) -> Result<crate::cost::BatchCost>;
    fn as_model(&mut self) -> &mut dyn ModelProposer;
    fn as_proposer(&mut self) -> &mut dyn Proposer;
}
