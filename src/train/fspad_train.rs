//! Training FSPAD-family heads (`adaspec head fspad`) as the FSPAD code does: fixed dataset
//! responses, teacher-forced target features f (the target's final-norm hidden states,
//! extracted through llama.cpp from the target GGUF users verify with), loss
//! 1.0·SmoothL1(hidden, f[P+1]) + 0.1·soft-CE(LM(tok), softmax(LM(f[P+1]))) on response
//! positions, uniform noise of amplitude 0.1·512/L on the input features, AdamW (0.9, 0.95),
//! element-wise gradient clipping, linear warm-up. The feature loss trains the hidden output
//! children read (the feature half under partial alignment; the shared output otherwise, as
//! EAGLE-2 does). With a reduced draft vocabulary both distributions are over its tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::data::Example;
use super::error::{Error, Result};
use super::export::{check_destination, tokenizer_metadata, ExportType};
use super::fspad_model::{smooth_l1, soft_ce, FspadModel};
use super::gguf_import::{config_from_gguf, read_gguf_content};
use super::model::Weights;
use super::trainer::{accumulate, AdamW, TrainConfig};
use crate::backend::{Batch, Context, ContextExtras, ContextParams, Model};
use crate::features::FeatureTap;
use crate::fspad::{FspadConfig, Variant};

/// A head shaped for the target GGUF `target`: its hidden size, heads and RoPE base; FFN width
/// `ffn` (default the target's), the feature-sampling MLP as wide.
pub fn fspad_config_for(target: &Path, variant: Variant, ffn: Option<usize>) -> Result<FspadConfig> {
    let (content, _) = read_gguf_content(target)?;
    let t = config_from_gguf(&content, target)?;
    let ffn = ffn.unwrap_or(t.intermediate_size);
    Ok(FspadConfig {
        variant,
        hidden: t.hidden_size,
        n_head: t.num_attention_heads,
        n_head_kv: t.num_key_value_heads,
        head_dim: t.head_dim,
        ffn,
        fs_ffn: if variant.sampling() { ffn } else { 0 },
        rope_theta: t.rope_theta as f32,
        rms_eps: t.rms_norm_eps as f32,
        target_vocab: t.vocab_size,
    })
}

/// PyTorch's `nn.Linear` initialisation (U(±1/√fan_in) for weights and bias), unit norms.
pub fn init_fspad(cfg: &FspadConfig, seed: u64) -> Result<Weights> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = Weights::new();
    let shapes = cfg.tensor_shapes();
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let fan_in = if name == "fc.bias" { 2 * cfg.hidden } else { shape[1] };
            let b = 1.0 / (fan_in as f32).sqrt();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-b..b)).collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
        };
        w.insert(name.clone(), t);
    }
    Ok(w)
}

/// Rows `ids` of the target's LM head (all rows when `ids` is empty), f32 (V, H).
pub fn target_lm(target: &Path, ids: &[u32]) -> Result<Tensor> {
    super::head::target_lm_rows(target, ids)
}

/// The target's token embedding matrix (V, H) f32.
pub fn target_embedding(target: &Path) -> Result<Tensor> {
    let (content, mut reader) = read_gguf_content(target)?;
    let q = content
        .tensor(&mut reader, "token_embd.weight", &Device::Cpu)
        .map_err(|e| Error::Gguf { path: target.to_path_buf(), reason: format!("token_embd.weight: {e}") })?;
    Ok(q.dequantize(&Device::Cpu)?)
}

/// One training sequence (n = T − 1 entries).
pub struct FspadExample {
    /// Raw target embeddings of token[P+1] (n, H).
    pub emb: Tensor,
    /// Target features f[0..T) (T, H): entry P reads f[P], is trained towards f[P+1].
    pub feat: Tensor,
    /// 1 where entry P is trained (token[P+2] is a response token).
    pub mask: Vec<f32>,
}

/// Final-norm target features of every token of `examples`, through llama.cpp.
pub fn extract(target: &Arc<Model>, examples: &[Example], threads: i32, progress: bool) -> Result<Vec<FspadExample>> {
    let emb_all = target_embedding(target.path())?;
    let h = target.n_embd();
    let tap = Arc::new(FeatureTap::final_norm(h));
    let max_t = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
    let n_ctx = (max_t + 8).next_multiple_of(256) as u32;
    let cp = ContextParams { n_ctx, n_batch: 64, n_threads: threads, ..Default::default() };
    let mut ctx =
        Context::with_extras(target.clone(), &cp, ContextExtras { tap: Some(tap.clone()), ..Default::default() })?;
    let mut batch = Batch::new(64, 1);
    let bar = super::head_train::progress_bar(examples.len(), progress, "target features");
    let mut out = Vec::with_capacity(examples.len());
    for ex in examples {
        let t = ex.tokens.len();
        if t < 3 {
            continue;
        }
        ctx.clear();
        tap.clear();
        for (c, chunk) in ex.tokens.chunks(64).enumerate() {
            batch.clear();
            for (j, &tok) in chunk.iter().enumerate() {
                batch.add(tok, (c * 64 + j) as i32, &[0], true)?;
            }
            ctx.decode(&batch)?;
        }
        let mut feats = Vec::with_capacity(t * h);
        tap.gather(&(0..t).collect::<Vec<_>>(), &mut feats)?;
        let ids: Vec<u32> = ex.tokens[1..].iter().map(|&x| x as u32).collect();
        let emb = emb_all.index_select(&Tensor::from_vec(ids, t - 1, &Device::Cpu)?, 0)?;
        let mask = (0..t - 1).map(|p| if p + 2 >= ex.prompt_len { 1.0 } else { 0.0 }).collect();
        out.push(FspadExample {
            emb: emb.to_dtype(DType::F16)?,
            feat: Tensor::from_vec(feats, (t, h), &Device::Cpu)?.to_dtype(DType::F16)?,
            mask,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Training settings (defaults: the FSPAD code's, but the step count).
#[derive(Debug, Clone)]
pub struct FspadTrainConfig {
    pub lr: f64,
    pub warmup_steps: usize,
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Element-wise gradient value clip.
    pub grad_clip_value: f64,
    /// Weight of the feature (SmoothL1) loss.
    pub feature_weight: f64,
    /// Weight of the token (soft cross-entropy) loss.
    pub token_weight: f64,
    /// Uniform input-feature noise: amplitude `noise · 512 / L` (0 = none).
    pub noise: f64,
    /// AdaSPEC on the token loss: train the top-k fraction of positions by ΔL against a
    /// reference head (with [`train_fspad`]'s `reference`).
    pub select_k: Option<f64>,
    pub selection: super::loss::Selection,
    pub seed: u64,
    pub progress: bool,
    pub log: Option<PathBuf>,
}

impl Default for FspadTrainConfig {
    fn default() -> Self {
        FspadTrainConfig {
            lr: 5e-5,
            warmup_steps: 20,
            steps: 200,
            batch: 4,
            grad_clip_value: 0.5,
            feature_weight: 1.0,
            token_weight: 0.1,
            noise: 0.1,
            select_k: None,
            selection: super::loss::Selection::Gap,
            seed: 0,
            progress: true,
            log: None,
        }
    }
}

struct SeqLoss {
    loss: Tensor,
    feature: f64,
    token: f64,
}

fn seq_loss(
    model: &FspadModel,
    ex: &FspadExample,
    cfg: &FspadTrainConfig,
    rng: &mut StdRng,
    reference: Option<&FspadModel>,
) -> Result<Option<SeqLoss>> {
    let count: f32 = ex.mask.iter().sum();
    if count == 0.0 {
        return Ok(None);
    }
    let emb = ex.emb.to_dtype(DType::F32)?;
    let feat = ex.feat.to_dtype(DType::F32)?;
    let (t, h) = feat.dims2()?;
    let n = t - 1;
    let input = feat.narrow(0, 0, n)?;
    let input = if cfg.noise > 0.0 {
        let a = (cfg.noise * 512.0 / t as f64) as f32;
        let noise: Vec<f32> = (0..n * h).map(|_| rng.random_range(-a..a)).collect();
        (input + Tensor::from_vec(noise, (n, h), &Device::Cpu)?)?
    } else {
        input
    };
    let next = feat.narrow(0, 1, n)?;
    let out = model.forward(&emb, &input, 1)?.remove(0);
    let m = Tensor::from_vec(ex.mask.clone(), n, &Device::Cpu)?;
    let fl = (smooth_l1(&out.hidden, &next)? * &m)?.sum_all()? / count as f64;
    let target_logits = model.logits(&next)?;
    let ce = soft_ce(&model.logits(&out.tok)?, &target_logits)?; // (n)
    let mut train_mask = ex.mask.clone();
    if let (Some(r), Some(k)) = (reference, cfg.select_k) {
        let r_out = r.forward(&emb, &input, 1)?.remove(0);
        let ce_ref = soft_ce(&r.logits(&r_out.tok.detach())?, &target_logits)?.to_vec1::<f32>()?;
        let ce_head = ce.detach().to_vec1::<f32>()?;
        let valid: Vec<usize> = (0..n).filter(|&p| ex.mask[p] > 0.0).collect();
        let delta: Vec<f32> = match cfg.selection {
            super::loss::Selection::Gap => valid.iter().map(|&p| ce_head[p] - ce_ref[p]).collect(),
            super::loss::Selection::RefLoss => valid.iter().map(|&p| -ce_ref[p]).collect(),
        };
        for (&p, &kept) in valid.iter().zip(&super::loss::select_top_gap(&delta, k)?) {
            train_mask[p] = kept;
        }
    }
    let tm = Tensor::from_vec(train_mask, n, &Device::Cpu)?;
    let tl = ((ce * tm)?.sum_all()? / count as f64)?;
    let fl = fl?;
    let (fv, tv) = (fl.to_scalar::<f32>()? as f64, tl.to_scalar::<f32>()? as f64);
    let loss = ((fl * cfg.feature_weight)? + (tl * cfg.token_weight)?)?;
    Ok(Some(SeqLoss { loss, feature: fv, token: tv }))
}

/// Held-out measures of an FSPAD-family head, teacher-forced along the target's tokens.
#[derive(Debug, Clone, Default)]
pub struct FspadEval {
    /// Greedy agreement per draft depth (α_d: the head's argmax equals the target's at depth d,
    /// reading its own hidden outputs for d ≥ 2).
    pub alpha: Vec<f64>,
    /// The chain length under independence, 1 + Σ_d Π_{i<d} α_i.
    pub tau_chain: f64,
    /// (k, τ) measured position by position (as the heads' evaluation does): a chain of the
    /// evaluated depth (k = 1) and full top-k trees of that depth (k = 2, 4).
    pub tau: Vec<(u32, f64)>,
    /// Start positions the measured τ average over.
    pub starts: usize,
}

impl FspadEval {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "alpha": self.alpha,
            "tau_chain": self.tau_chain,
            "tau_measured": super::head_train::tau_json(&self.tau),
            "starts": self.starts,
        })
    }
}

/// Evaluates `model` on `val` to draft depth `depth` (see [`FspadEval`]).
pub fn evaluate(model: &FspadModel, val: &[FspadExample], depth: usize) -> Result<FspadEval> {
    let mut acc = vec![(0.0f64, 0.0f64); depth];
    let mut runs = super::head_train::TauRuns::default();
    for ex in val {
        let emb = ex.emb.to_dtype(DType::F32)?;
        let feat = ex.feat.to_dtype(DType::F32)?;
        let n = feat.dims()[0] - 1;
        let want = model.logits(&feat.narrow(0, 1, n)?)?.argmax(1)?;
        let outs = model.forward(&emb, &feat.narrow(0, 0, n)?, depth)?;
        // ranks[i][p]: how many tokens depth i + 1's logits at row p (start p − i) score above
        // the target's token; u32::MAX where no start reaches it.
        let mut ranks = Vec::with_capacity(outs.len());
        for (i, o) in outs.iter().enumerate() {
            let logits = model.logits(&o.tok)?;
            let tgt = logits.gather(&want.unsqueeze(1)?, 1)?;
            let above = logits.broadcast_gt(&tgt)?.to_dtype(DType::F32)?.sum(1)?.to_vec1::<f32>()?;
            let mut r = vec![u32::MAX; n];
            for p in i..n {
                if ex.mask[p] > 0.0 {
                    acc[i].1 += 1.0;
                    r[p] = above[p] as u32;
                    if above[p] == 0.0 {
                        acc[i].0 += 1.0;
                    }
                }
            }
            ranks.push(r);
        }
        runs.add(&ranks, &ex.mask[..n]);
    }
    let alpha: Vec<f64> = acc.iter().map(|(h, c)| if *c > 0.0 { h / c } else { 0.0 }).collect();
    let (mut tau_chain, mut reach) = (1.0, 1.0);
    for a in &alpha {
        reach *= a;
        tau_chain += reach;
    }
    Ok(FspadEval { alpha, tau_chain, tau: runs.tau(), starts: runs.starts() })
}

/// Trains `model` on `train`; evaluates on `val` (depth `eval_depth`) at the start and the end.
/// Returns (JSON summary of the run, final α per depth).
pub fn train_fspad(
    model: &FspadModel,
    reference: Option<&FspadModel>,
    train: &[FspadExample],
    val: &[FspadExample],
    cfg: &FspadTrainConfig,
    eval_depth: usize,
) -> Result<serde_json::Value> {
    if cfg.select_k.is_some() != reference.is_some() {
        return Err(Error::InvalidArg {
            name: "--reference",
            reason: "AdaSPEC selection needs a reference head, and a reference is only used with it".into(),
        });
    }
    if let Some(k) = cfg.select_k {
        super::loss::check_k(k)?;
    }
    if train.is_empty() {
        return Err(Error::InvalidArg { name: "--data", reason: "no training sequences".into() });
    }
    let tc = TrainConfig { beta1: 0.9, beta2: 0.95, weight_decay: 0.0, lr: cfg.lr, ..Default::default() };
    let mut opt = AdamW::new(model.named_vars(), &tc)?;
    let mut log = match &cfg.log {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| Error::io(p, e))?),
        None => None,
    };
    let before = evaluate(model, val, eval_depth)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0xf5);
    let order = super::data::permutation(train.len(), cfg.seed);
    let bar = super::head_train::progress_bar(cfg.steps, cfg.progress, "fspad train");
    let t0 = Instant::now();
    let (mut cursor, mut tokens) = (0usize, 0usize);
    let mut last = (0.0, 0.0);
    for step in 1..=cfg.steps {
        let mut acc: Vec<Option<Tensor>> = vec![None; opt.params().len()];
        let (mut fsum, mut tsum, mut nseq) = (0.0, 0.0, 0usize);
        for _ in 0..cfg.batch {
            let ex = &train[order[cursor % order.len()]];
            cursor += 1;
            tokens += ex.mask.len();
            let Some(s) = seq_loss(model, ex, cfg, &mut rng, reference)? else { continue };
            fsum += s.feature;
            tsum += s.token;
            nseq += 1;
            let grads = (s.loss / cfg.batch as f64)?.backward()?;
            accumulate(&grads, opt.params(), &mut acc)?;
        }
        for g in acc.iter_mut().flatten() {
            *g = g.clamp(-cfg.grad_clip_value, cfg.grad_clip_value)?;
        }
        let lr = if step <= cfg.warmup_steps { cfg.lr * step as f64 / cfg.warmup_steps as f64 } else { cfg.lr };
        opt.step(&acc, lr)?;
        let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        last = (fsum / nseq.max(1) as f64, tsum / nseq.max(1) as f64);
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let v = serde_json::json!({"kind": "train", "step": step, "feature_loss": last.0, "token_loss": last.1, "lr": lr, "tokens_per_s": tps});
            writeln!(f, "{v}").map_err(|e| Error::io(cfg.log.clone().unwrap_or_default(), e))?;
        }
        bar.inc(1);
        bar.set_message(format!("feature {:.3} token {:.3} {tps:.0} tok/s", last.0, last.1));
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let after = evaluate(model, val, eval_depth)?;
    Ok(serde_json::json!({
        "variant": model.config().variant.name(),
        "steps": cfg.steps,
        "train_tokens_per_s": tokens as f64 / secs.max(1e-9),
        "train_seconds": secs,
        "feature_loss": last.0,
        "token_loss": last.1,
        "alpha_before": before.alpha,
        "tau_chain_before": before.tau_chain,
        "alpha": after.alpha,
        "tau_chain": after.tau_chain,
        "tau_measured": super::head_train::tau_json(&after.tau),
    }))
}

/// Writes an FSPAD-family head GGUF (`general.architecture = "fspad"`, keys and tensors in the
/// README) with `tokenizer_from`'s tokenizer; with a reduced vocabulary `draft_vocab`, the
/// frozen LM-head rows `lm` and `d2t` go in too.
pub fn write_fspad_gguf(
    cfg: &FspadConfig,
    weights: &Weights,
    lm: Option<&Tensor>,
    draft_vocab: &[u32],
    out: &Path,
    tokenizer_from: &Path,
    ty: ExportType,
) -> Result<()> {
    check_destination(out, &[tokenizer_from])?;
    let u = |x: usize| Value::U32(u32::try_from(x).unwrap_or(u32::MAX));
    let k = |s: &str| format!("fspad.{s}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("fspad".into())),
        ("general.name".into(), Value::String(format!("adaspec-head-{}", cfg.variant))),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("variant"), Value::String(cfg.variant.name().into())),
        (k("embedding_length"), u(cfg.hidden)),
        (k("feed_forward_length"), u(cfg.ffn)),
        (k("sampling_length"), u(cfg.fs_ffn)),
        (k("attention.head_count"), u(cfg.n_head)),
        (k("attention.head_count_kv"), u(cfg.n_head_kv)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_eps)),
        (k("target_vocab_size"), u(cfg.target_vocab)),
    ];
    md.extend(tokenizer_metadata(tokenizer_from, cfg.target_vocab)?);
    let mut qt: Vec<(String, QTensor)> = Vec::new();
    for (name, shape) in cfg.tensor_shapes() {
        let t = super::head::head_tensor(weights, &name, &shape, "fspad export")?;
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        qt.push((name, QTensor::quantize(&t, ty.tensor_type(&shape))?));
    }
    if !draft_vocab.is_empty() {
        let lm =
            lm.ok_or_else(|| Error::InvalidArg { name: "lm", reason: "a reduced vocabulary needs its rows".into() })?;
        let shape = vec![draft_vocab.len(), cfg.hidden];
        qt.push(("output.weight".into(), QTensor::quantize(&lm.contiguous()?, ty.tensor_type(&shape))?));
    }
    let d2t: Vec<i64> = draft_vocab.iter().map(|&t| t as i64).collect();
    super::head::write_head_file(out, &md, qt, &d2t)
}

/// Reads an FSPAD-family head GGUF into candle: its shape, trainable weights, and (with a
/// reduced vocabulary) its LM-head rows and their target ids.
pub fn load_fspad_gguf(path: &Path) -> Result<(FspadConfig, Weights, Option<Tensor>, Vec<u32>)> {
    let head = crate::fspad::FspadHead::load(path)
        .map_err(|e| Error::Gguf { path: path.to_path_buf(), reason: e.to_string() })?;
    let cfg = head.config().clone();
    let d2t = head.draft_vocab().to_vec();
    let get = |name: &str| -> Result<Tensor> {
        let (shape, v) = head
            .tensor_f32(name)
            .ok_or_else(|| Error::Gguf { path: path.to_path_buf(), reason: format!("{name} unreadable") })?;
        Ok(Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?)
    };
    let mut w = Weights::new();
    for (name, _) in cfg.tensor_shapes() {
        let t = get(&name)?;
        w.insert(name, t);
    }
    let lm = if d2t.is_empty() { None } else { Some(get("output.weight")?) };
    Ok((cfg, w, lm, d2t))
}

/// Saves extracted sequences (a safetensors file), so experiments extract once.
pub fn save_examples(path: &Path, v: &[FspadExample]) -> Result<()> {
    let mut m = std::collections::HashMap::new();
    for (i, e) in v.iter().enumerate() {
        m.insert(format!("{i}.emb"), e.emb.clone());
        m.insert(format!("{i}.feat"), e.feat.clone());
        m.insert(format!("{i}.mask"), Tensor::from_vec(e.mask.clone(), e.mask.len(), &Device::Cpu)?);
    }
    let tmp = super::gguf_import::temp_path_for(path)?;
    candle_core::safetensors::save(&m, &tmp)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Loads what [`save_examples`] wrote.
pub fn load_saved_examples(path: &Path) -> Result<Vec<FspadExample>> {
    let m = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut out = Vec::new();
    for i in 0.. {
        let (Some(emb), Some(feat), Some(mask)) =
            (m.get(&format!("{i}.emb")), m.get(&format!("{i}.feat")), m.get(&format!("{i}.mask")))
        else {
            break;
        };
        out.push(FspadExample { emb: emb.clone(), feat: feat.clone(), mask: mask.to_vec1::<f32>()? });
    }
    Ok(out)
}
