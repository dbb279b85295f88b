//! What a feature-level head costs on this machine, as fractions of one target decode:
//! (1) collecting the target features (`cb_eval` tap) on every target decode, B = 1 and 4;
//! (2) one head draft step (B = 1..8 entries). The numbers behind docs/HEADS.md.
//!
//!     cargo run --release --example head_cost -- TARGET.gguf HEAD.gguf [THREADS]

use std::sync::Arc;
use std::time::Instant;

use adaspec::backend::{decode_span, Batch, Context, ContextExtras, ContextParams};
use adaspec::eagle::head_info;
use adaspec::features::FeatureTap;
use adaspec::probe::probe_tokens;
use adaspec::proposer::{FeatureHead, HeadDraft};
use adaspec::{Model, ModelParams};

/// Median ms of `reps` decodes of `b` tokens after a 64-token prefix, with or without a tap.
fn target_ms(model: &Arc<Model>, tap: Option<Arc<FeatureTap>>, b: usize, reps: usize, threads: i32) -> f64 {
    let cp = ContextParams { n_ctx: 512, n_batch: 64, n_threads: threads, ..Default::default() };
    let mut ctx = Context::with_extras(model.clone(), &cp, ContextExtras { tap, ..Default::default() }).unwrap();
    let mut batch = Batch::new(64, 1);
    let probe = probe_tokens(model, 64 + b);
    decode_span(&mut ctx, &mut batch, &probe[..64], 0, false).unwrap();
    let mut ms = Vec::new();
    for _ in 0..reps + 2 {
        ctx.seq_rm(0, 64, -1);
        batch.clear();
        for j in 0..b {
            batch.add(probe[64 + j], (64 + j) as i32, &[0], true).unwrap();
        }
        let t = Instant::now();
        ctx.decode(&batch).unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.drain(..2);
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (t, h) = (args.next().ok_or("usage: head_cost TARGET.gguf HEAD.gguf [THREADS]")?, args.next().ok_or("HEAD")?);
    let threads: i32 = args.next().map_or(Ok(2), |t| t.parse())?;
    let target = Arc::new(Model::load(&t, &ModelParams::default())?);
    let head = Arc::new(Model::load(&h, &ModelParams::default())?);
    let info = head_info(&head)?;
    adaspec::eagle::check_head_compat(&target, &head, &info)?;
    let tap = || Some(Arc::new(FeatureTap::new(info.target_layers, target.n_layer(), target.n_embd()).unwrap()));
    println!("target {} ({} layers), head {} (layers {:?})", t, target.n_layer(), h, info.target_layers);
    let mut t1 = 0.0;
    for b in [1, 4] {
        // Interleaved, so machine noise hits both alike.
        let (mut plain, mut tapped) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            plain.push(target_ms(&target, None, b, 15, threads));
            tapped.push(target_ms(&target, tap(), b, 15, threads));
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[1]
        };
        let (p, q) = (med(&mut plain), med(&mut tapped));
        if b == 1 {
            t1 = p;
        }
        println!("target decode B{b}: {p:.2} ms, with the feature tap {q:.2} ms ({:+.1}%)", (q / p - 1.0) * 100.0);
    }
    let tap = tap().unwrap();
    let mut hd = HeadDraft::new(head, &info, target.clone(), tap, 512, 16, threads)?;
    let c = hd.measure_costs(&[1, 2, 4, 8])?;
    for (b, ms) in c.points() {
        println!("head step B{b}: {ms:.2} ms = {:.3} of a target decode", ms / t1);
    }
    Ok(())
}
