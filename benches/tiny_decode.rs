//! Decoding speed of adaspec's own engine on the generated tiny models (no downloads): for each
//! architecture, writes the tiny pair with `adaspec::tiny_model`, loads the target and decodes
//! 300 tokens greedily with `Strategy::None` (target alone, end-of-generation ignored), a few
//! times. Prints a table for people and one `{"bench":"tiny_decode",...}` JSON line for tools.
//!
//! `cargo bench --bench tiny_decode` (env: TINY_DECODE_RUNS=5, TINY_DECODE_TOKENS=300,
//! TINY_DECODE_THREADS=0 = all cores). This replaces the wall-clock assertion that used to sit in
//! tests/tiny_model.rs: speed is reported here, never asserted by a test.

use std::sync::Arc;
use std::time::Instant;

use adaspec::tiny_model::{write_tiny_pair, TinyArch, DEFAULT_DRAFT_NOISE};
use adaspec::{GenerateParams, Model, ModelParams, NumericMode, Prompt, Session, SessionParams, Strategy};
use anyhow::Context;

const PROMPT: &str = "The quick brown fox jumps over the lazy dog. Once upon a time";

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?}: expected a whole number")),
        Err(_) => Ok(default),
    }
}

#[derive(serde::Serialize)]
struct Row {
    arch: String,
    tokens: usize,
    runs: usize,
    threads: i32,
    median_tokens_per_second: f64,
    min_tokens_per_second: f64,
    max_tokens_per_second: f64,
    /// Median wall time of one generate call (prompt included), milliseconds.
    median_wall_ms: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let runs = env_usize("TINY_DECODE_RUNS", 5)?.max(1);
    let tokens = env_usize("TINY_DECODE_TOKENS", 300)?.max(1);
    let threads = i32::try_from(env_usize("TINY_DECODE_THREADS", 0)?).context("TINY_DECODE_THREADS is too large")?;
    let dir = std::env::temp_dir().join(format!("adaspec-bench-tiny-decode-{}", std::process::id()));
    let mut rows = Vec::new();
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let (target_path, _draft_path) = write_tiny_pair(&dir.join(format!("{arch:?}")), arch, DEFAULT_DRAFT_NOISE, 7)
            .with_context(|| format!("writing the tiny {arch:?} pair under {}", dir.display()))?;
        let target = Arc::new(Model::load(&target_path, &ModelParams::default())?);
        let params = SessionParams {
            n_ctx: 1024,
            n_threads: threads,
            strategy: Strategy::None,
            mode: NumericMode::Fast,
            ..Default::default()
        };
        let mut session = Session::new(target, None, params)?;
        let gp = GenerateParams { max_tokens: tokens, ignore_eog: true, ..Default::default() };
        let prompt = Prompt::Text(PROMPT.into());
        // One warm-up generation, not counted.
        session.generate(&prompt, &gp, &mut |_, _| true)?;
        let (mut tps, mut wall) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            session.reset();
            let t = Instant::now();
            let g = session.generate(&prompt, &gp, &mut |_, _| true)?;
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(g.stats.tokens == tokens, "{arch:?}: generated {} of {tokens} tokens", g.stats.tokens);
            tps.push(g.stats.tokens_per_second);
        }
        let (min, max) = tps.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        rows.push(Row {
            arch: format!("{arch:?}").to_lowercase(),
            tokens,
            runs,
            threads,
            median_tokens_per_second: median(&mut tps),
            min_tokens_per_second: min,
            max_tokens_per_second: max,
            median_wall_ms: median(&mut wall),
        });
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!("tiny_decode: greedy target alone (Strategy::None), {tokens} tokens, {runs} runs, threads {threads}");
    println!("| arch | tok/s median | min | max | wall ms median |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.arch, r.median_tokens_per_second, r.min_tokens_per_second, r.max_tokens_per_second, r.median_wall_ms
        );
    }
    println!("{}", serde_json::json!({ "bench": "tiny_decode", "results": rows }));
    Ok(())
}
