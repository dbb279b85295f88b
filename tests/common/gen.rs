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

/// A nearly bigram tiny target of `arch` with `n_layer` layers (small block outputs: learnable
/// by a small head in seconds) written to `dir/bigram-target.gguf`, with 160 sampled continuations of
/// GSM8K prompts as training data ([`sampled_continuations`]) and their token counts.
#[cfg(feature = "train")]
pub fn bigram_target_data(
    arch: adaspec::tiny_model::TinyArch,
    n_layer: usize,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::sync::Arc<adaspec::Model>, Vec<adaspec::train::data::Example>, Vec<u64>) {
    use adaspec::tiny_model::{write_tiny_model, TinyModelConfig};
    use adaspec::train::data::{load_examples, BadLines, TokenizeOptions};
    let path = dir.join("bigram-target.gguf");
    let cfg = TinyModelConfig { arch, n_layer, seed: 3, block_scale: 0.05, ..Default::default() };
    write_tiny_model(&path, &cfg).unwrap();
    let target = std::sync::Arc::new(adaspec::Model::load(&path, &adaspec::ModelParams::default()).unwrap());
    let data = [std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gsm8k/train.jsonl")];
    let opts = TokenizeOptions { chat: false, max_len: 512, ..Default::default() };
    let (prompts, _) = load_examples(&target, &data, &opts, BadLines::Stop).unwrap();
    let examples = sampled_continuations(&target, &prompts, 160);
    let mut freq = vec![0u64; target.n_vocab()];
    for e in &examples {
        for &t in &e.tokens {
            freq[t as usize] += 1;
        }
    }
    (path, target, examples, freq)
}
