//! The benchmark matrix: target formats (the given file and copies converted by llama.cpp's
//! quantizer) × data sets, every cell a side-by-side [`run_bench`] with ratios against target
//! alone, the format's ceiling, and optionally llama.cpp's own speculative decoding as a peer.
//!
//! The ceiling of a format is the speedup a free, always-right draft would reach on the
//! measured verification curve: max over batch sizes B of B·T(1)/T(B).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{convert_model, ChatMessage, FileType, Model, ModelParams};
use crate::bench::peer::{Peer, PeerVariant};
use crate::bench::{median, run_bench, BenchConfig, BenchReport};
use crate::error::{Error, Result};
use crate::probe;
use crate::strategy::{NumericMode, Strategy};
use crate::verifier::Verifier;

/// Batch sizes of the measured verification curve.
pub const CURVE_SIZES: [usize; 12] = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48];

/// What to run.
#[derive(Debug, Clone)]
pub struct MatrixConfig {
    /// The given target file and its formats to benchmark (the given file is used for the
    /// format its name says; others are converted copies in `cache_dir`).
    pub target: PathBuf,
    pub draft: PathBuf,
    pub formats: Vec<FileType>,
    pub datasets: Vec<String>,
    pub n_prompts: usize,
    /// Settings of every cell (prompts are filled in per data set).
    pub bench: BenchConfig,
    pub cache_dir: PathBuf,
    pub peer: Option<Peer>,
}

/// A target format: its file and measured verification curve.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormatInfo {
    pub format: FileType,
    pub path: String,
    /// (batch size, ms per decode) on this machine, fast kernels unless exact mode.
    pub curve_ms: Vec<(usize, f64)>,
    /// Speedup of a free, always-right draft on that curve, and the batch size reaching it.
    pub ceiling: f64,
    pub ceiling_batch: usize,
}

/// One strategy in one cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CellEntry {
    pub name: String,
    pub median_speedup: f64,
    pub median_tokens_per_second: f64,
    pub mean_tokens_per_pass: f64,
    pub identical: usize,
    pub prompts: usize,
    /// median_speedup / the format's ceiling.
    pub of_ceiling: f64,
}

/// One format × data set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixCell {
    pub format: FileType,
    pub dataset: String,
    pub target_tokens_per_second: f64,
    pub ours: Vec<CellEntry>,
    /// llama.cpp's speculative decoding, each against llama.cpp's target alone on the same
    /// prompts (empty without a peer).
    pub peer: Vec<CellEntry>,
    /// llama.cpp's target alone: median tok/s, and on how many prompts its output equals ours
    /// (same prompt tokens, same greedy decoding: a check that both sides ran the same task).
    pub peer_target_tokens_per_second: Option<f64>,
    pub peer_target_matches_ours: Option<usize>,
    pub best_fixed: Option<(String, f64)>,
    /// auto / best fixed strategy.
    pub auto_vs_best_fixed: Option<f64>,
    pub best_peer: Option<(String, f64)>,
    /// auto tok/s / the best llama.cpp configuration's tok/s.
    pub auto_vs_peer: Option<f64>,
    pub report: BenchReport,
}

/// The whole matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixReport {
    pub target: String,
    pub draft: String,
    pub mode: NumericMode,
    pub threads: i32,
    pub max_tokens: usize,
    pub tinyblas: bool,
    pub formats: Vec<FormatInfo>,
    pub cells: Vec<MatrixCell>,
}

/// The file of `format`: the given target if its name says that format, else a converted copy
/// in `cache_dir` (made once; remade when the source is newer).
pub fn target_file(given: &Path, format: FileType, cache_dir: &Path, threads: i32) -> Result<PathBuf> {
    let name = given.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if name.contains(format.name()) {
        return Ok(given.to_path_buf());
    }
    let stem = given.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let dst = cache_dir.join(format!("{stem}.as-{}.gguf", format.name()));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(d), Some(s)) = (modified(&dst), modified(given)) {
        if d >= s {
            return Ok(dst);
        }
    }
    std::fs::create_dir_all(cache_dir).map_err(|source| Error::Io { path: cache_dir.to_path_buf(), source })?;
    let tmp = dst.with_extension(format!("tmp-{}", std::process::id()));
    eprintln!("converting {} to {} (once; cached as {})", given.display(), format.name(), dst.display());
    convert_model(given, &tmp, format, threads)?;
    std::fs::rename(&tmp, &dst).map_err(|source| Error::Io { path: dst.clone(), source })?;
    Ok(dst)
}

/// A model's verification curve on this machine and its ceiling.
#[derive(Debug, Clone)]
pub struct Curve {
    /// (batch size, ms per decode) for [`CURVE_SIZES`].
    pub ms: Vec<(usize, f64)>,
    pub ceiling: f64,
    pub ceiling_batch: usize,
}

/// Measures `model`'s verification curve (reference kernels in exact mode) and its ceiling.
pub fn measure_curve(model: &Arc<Model>, mode: NumericMode, threads: i32) -> Result<Curve> {
    let mut v = Verifier::new(model.clone(), 1024, 512, 1, threads, mode == NumericMode::Exact, None)?;
    let probe_tokens = probe::probe_tokens(model, 48);
    let (ctx, batch) = v.context_mut();
    let cost = probe::measure_batch_costs(ctx, batch, &probe_tokens, &CURVE_SIZES)?;
    let curve_ms: Vec<(usize, f64)> = CURVE_SIZES.iter().map(|&b| (b, cost.estimate(b))).collect();
    let t1 = curve_ms[0].1;
    let (ceiling_batch, ceiling) =
        curve_ms.iter().map(|&(b, ms)| (b, b as f64 * t1 / ms)).max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((1, 1.0));
    Ok(Curve { ms: curve_ms, ceiling, ceiling_batch })
}

fn entry(name: String, speedups: Vec<f64>, tps: Vec<f64>, tpp: Vec<f64>, identical: usize, ceiling: f64) -> CellEntry {
    let prompts = speedups.len();
    let median_speedup = median(speedups);
    CellEntry {
        name,
        median_speedup,
        median_tokens_per_second: median(tps),
        mean_tokens_per_pass: tpp.iter().sum::<f64>() / prompts.max(1) as f64,
        identical,
        prompts,
        of_ceiling: of_ceiling(median_speedup, ceiling),
    }
}

fn of_ceiling(speedup: f64, ceiling: f64) -> f64 {
    if ceiling > 0.0 {
        speedup / ceiling
    } else {
        0.0
    }
}

/// Runs the matrix; `progress(line)` after every cell, `partial(report)` too (to save it).
pub fn run_matrix(
    cfg: &MatrixConfig,
    progress: &mut dyn FnMut(&str),
    partial: &mut dyn FnMut(&MatrixReport),
) -> Result<MatrixReport> {
    let mode = cfg.bench.mode;
    let threads = cfg.bench.threads;
    let draft = Arc::new(Model::load(&cfg.draft, &ModelParams::default())?);
    let mut report = MatrixReport {
        target: cfg.target.display().to_string(),
        draft: cfg.draft.display().to_string(),
        mode,
        threads,
        max_tokens: cfg.bench.max_tokens,
        tinyblas: crate::cpu_kernels::has_tinyblas(),
        formats: Vec::new(),
        cells: Vec::new(),
    };
    // Prompts first, so a wrong data set name fails before any conversion or model load.
    let mut prompts = Vec::new();
    for d in &cfg.datasets {
        prompts.push(crate::dataset::load_prompts(d, cfg.n_prompts)?);
    }
    for &format in &cfg.formats {
        let path = target_file(&cfg.target, format, &cfg.cache_dir, threads)?;
        let mp = ModelParams { repack: mode == NumericMode::Fast, ..Default::default() };
        let target = Arc::new(Model::load(&path, &mp)?);
        let c = measure_curve(&target, mode, threads)?;
        let info = FormatInfo {
            format,
            path: path.display().to_string(),
            curve_ms: c.ms,
            ceiling: c.ceiling,
            ceiling_batch: c.ceiling_batch,
        };
        progress(&format!(
            "{}: ceiling {:.2}x at batch {} (curve {})",
            format.name(),
            info.ceiling,
            info.ceiling_batch,
            info.curve_ms.iter().map(|(b, ms)| format!("B{b} {ms:.0}")).collect::<Vec<_>>().join(", ")
        ));
        let ceiling = info.ceiling;
        report.formats.push(info);
        for (dataset, texts) in cfg.datasets.iter().zip(&prompts) {
            let bc = BenchConfig { prompts: texts.clone(), ..cfg.bench.clone() };
            let r = run_bench(target.clone(), draft.clone(), &bc, &mut |done, total, line| {
                eprintln!("  [{} {dataset} {done}/{total}] {line}", format.name())
            })?;
            let none = Strategy::None.to_string();
            let ours: Vec<CellEntry> = r
                .summaries
                .iter()
                .filter(|s| s.strategy != none)
                .map(|s| CellEntry {
                    name: s.strategy.clone(),
                    median_speedup: s.median_speedup,
                    median_tokens_per_second: s.median_tokens_per_second,
                    mean_tokens_per_pass: s.mean_tokens_per_pass,
                    identical: s.identical,
                    prompts: s.prompts,
                    of_ceiling: of_ceiling(s.median_speedup, ceiling),
                })
                .collect();
            let base_tps = r.summaries.iter().find(|s| s.strategy == none).map_or(0.0, |s| s.median_tokens_per_second);
            let base_outputs: Vec<&[crate::backend::Token]> = (0..texts.len())
                .map(|pi| {
                    r.runs
                        .iter()
                        .find(|x| x.prompt_index == pi && x.strategy == none)
                        .map_or(&[][..], |x| &x.output[..])
                })
                .collect();
            let (peer, peer_target) = match &cfg.peer {
                Some(p) => {
                    let (entries, tps, matches) = run_peer(p, &target, &cfg.draft, texts, &bc, ceiling, &base_outputs)?;
                    (entries, Some((tps, matches)))
                }
                None => (Vec::new(), None),
            };
            let auto = ours.iter().find(|e| e.name == Strategy::Auto.to_string());
            let is_fixed =
                |name: &str| name.parse::<crate::bench::Variant>().is_ok_and(|v| v.strategy != Strategy::Auto);
            let best_fixed = ours
                .iter()
                .filter(|e| is_fixed(&e.name))
                .max_by(|a, b| a.median_speedup.total_cmp(&b.median_speedup))
                .map(|e| (e.name.clone(), e.median_speedup));
            let best_peer = peer
                .iter()
                .max_by(|a, b| a.median_tokens_per_second.total_cmp(&b.median_tokens_per_second))
                .map(|e| (e.name.clone(), e.median_speedup));
            let auto_vs_best_fixed = match (auto, &best_fixed) {
                (Some(a), Some((_, b))) if *b > 0.0 => Some(a.median_speedup / b.max(1.0)),
                _ => None,
            };
            let auto_vs_peer = match auto {
                Some(a) => peer
                    .iter()
                    .map(|e| e.median_tokens_per_second)
                    .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
                    .filter(|&x| x > 0.0)
                    .map(|x| a.median_tokens_per_second / x),
                None => None,
            };
            progress(&format!(
                "{} × {dataset}: target {:.1} tok/s, auto {}, best fixed {}, auto/best {}, llama.cpp best {}{}",
                format.name(),
                base_tps,
                auto.map_or("-".into(), |a| format!("{:.2}x", a.median_speedup)),
                best_fixed.as_ref().map_or("-".into(), |(n, x)| format!("{n} {x:.2}x")),
                auto_vs_best_fixed.map_or("-".into(), |x| format!("{x:.2}")),
                best_peer.as_ref().map_or("-".into(), |(n, x)| format!("{n} {x:.2}x")),
                peer_target.map_or(String::new(), |(tps, m)| format!(
                    " (llama.cpp target {tps:.1} tok/s, same output as ours on {m}/{})",
                    texts.len()
                )),
            ));
            report.cells.push(MatrixCell {
                format,
                dataset: dataset.clone(),
                target_tokens_per_second: base_tps,
                ours,
                peer,
                best_fixed,
                auto_vs_best_fixed,
                best_peer,
                auto_vs_peer,
                peer_target_tokens_per_second: peer_target.map(|p| p.0),
                peer_target_matches_ours: peer_target.map(|p| p.1),
                report: r,
            });
            partial(&report);
        }
    }
    Ok(report)
}

/// llama.cpp on the same prompts: its target alone, then each variant; ratios per prompt.
/// Also returns llama.cpp's target-alone median tok/s and on how many prompts its output
/// equals `ours` (our target-alone outputs).
#[allow(clippy::too_many_arguments)]
fn run_peer(
    p: &Peer,
    target: &Arc<Model>,
    draft: &Path,
    texts: &[String],
    bc: &BenchConfig,
    ceiling: f64,
    ours: &[&[crate::backend::Token]],
) -> Result<(Vec<CellEntry>, f64, usize)> {
    // Per variant: speedups, tok/s, tokens per pass, prompts identical to llama.cpp's target.
    #[derive(Clone, Default)]
    struct Acc {
        speedup: Vec<f64>,
        tps: Vec<f64>,
        tpp: Vec<f64>,
        identical: usize,
    }
    let mut per = vec![Acc::default(); p.variants.len()];
    let (mut base_tps, mut matches) = (Vec::new(), 0);
    for (pi, text) in texts.iter().enumerate() {
        let rendered = if bc.chat {
            target.apply_chat_template(&[ChatMessage::new("user", text.clone())], true)?
        } else {
            text.clone()
        };
        let base = p.run(&PeerVariant::Target, target.path(), draft, &rendered, bc.max_tokens)?;
        base_tps.push(base.tokens_per_second);
        matches += usize::from(ours.get(pi).is_some_and(|o| *o == &base.tokens[..]));
        for (k, v) in p.variants.iter().enumerate() {
            let r = p.run(v, target.path(), draft, &rendered, bc.max_tokens)?;
            eprintln!(
                "  [llama.cpp] {v:<26} {:6.2} tok/s  x{:.2}  tok/pass {:.2}",
                r.tokens_per_second,
                r.tokens_per_second / base.tokens_per_second.max(1e-9),
                r.tokens_per_pass
            );
            per[k].speedup.push(r.tokens_per_second / base.tokens_per_second.max(1e-9));
            per[k].tps.push(r.tokens_per_second);
            per[k].tpp.push(r.tokens_per_pass);
            per[k].identical += usize::from(r.tokens == base.tokens);
        }
    }
    let entries = p
        .variants
        .iter()
        .zip(per)
        .map(|(v, a)| entry(v.to_string(), a.speedup, a.tps, a.tpp, a.identical, ceiling))
        .collect();
    Ok((entries, median(base_tps), matches))
}

/// The matrix as a table for people.
pub fn format_matrix(r: &MatrixReport) -> String {
    let mut s = String::new();
    s.push_str("formats (verification curve on this machine, ceiling = free always-right draft):\n");
    for f in &r.formats {
        s.push_str(&format!(
            "  {:<7} ceiling {:.2}x (B{})  {}\n",
            f.format.name(),
            f.ceiling,
            f.ceiling_batch,
            f.curve_ms.iter().map(|(b, ms)| format!("B{b}:{:.2}", ms / f.curve_ms[0].1)).collect::<Vec<_>>().join(" ")
        ));
    }
    let names: Vec<String> =
        r.cells.first().map(|c| c.ours.iter().map(|e| e.name.clone()).collect()).unwrap_or_default();
    let peer_names: Vec<String> = r
        .cells
        .first()
        .map(|c| c.peer.iter().map(|e| e.name.replace("llama.cpp ", "lc:")).collect())
        .unwrap_or_default();
    s.push_str(&format!("\n{:<7} {:<15} {:>7} {:>6}", "format", "dataset", "tok/s", "ceil"));
    for n in names.iter().chain(&peer_names) {
        s.push_str(&format!(" {:>15}", n));
    }
    s.push_str(&format!(" {:>9} {:>9}\n", "auto/best", "auto/lc"));
    for c in &r.cells {
        let ceiling = r.formats.iter().find(|f| f.format == c.format).map_or(0.0, |f| f.ceiling);
        s.push_str(&format!(
            "{:<7} {:<15} {:>7.1} {:>5.2}x",
            c.format.name(),
            c.dataset,
            c.target_tokens_per_second,
            ceiling
        ));
        for e in c.ours.iter().chain(&c.peer) {
            s.push_str(&format!(" {:>15}", format!("{:.2}x", e.median_speedup)));
        }
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        s.push_str(&format!(" {:>9} {:>9}\n", f(c.auto_vs_best_fixed), f(c.auto_vs_peer)));
    }
    s
}
