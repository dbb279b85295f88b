//! An `eagle3` head (EAGLE-3 layout) run by llama.cpp's own graph (`src/models/eagle3.cpp`) in a
//! second context: the encoder maps target features [low; mid; high] (3·H_t) to g = fc(·) (H),
//! the decoder reads (token, g) pairs — the token's embedding (the head's own or the target's,
//! shared through `ctx_other`) next to g — and returns logits over the target's vocabulary
//! (-inf outside a reduced draft vocabulary) and its pre-norm output, which is the g of the
//! next step.
//!
//! Why llama.cpp's graph rather than our own: it runs the head on the target's backend (CPU or
//! GPU) with any weight type llama.cpp supports (Q8_0/Q4 heads cost a fraction of f32), shares
//! the target's embedding and LM head without copying them, and is the implementation stock
//! llama.cpp users run, so an exported head behaves the same in both.
//!
//! The extended-batch API (`llama_batch_ext`, `llama_process`) is public C; the three accessors
//! below are declared only in llama.cpp's C++ staging header (`src/llama-ext.h`), so they are
//! bound by their Itanium-mangled names (Linux, macOS; not MSVC).

use std::path::Path;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use crate::backend::{Context, ContextExtras, ContextParams, Model, ModelParams, Token};
use crate::error::{Error, Result};

/// llama.cpp's C++-only accessors (`src/llama-ext.h`).
pub(crate) mod ext {
    use llama_cpp_sys_2 as sys;

    extern "C" {
        #[link_name = "_Z26llama_set_embeddings_nextnP13llama_contextbb"]
        fn llama_set_embeddings_nextn(ctx: *mut sys::llama_context, value: bool, masked: bool);
        #[link_name = "_Z30llama_get_embeddings_nextn_ithP13llama_contexti"]
        fn llama_get_embeddings_nextn_ith(ctx: *mut sys::llama_context, i: i32) -> *mut f32;
        #[link_name = "_Z26llama_get_embeddings_nextnP13llama_context"]
        fn llama_get_embeddings_nextn(ctx: *mut sys::llama_context) -> *mut f32;
        #[link_name = "_Z28llama_model_target_layer_idsPK11llama_model"]
        fn llama_model_target_layer_ids(model: *const sys::llama_model) -> *const i32;
        #[link_name = "_Z30llama_model_target_layer_ids_nPK11llama_model"]
        fn llama_model_target_layer_ids_n(model: *const sys::llama_model) -> u32;
    }

    /// # Safety
    /// `ctx` is a valid context.
    pub unsafe fn set_embeddings_nextn(ctx: *mut sys::llama_context, value: bool, masked: bool) {
        llama_set_embeddings_nextn(ctx, value, masked)
    }

    /// # Safety
    /// `ctx` is a valid context; the pointer is valid until its next decode.
    pub unsafe fn embeddings_nextn_ith(ctx: *mut sys::llama_context, i: i32) -> *mut f32 {
        llama_get_embeddings_nextn_ith(ctx, i)
    }

    /// # Safety
    /// `ctx` is a valid context; the pointer is valid until its next decode.
    pub unsafe fn embeddings_nextn(ctx: *mut sys::llama_context) -> *mut f32 {
        llama_get_embeddings_nextn(ctx)
    }

    /// # Safety
    /// `model` is a valid model.
    pub unsafe fn target_layer_ids(model: *const sys::llama_model) -> Vec<i32> {
        let n = llama_model_target_layer_ids_n(model) as usize;
        let p = llama_model_target_layer_ids(model);
        if p.is_null() || n == 0 {
            return Vec::new();
        }
        std::slice::from_raw_parts(p, n).to_vec()
    }
}

/// What a head file says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInfo {
    /// Target layers whose inputs it reads (low, mid, high).
    pub target_layers: [u32; 3],
    /// Hidden size of the target it was made for.
    pub target_hidden: usize,
    /// The head's own hidden size.
    pub n_embd: usize,
}

/// Loads an `eagle3` GGUF head and reads its metadata.
pub fn load_head(path: &Path, params: &ModelParams) -> Result<(Arc<Model>, HeadInfo)> {
    let model = Arc::new(Model::load(path, params)?);
    let info = head_info(&model)?;
    Ok((model, info))
}

/// The head metadata of a loaded model; an error if it is not an `eagle3` head.
pub fn head_info(model: &Model) -> Result<HeadInfo> {
    let bad = |reason: String| Error::InvalidGguf { path: model.path().to_path_buf(), reason };
    let arch = model.meta("general.architecture").unwrap_or_default();
    if arch != "eagle3" {
        return Err(bad(format!("architecture '{arch}' is not a head (expected 'eagle3')")));
    }
    // SAFETY: valid model.
    let ids = unsafe { ext::target_layer_ids(model.raw()) };
    let target_layers: [u32; 3] = match ids.as_slice() {
        [a, b, c] if *a >= 0 && *b >= 0 && *c >= 0 => [*a as u32, *b as u32, *c as u32],
        other => return Err(bad(format!("eagle3.target_layers must be 3 layer ids, got {other:?}"))),
    };
    let target_hidden = model
        .meta("eagle3.target_hidden_size")
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| bad("eagle3.target_hidden_size missing".into()))?;
    Ok(HeadInfo { target_layers, target_hidden, n_embd: model.n_embd() })
}

/// Checks that `head` was made for `target`: hidden size, layers, vocabulary.
pub fn check_head_compat(target: &Model, head: &Model, info: &HeadInfo) -> Result<()> {
    let bad = |reason: String| Error::IncompatibleVocab(format!("head: {reason}"));
    if info.target_hidden != target.n_embd() {
        return Err(bad(format!(
            "the head reads features of hidden size {}, the target's is {}",
            info.target_hidden,
            target.n_embd()
        )));
    }
    if let Some(&l) = info.target_layers.iter().find(|&&l| l as usize >= target.n_layer()) {
        return Err(bad(format!("the head reads layer {l}, the target has {} layers", target.n_layer())));
    }
    if head.n_vocab() != target.n_vocab() {
        return Err(bad(format!(
            "the head's vocabulary has {} tokens, the target's {} (a head carries its target's tokenizer)",
            head.n_vocab(),
            target.n_vocab()
        )));
    }
    for t in [0, target.n_vocab() / 2, target.n_vocab() - 1] {
        if head.token_text(t as Token) != target.token_text(t as Token) {
            return Err(bad(format!("token {t} differs between the head's and the target's vocabulary")));
        }
    }
    Ok(())
}

/// One decoder entry: the token at `pos` read with `g`, in sequences `seqs`.
pub struct Entry<'a> {
    pub token: Token,
    pub pos: i32,
    pub seqs: &'a [i32],
    pub g: &'a [f32],
}

/// A head's llama.cpp context (and, when the head shares the target's embedding or LM head, a
/// small context over the target that lends them).
pub struct HeadContext {
    batch: *mut sys::llama_batch_ext,
    ctx: Context,
    /// Lends the target's weights (`ctx_other`); dropped after `ctx`.
    _other: Context,
    n_embd: usize,
    n_enc: usize,
    staging: Vec<f32>,
}

// SAFETY: the batch and contexts are used by one thread at a time (&mut for every call).
unsafe impl Send for HeadContext {}

impl Drop for HeadContext {
    fn drop(&mut self) {
        // SAFETY: created by llama_batch_ext_init and freed once, before the contexts.
        unsafe { sys::llama_batch_ext_free(self.batch) }
    }
}

impl HeadContext {
    /// A context over `head` with `n_seq` sequence ids, sharing `target`'s weights.
    pub fn new(
        head: Arc<Model>,
        info: &HeadInfo,
        target: Arc<Model>,
        n_ctx: u32,
        n_batch: u32,
        n_seq: u32,
        n_threads: i32,
    ) -> Result<HeadContext> {
        // The lending context is never decoded: the smallest one llama.cpp allows.
        let other = Context::new(target, &ContextParams { n_ctx: 256, n_batch: 1, n_threads, ..Default::default() })?;
        let cp = ContextParams { n_ctx, n_batch, n_seq_max: n_seq, n_threads, ..Default::default() };
        let extras = ContextExtras { other: Some(&other), prenorm_outputs: true, ..Default::default() };
        let ctx = Context::with_extras(head, &cp, extras)?;
        // SAFETY: valid context; freed in Drop.
        let batch = unsafe { sys::llama_batch_ext_init(ctx.raw()) };
        if batch.is_null() {
            return Err(Error::ContextCreate("llama_batch_ext_init failed".into()));
        }
        Ok(HeadContext {
            batch,
            ctx,
            _other: other,
            n_embd: info.n_embd,
            n_enc: 3 * info.target_hidden,
            staging: Vec::new(),
        })
    }

    /// The head's context (KV bookkeeping).
    pub fn ctx(&self) -> &Context {
        &self.ctx
    }

    pub fn ctx_mut(&mut self) -> &mut Context {
        &mut self.ctx
    }

    /// The head's hidden size (rows of g).
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Width of one target feature row.
    pub fn n_enc(&self) -> usize {
        self.n_enc
    }

    fn process(&mut self, kind: sys::llama_process_type, what: &str) -> Result<()> {
        crate::backend::take_llama_error();
        // SAFETY: the batch was filled for this context; staging (which its entries point
        // into) is not touched until the call returns.
        let code = unsafe { sys::llama_process(self.ctx.raw(), kind, self.batch) };
        if code != 0 {
            return Err(Error::Decode { code, what: format!("head {what}: {}", crate::backend::take_llama_error()) });
        }
        Ok(())
    }

    fn check(&self, ok: bool, what: &str) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidParam { name: "head batch", reason: what.to_string() })
        }
    }

    /// g = fc(features) for each row of `features` (rows × n_enc), appended to `out`.
    pub fn encode(&mut self, features: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let n_rows = features.len() / self.n_enc.max(1);
        let chunk = self.ctx.n_batch();
        let mut done = 0;
        while done < n_rows {
            let n = chunk.min(n_rows - done);
            self.staging.clear();
            self.staging.extend_from_slice(&features[done * self.n_enc..(done + n) * self.n_enc]);
            // The encoder ignores positions; they only have to be valid for the memory.
            let pos0 = self.ctx.seq_pos_max(0) + 1;
            // SAFETY: valid batch; every embd view points into staging, which stays put until
            // process() returns.
            unsafe {
                sys::llama_batch_ext_clear(self.batch);
                for j in 0..n {
                    let embd = sys::llama_embd {
                        data: self.staging.as_ptr().add(j * self.n_enc),
                        n_rows: 1,
                        n_embd: self.n_enc,
                    };
                    let idx = sys::llama_batch_ext_add_embd(self.batch, 0, embd);
                    self.check(idx >= 0, "encoder entry refused")?;
                    let pos = [pos0 + j as i32, 0, 0, 0];
                    self.check(sys::llama_batch_ext_set_pos(self.batch, idx, pos.as_ptr()), "position refused")?;
                    self.check(sys::llama_batch_ext_set_output_embd(self.batch, idx, true), "output refused")?;
                }
            }
            self.process(sys::LLAMA_PROCESS_TYPE_ENCODE, "encoder")?;
            // SAFETY: the encoder output holds n rows of n_embd floats until the next call.
            let g = unsafe { ext::embeddings_nextn(self.ctx.raw()) };
            self.check(!g.is_null(), "the encoder produced no output")?;
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(g, n * self.n_embd) });
            done += n;
        }
        Ok(())
    }

    /// Runs the decoder over `entries` (each an output row, in order).
    pub fn decode(&mut self, entries: &[Entry<'_>]) -> Result<()> {
        if entries.len() > self.ctx.n_batch() {
            return Err(Error::InvalidParam {
                name: "head batch",
                reason: format!("{} entries exceed n_batch {}", entries.len(), self.ctx.n_batch()),
            });
        }
        self.staging.clear();
        for e in entries {
            self.check(e.g.len() == self.n_embd, "g row of the wrong width")?;
            self.staging.extend_from_slice(e.g);
        }
        self.ctx.prepare_kernels(entries.len());
        // SAFETY: as in encode().
        unsafe {
            sys::llama_batch_ext_clear(self.batch);
            for (j, e) in entries.iter().enumerate() {
                let idx = sys::llama_batch_ext_add_token(self.batch, e.seqs[0], e.token);
                self.check(idx >= 0, "decoder entry refused (token or sequence id out of range)")?;
                for &s in &e.seqs[1..] {
                    self.check(sys::llama_batch_ext_add_seq(self.batch, idx, s), "sequence id refused")?;
                }
                let pos = [e.pos, 0, 0, 0];
                self.check(sys::llama_batch_ext_set_pos(self.batch, idx, pos.as_ptr()), "position refused")?;
                let embd = sys::llama_embd {
                    data: self.staging.as_ptr().add(j * self.n_embd),
                    n_rows: 1,
                    n_embd: self.n_embd,
                };
                self.check(sys::llama_batch_ext_set_embd_token(self.batch, idx, embd), "g refused")?;
                self.check(sys::llama_batch_ext_set_output_logits(self.batch, idx, true), "output refused")?;
            }
        }
        self.process(sys::LLAMA_PROCESS_TYPE_DECODE, "decoder")
    }

    /// Logits (target vocabulary) of entry `i` of the last decode.
    pub fn logits(&self, i: usize) -> Result<&[f32]> {
        self.ctx.logits(i)
    }

    /// Pre-norm output of entry `i` of the last decode: the g its children read.
    pub fn prenorm(&self, i: usize) -> Result<Vec<f32>> {
        // SAFETY: valid context; null for a row without output.
        let p = unsafe { ext::embeddings_nextn_ith(self.ctx.raw(), i as i32) };
        self.check(!p.is_null(), "no pre-norm output for that row")?;
        // SAFETY: a non-null row holds n_embd floats until the next decode.
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_embd) }.to_vec())
    }
}
