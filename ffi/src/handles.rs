//! Opaque handles and the only raw-pointer casts between C handles and Rust objects.
//!
//! A model handle is `Arc::into_raw(Arc<ModelHandle>)` (sessions hold their own clone, so a
//! model freed while sessions use it stays alive until the last of them is freed); a session
//! handle is `Box::into_raw(Box<SessionHandle>)`. Nothing else in the crate casts handles.
//! The handle structs are deliberately not `repr(C)`: cbindgen then declares them as
//! incomplete (opaque) C types.

use std::sync::Arc;

use crate::model::ModelHandle;
use crate::session::SessionHandle;
use crate::status::{FfiError, FfiResult};

/// A loaded GGUF model (target or draft). Opaque; created by `adaspec_model_load`, released
/// by `adaspec_model_free`. Read-only after loading: one model may be used by any number of
/// sessions and threads at once.
pub struct adaspec_model {
    _private: [u8; 0],
}

/// A generation session: target (+ optional draft) contexts, KV caches and conversation.
/// Opaque; created by `adaspec_session_new`, released by `adaspec_session_free`. Use one
/// session from one thread at a time (a concurrent call returns `ADASPEC_STATUS_BUSY`).
pub struct adaspec_session {
    _private: [u8; 0],
}

/// Turns a model into a new C handle owning one strong reference.
pub(crate) fn model_into_raw(m: Arc<ModelHandle>) -> *mut adaspec_model {
    Arc::into_raw(m) as *mut adaspec_model
}

/// Borrows the model behind a handle, as a new strong reference.
///
/// # Safety
/// `p` must be NULL or a live handle from [`model_into_raw`].
pub(crate) unsafe fn model_clone(p: *const adaspec_model, arg: &str) -> FfiResult<Arc<ModelHandle>> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    let raw = p as *const ModelHandle;
    // SAFETY: `raw` came from Arc::into_raw and still owns a strong count (caller contract);
    // incrementing first keeps the count balanced when the new Arc is dropped.
    unsafe {
        Arc::increment_strong_count(raw);
        Ok(Arc::from_raw(raw))
    }
}

/// Releases the reference a handle owns. NULL is ignored.
///
/// # Safety
/// `p` must be NULL or a live handle from [`model_into_raw`], not used afterwards.
pub(crate) unsafe fn model_release(p: *mut adaspec_model) {
    if !p.is_null() {
        // SAFETY: the handle owns one strong reference (caller contract); drop it.
        drop(unsafe { Arc::from_raw(p as *const ModelHandle) });
    }
}

/// Turns a session into a new C handle.
pub(crate) fn session_into_raw(s: Box<SessionHandle>) -> *mut adaspec_session {
    Box::into_raw(s) as *mut adaspec_session
}

/// Borrows the session behind a handle. Mutation goes through the session's in-use flag.
///
/// # Safety
/// `p` must be NULL or a live handle from [`session_into_raw`].
pub(crate) unsafe fn session_ref<'a>(p: *mut adaspec_session, arg: &str) -> FfiResult<&'a SessionHandle> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: live handle from Box::into_raw (caller contract); shared borrow only.
    Ok(unsafe { &*(p as *const SessionHandle) })
}

/// Takes ownership of the session behind a handle.
///
/// # Safety
/// `p` must be a non-NULL live handle from [`session_into_raw`], not used afterwards.
pub(crate) unsafe fn session_take(p: *mut adaspec_session) -> Box<SessionHandle> {
    // SAFETY: caller contract above; the Box is rebuilt exactly once.
    unsafe { Box::from_raw(p as *mut SessionHandle) }
}
