//! Model exports: load, free, a few read-only properties, and the target/draft vocabulary
//! check. A model is immutable after loading and shared (Arc) by every session that uses it.

use std::ffi::c_char;
use std::sync::Arc;

use crate::handles::{adaspec_model, model_clone, model_into_raw, model_release};
use crate::params::{adaspec_model_params, read_params, read_str};
use crate::status::{adaspec_status, boundary, boundary_value, set_last_error, FfiError};

/// What a model handle points to.
pub(crate) struct ModelHandle {
    pub model: Arc<engine::Model>,
    /// Default thread count of sessions using this model as target (0 = all cores).
    pub n_threads: i32,
}

/// Loads a GGUF model. `params` may be NULL (defaults). On success writes a new handle to
/// `*out_model`; release it with `adaspec_model_free`. Fails with
/// `ADASPEC_STATUS_MODEL_FILE` for missing, unreadable, non-GGUF or truncated files.
#[no_mangle]
pub extern "C" fn adaspec_model_load(
    path: *const c_char,
    params: *const adaspec_model_params,
    out_model: *mut *mut adaspec_model,
) -> adaspec_status {
    boundary("adaspec_model_load", || {
        check_null!(out_model);
        // SAFETY: NULL-checked inside; the host passes a NUL-terminated string.
        let path = unsafe { read_str(path, "path") }?;
        // SAFETY: NULL or a host-owned struct, size-checked inside.
        let p = unsafe { read_params(params, "params") }?;
        if !(0..=1024).contains(&p.n_threads) {
            return Err(FfiError::param("params->n_threads", format!("{} is outside 0..=1024", p.n_threads)));
        }
        if p.n_gpu_layers < -1 {
            return Err(FfiError::param(
                "params->n_gpu_layers",
                format!("{} is below -1 (-1 = all layers)", p.n_gpu_layers),
            ));
        }
        let mp = engine::ModelParams {
            n_gpu_layers: if p.n_gpu_layers == -1 { i32::MAX as u32 } else { p.n_gpu_layers as u32 },
            use_mmap: p.use_mmap.get(),
            repack: p.repack.get(),
        };
        let model = engine::Model::load(path, &mp)?;
        let handle = Arc::new(ModelHandle { model: Arc::new(model), n_threads: p.n_threads });
        // SAFETY: NULL-checked above; written only on success.
        unsafe { *out_model = model_into_raw(handle) };
        Ok(())
    })
}

/// Releases a model handle. NULL is ignored; a handle that is not live (freed twice) sets the
/// last error and is otherwise ignored. Sessions created from the model keep it alive until
/// they are freed, so the order of frees does not matter, and a free racing another call that
/// uses the model (another thread creating a session, tokenizing) is safe: that call keeps the
/// model until it returns.
#[no_mangle]
pub extern "C" fn adaspec_model_free(model: *mut adaspec_model) {
    boundary_value("adaspec_model_free", (), || {
        if let Err(e) = model_release(model) {
            set_last_error(&format!("adaspec_model_free: {}", e.message));
        }
    })
}

/// Size of the model's vocabulary, or -1 when `model` is NULL or not a live handle.
#[no_mangle]
pub extern "C" fn adaspec_model_n_vocab(model: *const adaspec_model) -> i32 {
    boundary_value("adaspec_model_n_vocab", -1, || match model_clone(model, "model") {
        Ok(m) => i32::try_from(m.model.n_vocab()).unwrap_or(i32::MAX),
        Err(_) => -1,
    })
}

/// Context length the model was trained with, or -1 when `model` is NULL or not a live handle.
#[no_mangle]
pub extern "C" fn adaspec_model_n_ctx_train(model: *const adaspec_model) -> i32 {
    boundary_value("adaspec_model_n_ctx_train", -1, || match model_clone(model, "model") {
        Ok(m) => i32::try_from(m.model.n_ctx_train()).unwrap_or(i32::MAX),
        Err(_) => -1,
    })
}

/// Whether `token` ends generation (EOS, end-of-turn) for this model; false for NULL, a handle
/// that is not live, or an id outside the vocabulary.
#[no_mangle]
pub extern "C" fn adaspec_model_token_is_eog(model: *const adaspec_model, token: i32) -> bool {
    boundary_value("adaspec_model_token_is_eog", false, || match model_clone(model, "model") {
        Ok(m) => token >= 0 && (token as usize) < m.model.n_vocab() && m.model.is_eog(token),
        Err(_) => false,
    })
}

/// Checks, without creating a session, that `draft` can propose tokens for `target`: same
/// vocabulary type, sizes within 128, same BOS/EOS, identical token texts. Returns
/// `ADASPEC_STATUS_OK` or `ADASPEC_STATUS_INCOMPATIBLE_VOCAB` (the last error names the first
/// difference).
#[no_mangle]
pub extern "C" fn adaspec_model_check_vocab(
    target: *const adaspec_model,
    draft: *const adaspec_model,
) -> adaspec_status {
    boundary("adaspec_model_check_vocab", || {
        let t = model_clone(target, "target")?;
        let d = model_clone(draft, "draft")?;
        engine::check_vocab_compat(&t.model, &d.model)?;
        Ok(())
    })
}
