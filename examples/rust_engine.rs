//! The engine used directly from Rust: load a target and a draft, stream a greedy
//! speculative generation to stdout, print the stats.
//!
//! cargo run --release --example rust_engine -- TARGET.gguf DRAFT.gguf "def fibonacci(n):" [MAX_TOKENS]

use std::io::Write;
use std::sync::Arc;

use adaspec::{GenerateParams, Model, ModelParams, Prompt, Session, SessionParams, Strategy};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, draft, prompt, rest @ ..] = &args[..] else {
        anyhow::bail!("usage: rust_engine TARGET.gguf DRAFT.gguf PROMPT [MAX_TOKENS]");
    };
    let max_tokens = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(64);

    // One loaded model can serve many sessions: share it as Arc<Model>.
    let target = Arc::new(Model::load(target, &ModelParams::default())?);
    let draft = Arc::new(Model::load(draft, &ModelParams::default())?);
    adaspec::check_vocab_compat(&target, &draft)?;

    let params = SessionParams { strategy: Strategy::Auto, ..Default::default() };
    let mut session = Session::new(target, Some(draft), params)?;
    let gen = GenerateParams { max_tokens, ..Default::default() };
    let mut stdout = std::io::stdout();
    let out = session.generate(&Prompt::Text(prompt.clone()), &gen, &mut |_tokens, piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
        true // false would stop generation
    })?;
    let s = &out.stats;
    eprintln!(
        "\n{} tokens in {} rounds: {:.2} tokens/pass, acceptance {:.2}, {:.1} tok/s ({:?})",
        s.tokens, s.rounds, s.tokens_per_pass, s.acceptance_rate, s.tokens_per_second, out.stop_reason
    );
    Ok(())
}
