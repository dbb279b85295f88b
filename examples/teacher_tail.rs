//! How the sparse teacher's form moves AdaSPEC's selection, on real models: for every response
//! position of a data set, the forward KL of a draft and of a reference against the target,
//! computed three ways — the exact teacher, the K + 1 bins the trainer now uses, and the
//! earlier uniform tail (the remaining mass r spread evenly over the V − K other tokens) —
//! then ΔL = L_draft − L_ref and AdaSPEC's top-k selection. Prints, per form, the correlation
//! of ΔL with the teacher's tail mass r, the mean r of the selected positions, and how often
//! the selection agrees with the exact teacher's.
//!
//! cargo run --release --features train --example teacher_tail -- \
//!     TARGET.gguf DRAFT.gguf REFERENCE.gguf DATA.jsonl [N_EXAMPLES=24] [TOP_K=16] [SELECT_K=0.4]

use std::path::PathBuf;
use std::sync::Arc;

use adaspec::backend::sequence_logits_rows;
use adaspec::train::data::{load_examples, BadLines, TokenizeOptions};
use adaspec::train::loss::select_top_gap;
use adaspec::{Model, ModelParams};

/// Log-softmax of one row in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// FKL of `logq` against the teacher `logp`: exact, on K + 1 bins, and with a uniform tail.
fn fkl3(logp: &[f64], top: &[usize], logq: &[f64]) -> [f64; 3] {
    let v = logp.len();
    let exact: f64 = logp.iter().zip(logq).map(|(&lp, &lq)| if lp > -700.0 { lp.exp() * (lp - lq) } else { 0.0 }).sum();
    let kept_p: f64 = top.iter().map(|&i| logp[i].exp()).sum();
    let kept_q: f64 = top.iter().map(|&i| logq[i].exp()).sum();
    let r = (1.0 - kept_p).max(1e-300);
    let head: f64 = top.iter().map(|&i| logp[i].exp() * (logp[i] - logq[i])).sum();
    let q_other = (1.0 - kept_q).max(1e-300);
    let bins = head + r * (r.ln() - q_other.ln());
    let mut is_top = vec![false; v];
    for &i in top {
        is_top[i] = true;
    }
    let fill = r / (v - top.len()) as f64;
    let tail: f64 = (0..v).filter(|&i| !is_top[i]).map(|i| fill * (fill.ln() - logq[i])).sum();
    [exact, bins, head + tail]
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt().max(1e-300)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        anyhow::bail!(
            "usage: teacher_tail TARGET.gguf DRAFT.gguf REFERENCE.gguf DATA.jsonl [N=24] [TOP_K=16] [SELECT_K=0.4]"
        );
    }
    let n_ex: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(24);
    let top_k: usize = args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let select_k: f64 = args.get(7).map(|s| s.parse()).transpose()?.unwrap_or(0.4);
    let load = |p: &str| -> anyhow::Result<Arc<Model>> { Ok(Arc::new(Model::load(p, &ModelParams::default())?)) };
    let (target, draft, reference) = (load(&args[1])?, load(&args[2])?, load(&args[3])?);
    let v = target.n_vocab().min(draft.n_vocab()).min(reference.n_vocab());
    let opts = TokenizeOptions { chat: true, max_len: 160, ..Default::default() };
    let (mut ex, _) = load_examples(&target, &[PathBuf::from(&args[4])], &opts, BadLines::Skip)?;
    ex.truncate(n_ex);
    // Per position: tail mass r, and [exact, bins, uniform] FKL of draft and reference.
    let (mut tail, mut ld, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    for (n, e) in ex.iter().enumerate() {
        let range = e.loss_positions();
        let rows = |m: &Arc<Model>| sequence_logits_rows(m, &e.tokens, range.clone(), 2);
        let (t, d, r) = (rows(&target)?, rows(&draft)?, rows(&reference)?);
        let (tv, dv, rv) = (target.n_vocab(), draft.n_vocab(), reference.n_vocab());
        for j in 0..range.len() {
            let logp = log_softmax(&t[j * tv..j * tv + v]);
            let mut idx: Vec<usize> = (0..v).collect();
            idx.select_nth_unstable_by(top_k - 1, |&a, &b| logp[b].total_cmp(&logp[a]));
            let top = &idx[..top_k];
            tail.push(1.0 - top.iter().map(|&i| logp[i].exp()).sum::<f64>());
            ld.push(fkl3(&logp, top, &log_softmax(&d[j * dv..j * dv + v])));
            lr.push(fkl3(&logp, top, &log_softmax(&r[j * rv..j * rv + v])));
        }
        eprintln!("example {}/{}: {} positions", n + 1, ex.len(), range.len());
    }
    let names = ["exact", "bins (K+1)", "uniform tail"];
    let masks: Vec<Vec<f32>> = (0..3)
        .map(|f| {
            let delta: Vec<f32> = ld.iter().zip(&lr).map(|(a, b)| (a[f] - b[f]) as f32).collect();
            select_top_gap(&delta, select_k)
        })
        .collect::<Result<_, _>>()?;
    let mean_tail = tail.iter().sum::<f64>() / tail.len() as f64;
    println!(
        "{} positions of {} examples, top-{top_k}, select k = {select_k}; teacher tail mass r: mean {mean_tail:.4}",
        tail.len(),
        ex.len()
    );
    println!("| teacher form | mean L_draft | mean L_ref | corr(ΔL, r) | mean r of selected | selection = exact's |");
    println!("|---|---|---|---|---|---|");
    for f in 0..3 {
        let delta: Vec<f64> = ld.iter().zip(&lr).map(|(a, b)| a[f] - b[f]).collect();
        let sel: Vec<f64> = tail.iter().zip(&masks[f]).filter(|(_, &m)| m > 0.0).map(|(t, _)| *t).collect();
        let agree = masks[f].iter().zip(&masks[0]).filter(|(a, b)| a == b).count() as f64 / tail.len() as f64;
        println!(
            "| {} | {:.4} | {:.4} | {:.3} | {:.4} | {:.3} |",
            names[f],
            ld.iter().map(|x| x[f]).sum::<f64>() / ld.len() as f64,
            lr.iter().map(|x| x[f]).sum::<f64>() / lr.len() as f64,
            pearson(&delta, &tail),
            sel.iter().sum::<f64>() / sel.len().max(1) as f64,
            agree
        );
    }
    Ok(())
}
