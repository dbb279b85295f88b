//! What a generation returns: tokens, text, why it stopped, and its counters and timings.

use crate::backend::Token;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    Eog,
    StopString,
    Callback,
    /// The context window is full (the text so far is returned).
    ContextFull,
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

impl Stats {
    /// Fills the derived rates from the counters.
    pub(crate) fn finish(&mut self, gen_ms: f64) {
        self.tokens_per_second = if gen_ms > 0.0 { self.tokens as f64 * 1e3 / gen_ms } else { 0.0 };
        self.acceptance_rate =
            if self.draft_proposed > 0 { self.draft_accepted as f64 / self.draft_proposed as f64 } else { 0.0 };
        self.tokens_per_pass = if self.rounds > 0 { self.tokens as f64 / self.rounds as f64 } else { 0.0 };
    }
}
