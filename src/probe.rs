//! Start-up measurements on a context: decode time per batch size (the cost curve `auto`
//! plans with) and the exact-mode self-check (the largest verification batch whose logits are
//! bit-identical to one-token decoding, SPEC §7). Both leave the cache empty.

use std::time::Instant;

use crate::backend::{decode_span, ms_since, Batch, Context, Model, Token};
use crate::cost::BatchCost;
use crate::cpu_kernels::KernelPlan;
use crate::error::Result;

/// `n` tokens of fixed text (repeated), tokenized by `model`.
pub fn probe_tokens(model: &Model, n: usize) -> Vec<Token> {
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

/// Largest batch size whose reference-kernel time is measured.
const REFERENCE_MAX_BATCH: usize = 8;

/// Times one decode per batch size on scratch positions (warm-up first); leaves the cache empty.
/// Where the context can switch CPU kernels (fast mode), times both the fast and the reference
/// kernels, installs the cheaper per size as the context's [`KernelPlan`] and returns that
/// curve.
pub fn measure_batch_costs(
    ctx: &mut Context,
    batch: &mut Batch,
    probe: &[Token],
    sizes: &[usize],
) -> Result<BatchCost> {
    let mut cost = BatchCost::default();
    let switchable = ctx.kernels_switchable();
    let prefix = 8.min(probe.len());
    // Only sizes that fit the context and one decode call.
    let sizes: Vec<usize> = sizes.iter().copied().filter(|&b| b <= ctx.n_batch() && prefix + b < ctx.n_ctx()).collect();
    let max = sizes.iter().copied().max().unwrap_or(1);
    ctx.set_kernel_plan(KernelPlan::default());
    ctx.clear();
    decode_span(ctx, batch, &probe[..prefix], 0, false)?;
    let run = |ctx: &mut Context, batch: &mut Batch, b: usize| -> Result<f64> {
        ctx.seq_rm(0, prefix as i32, -1);
        batch.clear();
        for j in 0..b {
            batch.add(probe[(prefix + j) % probe.len()], (prefix + j) as i32, &[0], true)?;
        }
        let t = Instant::now();
        ctx.decode(batch)?;
        Ok(ms_since(t))
    };
    run(ctx, batch, 1)?;
    // Two interleaved passes, keeping each size's faster run, so a moment of machine noise
    // does not skew one batch size (or one kernel set) against the others. Each measurement is
    // the second of two decodes in a row: the first rebuilds llama.cpp's graph for the new
    // shape (several ms, which would make one-token decoding look dearer than it is when
    // rounds of the same shape follow each other).
    let twice = |ctx: &mut Context, batch: &mut Batch, b: usize| -> Result<f64> {
        run(ctx, batch, b)?;
        run(ctx, batch, b)
    };
    let mut fast = vec![f64::INFINITY; sizes.len()];
    let mut reference = vec![f64::INFINITY; sizes.len()];
    for _ in 0..2 {
        for (k, &b) in sizes.iter().enumerate() {
            ctx.set_kernel_plan(KernelPlan::default());
            fast[k] = fast[k].min(twice(ctx, batch, b)?);
            // The reference kernels only ever win at small batches.
            if switchable && b > 1 && b <= REFERENCE_MAX_BATCH {
                ctx.set_kernel_plan(KernelPlan::reference_up_to(max));
                reference[k] = reference[k].min(twice(ctx, batch, b)?);
            }
        }
    }
    let pairs = |v: &[f64]| sizes.iter().copied().zip(v.iter().copied()).collect::<Vec<_>>();
    let plan = if switchable {
        KernelPlan::from_measurements(&pairs(&fast), &pairs(&reference))
    } else {
        KernelPlan::default()
    };
    for (k, &b) in sizes.iter().enumerate() {
        cost.observe(b, if plan.reference_for(b) { reference[k] } else { fast[k] });
    }
    ctx.set_kernel_plan(plan);
    ctx.clear();
    Ok(cost)
}

/// The largest chain batch (root + draft tokens, at most `max_batch`) whose logits are
/// bit-identical to decoding the same tokens one at a time, checked in the states a session
/// meets: a short prefix, and a prefix past 512 cells (llama.cpp's n_kv steps) whose cache has
/// holes left by rolled-back tree cells (needs two sequence ids). Never less than 1. Leaves
/// the cache empty.
pub fn exact_cap(ctx: &mut Context, batch: &mut Batch, model: &Model, max_batch: usize) -> Result<usize> {
    let long = 600.min(ctx.n_ctx().saturating_sub(max_batch + 16));
    let probe = probe_tokens(model, long.max(8) + max_batch);
    let mut cap = max_batch;
    for prefix in [8, long] {
        if prefix < 8 || cap <= 1 {
            continue;
        }
        ctx.clear();
        if prefix > 8 && ctx.n_seq_max() > 1 {
            // Half the prefix, a 7-cell "tree branch" in seq 1 that is rolled back, the rest:
            // the freed cells are a hole in the middle of the cache that later batches fill.
            let half = prefix / 2;
            decode_span(ctx, batch, &probe[..half], 0, false)?;
            ctx.seq_cp(0, 1, -1, -1);
            batch.clear();
            for (j, &t) in probe[..7].iter().enumerate() {
                batch.add(t, (half + j) as i32, &[1], false)?;
            }
            ctx.decode(batch)?;
            decode_span(ctx, batch, &probe[half..prefix], half, false)?;
            ctx.seq_rm(1, -1, -1);
        } else {
            decode_span(ctx, batch, &probe[..prefix], 0, false)?;
        }
        cap = cap.min(bit_identical_up_to(ctx, batch, &probe[prefix..prefix + max_batch], prefix)?);
    }
    ctx.clear();
    Ok(cap.max(1))
}

/// With the cache holding `start` tokens, the largest b <= tokens.len() for which one batch of
/// tokens[..b] gives the same logits bits as decoding them one by one. Restores the cache.
fn bit_identical_up_to(ctx: &mut Context, batch: &mut Batch, tokens: &[Token], start: usize) -> Result<usize> {
    let mut reference: Vec<Vec<f32>> = Vec::new();
    for (j, &t) in tokens.iter().enumerate() {
        batch.clear();
        batch.add(t, (start + j) as i32, &[0], true)?;
        ctx.decode(batch)?;
        reference.push(ctx.logits(0)?.to_vec());
    }
    ctx.seq_rm(0, start as i32, -1);
    let mut cap = 1;
    for b in 2..=tokens.len() {
        batch.clear();
        for (j, &t) in tokens.iter().take(b).enumerate() {
            batch.add(t, (start + j) as i32, &[0], true)?;
        }
        ctx.decode(batch)?;
        let same = (0..b)
            .all(|j| ctx.logits(j).is_ok_and(|l| l.iter().zip(&reference[j]).all(|(a, r)| a.to_bits() == r.to_bits())));
        ctx.seq_rm(0, start as i32, -1);
        if !same {
            break;
        }
        cap = b;
    }
    Ok(cap)
}
