//! Generation helpers of the engine tests: greedy fixed-length runs on the shared prompts.

use adaspec::{GenerateParams, Prompt, Session};

/// Greedy, exactly `max_tokens` (end-of-generation ignored).
pub fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams { max_tokens, ignore_eog: true, ..Default::default() }
}

/// Generates from a text prompt; panics on error.
pub fn run(s: &mut Session, prompt: &str, gp: &GenerateParams) -> adaspec::Generation {
    s.generate(&Prompt::Text(prompt.into()), gp, &mut |_, _| true).expect("generate")
}

pub const PROMPTS: [&str; 3] =
    ["def fibonacci(n):\n    return", "The quick brown fox jumps over", "Once upon a time, in a land far away,"];
