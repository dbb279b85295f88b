//! Thin safe layer over llama.cpp: models, contexts, batches with seq-id sets, KV-cache edits,
//! tokenizer and chat template.
//!
//! Why llama-cpp-sys-2 directly and not only llama-cpp-2's wrappers: the `exact` numeric mode
//! needs `use_extra_bufts = false` (no weight repacking, SPEC §7), which llama-cpp-2 0.1.160 has
//! no setter for, and its `LlamaBatch::add` neither checks seq-id counts nor avoids panics.
//! Both crates are pinned to the same llama.cpp build.
//!
//! This module must never panic on bad input: every failure is an [`Error`].

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Once};

use llama_cpp_sys_2 as sys;

use crate::cpu_kernels::{create_capturing, CpuBackend, KernelPlan};
use crate::error::{Error, Result};
use crate::features::FeatureTap;
use crate::model_file;

/// A llama.cpp token id.
pub type Token = i32;

static BACKEND_INIT: Once = Once::new();
/// The last error-level line llama.cpp logged, so failures can say *why*.
static LAST_LLAMA_ERROR: Mutex<String> = Mutex::new(String::new());

/// Where llama.cpp's log lines go besides `tracing`: (level, line) with ggml's levels
/// (1 debug ... 4 error). A host installs one through the C API; none by default, so the
/// library prints nothing of its own.
pub type LogSink = Box<dyn Fn(i32, &str) + Send + Sync>;

static LOG_SINK: std::sync::RwLock<Option<LogSink>> = std::sync::RwLock::new(None);

/// Installs (or, with `None`, removes) the sink for llama.cpp's log lines.
pub fn set_log_sink(sink: Option<LogSink>) {
    if let Ok(mut s) = LOG_SINK.write() {
        *s = sink;
    }
}

/// Forwards llama.cpp's log lines to `tracing` (debug level) and the log sink, and remembers
/// errors.
unsafe extern "C" fn log_to_tracing(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let line = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let line = line.trim_end();
    if let Ok(sink) = LOG_SINK.read() {
        if let Some(f) = sink.as_ref() {
            f(level as i32, line);
        }
    }
    if level == sys::GGML_LOG_LEVEL_ERROR {
        tracing::warn!(target: "llama.cpp", "{line}");
        if let Ok(mut last) = LAST_LLAMA_ERROR.lock() {
            // Keep the whole story of one failure (llama.cpp logs the cause, then a summary).
            if last.len() < 4096 {
                if !last.is_empty() {
                    last.push_str("; ");
                }
                last.push_str(line);
            }
        }
    } else {
        tracing::trace!(target: "llama.cpp", "{line}");
    }
}

/// Initialises llama.cpp once per process and routes its logs through `tracing`.
pub fn init() {
    BACKEND_INIT.call_once(|| {
        // ggml's CPU initialisation sets KMP_BLOCKTIME=200 in the process environment when it is
        // unset (an LLVM/Intel OpenMP setting; this build's libgomp ignores it). The environment
        // belongs to the host: take the variable back out if ggml put it there.
        let had_blocktime = std::env::var_os("KMP_BLOCKTIME").is_some();
        // SAFETY: plain global initialisation; the callback is a `'static` function;
        // ggml_cpu_init is idempotent.
        unsafe {
            sys::llama_log_set(Some(log_to_tracing), std::ptr::null_mut());
            sys::llama_backend_init();
            sys::ggml_cpu_init();
        }
        if !had_blocktime && std::env::var_os("KMP_BLOCKTIME").as_deref() == Some(std::ffi::OsStr::new("200")) {
            std::env::remove_var("KMP_BLOCKTIME");
        }
    });
}

pub(crate) fn take_llama_error() -> String {
    LAST_LLAMA_ERROR.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default()
}

/// How a model is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    /// Layers to offload to a GPU (0 = CPU only; needs a GPU build).
    pub n_gpu_layers: u32,
    /// Memory-map the file instead of reading it.
    pub use_mmap: bool,
    /// Let llama.cpp repack weights for faster CPU matmuls. Repacked kernels make batched
    /// logits differ from one-token logits (SPEC §7), so `exact` mode turns this off.
    pub repack: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self { n_gpu_layers: 0, use_mmap: true, repack: true }
    }
}

/// A loaded GGUF model. Immutable after loading: share it between sessions as `Arc<Model>`.
pub struct Model {
    raw: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    path: PathBuf,
    params: ModelParams,
}

// SAFETY: llama.cpp never mutates a model after loading; contexts only read it.
unsafe impl Send for Model {}
// SAFETY: as above, all methods only read the model.
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_model_load_from_file and is freed once, here.
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.path).field("params", &self.params).finish()
    }
}

/// Whether weight repacking would put tensors in ggml's AMX buffer, whose matmul crashes on
/// some AMX machines with K-quants (llama.cpp issue #20824, seen here on a Xeon with AMX_INT8:
/// the first Q4_K_M decode segfaults). `ADASPEC_ALLOW_AMX=1` keeps it.
fn amx_repack_unsafe() -> bool {
    // SAFETY: a plain query of how ggml-cpu was compiled.
    let amx = unsafe { sys::ggml_cpu_has_amx_int8() } != 0;
    amx && std::env::var_os("ADASPEC_ALLOW_AMX").map_or(true, |v| v.is_empty() || v == "0")
}

/// Whether `Model::load` with `repack: true` really repacks on this machine (false on AMX
/// CPUs, see [`Model::load`]).
pub fn repacking_available() -> bool {
    !amx_repack_unsafe()
}

impl Model {
    /// Loads a GGUF model. On CPUs with AMX, weights are not repacked (see
    /// [`amx_repack_unsafe`]); the model's [`Model::params`] then say `repack: false`.
    pub fn load(path: impl AsRef<Path>, params: &ModelParams) -> Result<Model> {
        init();
        let path = path.as_ref();
        let c_path = model_file::c_path(path)?;
        model_file::check(path, &c_path, params.use_mmap)?;
        let mut params = params.clone();
        if params.repack && amx_repack_unsafe() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::info!(
                    "this CPU has AMX: weights are not repacked (llama.cpp's AMX matmul crashes on some \
                     AMX machines, llama.cpp #20824); ADASPEC_ALLOW_AMX=1 repacks anyway"
                )
            });
            params.repack = false;
        }
        let params = &params;
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = i32::try_from(params.n_gpu_layers).unwrap_or(i32::MAX);
        mp.use_extra_bufts = params.repack;
        if !params.use_mmap {
            mp.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        }
        take_llama_error();
        // SAFETY: c_path is NUL-terminated and outlives the call; mp is a valid params struct.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        let Some(raw) = NonNull::new(raw) else {
            let why = take_llama_error();
            return Err(if why.is_empty() {
                Error::ModelLoad { path: path.to_path_buf() }
            } else {
                Error::InvalidGguf { path: path.to_path_buf(), reason: why }
            });
        };
        // SAFETY: raw is a valid model; the vocab lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(raw.as_ptr()) };
        let Some(vocab) = NonNull::new(vocab as *mut sys::llama_vocab) else {
            // SAFETY: raw is valid and not yet owned by anything else.
            unsafe { sys::llama_model_free(raw.as_ptr()) };
            return Err(Error::InvalidGguf { path: path.to_path_buf(), reason: "model has no vocabulary".into() });
        };
        Ok(Model { raw, vocab, path: path.to_path_buf(), params: params.clone() })
    }

    /// The file this model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parameters it was loaded with.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    fn vocab_ptr(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// Vocabulary size (logit row length).
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer for the model's lifetime.
        usize::try_from(unsafe { sys::llama_vocab_n_tokens(self.vocab_ptr()) }).unwrap_or(0)
    }

    /// Vocabulary type as llama.cpp numbers it (1 SPM, 2 BPE, ...).
    pub fn vocab_type(&self) -> u32 {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_type(self.vocab_ptr()) as u32 }
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: valid model pointer.
        u32::try_from(unsafe { sys::llama_model_n_ctx_train(self.raw.as_ptr()) }).unwrap_or(0)
    }

    /// Hidden size.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        usize::try_from(unsafe { sys::llama_model_n_embd(self.raw.as_ptr()) }).unwrap_or(0)
    }

    /// Number of transformer blocks.
    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer.
        usize::try_from(unsafe { sys::llama_model_n_layer(self.raw.as_ptr()) }).unwrap_or(0)
    }

    /// Beginning-of-sequence token (-1 if none).
    pub fn bos(&self) -> Token {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_bos(self.vocab_ptr()) }
    }

    /// End-of-sequence token (-1 if none).
    pub fn eos(&self) -> Token {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_eos(self.vocab_ptr()) }
    }

    /// Whether the tokenizer adds BOS to a fresh prompt.
    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab_ptr()) }
    }

    fn token_in_range(&self, token: Token) -> bool {
        token >= 0 && (token as usize) < self.n_vocab()
    }

    /// Whether `token` ends generation (EOS, EOT, ...). Out-of-range ids are not.
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: valid vocab pointer; the id is range-checked first.
        self.token_in_range(token) && unsafe { sys::llama_vocab_is_eog(self.vocab_ptr(), token) }
    }

    /// The vocabulary's stored text of a token (empty for out-of-range ids).
    pub fn token_text(&self, token: Token) -> Vec<u8> {
        if !self.token_in_range(token) {
            return Vec::new();
        }
        // SAFETY: range-checked id; llama.cpp returns a NUL-terminated string owned by the vocab.
        let p = unsafe { sys::llama_vocab_get_text(self.vocab_ptr(), token) };
        if p.is_null() {
            return Vec::new();
        }
        // SAFETY: non-null, NUL-terminated, lives as long as the model.
        unsafe { CStr::from_ptr(p) }.to_bytes().to_vec()
    }

    /// Converts text to tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| Error::Tokenize("text longer than 2 GiB".into()))?;
        let mut out: Vec<Token> = vec![0; text.len() + 2];
        for _ in 0..2 {
            let cap = i32::try_from(out.len()).unwrap_or(i32::MAX);
            // SAFETY: text pointer/len describe valid bytes; out has `cap` writable slots.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab_ptr(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    cap,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                return Err(Error::Tokenize("tokenization overflowed".into()));
            }
            out.resize((-n) as usize, 0);
        }
        Err(Error::Tokenize("tokenizer reported inconsistent sizes".into()))
    }

    /// The bytes a token renders to (special tokens render as empty unless `special`).
    pub fn token_to_piece_ext(&self, token: Token, special: bool) -> Vec<u8> {
        if !self.token_in_range(token) {
            return Vec::new();
        }
        let mut buf = vec![0u8; 32];
        for _ in 0..2 {
            let cap = i32::try_from(buf.len()).unwrap_or(i32::MAX);
            // SAFETY: buf has `cap` writable bytes; id range-checked.
            let n = unsafe {
                sys::llama_token_to_piece(self.vocab_ptr(), token, buf.as_mut_ptr() as *mut c_char, cap, 0, special)
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
        Vec::new()
    }

    /// The bytes a token renders to in generated text (control tokens render as nothing).
    pub fn token_to_piece(&self, token: Token) -> Vec<u8> {
        self.token_to_piece_ext(token, false)
    }

    /// Renders tokens to text (invalid UTF-8 replaced).
    pub fn detokenize(&self, tokens: &[Token]) -> String {
        let bytes: Vec<u8> = tokens.iter().flat_map(|&t| self.token_to_piece(t)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        for _ in 0..2 {
            // SAFETY: key is NUL-terminated; buf has buf.len() writable bytes.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.raw.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
        None
    }

    /// The model's built-in chat template, if it has one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: valid model pointer; NULL name = default template.
        let p = unsafe { sys::llama_model_chat_template(self.raw.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: NUL-terminated, owned by the model.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Formats messages with the model's chat template (llama.cpp's built-in template set).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_assistant: bool) -> Result<String> {
        let tmpl = self
            .chat_template()
            .ok_or_else(|| Error::ChatTemplate(format!("{} has no chat template", self.path.display())))?;
        let c_tmpl = CString::new(tmpl).map_err(|_| Error::ChatTemplate("template contains NUL".into()))?;
        let mut owned = Vec::with_capacity(messages.len());
        for m in messages {
            let role =
                CString::new(m.role.as_str()).map_err(|_| Error::ChatTemplate("role contains a NUL byte".into()))?;
            let content = CString::new(m.content.as_str())
                .map_err(|_| Error::ChatTemplate("message contains a NUL byte".into()))?;
            owned.push((role, content));
        }
        let msgs: Vec<sys::llama_chat_message> =
            owned.iter().map(|(r, c)| sys::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
        let total: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        let mut buf = vec![0u8; 2 * total + 256];
        for _ in 0..2 {
            let cap = i32::try_from(buf.len()).unwrap_or(i32::MAX);
            // SAFETY: all strings are NUL-terminated and outlive the call; buf has cap bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    c_tmpl.as_ptr(),
                    msgs.as_ptr(),
                    msgs.len(),
                    add_assistant,
                    buf.as_mut_ptr() as *mut c_char,
                    cap,
                )
            };
            if n < 0 {
                return Err(Error::ChatTemplate("llama.cpp does not support this model's chat template".into()));
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf).map_err(|_| Error::ChatTemplate("template output is not UTF-8".into()));
            }
            buf.resize(n, 0);
        }
        Err(Error::ChatTemplate("template output size changed between calls".into()))
    }

    pub(crate) fn raw(&self) -> *mut sys::llama_model {
        self.raw.as_ptr()
    }
}

/// One chat message for [`Model::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A GGUF file type llama.cpp's quantizer can write (`llama_ftype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum FileType {
    F16,
    Bf16,
    Q8_0,
    Q4KM,
}

impl FileType {
    fn ftype(self) -> sys::llama_ftype {
        match self {
            FileType::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
            FileType::Bf16 => sys::LLAMA_FTYPE_MOSTLY_BF16,
            FileType::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
            FileType::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
        }
    }

    /// Lower-case name as in GGUF file names (`q8_0`, `f16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F16 => "f16",
            FileType::Bf16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4KM => "q4_k_m",
        }
    }
}

impl std::str::FromStr for FileType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(FileType::F16),
            "bf16" => Ok(FileType::Bf16),
            "q8_0" => Ok(FileType::Q8_0),
            "q4_k_m" => Ok(FileType::Q4KM),
            other => Err(Error::InvalidParam {
                name: "format",
                reason: format!("{other:?}: expected f16, bf16, q8_0 or q4_k_m"),
            }),
        }
    }
}

/// Writes a copy of the GGUF model `src` with its weights converted to `to` (llama.cpp's
/// `llama_model_quantize`; requantizing a quantized file is allowed: the copy keeps the
/// source's precision in a different storage format, which is what sets its speed).
pub fn convert_model(src: &Path, dst: &Path, to: FileType, n_threads: i32) -> Result<()> {
    init();
    let (c_src, c_dst) = (model_file::c_path(src)?, model_file::c_path(dst)?);
    model_file::check(src, &c_src, true)?;
    // SAFETY: returns a plain struct of defaults.
    let mut qp = unsafe { sys::llama_model_quantize_default_params() };
    qp.nthread = n_threads;
    qp.ftype = to.ftype();
    qp.allow_requantize = true;
    take_llama_error();
    // SAFETY: NUL-terminated paths and a valid params struct that outlives the call.
    let code = unsafe { sys::llama_model_quantize(c_src.as_ptr(), c_dst.as_ptr(), &qp) };
    if code != 0 {
        let _ = std::fs::remove_file(dst);
        return Err(Error::ModelFile {
            path: src.to_path_buf(),
            reason: format!("llama_model_quantize to {} failed ({code}): {}", to.name(), take_llama_error()),
        });
    }
    Ok(())
}

/// Checks that a draft can propose tokens for a target: same vocabulary type, sizes within
/// 128, same BOS/EOS, identical token texts over the shared range (llama.cpp's own rules).
pub fn check_vocab_compat(target: &Model, draft: &Model) -> Result<()> {
    if target.vocab_type() != draft.vocab_type() {
        return Err(Error::IncompatibleVocab(format!(
            "vocabulary type differs (target {}, draft {})",
            target.vocab_type(),
            draft.vocab_type()
        )));
    }
    let (nt, nd) = (target.n_vocab(), draft.n_vocab());
    if nt.abs_diff(nd) > 128 {
        return Err(Error::IncompatibleVocab(format!(
            "vocabulary sizes differ by more than 128 (target {nt}, draft {nd})"
        )));
    }
    if target.bos() != draft.bos() || target.add_bos() != draft.add_bos() {
        return Err(Error::IncompatibleVocab(format!(
            "BOS differs (target {} add={}, draft {} add={})",
            target.bos(),
            target.add_bos(),
            draft.bos(),
            draft.add_bos()
        )));
    }
    if target.eos() != draft.eos() {
        return Err(Error::IncompatibleVocab(format!("EOS differs (target {}, draft {})", target.eos(), draft.eos())));
    }
    for t in 0..nt.min(nd) as Token {
        let (a, b) = (target.token_text(t), draft.token_text(t));
        if a != b {
            return Err(Error::IncompatibleVocab(format!(
                "token {t} differs: target {:?}, draft {:?}",
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b)
            )));
        }
    }
    Ok(())
}

/// How a context is created.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextParams {
    /// KV-cache size in tokens.
    pub n_ctx: u32,
    /// Largest batch passed to one decode call.
    pub n_batch: u32,
    /// Largest number of distinct sequence ids (tree leaves + 1), at most 256.
    pub n_seq_max: u32,
    /// CPU threads (0 = all cores).
    pub n_threads: i32,
    /// Flash attention (off by default: on this CPU it was slower for batches >= 2).
    pub flash_attn: bool,
    /// ggml's reference CPU kernels, whose results do not depend on how tokens are batched
    /// (exact mode); off = the fastest kernels (tinyBLAS, tiled matmuls, fused ops).
    pub reference_kernels: bool,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self { n_ctx: 4096, n_batch: 512, n_seq_max: 1, n_threads: 0, flash_attn: false, reference_kernels: false }
    }
}

/// What some contexts need beyond [`ContextParams`]: feature-level heads.
#[derive(Default)]
pub struct ContextExtras<'a> {
    /// Collect target features during every decode (target contexts with a head).
    pub tap: Option<Arc<FeatureTap>>,
    /// The target context whose embedding and LM head an `eagle3` head may share
    /// (llama.cpp's `ctx_other`); it must outlive the new context.
    pub other: Option<&'a Context>,
    /// Output the pre-norm hidden state of every output row (`eagle3` heads).
    pub prenorm_outputs: bool,
}

/// Number of CPU threads to use when the caller says 0.
pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)
}

/// A llama.cpp context: a KV cache and compute buffers over one model.
pub struct Context {
    raw: NonNull<sys::llama_context>,
    model: Arc<Model>,
    n_ctx: u32,
    n_batch: u32,
    n_seq_max: u32,
    n_vocab: usize,
    /// The context's CPU backend, when it could be learned (kernel switch).
    cpu: Option<CpuBackend>,
    /// Reference kernels for every decode (exact mode).
    reference_always: bool,
    /// Otherwise, which kernels each batch size uses.
    plan: KernelPlan,
    /// What the backend is set to now.
    reference_now: bool,
    /// The feature tap `cb_eval` writes to (kept alive as long as the context).
    tap: Option<Arc<FeatureTap>>,
}

// SAFETY: a context is used by one thread at a time (&mut for every mutation); llama.cpp
// contexts may move between threads.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: raw came from llama_init_from_model and is freed once; the model outlives it
        // because we hold an Arc to it.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}

impl Context {
    /// Creates a context with a unified KV cache (needed for tree verification, SPEC §2).
    pub fn new(model: Arc<Model>, params: &ContextParams) -> Result<Context> {
        Self::with_extras(model, params, ContextExtras::default())
    }

    /// [`Context::new`] with a feature tap, a context to share weights with, or pre-norm outputs.
    pub fn with_extras(model: Arc<Model>, params: &ContextParams, extras: ContextExtras<'_>) -> Result<Context> {
        if params.n_ctx == 0 {
            return Err(Error::InvalidParam { name: "n_ctx", reason: "must be > 0".into() });
        }
        if params.n_seq_max == 0 || params.n_seq_max > 256 {
            return Err(Error::InvalidParam {
                name: "n_seq_max",
                reason: format!("{} not in 1..=256", params.n_seq_max),
            });
        }
        if params.n_seq_max > params.n_ctx {
            return Err(Error::InvalidParam {
                name: "n_seq_max",
                reason: format!("{} exceeds n_ctx {}", params.n_seq_max, params.n_ctx),
            });
        }
        // llama.cpp reserves outputs for every sequence and asserts they fit in one batch.
        let n_batch = params.n_batch.max(params.n_seq_max).clamp(1, params.n_ctx);
        let threads = if params.n_threads <= 0 { default_threads() } else { params.n_threads };
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = n_batch;
        cp.n_ubatch = n_batch;
        cp.n_seq_max = params.n_seq_max;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.flash_attn_type =
            if params.flash_attn { sys::LLAMA_FLASH_ATTN_TYPE_ENABLED } else { sys::LLAMA_FLASH_ATTN_TYPE_DISABLED };
        cp.kv_unified = true;
        cp.no_perf = true;
        if let Some(tap) = &extras.tap {
            cp.cb_eval = Some(crate::features::feature_callback);
            cp.cb_eval_user_data = Arc::as_ptr(tap) as *mut std::ffi::c_void;
        }
        if let Some(other) = extras.other {
            cp.ctx_other = other.raw();
        }
        take_llama_error();
        // SAFETY: model pointer valid; cp is a valid params struct.
        let (raw, cpu) = create_capturing(|| unsafe { sys::llama_init_from_model(model.raw(), cp) });
        let raw = NonNull::new(raw).ok_or_else(|| Error::ContextCreate(take_llama_error()))?;
        if let Some(b) = cpu {
            b.set_reference(params.reference_kernels);
        } else if params.reference_kernels {
            tracing::warn!("reference CPU kernels requested but the context's CPU backend is unknown");
        }
        let (reference_always, reference_now) = (params.reference_kernels, params.reference_kernels);
        let n_vocab = model.n_vocab();
        // SAFETY: valid context.
        let n_ctx = unsafe { sys::llama_n_ctx(raw.as_ptr()) };
        if extras.prenorm_outputs {
            // SAFETY: valid context.
            unsafe { crate::eagle::ext::set_embeddings_nextn(raw.as_ptr(), true, true) };
        }
        Ok(Context {
            raw,
            model,
            n_ctx,
            n_batch,
            n_seq_max: params.n_seq_max,
            n_vocab,
            cpu,
            reference_always,
            plan: KernelPlan::default(),
            reference_now,
            tap: extras.tap,
        })
    }

    /// The llama.cpp context (for the head's extended batches).
    pub(crate) fn raw(&self) -> *mut sys::llama_context {
        self.raw.as_ptr()
    }

    /// The feature tap of this context, if it collects target features.
    pub fn tap(&self) -> Option<&Arc<FeatureTap>> {
        self.tap.as_ref()
    }

    /// Switches the CPU kernels for a batch of `n` tokens per the plan (before any decode).
    pub(crate) fn prepare_kernels(&mut self, n: usize) {
        let reference = self.reference_always || self.plan.reference_for(n);
        if let (Some(cpu), true) = (self.cpu, reference != self.reference_now) {
            cpu.set_reference(reference);
            self.reference_now = reference;
        }
    }

    /// Whether this context picks its CPU kernels per batch size (fast mode with a known CPU
    /// backend); exact-mode contexts always use the reference kernels.
    pub fn kernels_switchable(&self) -> bool {
        self.cpu.is_some() && !self.reference_always
    }

    /// Whether the context's CPU backend is known, so its kernels can be chosen (reference or
    /// fast); false where the layout check failed (see `cpu_kernels`).
    pub fn cpu_backend_known(&self) -> bool {
        self.cpu.is_some()
    }

    /// Sets which kernels each batch size uses (ignored where not switchable).
    pub fn set_kernel_plan(&mut self, plan: KernelPlan) {
        if self.kernels_switchable() {
            self.plan = plan;
        }
    }

    /// Which kernels each batch size uses.
    pub fn kernel_plan(&self) -> &KernelPlan {
        &self.plan
    }

    /// The model this context runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// KV-cache size in tokens.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx as usize
    }

    /// Largest batch per decode call.
    pub fn n_batch(&self) -> usize {
        self.n_batch as usize
    }

    /// Largest number of sequence ids.
    pub fn n_seq_max(&self) -> usize {
        self.n_seq_max as usize
    }

    /// Runs the model over a batch. Fails cleanly if the batch does not fit.
    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        if batch.n_tokens() == 0 {
            return Ok(());
        }
        if batch.n_tokens() > self.n_batch as usize {
            return Err(Error::InvalidParam {
                name: "batch",
                reason: format!("{} tokens exceed n_batch {}", batch.n_tokens(), self.n_batch),
            });
        }
        if batch.max_seq_id >= self.n_seq_max as i32 {
            return Err(Error::InvalidParam {
                name: "batch",
                reason: format!("seq id {} exceeds n_seq_max {}", batch.max_seq_id, self.n_seq_max),
            });
        }
        self.prepare_kernels(batch.n_tokens());
        take_llama_error();
        // SAFETY: batch.raw is a fully initialised llama_batch whose arrays hold n_tokens entries;
        // every seq id was checked against this context's n_seq_max above.
        let code = unsafe { sys::llama_decode(self.raw.as_ptr(), batch.raw) };
        if code != 0 {
            let what = match code {
                1 => "no KV-cache slot for the batch (context full)".to_string(),
                2 => "aborted".to_string(),
                -1 => format!("invalid batch: {}", take_llama_error()),
                _ => take_llama_error(),
            };
            return Err(Error::Decode { code, what });
        }
        Ok(())
    }

    /// Logits of the `batch_index`-th token of the last decoded batch (it must have asked for
    /// logits).
    pub fn logits(&self, batch_index: usize) -> Result<&[f32]> {
        let i = i32::try_from(batch_index)
            .map_err(|_| Error::InvalidParam { name: "batch_index", reason: "too large".into() })?;
        // SAFETY: llama.cpp bounds-checks i and returns NULL for rows without logits.
        let p = unsafe { sys::llama_get_logits_ith(self.raw.as_ptr(), i) };
        if p.is_null() {
            return Err(Error::InvalidParam {
                name: "batch_index",
                reason: format!("no logits for batch row {batch_index}"),
            });
        }
        // SAFETY: a non-null row holds n_vocab floats, valid until the next decode (&self
        // borrow prevents that).
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    fn mem(&self) -> sys::llama_memory_t {
        // SAFETY: valid context.
        unsafe { sys::llama_get_memory(self.raw.as_ptr()) }
    }

    /// Removes cells of `seq` (-1 = all) in positions [p0, p1) (-1 = open end).
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // SAFETY: valid memory handle; llama.cpp validates the ranges.
        unsafe { sys::llama_memory_seq_rm(self.mem(), seq, p0, p1) }
    }

    /// Adds `dst` to the cells of `src` in [p0, p1).
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_seq_cp(self.mem(), src, dst, p0, p1) }
    }

    /// Drops every cell not belonging to `seq`.
    pub fn seq_keep(&mut self, seq: i32) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_seq_keep(self.mem(), seq) }
    }

    /// Largest position stored for `seq` (-1 when empty).
    pub fn seq_pos_max(&self, seq: i32) -> i32 {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_seq_pos_max(self.mem(), seq) }
    }

    /// Length of the prefix seq 0 holds (its positions run 0..len): the history tokens this
    /// cache has read.
    pub fn prefix_len(&self) -> usize {
        (self.seq_pos_max(0) + 1).max(0) as usize
    }

    /// Drops every sequence but 0, and seq 0's cells from position `len` on: what a rollback
    /// of the history to `len` tokens (or a failed round) leaves.
    pub fn keep_prefix(&mut self, len: usize) {
        self.seq_keep(0);
        if self.prefix_len() > len {
            self.seq_rm(0, len as i32, -1);
        }
    }

    /// Empties the KV cache.
    pub fn clear(&mut self) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_clear(self.mem(), true) }
    }
}

/// Milliseconds since `t`.
pub fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Decodes `tokens` at positions start.. in seq 0, in chunks; returns the last row's logits
/// if `want_last`.
pub fn decode_span(
    ctx: &mut Context,
    batch: &mut Batch,
    tokens: &[Token],
    start: usize,
    want_last: bool,
) -> Result<Vec<f32>> {
    if start + tokens.len() > ctx.n_ctx() {
        return Err(Error::ContextFull { needed: start + tokens.len(), n_ctx: ctx.n_ctx() });
    }
    let chunk = ctx.n_batch().min(512);
    let mut last = Vec::new();
    let n_chunks = tokens.len().div_ceil(chunk);
    for (c, part) in tokens.chunks(chunk).enumerate() {
        batch.clear();
        let final_chunk = c + 1 == n_chunks;
        for (j, &t) in part.iter().enumerate() {
            let is_last = final_chunk && j + 1 == part.len();
            batch.add(t, (start + c * chunk + j) as i32, &[0], want_last && is_last)?;
        }
        ctx.decode(batch)?;
        if want_last && final_chunk {
            last = ctx.logits(part.len() - 1)?.to_vec();
        }
    }
    Ok(last)
}

/// A batch of tokens with positions and sequence-id sets. Checks every size llama.cpp does
/// not (llama-cpp-2's batch writes past its buffers when given too many seq ids).
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    seq_capacity: usize,
    max_seq_id: i32,
    n_logits: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: raw came from llama_batch_init and is freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

// SAFETY: the batch owns its C arrays exclusively.
unsafe impl Send for Batch {}

impl Batch {
    /// A batch for up to `capacity` tokens, each in up to `seq_capacity` sequences.
    pub fn new(capacity: usize, seq_capacity: usize) -> Batch {
        let capacity = capacity.max(1);
        let seq_capacity = seq_capacity.max(1);
        // SAFETY: allocates arrays of the given sizes (embd = 0 → token ids).
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, seq_capacity as i32) };
        Batch { raw, capacity, seq_capacity, max_seq_id: -1, n_logits: 0 }
    }

    /// Number of tokens in the batch.
    pub fn n_tokens(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// Number of rows that will have logits.
    pub fn n_logits(&self) -> usize {
        self.n_logits
    }

    /// Empties the batch (keeps its memory).
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
        self.max_seq_id = -1;
        self.n_logits = 0;
    }

    /// Appends a token at `pos` belonging to `seq_ids`.
    pub fn add(&mut self, token: Token, pos: i32, seq_ids: &[i32], logits: bool) -> Result<()> {
        let i = self.n_tokens();
        if i >= self.capacity {
            return Err(Error::InvalidParam { name: "batch", reason: format!("full ({} tokens)", self.capacity) });
        }
        if seq_ids.is_empty() || seq_ids.len() > self.seq_capacity {
            return Err(Error::InvalidParam {
                name: "seq_ids",
                reason: format!("{} ids, batch allows 1..={}", seq_ids.len(), self.seq_capacity),
            });
        }
        if seq_ids.iter().any(|&s| s < 0) || pos < 0 {
            return Err(Error::InvalidParam { name: "batch", reason: "negative seq id or position".into() });
        }
        // SAFETY: i < capacity and seq_ids.len() <= seq_capacity, the sizes the arrays were
        // allocated with by llama_batch_init.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = seq_ids.len() as i32;
            let dst = *self.raw.seq_id.add(i);
            for (k, &s) in seq_ids.iter().enumerate() {
                *dst.add(k) = s;
            }
            *self.raw.logits.add(i) = i8::from(logits);
        }
        self.max_seq_id = self.max_seq_id.max(seq_ids.iter().copied().max().unwrap_or(0));
        if logits {
            self.n_logits += 1;
        }
        self.raw.n_tokens += 1;
        Ok(())
    }
}

/// Teacher-forced logits at every position of `tokens`, row-major (tokens.len() × n_vocab),
/// computed with ggml's reference CPU kernels: the same bits as decoding the tokens one at a
/// time (no batch-dependent rounding). Used by parity tests; the trainer asks for the rows it
/// needs, on the fast kernels, with [`sequence_logits_rows`].
pub fn sequence_logits(model: &Arc<Model>, tokens: &[Token], n_threads: i32) -> Result<Vec<f32>> {
    logits_of_rows(model, tokens, 0..tokens.len(), n_threads, true)
}

/// Teacher-forced logits at positions `rows` of `tokens`, row-major (rows.len() × n_vocab).
/// Decodes `tokens[..rows.end]`; positions before `rows.start` (a prompt) skip the vocabulary
/// projection, which for the 1.5B target's 151,936-token head is a sizeable part of a
/// position's cost.
pub fn sequence_logits_rows(
    model: &Arc<Model>,
    tokens: &[Token],
    rows: std::ops::Range<usize>,
    n_threads: i32,
) -> Result<Vec<f32>> {
    logits_of_rows(model, tokens, rows, n_threads, false)
}

fn logits_of_rows(
    model: &Arc<Model>,
    tokens: &[Token],
    rows: std::ops::Range<usize>,
    n_threads: i32,
    reference_kernels: bool,
) -> Result<Vec<f32>> {
    if rows.start > rows.end || rows.end > tokens.len() {
        return Err(Error::InvalidParam {
            name: "rows",
            reason: format!("{rows:?} is not a range inside the {} tokens", tokens.len()),
        });
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let n = rows.end;
    let n_batch = n.min(512);
    let mut ctx = Context::new(
        model.clone(),
        &ContextParams {
            n_ctx: (n as u32).max(16),
            n_batch: n_batch as u32,
            n_seq_max: 1,
            n_threads,
            reference_kernels,
            ..Default::default()
        },
    )?;
    let n_vocab = model.n_vocab();
    let mut out = Vec::with_capacity(rows.len() * n_vocab);
    let mut batch = Batch::new(n_batch, 1);
    for (c, chunk) in tokens[..n].chunks(n_batch).enumerate() {
        batch.clear();
        let first = c * n_batch;
        for (j, &t) in chunk.iter().enumerate() {
            batch.add(t, (first + j) as i32, &[0], rows.contains(&(first + j)))?;
        }
        ctx.decode(&batch)?;
        for j in 0..chunk.len() {
            if rows.contains(&(first + j)) {
                out.extend_from_slice(ctx.logits(j)?);
            }
        }
    }
    Ok(out)
}
