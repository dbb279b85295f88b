//! FSPAD heads and their EAGLE-2-style baseline (arXiv 2408.15562, `Luc4Gui/FSPAD`): the file
//! format (`general.architecture = "fspad"`, see the README) and their computation as a ggml
//! graph run on llama.cpp's own CPU kernels (any weight type llama.cpp reads: F32, F16, Q8_0…).
//!
//! One entry at position P reads (token x, hidden f) and computes, with e = Emb(x) the target's
//! raw token embedding:
//! * u = W_fc·[e; f] + b (2H → H);
//! * feature sampling (variants `fspad`, `fs`): s = u + W_down(SiLU(W_gate·e) ⊙ W_up·RMSNorm(u)),
//!   otherwise s = u;
//! * one decoder layer on s with no input norm: a = s + Wo·Attn(s) (RoPE NEOX style at P, over
//!   the entry's visible keys), m = MLP(RMSNorm(a));
//! * partial alignment (variants `fspad`, `pad`): y = [a; a] + m with an I → 2H down
//!   projection; the first half y₁ gives the logits (the target's LM head, no final norm), the
//!   second y₂ is the hidden input of the entry's children. Otherwise y = a + m serves both.
//!
//! For committed positions f is the target's last hidden state after its final norm
//! (`result_norm`, collected by [`crate::features::FeatureTap::final_norm`]).
//!
//! Why a ggml graph rather than candle: it runs the head with llama.cpp's quantized kernels
//! (a Q8_0 head reads a quarter of an f32 head's bytes per draft step), reads the target's
//! embedding in its own quantization through `ggml_get_rows`, and keeps the C plugin free of
//! the trainer's crates. The trainer's candle model computes the same function (checked by
//! `tests/fspad.rs`). The head's KV cache is kept by the caller ([`FspadRunner::run`] takes the
//! visible keys and a mask), so a tree's attention mask is explicit.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use crate::error::{Error, Result};
use crate::model_file;

/// `general.architecture` of FSPAD-family heads.
pub const ARCH: &str = "fspad";

/// Which of the four heads of the FSPAD paper a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// EAGLE-2-style: fc, one decoder layer without input norm, the target's LM head.
    Eagle2,
    /// Feature sampling and partial alignment (the paper's method).
    Fspad,
    /// Feature sampling only (`cnets_mlplin.py`).
    FsOnly,
    /// Partial alignment only (`cnets_fspad_wofs.py`).
    PadOnly,
}

impl Variant {
    pub const ALL: [Variant; 4] = [Variant::Eagle2, Variant::Fspad, Variant::FsOnly, Variant::PadOnly];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Eagle2 => "eagle2",
            Variant::Fspad => "fspad",
            Variant::FsOnly => "fs",
            Variant::PadOnly => "pad",
        }
    }

    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    /// Has the feature-sampling MLP.
    pub fn sampling(self) -> bool {
        matches!(self, Variant::Fspad | Variant::FsOnly)
    }

    /// Has the 2H residual stream with a feature half.
    pub fn partial_alignment(self) -> bool {
        matches!(self, Variant::Fspad | Variant::PadOnly)
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape of a head (the `fspad.*` metadata keys).
#[derive(Debug, Clone, PartialEq)]
pub struct FspadConfig {
    pub variant: Variant,
    /// Hidden size H (the target's).
    pub hidden: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Decoder-layer FFN width I.
    pub ffn: usize,
    /// Feature-sampling MLP width (0 without feature sampling).
    pub fs_ffn: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// The target's vocabulary size.
    pub target_vocab: usize,
}

impl FspadConfig {
    /// Tensors of a head file, GGUF names with row-major shapes (the LM head rows and `d2t`
    /// come on top when the file carries a reduced vocabulary).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, i) = (self.hidden, self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.ffn);
        let b = |s: &str| format!("blk.0.{s}");
        let mut t = vec![("fc.weight".to_string(), vec![h, 2 * h]), ("fc.bias".to_string(), vec![h])];
        if self.variant.sampling() {
            let f = self.fs_ffn;
            t.push(("fs_norm.weight".into(), vec![h]));
            t.push(("fs_gate.weight".into(), vec![f, h]));
            t.push(("fs_up.weight".into(), vec![f, h]));
            t.push(("fs_down.weight".into(), vec![h, f]));
        }
        let down = if self.variant.partial_alignment() { 2 * h } else { h };
        t.extend([
            (b("attn_q.weight"), vec![q, h]),
            (b("attn_k.weight"), vec![kv, h]),
            (b("attn_v.weight"), vec![kv, h]),
            (b("attn_output.weight"), vec![h, q]),
            (b("ffn_norm.weight"), vec![h]),
            (b("ffn_gate.weight"), vec![i, h]),
            (b("ffn_up.weight"), vec![i, h]),
            (b("ffn_down.weight"), vec![down, i]),
        ]);
        t
    }

    /// Width of one KV row (keys or values of one entry).
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden == 0 || self.n_head == 0 || self.n_head_kv == 0 || self.head_dim == 0 || self.ffn == 0 {
            return Err("sizes must be > 0".into());
        }
        if self.n_head % self.n_head_kv != 0 {
            return Err(format!("{} heads are not a multiple of {} KV heads", self.n_head, self.n_head_kv));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head size {} is odd (RoPE pairs dimensions)", self.head_dim));
        }
        if self.variant.sampling() != (self.fs_ffn > 0) {
            return Err(format!("variant {} with feature-sampling width {}", self.variant, self.fs_ffn));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0 && self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err("rope.freq_base and layer_norm_rms_epsilon must be positive".into());
        }
        Ok(())
    }
}

/// A ggml context holding loaded tensors (freed on drop).
struct GgmlCtx(NonNull<sys::ggml_context>);

// SAFETY: the context is only read after loading (tensor data and metadata), never mutated.
unsafe impl Send for GgmlCtx {}
unsafe impl Sync for GgmlCtx {}

impl Drop for GgmlCtx {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init and freed once.
        unsafe { sys::ggml_free(self.0.as_ptr()) }
    }
}

/// A GGUF file's metadata (gguf context without tensor data, freed on drop).
struct Gguf {
    raw: NonNull<sys::gguf_context>,
    meta: NonNull<sys::ggml_context>,
    path: PathBuf,
}

impl Drop for Gguf {
    fn drop(&mut self) {
        // SAFETY: both created by gguf_init_from_file and freed once.
        unsafe {
            sys::ggml_free(self.meta.as_ptr());
            sys::gguf_free(self.raw.as_ptr());
        }
    }
}

impl Gguf {
    fn open(path: &Path) -> Result<Gguf> {
        crate::backend::init();
        model_file::check_header(path)?;
        let c = model_file::c_path(path)?;
        let mut meta: *mut sys::ggml_context = std::ptr::null_mut();
        let params = sys::gguf_init_params { no_alloc: true, ctx: &mut meta };
        // SAFETY: c is NUL-terminated; gguf reads the header only (no_alloc) and returns null on
        // a malformed file.
        let raw = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
        let bad = |r: &str| Error::InvalidGguf { path: path.to_path_buf(), reason: r.into() };
        let raw = NonNull::new(raw).ok_or_else(|| bad("unreadable GGUF header"))?;
        let Some(meta) = NonNull::new(meta) else {
            // SAFETY: raw is valid and owned here.
            unsafe { sys::gguf_free(raw.as_ptr()) };
            return Err(bad("no tensor table"));
        };
        Ok(Gguf { raw, meta, path: path.to_path_buf() })
    }

    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::InvalidGguf { path: self.path.clone(), reason: reason.into() }
    }

    fn key(&self, key: &str) -> Option<i64> {
        let c = CString::new(key).ok()?;
        // SAFETY: valid context, NUL-terminated key.
        let id = unsafe { sys::gguf_find_key(self.raw.as_ptr(), c.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn str(&self, key: &str) -> Option<String> {
        let id = self.key(key)?;
        // SAFETY: id is a valid key id; the type is checked before reading.
        unsafe {
            if sys::gguf_get_kv_type(self.raw.as_ptr(), id) != sys::GGUF_TYPE_STRING {
                return None;
            }
            let p = sys::gguf_get_val_str(self.raw.as_ptr(), id);
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    fn u32(&self, key: &str) -> Result<usize> {
        let id = self.key(key).ok_or_else(|| self.bad(format!("{key} missing")))?;
        // SAFETY: id is a valid key id; the type is checked before reading.
        unsafe {
            let t = sys::gguf_get_kv_type(self.raw.as_ptr(), id);
            match t {
                sys::GGUF_TYPE_UINT32 => Ok(sys::gguf_get_val_u32(self.raw.as_ptr(), id) as usize),
                sys::GGUF_TYPE_INT32 => usize::try_from(sys::gguf_get_val_i32(self.raw.as_ptr(), id))
                    .map_err(|_| self.bad(format!("{key} is negative"))),
                _ => Err(self.bad(format!("{key} is not an integer"))),
            }
        }
    }

    fn f32(&self, key: &str) -> Result<f32> {
        let id = self.key(key).ok_or_else(|| self.bad(format!("{key} missing")))?;
        // SAFETY: id is a valid key id; the type is checked before reading.
        unsafe {
            if sys::gguf_get_kv_type(self.raw.as_ptr(), id) != sys::GGUF_TYPE_FLOAT32 {
                return Err(self.bad(format!("{key} is not a float")));
            }
            Ok(sys::gguf_get_val_f32(self.raw.as_ptr(), id))
        }
    }

    /// The metadata tensor `name` (shape and type; no data).
    fn tensor(&self, name: &str) -> Option<*mut sys::ggml_tensor> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid context, NUL-terminated name.
        let t = unsafe { sys::ggml_get_tensor(self.meta.as_ptr(), c.as_ptr()) };
        (!t.is_null()).then_some(t)
    }

    /// Row-major shape (outermost first) of a metadata tensor.
    fn shape(t: *mut sys::ggml_tensor) -> Vec<usize> {
        // SAFETY: t is a valid tensor of the metadata context.
        let (ne, nd) = unsafe { ((*t).ne, sys::ggml_n_dims(t)) };
        (0..nd as usize).rev().map(|d| ne[d] as usize).collect()
    }

    /// Loads tensors `names` into a new ggml context (data read from the file).
    fn load(&self, names: &[String]) -> Result<(GgmlCtx, HashMap<String, *mut sys::ggml_tensor>)> {
        let mut metas = Vec::with_capacity(names.len());
        let mut bytes = 0usize;
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        for n in names {
            let t = self.tensor(n).ok_or_else(|| self.bad(format!("tensor {n} missing")))?;
            let c = CString::new(n.as_str()).map_err(|_| self.bad("tensor name with NUL"))?;
            // SAFETY: valid context and name; t is its tensor.
            let id = unsafe { sys::gguf_find_tensor(self.raw.as_ptr(), c.as_ptr()) };
            if id < 0 {
                return Err(self.bad(format!("tensor {n} missing")));
            }
            // SAFETY: t is valid.
            let nb = unsafe { sys::ggml_nbytes(t) };
            // SAFETY: valid context and tensor id.
            let off = unsafe {
                sys::gguf_get_data_offset(self.raw.as_ptr()) + sys::gguf_get_tensor_offset(self.raw.as_ptr(), id)
            };
            // Checked before anything is allocated: a header may declare any size.
            if off as u64 + nb as u64 > len {
                return Err(self.bad(format!("tensor {n} lies past the end of the file")));
            }
            bytes += nb + 64;
            metas.push((n.clone(), t, off, nb));
        }
        // SAFETY: plain size query.
        let overhead = unsafe { sys::ggml_tensor_overhead() } * (names.len() + 1);
        let params = sys::ggml_init_params {
            mem_size: bytes + overhead + 1024,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        };
        // SAFETY: ggml allocates the context; the size is at most the file's (gguf checks that
        // tensor data regions follow each other), so the allocation is a sane one.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) }).map(GgmlCtx).ok_or_else(|| {
            Error::ContextCreate(format!("{}: cannot allocate {bytes} bytes for tensors", self.path.display()))
        })?;
        let mut file = std::fs::File::open(&self.path)
            .map_err(|e| Error::ModelFile { path: self.path.clone(), reason: e.to_string() })?;
        let mut out = HashMap::new();
        for (n, meta, off, nb) in metas {
            // SAFETY: ctx has room for every tensor (sized above); meta is a valid tensor.
            let t = unsafe { sys::ggml_dup_tensor(ctx.0.as_ptr(), meta) };
            // SAFETY: t was just allocated with nb bytes of data.
            let dst = unsafe { std::slice::from_raw_parts_mut((*t).data as *mut u8, nb) };
            file.seek(SeekFrom::Start(off as u64))
                .and_then(|_| file.read_exact(dst))
                .map_err(|e| Error::ModelFile { path: self.path.clone(), reason: format!("tensor {n}: {e}") })?;
            out.insert(n, t);
        }
        Ok((ctx, out))
    }
}

fn ggml_type_of(t: *mut sys::ggml_tensor) -> sys::ggml_type {
    // SAFETY: valid tensor.
    unsafe { (*t).type_ }
}

/// A loaded FSPAD-family head: shape, weights and its draft vocabulary.
pub struct FspadHead {
    path: PathBuf,
    cfg: FspadConfig,
    _ctx: GgmlCtx,
    w: HashMap<String, *mut sys::ggml_tensor>,
    /// Target id of each row of the head's own LM head (`output.weight`); empty when the
    /// head uses the target's LM head.
    d2t: Vec<u32>,
}

// SAFETY: the weights are read-only after loading.
unsafe impl Send for FspadHead {}
unsafe impl Sync for FspadHead {}

impl FspadHead {
    /// Loads and checks a head file.
    pub fn load(path: &Path) -> Result<FspadHead> {
        let g = Gguf::open(path)?;
        let arch = g.str("general.architecture").unwrap_or_default();
        if arch != ARCH {
            return Err(g.bad(format!("architecture '{arch}' is not an FSPAD-family head (expected '{ARCH}')")));
        }
        let k = |s: &str| format!("{ARCH}.{s}");
        let vname = g.str(&k("variant")).ok_or_else(|| g.bad("fspad.variant missing"))?;
        let variant = Variant::parse(&vname)
            .ok_or_else(|| g.bad(format!("fspad.variant '{vname}' is not one of eagle2, fspad, fs, pad")))?;
        let cfg = FspadConfig {
            variant,
            hidden: g.u32(&k("embedding_length"))?,
            n_head: g.u32(&k("attention.head_count"))?,
            n_head_kv: g.u32(&k("attention.head_count_kv"))?,
            head_dim: g.u32(&k("attention.key_length"))?,
            ffn: g.u32(&k("feed_forward_length"))?,
            fs_ffn: if variant.sampling() { g.u32(&k("sampling_length"))? } else { 0 },
            rope_theta: g.f32(&k("rope.freq_base"))?,
            rms_eps: g.f32(&k("attention.layer_norm_rms_epsilon"))?,
            target_vocab: g.u32(&k("target_vocab_size"))?,
        };
        cfg.validate().map_err(|r| g.bad(r))?;
        let mut shapes = cfg.tensor_shapes();
        let own_lm = g.tensor("output.weight").is_some();
        if own_lm {
            let rows = g.tensor("output.weight").map(Gguf::shape).unwrap_or_default();
            let v = rows.first().copied().unwrap_or(0);
            shapes.push(("output.weight".into(), vec![v, cfg.hidden]));
            shapes.push(("d2t".into(), vec![v]));
        }
        for (n, want) in &shapes {
            let t = g.tensor(n).ok_or_else(|| g.bad(format!("tensor {n} missing")))?;
            let got = Gguf::shape(t);
            if &got != want {
                return Err(g.bad(format!("{n} has shape {got:?}, expected {want:?}")));
            }
            let ty = ggml_type_of(t);
            let vector = want.len() == 1;
            if n == "d2t" && ty != sys::GGML_TYPE_I64 {
                return Err(g.bad("d2t must be I64 (as in eagle3 heads)"));
            }
            if vector && n != "d2t" && ty != sys::GGML_TYPE_F32 {
                return Err(g.bad(format!("{n} must be F32")));
            }
            // SAFETY: plain query on a ggml type.
            if !vector
                && (unsafe { sys::ggml_blck_size(ty) } as usize == 0
                    || want[1] % unsafe { sys::ggml_blck_size(ty) } as usize != 0)
            {
                return Err(g.bad(format!("{n}: rows of {} do not fit its type's blocks", want[1])));
            }
        }
        let names: Vec<String> = shapes.iter().map(|(n, _)| n.clone()).collect();
        let (ctx, w) = g.load(&names)?;
        let mut d2t = Vec::new();
        if let Some(&t) = w.get("d2t") {
            // SAFETY: an I64 vector tensor loaded above.
            let n = unsafe { (*t).ne[0] } as usize;
            let s = unsafe { std::slice::from_raw_parts((*t).data as *const i64, n) };
            for &id in s {
                if id < 0 || id as usize >= cfg.target_vocab {
                    return Err(g.bad(format!("d2t holds id {id} outside the target's {} tokens", cfg.target_vocab)));
                }
                d2t.push(id as u32);
            }
        }
        Ok(FspadHead { path: path.to_path_buf(), cfg, _ctx: ctx, w, d2t })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &FspadConfig {
        &self.cfg
    }

    /// Target ids of the head's own LM-head rows (empty: the target's whole LM head).
    pub fn draft_vocab(&self) -> &[u32] {
        &self.d2t
    }

    /// Checks that this head was made for `target`.
    pub fn check_target(&self, target: &crate::backend::Model) -> Result<()> {
        let bad = |r: String| Error::IncompatibleVocab(format!("head: {r}"));
        if self.cfg.hidden != target.n_embd() {
            return Err(bad(format!(
                "the head reads features of hidden size {}, the target's is {}",
                self.cfg.hidden,
                target.n_embd()
            )));
        }
        if self.cfg.target_vocab != target.n_vocab() {
            return Err(bad(format!(
                "the head was made for a vocabulary of {} tokens, the target has {}",
                self.cfg.target_vocab,
                target.n_vocab()
            )));
        }
        Ok(())
    }

    fn t(&self, name: &str) -> *mut sys::ggml_tensor {
        self.w[name]
    }

    /// Tensor `name` dequantized to f32 with its row-major shape (for the trainer and
    /// inspection); `None` for a tensor the head does not have or `d2t`.
    pub fn tensor_f32(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let &t = self.w.get(name)?;
        if name == "d2t" {
            return None;
        }
        let shape = Gguf::shape(t);
        let n: usize = shape.iter().product();
        let ty = ggml_type_of(t);
        let mut out = vec![0.0f32; n];
        if ty == sys::GGML_TYPE_F32 {
            // SAFETY: a loaded contiguous f32 tensor of n elements.
            out.copy_from_slice(unsafe { std::slice::from_raw_parts((*t).data as *const f32, n) });
            return Some((shape, out));
        }
        // SAFETY: ggml's type table; to_float converts n elements (whole rows of whole blocks,
        // checked when the head was loaded) of the tensor's data.
        unsafe {
            let traits = sys::ggml_get_type_traits(ty);
            let to_float = traits.as_ref()?.to_float?;
            to_float((*t).data, out.as_mut_ptr(), n as i64);
        }
        Some((shape, out))
    }
}

/// The target's tensors a head needs: its token embedding and (without a head LM head) its
/// LM head, read from the target's GGUF in the target's own types.
pub struct TargetTensors {
    _ctx: GgmlCtx,
    embd: *mut sys::ggml_tensor,
    lm: Option<*mut sys::ggml_tensor>,
}

// SAFETY: read-only after loading.
unsafe impl Send for TargetTensors {}
unsafe impl Sync for TargetTensors {}

impl TargetTensors {
    /// [`TargetTensors::load`], shared by every live session on the same target file (the
    /// embedding of a 1.5B target is ~150 MB: read once, not per session).
    pub fn shared(target: &Path, hidden: usize, n_vocab: usize, lm_head: bool) -> Result<Arc<TargetTensors>> {
        type Key = (PathBuf, usize, usize, bool);
        static LIVE: std::sync::Mutex<Vec<(Key, std::sync::Weak<TargetTensors>)>> = std::sync::Mutex::new(Vec::new());
        let key = (target.to_path_buf(), hidden, n_vocab, lm_head);
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(_, w)| w.strong_count() > 0);
        if let Some(t) = live.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade()) {
            return Ok(t);
        }
        let t = Arc::new(TargetTensors::load(target, hidden, n_vocab, lm_head)?);
        live.push((key, Arc::downgrade(&t)));
        Ok(t)
    }

    /// Reads `token_embd.weight` (and, with `lm_head`, `output.weight` or the tied embedding).
    pub fn load(target: &Path, hidden: usize, n_vocab: usize, lm_head: bool) -> Result<TargetTensors> {
        let g = Gguf::open(target)?;
        let mut names = vec!["token_embd.weight".to_string()];
        let has_output = g.tensor("output.weight").is_some();
        if lm_head && has_output {
            names.push("output.weight".into());
        }
        for n in &names {
            let t = g.tensor(n).ok_or_else(|| g.bad(format!("tensor {n} missing")))?;
            let s = Gguf::shape(t);
            if s.len() != 2 || s[1] != hidden || s[0] < n_vocab {
                return Err(g.bad(format!(
                    "{n} has shape {s:?}; a head over {n_vocab} tokens of width {hidden} needs [{n_vocab}, {hidden}]"
                )));
            }
        }
        let (ctx, w) = g.load(&names)?;
        let embd = w["token_embd.weight"];
        let lm = lm_head.then(|| *w.get("output.weight").unwrap_or(&embd));
        Ok(TargetTensors { _ctx: ctx, embd, lm })
    }
}

/// One entry of a head call.
pub struct EntryIn<'a> {
    pub token: i32,
    pub pos: i32,
    /// Hidden input (H floats): a target feature or a parent entry's hidden output.
    pub hidden: &'a [f32],
}

/// What a head call returns, row-major per entry.
#[derive(Debug, Default)]
pub struct StepOut {
    /// Logits over the head's vocabulary (draft vocabulary or the target's), V floats per entry.
    pub logits: Vec<f32>,
    /// Hidden output for the entry's children (H floats per entry).
    pub hidden: Vec<f32>,
    /// Keys (RoPE applied) and values of the entries (kv_dim floats per entry).
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Runs a head for one session (its own scratch memory; the KV cache is the caller's).
pub struct FspadRunner {
    head: Arc<FspadHead>,
    tgt: Arc<TargetTensors>,
    n_threads: i32,
    /// Scratch memory of the per-call ggml context (16-byte aligned).
    buf: Vec<u128>,
    n_vocab_out: usize,
}

// SAFETY: the runner owns its scratch memory; the shared tensors are read-only.
unsafe impl Send for FspadRunner {}

impl FspadRunner {
    pub fn new(head: Arc<FspadHead>, target: &crate::backend::Model, n_threads: i32) -> Result<FspadRunner> {
        head.check_target(target)?;
        let own_lm = !head.d2t.is_empty();
        let tgt = TargetTensors::shared(target.path(), head.cfg.hidden, target.n_vocab(), !own_lm)?;
        let n_vocab_out = if own_lm { head.d2t.len() } else { target.n_vocab() };
        let n_threads = if n_threads > 0 { n_threads } else { crate::backend::default_threads() };
        Ok(FspadRunner { head, tgt, n_threads, buf: Vec::new(), n_vocab_out })
    }

    pub fn head(&self) -> &Arc<FspadHead> {
        &self.head
    }

    /// Logits per entry.
    pub fn n_vocab_out(&self) -> usize {
        self.n_vocab_out
    }

    /// Runs `entries` attending to `s` visible cached rows (`k_cache`, `v_cache`: s·kv_dim
    /// floats each) and to each other as `mask` says: row b holds s + B additive values
    /// (0 visible, -inf hidden) for cached rows then the new entries.
    pub fn run(&mut self, entries: &[EntryIn<'_>], k_cache: &[f32], v_cache: &[f32], mask: &[f32]) -> Result<StepOut> {
        let c = self.head.cfg.clone();
        let (h, kvd, nb) = (c.hidden, c.kv_dim(), entries.len());
        if nb == 0 {
            return Ok(StepOut::default());
        }
        let s = k_cache.len() / kvd;
        let bad = |r: String| Error::InvalidParam { name: "head", reason: r };
        if k_cache.len() != s * kvd || v_cache.len() != s * kvd {
            return Err(bad("KV cache rows of the wrong width".into()));
        }
        if mask.len() != nb * (s + nb) {
            return Err(bad(format!("mask of {} values for {nb} entries over {} keys", mask.len(), s + nb)));
        }
        if entries.iter().any(|e| e.hidden.len() != h) {
            return Err(bad(format!("hidden inputs must have {h} floats")));
        }
        if entries.iter().any(|e| e.token < 0 || e.token as usize >= c.target_vocab) {
            return Err(bad("token outside the target's vocabulary".into()));
        }
        // Scratch size: every intermediate of the graph in f32, with slack for ggml's work
        // buffer (activations quantized for the weight types) and tensor headers.
        let n_kv = s + nb;
        let fs = if c.variant.sampling() { c.fs_ffn } else { 0 };
        let floats = nb * (16 * h + 6 * c.ffn + 4 * fs + 3 * self.n_vocab_out + 4 * c.n_head * c.head_dim)
            + 6 * n_kv * kvd
            + 3 * n_kv * nb * c.n_head
            + nb * (s + nb);
        // SAFETY: plain size queries.
        let overhead = unsafe { sys::ggml_tensor_overhead() * 160 + sys::ggml_graph_overhead_custom(256, false) };
        let bytes = floats * 4 * 2 + overhead + (8 << 20);
        let words = bytes.div_ceil(16);
        if self.buf.len() < words {
            // A failed allocation is an error, not an abort (the C boundary never aborts).
            let mut buf: Vec<u128> = Vec::new();
            buf.try_reserve_exact(words).map_err(|_| {
                Error::ContextCreate(format!(
                    "head: cannot allocate {bytes} bytes of scratch for {nb} entries over {n_kv} keys"
                ))
            })?;
            buf.resize(words, 0);
            self.buf = buf;
        }
        let params = sys::ggml_init_params {
            mem_size: self.buf.len() * 16,
            mem_buffer: self.buf.as_mut_ptr() as *mut c_void,
            no_alloc: false,
        };
        // SAFETY: buf is 16-byte aligned and outlives the context, freed at the end of this call.
        let ctx = unsafe { sys::ggml_init(params) };
        if ctx.is_null() {
            return Err(Error::ContextCreate("head: ggml_init failed".into()));
        }
        struct Free(*mut sys::ggml_context);
        impl Drop for Free {
            fn drop(&mut self) {
                // SAFETY: created above, freed once.
                unsafe { sys::ggml_free(self.0) }
            }
        }
        let _free = Free(ctx);
        // SAFETY: every tensor below is created in ctx (sized above) from validated shapes:
        // weights were checked against the config when the head was loaded, inputs above.
        unsafe { self.graph(ctx, entries, k_cache, v_cache, mask, s) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn graph(
        &self,
        ctx: *mut sys::ggml_context,
        entries: &[EntryIn<'_>],
        k_cache: &[f32],
        v_cache: &[f32],
        mask: &[f32],
        s: usize,
    ) -> Result<StepOut> {
        let c = &self.head.cfg;
        let hd = &self.head;
        let (h, nb) = (c.hidden as i64, entries.len() as i64);
        let (nh, nkv, dh) = (c.n_head as i64, c.n_head_kv as i64, c.head_dim as i64);
        let f32t = sys::GGML_TYPE_F32;
        let new1 = |ty, n: i64| sys::ggml_new_tensor_1d(ctx, ty, n);
        let new2 = |ty, a: i64, b: i64| sys::ggml_new_tensor_2d(ctx, ty, a, b);
        let fill = |t: *mut sys::ggml_tensor, v: &[f32]| {
            std::ptr::copy_nonoverlapping(v.as_ptr(), (*t).data as *mut f32, v.len());
        };
        // Inputs.
        let ids = new1(sys::GGML_TYPE_I32, nb);
        let pos = new1(sys::GGML_TYPE_I32, nb);
        for (j, e) in entries.iter().enumerate() {
            *((*ids).data as *mut i32).add(j) = e.token;
            *((*pos).data as *mut i32).add(j) = e.pos;
        }
        let f = new2(f32t, h, nb);
        for (j, e) in entries.iter().enumerate() {
            std::ptr::copy_nonoverlapping(e.hidden.as_ptr(), ((*f).data as *mut f32).add(j * h as usize), h as usize);
        }
        let n_kv = s as i64 + nb;
        let kq_mask = new2(f32t, n_kv, nb);
        fill(kq_mask, mask);

        let mm = |w: &str, x| sys::ggml_mul_mat(ctx, hd.t(w), x);
        let norm = |x, w: &str| sys::ggml_mul(ctx, sys::ggml_rms_norm(ctx, x, c.rms_eps), hd.t(w));
        let e = sys::ggml_get_rows(ctx, self.tgt.embd, ids); // (H, B) f32
        let u = sys::ggml_add(ctx, mm("fc.weight", sys::ggml_concat(ctx, e, f, 0)), hd.t("fc.bias"));
        let x = if c.variant.sampling() {
            let g = sys::ggml_silu(ctx, mm("fs_gate.weight", e));
            let up = mm("fs_up.weight", norm(u, "fs_norm.weight"));
            sys::ggml_add(ctx, u, mm("fs_down.weight", sys::ggml_mul(ctx, g, up)))
        } else {
            u
        };
        // Attention (no input norm), RoPE NEOX style at each entry's position.
        let rope = |t| {
            sys::ggml_rope_ext(
                ctx,
                t,
                pos,
                std::ptr::null_mut(),
                dh as i32,
                2,
                0,
                c.rope_theta,
                1.0,
                0.0,
                1.0,
                32.0,
                1.0,
            )
        };
        let q = rope(sys::ggml_reshape_3d(ctx, mm("blk.0.attn_q.weight", x), dh, nh, nb));
        let k_new = rope(sys::ggml_reshape_3d(ctx, mm("blk.0.attn_k.weight", x), dh, nkv, nb));
        let v_new = sys::ggml_reshape_3d(ctx, mm("blk.0.attn_v.weight", x), dh, nkv, nb);
        let (k_all, v_all) = if s > 0 {
            let kc = sys::ggml_new_tensor_3d(ctx, f32t, dh, nkv, s as i64);
            let vc = sys::ggml_new_tensor_3d(ctx, f32t, dh, nkv, s as i64);
            fill(kc, k_cache);
            fill(vc, v_cache);
            (sys::ggml_concat(ctx, kc, k_new, 2), sys::ggml_concat(ctx, vc, v_new, 2))
        } else {
            (k_new, v_new)
        };
        let qp = sys::ggml_permute(ctx, q, 0, 2, 1, 3); // (dh, B, nh)
        let kp = sys::ggml_cont(ctx, sys::ggml_permute(ctx, k_all, 0, 2, 1, 3)); // (dh, n_kv, nkv)
        let kq = sys::ggml_mul_mat(ctx, kp, qp); // (n_kv, B, nh)
        let kq = sys::ggml_soft_max_ext(ctx, kq, kq_mask, 1.0 / (dh as f32).sqrt(), 0.0);
        let vt = sys::ggml_cont(ctx, sys::ggml_permute(ctx, v_all, 1, 2, 0, 3)); // (n_kv, dh, nkv)
        let kqv = sys::ggml_mul_mat(ctx, vt, kq); // (dh, B, nh)
        let o = sys::ggml_cont(ctx, sys::ggml_permute(ctx, kqv, 0, 2, 1, 3)); // (dh, nh, B)
        let o = sys::ggml_reshape_2d(ctx, o, dh * nh, nb);
        let a = sys::ggml_add(ctx, x, mm("blk.0.attn_output.weight", o));
        let hn = norm(a, "blk.0.ffn_norm.weight");
        let m = mm(
            "blk.0.ffn_down.weight",
            sys::ggml_mul(ctx, sys::ggml_silu(ctx, mm("blk.0.ffn_gate.weight", hn)), mm("blk.0.ffn_up.weight", hn)),
        );
        let (y_tok, y_hidden) = if c.variant.partial_alignment() {
            let y = sys::ggml_add(ctx, sys::ggml_concat(ctx, a, a, 0), m); // (2H, B)
            let row = (*y).nb[1];
            let first = sys::ggml_cont(ctx, sys::ggml_view_2d(ctx, y, h, nb, row, 0));
            let second = sys::ggml_cont(ctx, sys::ggml_view_2d(ctx, y, h, nb, row, h as usize * 4));
            (first, second)
        } else {
            let y = sys::ggml_add(ctx, a, m);
            (y, y)
        };
        let lm = if hd.d2t.is_empty() {
            self.tgt.lm.ok_or_else(|| Error::InvalidParam { name: "head", reason: "no LM head".into() })?
        } else {
            hd.t("output.weight")
        };
        let logits = sys::ggml_mul_mat(ctx, lm, y_tok);
        let k_out = sys::ggml_cont(ctx, k_new);
        let v_out = sys::ggml_cont(ctx, v_new);

        let gf = sys::ggml_new_graph_custom(ctx, 256, false);
        for t in [logits, y_hidden, k_out, v_out] {
            sys::ggml_build_forward_expand(gf, t);
        }
        let st = sys::ggml_graph_compute_with_ctx(ctx, gf, self.n_threads);
        if st != sys::GGML_STATUS_SUCCESS {
            return Err(Error::Decode { code: st, what: "head graph".into() });
        }
        let read = |t: *mut sys::ggml_tensor, n: usize| std::slice::from_raw_parts((*t).data as *const f32, n).to_vec();
        let (b, kvd) = (nb as usize, c.kv_dim());
        Ok(StepOut {
            logits: read(logits, b * self.n_vocab_out),
            hidden: read(y_hidden, b * c.hidden),
            k: read(k_out, b * kvd),
            v: read(v_out, b * kvd),
        })
    }
}

/// The architecture of a GGUF file (`general.architecture`), read without loading it.
pub fn file_architecture(path: &Path) -> Result<String> {
    Gguf::open(path)?
        .str("general.architecture")
        .ok_or_else(|| Error::InvalidGguf { path: path.to_path_buf(), reason: "general.architecture missing".into() })
}
