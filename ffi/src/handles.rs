//! Opaque handles: what a C handle is, and the only conversions between handles and Rust
//! objects.
//!
//! A handle is a number in a registry, shown to C as a pointer this library never
//! dereferences. The registry maps it to an `Arc` of the object; every call looks its handle up
//! and holds its own reference for as long as it runs, and a free only removes the handle from
//! the registry. So a free that races another call on the same handle (another thread, or the
//! object's own streaming callback) never frees memory that call still uses: the object goes
//! away when the last call holding it returns. A handle that was freed already, never made by
//! this library, or of the other type is refused with `ADASPEC_STATUS_INVALID_HANDLE` instead
//! of being read. Handle numbers are never reused within a process.
//!
//! The handle structs are deliberately not `repr(C)`: cbindgen then declares them as
//! incomplete (opaque) C types.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::model::ModelHandle;
use crate::session::SessionHandle;
use crate::status::{adaspec_status, FfiError, FfiResult};

/// A loaded GGUF model (target, draft or head). Opaque; created by `adaspec_model_load`,
/// released by `adaspec_model_free`. Read-only after loading: one model may be used by any
/// number of sessions and threads at once.
pub struct adaspec_model {
    _private: [u8; 0],
}

/// A generation session: target (+ optional draft) contexts, KV caches and conversation.
/// Opaque; created by `adaspec_session_new`, released by `adaspec_session_free`. One call at
/// a time uses a session (a concurrent call returns `ADASPEC_STATUS_BUSY`).
pub struct adaspec_session {
    _private: [u8; 0],
}

/// Handle numbers step by 16 from 0x10 (they look like aligned pointers to debuggers and
/// hosts that print them) and are shared by both registries, so a model handle is never a
/// session handle.
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

fn next_handle() -> usize {
    NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) << 4
}

/// Live handles of one type.
struct Registry<T> {
    live: Mutex<Option<HashMap<usize, Arc<T>>>>,
}

impl<T> Registry<T> {
    const fn new() -> Self {
        Registry { live: Mutex::new(None) }
    }

    /// The map, created on first use. No code holding the lock can panic, so a poisoned lock
    /// still holds a consistent map.
    fn map(&self) -> MutexGuard<'_, Option<HashMap<usize, Arc<T>>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, value: Arc<T>) -> usize {
        let id = next_handle();
        self.map().get_or_insert_with(HashMap::new).insert(id, value);
        id
    }

    fn get(&self, id: usize) -> Option<Arc<T>> {
        self.map().as_ref().and_then(|m| m.get(&id).cloned())
    }

    fn remove(&self, id: usize) -> Option<Arc<T>> {
        self.map().as_mut().and_then(|m| m.remove(&id))
    }
}

static MODELS: Registry<ModelHandle> = Registry::new();
static SESSIONS: Registry<SessionHandle> = Registry::new();

fn not_live(arg: &str, kind: &str, id: usize) -> FfiError {
    FfiError::new(
        adaspec_status::InvalidHandle,
        format!(
            "argument `{arg}` ({id:#x}) is not a live {kind} handle (freed already, or not made by adaspec_{kind}_*)"
        ),
    )
}

/// Registers a model and returns its new handle.
pub(crate) fn model_into_raw(m: Arc<ModelHandle>) -> *mut adaspec_model {
    MODELS.insert(m) as *mut adaspec_model
}

/// The model behind a handle, as a new reference.
pub(crate) fn model_clone(p: *const adaspec_model, arg: &str) -> FfiResult<Arc<ModelHandle>> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    MODELS.get(p as usize).ok_or_else(|| not_live(arg, "model", p as usize))
}

/// Unregisters a model handle (the model itself lives on in the sessions that use it).
/// NULL is ignored.
pub(crate) fn model_release(p: *mut adaspec_model) -> FfiResult<()> {
    if p.is_null() {
        return Ok(());
    }
    MODELS.remove(p as usize).map(drop).ok_or_else(|| not_live("model", "model", p as usize))
}

/// Registers a session and returns its new handle.
pub(crate) fn session_into_raw(s: Arc<SessionHandle>) -> *mut adaspec_session {
    SESSIONS.insert(s) as *mut adaspec_session
}

/// The session behind a handle, as a new reference held for the duration of one call.
/// Mutation goes through the session's in-use flag.
pub(crate) fn session_clone(p: *mut adaspec_session, arg: &str) -> FfiResult<Arc<SessionHandle>> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    SESSIONS.get(p as usize).ok_or_else(|| not_live(arg, "session", p as usize))
}

/// Unregisters a session handle and returns the registry's reference; the session is dropped
/// when the caller and every call still running on it have let go.
pub(crate) fn session_release(p: *mut adaspec_session) -> FfiResult<Arc<SessionHandle>> {
    SESSIONS.remove(p as usize).ok_or_else(|| not_live("session", "session", p as usize))
}
