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

/// Training sequences for a tiny target: the first `n` prompts of `examples` (cut to 24
/// tokens) with 48 tokens the target samples after each (temperature 1.5, top-k 4, seed i),
/// so the data covers what the sampling tests draw.
#[cfg(feature = "train")]
pub fn sampled_continuations(
    target: &std::sync::Arc<adaspec::Model>,
    examples: &[adaspec::train::data::Example],
    n: usize,
) -> Vec<adaspec::train::data::Example> {
    use adaspec::{SessionParams, Strategy};
    let sp = SessionParams { n_ctx: 1024, n_threads: 2, strategy: Strategy::None, ..Default::default() };
    let mut gen = Session::new(target.clone(), None, sp).unwrap();
    examples
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, e)| {
            let prompt = e.tokens[..e.prompt_len.min(24)].to_vec();
            gen.reset();
            let sampling = adaspec::SamplingParams { temperature: 1.5, top_k: 4, seed: i as u64, ..Default::default() };
            let gp = GenerateParams { max_tokens: 48, sampling, ignore_eog: true, ..Default::default() };
            let g = gen.generate(&Prompt::Tokens(prompt.clone()), &gp, &mut |_, _| true).unwrap();
            adaspec::train::data::Example { prompt_len: prompt.len(), tokens: [prompt, g.tokens].concat() }
        })
        .collect()
}
