//! The teacher: per-position next-token distributions of the **target GGUF run through
//! llama.cpp** (the model users verify with, quantization included), at the loss positions
//! of training sequences.
//!
//! Two modes:
//! * **exact**: full-vocabulary log-probabilities, recomputed with llama.cpp for every batch
//!   (nothing stored: 151,936 floats per position would not fit for real data sets);
//! * **sparse** (cached): per position the top-K probabilities and the remaining mass
//!   r = 1 − Σ top-K, computed once and cached on disk, keyed by the target file, the token
//!   data and K, so a second run or AdaSPEC's second stage reads the file instead of running
//!   the target. The losses compare it as **K + 1 bins** ([`TeacherRows::Bins`]): the K kept
//!   tokens and one "other" bin holding r, against the draft's probabilities of those K tokens
//!   and its total mass on all others. That is the divergence of both distributions coarsened
//!   to the bins (at most the full divergence, equal when the tail shapes agree); nothing is
//!   assumed about the shape of the teacher's tail. (An earlier version spread r uniformly over
//!   the V − K other tokens, which adds a term that grows with the teacher's tail mass to every
//!   token's loss and so biased AdaSPEC's ΔL towards high-entropy positions.) With K ≥ V it is
//!   exact mode.
//!
//! This module never trains, never changes the target, and writes only its cache files
//! (temp file + rename).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::data::{Example, Fnv64, PaddedBatch};
use super::error::{Error, Result};
use super::loss::TeacherRows;
use crate::backend::{sequence_logits_rows, Model};

/// Floor for teacher log-probabilities (a zero probability becomes e⁻¹⁰⁰): keeps reverse KL
/// and JSD finite.
pub const LOGP_FLOOR: f32 = -100.0;

/// How the teacher distributions are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum TeacherMode {
    /// Full vocabulary, recomputed per batch.
    Exact,
    /// Top-K probabilities + remaining mass, cached on disk.
    Sparse { top_k: usize },
}

/// Top-K probabilities and the remaining mass at each loss position of one example.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseRows {
    pub k: usize,
    /// (rows × k) token ids, most likely first.
    pub ids: Vec<u32>,
    /// (rows × k) their probabilities.
    pub probs: Vec<f32>,
    /// (rows) 1 − Σ kept probabilities.
    pub rest: Vec<f32>,
}

impl SparseRows {
    pub fn n_rows(&self) -> usize {
        self.rest.len()
    }
}

/// Row-wise log-softmax of (rows × vocab) logits into `out` (f64 accumulation).
pub fn log_softmax_rows(logits: &[f32], vocab: usize, out: &mut Vec<f32>) {
    for row in logits.chunks(vocab) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|&x| ((x as f64 - lse) as f32).max(LOGP_FLOOR)));
    }
}

/// Top-K of one row of logits: (ids, probs, rest).
pub fn top_k_row(row: &[f32], k: usize) -> (Vec<u32>, Vec<f32>, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let p: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = p.iter().sum();
    let k = k.min(row.len());
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let by_desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, by_desc);
    }
    idx.truncate(k);
    idx.sort_by(by_desc);
    let kept: f64 = idx.iter().map(|&i| p[i as usize]).sum();
    let probs = idx.iter().map(|&i| (p[i as usize] / z) as f32).collect();
    let rest = ((z - kept) / z).max(0.0) as f32;
    (idx, probs, rest)
}

fn ln_floor(p: f32) -> f32 {
    if p > 0.0 {
        p.ln().max(LOGP_FLOOR)
    } else {
        LOGP_FLOOR
    }
}

/// Expands sparse rows that keep the whole vocabulary (K ≥ V) into dense log-probabilities
/// (rows × vocab), appended to `out`; a token not kept gets [`LOGP_FLOOR`].
pub fn expand_sparse(rows: &SparseRows, range: std::ops::Range<usize>, vocab: usize, out: &mut Vec<f32>) {
    for r in range {
        let start = out.len();
        out.resize(start + vocab, LOGP_FLOOR);
        for j in 0..rows.k {
            let id = rows.ids[r * rows.k + j] as usize;
            let p = rows.probs[r * rows.k + j];
            if id < vocab {
                out[start + id] = ln_floor(p);
            }
        }
    }
}

/// A stable key for a model file: its size and hashes of its first and last MiB (reading a
/// whole multi-GB GGUF just for a cache key would cost as much as a teacher pass).
pub fn model_key(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut h = Fnv64::default();
    h.write(&len.to_le_bytes());
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk.min(len as usize)];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    h.write(&buf);
    if len as usize > chunk {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(len - chunk as u64)).map_err(|e| Error::io(path, e))?;
        f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        h.write(&buf);
    }
    Ok(h.finish())
}

/// The teacher for one list of examples (batches index into that list).
pub struct Teacher {
    model: Arc<Model>,
    mode: TeacherMode,
    n_threads: i32,
    sparse: Option<Vec<SparseRows>>,
    /// Where the sparse cache was read from or written to, and whether it was read.
    pub cache_file: Option<PathBuf>,
    pub cache_hit: bool,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct CacheHeader {
    format: String,
    model_key: u64,
    data_hash: u64,
    top_k: usize,
    n_vocab: usize,
    n_examples: usize,
}

/// The safetensors metadata key holding the cache header.
const CACHE_KEY: &str = "adaspec_teacher";

impl Teacher {
    /// An exact teacher (full distributions recomputed per batch).
    pub fn exact(model: Arc<Model>, n_threads: i32) -> Teacher {
        Teacher { model, mode: TeacherMode::Exact, n_threads, sparse: None, cache_file: None, cache_hit: false }
    }

    /// A sparse teacher with given distributions, one [`SparseRows`] per example (for
    /// synthetic tasks: the distributions need not come from `model`, which gives the
    /// vocabulary). Rows must match the examples' loss positions, share one K < vocab, name
    /// tokens inside the vocabulary and hold probabilities that sum with `rest` to 1.
    pub fn from_rows(model: Arc<Model>, examples: &[Example], rows: Vec<SparseRows>) -> Result<Teacher> {
        let v = model.n_vocab();
        let bad = |reason: String| Error::InvalidArg { name: "teacher rows", reason };
        let k = rows.first().map_or(1, |r| r.k);
        if rows.len() != examples.len() || k == 0 || k >= v {
            return Err(bad(format!(
                "{} row sets with K {k} for {} examples of a {v}-token vocabulary",
                rows.len(),
                examples.len()
            )));
        }
        for (i, (r, e)) in rows.iter().zip(examples).enumerate() {
            let n = r.n_rows();
            if r.k != k || n != e.n_loss() || r.ids.len() != n * k || r.probs.len() != n * k {
                return Err(bad(format!("example {i}: rows do not match its {} loss positions and K {k}", e.n_loss())));
            }
            if r.ids.iter().any(|&id| id as usize >= v) {
                return Err(bad(format!("example {i}: a token id outside the vocabulary")));
            }
            for j in 0..n {
                let mass: f32 = r.probs[j * k..(j + 1) * k].iter().sum::<f32>() + r.rest[j];
                if (mass - 1.0).abs() > 1e-3 || r.probs[j * k..(j + 1) * k].iter().any(|p| !(0.0..=1.0).contains(p)) {
                    return Err(bad(format!("example {i} row {j}: probabilities sum to {mass}")));
                }
            }
        }
        Ok(Teacher {
            model,
            mode: TeacherMode::Sparse { top_k: k },
            n_threads: 1,
            sparse: Some(rows),
            cache_file: None,
            cache_hit: false,
        })
    }

    /// A teacher in `mode` for `examples`. Sparse mode reads `cache_dir/teacher-….bin` when
    /// it matches (same target file, token data and K), else computes it with llama.cpp and
    /// writes it there (when `cache_dir` is given).
    pub fn new(
        model: Arc<Model>,
        mode: TeacherMode,
        examples: &[Example],
        cache_dir: Option<&Path>,
        n_threads: i32,
    ) -> Result<Teacher> {
        let top_k = match mode {
            TeacherMode::Exact => return Ok(Teacher::exact(model, n_threads)),
            TeacherMode::Sparse { top_k } => top_k,
        };
        if top_k == 0 {
            return Err(Error::InvalidArg { name: "--teacher-top-k", reason: "must be >= 1".into() });
        }
        let header = CacheHeader {
            format: "adaspec teacher cache v2 (safetensors)".into(),
            model_key: model_key(model.path())?,
            data_hash: super::data::examples_hash(examples),
            top_k,
            n_vocab: model.n_vocab(),
            n_examples: examples.len(),
        };
        let file = cache_dir.map(|d| {
            d.join(format!("teacher-{:016x}-{:016x}-k{top_k}.safetensors", header.model_key, header.data_hash))
        });
        if let Some(f) = &file {
            if let Some(rows) = read_cache(f, &header, examples) {
                tracing::info!("teacher: read sparse cache {}", f.display());
                return Ok(Teacher {
                    model,
                    mode,
                    n_threads,
                    sparse: Some(rows),
                    cache_file: file.clone(),
                    cache_hit: true,
                });
            }
        }
        let bar = progress("teacher", examples.len() as u64);
        let mut rows = Vec::with_capacity(examples.len());
        let v = model.n_vocab();
        for e in examples {
            let range = e.loss_positions();
            let logits = sequence_logits_rows(&model, &e.tokens, range.clone(), n_threads)?;
            let mut sr = SparseRows { k: top_k.min(v), ids: Vec::new(), probs: Vec::new(), rest: Vec::new() };
            for row in logits.chunks_exact(v) {
                let (ids, probs, rest) = top_k_row(row, top_k);
                sr.ids.extend(ids);
                sr.probs.extend(probs);
                sr.rest.push(rest);
            }
            rows.push(sr);
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some(f) = &file {
            write_cache(f, &header, &rows)?;
            tracing::info!("teacher: wrote sparse cache {}", f.display());
        }
        Ok(Teacher { model, mode, n_threads, sparse: Some(rows), cache_file: file, cache_hit: false })
    }

    pub fn mode(&self) -> TeacherMode {
        self.mode
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab()
    }

    /// The teacher's distributions at the loss positions of `batch` (built from `examples`,
    /// the list this teacher was made for), in `batch.loss_rows` order, on `dev`: dense for an
    /// exact teacher (or K ≥ vocab), K + 1 bins for a sparse one.
    pub fn rows(&self, examples: &[Example], batch: &PaddedBatch, dev: &candle_core::Device) -> Result<TeacherRows> {
        let v = self.n_vocab();
        let n = batch.loss_rows.len();
        let Some(sparse) = self.sparse.as_ref().filter(|s| s.first().map_or(true, |r| r.k < v)) else {
            return Ok(TeacherRows::Dense(candle_core::Tensor::from_vec(
                self.logp_rows(examples, batch)?,
                (n, v),
                dev,
            )?));
        };
        let k = sparse.first().map_or(1, |r| r.k);
        let (mut ids, mut logp) = (Vec::with_capacity(n * k), Vec::with_capacity(n * (k + 1)));
        for &i in &batch.examples {
            let sr = self.sparse_rows(sparse, examples, i)?;
            for r in 0..sr.n_rows() {
                ids.extend_from_slice(&sr.ids[r * k..(r + 1) * k]);
                logp.extend(sr.probs[r * k..(r + 1) * k].iter().map(|&p| ln_floor(p)));
                logp.push(ln_floor(sr.rest[r]));
            }
        }
        Ok(TeacherRows::Bins {
            ids: candle_core::Tensor::from_vec(ids, (n, k), dev)?,
            logp: candle_core::Tensor::from_vec(logp, (n, k + 1), dev)?,
        })
    }

    fn sparse_rows<'a>(&self, sparse: &'a [SparseRows], examples: &[Example], i: usize) -> Result<&'a SparseRows> {
        let e = examples.get(i).ok_or_else(|| Error::InvalidArg {
            name: "batch",
            reason: format!("example {i} out of range ({} examples)", examples.len()),
        })?;
        sparse.get(i).filter(|r| r.n_rows() == e.loss_positions().len()).ok_or_else(|| Error::InvalidArg {
            name: "teacher",
            reason: format!("sparse teacher was built for other examples (example {i})"),
        })
    }

    /// Dense teacher log-probabilities at the loss positions of `batch`, in `batch.loss_rows`
    /// order: (n_loss × vocab) row-major. Exact teachers and sparse ones with K ≥ vocab only
    /// (a smaller K has no dense form; use [`Teacher::rows`]).
    pub fn logp_rows(&self, examples: &[Example], batch: &PaddedBatch) -> Result<Vec<f32>> {
        let v = self.n_vocab();
        let mut out = Vec::with_capacity(batch.loss_rows.len() * v);
        for &i in &batch.examples {
            let e = examples.get(i).ok_or_else(|| Error::InvalidArg {
                name: "batch",
                reason: format!("example {i} out of range ({} examples)", examples.len()),
            })?;
            let range = e.loss_positions();
            match &self.sparse {
                None => {
                    let logits = sequence_logits_rows(&self.model, &e.tokens, range, self.n_threads)?;
                    log_softmax_rows(&logits, v, &mut out);
                }
                Some(rows) => {
                    let sr = self.sparse_rows(rows, examples, i)?;
                    if sr.k < v {
                        return Err(Error::InvalidArg {
                            name: "teacher",
                            reason: format!("a top-{} teacher of a {v}-token vocabulary has no dense form", sr.k),
                        });
                    }
                    expand_sparse(sr, 0..sr.n_rows(), v, &mut out);
                }
            }
        }
        Ok(out)
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress(what: &str, len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} < {{eta_precise}}]"
    )) {
        bar.set_style(style);
    }
    bar
}

/// The cache file: safetensors with u32 `rows` (loss positions per example), u32 `ids` and f32
/// `probs` (total rows × K) and f32 `rest` (total rows); the [`CacheHeader`] as JSON in the
/// metadata under "adaspec_teacher". Read through a memory map; a file that does not match
/// the header (or is not such a file) is recomputed.
fn read_cache(path: &Path, want: &CacheHeader, examples: &[Example]) -> Option<Vec<SparseRows>> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: the map is read-only and dropped before this returns; cache files are only ever
    // replaced by rename (write_cache), never modified in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let st = safetensors::SafeTensors::deserialize(&map).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).ok()?;
    let header: CacheHeader = serde_json::from_str(meta.metadata().as_ref()?.get(CACHE_KEY)?).ok()?;
    if &header != want {
        return None;
    }
    let k = want.top_k.min(want.n_vocab);
    let words = |name: &str, dtype: safetensors::Dtype| -> Option<Vec<u32>> {
        let t = st.tensor(name).ok()?;
        (t.dtype() == dtype)
            .then(|| t.data().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let (rows, ids) = (words("rows", safetensors::Dtype::U32)?, words("ids", safetensors::Dtype::U32)?);
    let probs = words("probs", safetensors::Dtype::F32)?;
    let rest = words("rest", safetensors::Dtype::F32)?;
    let total: usize = rows.iter().map(|&n| n as usize).sum();
    if rows.len() != examples.len() || ids.len() != total * k || probs.len() != total * k || rest.len() != total {
        return None;
    }
    let mut out = Vec::with_capacity(examples.len());
    let mut at = 0usize;
    for (e, &n) in examples.iter().zip(&rows) {
        let n = n as usize;
        if n != e.n_loss() {
            return None;
        }
        out.push(SparseRows {
            k,
            ids: ids[at * k..(at + n) * k].to_vec(),
            probs: probs[at * k..(at + n) * k].iter().map(|&b| f32::from_bits(b)).collect(),
            rest: rest[at..at + n].iter().map(|&b| f32::from_bits(b)).collect(),
        });
        at += n;
    }
    Some(out)
}

fn write_cache(path: &Path, header: &CacheHeader, rows: &[SparseRows]) -> Result<()> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let bad = |e: String| Error::InvalidArg { name: "teacher cache", reason: e };
    let h = serde_json::to_string(header).map_err(|e| bad(e.to_string()))?;
    let le = |words: &mut dyn Iterator<Item = u32>| -> Vec<u8> { words.flat_map(u32::to_le_bytes).collect() };
    let counts = le(&mut rows.iter().map(|r| r.n_rows() as u32));
    let ids = le(&mut rows.iter().flat_map(|r| r.ids.iter().copied()));
    let probs = le(&mut rows.iter().flat_map(|r| r.probs.iter().map(|p| p.to_bits())));
    let rest = le(&mut rows.iter().flat_map(|r| r.rest.iter().map(|p| p.to_bits())));
    let total: usize = rows.iter().map(SparseRows::n_rows).sum();
    let k = rows.first().map_or(0, |r| r.k);
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
        TensorView::new(dtype, shape, data)
            .map_err(|e| Error::InvalidArg { name: "teacher cache", reason: e.to_string() })
    }
    let tensors = vec![
        ("rows", view(Dtype::U32, vec![rows.len()], &counts)?),
        ("ids", view(Dtype::U32, vec![total, k], &ids)?),
        ("probs", view(Dtype::F32, vec![total, k], &probs)?),
        ("rest", view(Dtype::F32, vec![total], &rest)?),
    ];
    let meta = std::collections::HashMap::from([(CACHE_KEY.to_string(), h)]);
    let tmp = super::gguf_import::temp_path_for(path)?;
    let res = safetensors::serialize_to_file(tensors, Some(meta), &tmp)
        .map_err(|e| bad(format!("{}: {e}", tmp.display())))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_expansion() {
        let row = [0.0f32, 2.0, 1.0, -1.0, 2.0];
        let (ids, probs, rest) = top_k_row(&row, 2);
        assert_eq!(ids, vec![1, 4]); // ties broken by id
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        let p1 = (2f64.exp() / z) as f32;
        assert!((probs[0] - p1).abs() < 1e-6 && (probs[1] - p1).abs() < 1e-6);
        assert!((rest - (1.0 - 2.0 * p1)).abs() < 1e-6);
        // K = V is exact.
        let (ids, probs, rest) = top_k_row(&row, 9);
        let sr = SparseRows { k: 5, ids, probs, rest: vec![rest] };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        expand_sparse(&sr, 0..1, 5, &mut a);
        log_softmax_rows(&row, 5, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} {y}");
        }
    }
}
