//! Status codes, the thread-local last-error message and the panic boundary.
//!
//! Every export runs inside [`boundary`] (through the `ffi_status!`/`ffi_value!` macros): a
//! Rust panic becomes `ADASPEC_STATUS_PANIC` plus a message and never unwinds into C.
//! This module must never panic itself.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every fallible call. The numbers are stable and never reused.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum adaspec_status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// A parameter is out of range (negative size, unknown enum value, bad token id, ...).
    InvalidParam = 2,
    /// A parameter struct's `struct_size` does not match a size this library knows.
    StructSize = 3,
    /// A string argument is not valid UTF-8.
    InvalidUtf8 = 4,
    /// The model file is missing, unreadable, not GGUF, truncated, or llama.cpp refused it.
    ModelFile = 5,
    /// The draft's vocabulary is not compatible with the target's.
    IncompatibleVocab = 6,
    /// The conversation no longer fits into the session's context.
    ContextFull = 7,
    /// The session is in use: by another thread, or generate was called from its own callback.
    Busy = 8,
    /// The output buffer is too small; the needed size was written to the size out-param.
    BufferTooSmall = 9,
    /// llama.cpp failed (context creation, decode), or tokenizer/chat-template failure.
    Backend = 10,
    /// A Rust panic was caught at the boundary (a bug in adaspec; the message has details).
    Panic = 11,
    /// A model or session handle is not live: freed already, never made by this library, or a
    /// handle of the other type.
    InvalidHandle = 12,
}

impl adaspec_status {
    /// All statuses, for tests and `adaspec_status_name`.
    pub(crate) const ALL: [adaspec_status; 13] = [
        adaspec_status::Ok,
        adaspec_status::NullArgument,
        adaspec_status::InvalidParam,
        adaspec_status::StructSize,
        adaspec_status::InvalidUtf8,
        adaspec_status::ModelFile,
        adaspec_status::IncompatibleVocab,
        adaspec_status::ContextFull,
        adaspec_status::Busy,
        adaspec_status::BufferTooSmall,
        adaspec_status::Backend,
        adaspec_status::Panic,
        adaspec_status::InvalidHandle,
    ];

    pub(crate) fn name(self) -> &'static [u8] {
        match self {
            adaspec_status::Ok => b"ADASPEC_STATUS_OK\0",
            adaspec_status::NullArgument => b"ADASPEC_STATUS_NULL_ARGUMENT\0",
            adaspec_status::InvalidParam => b"ADASPEC_STATUS_INVALID_PARAM\0",
            adaspec_status::StructSize => b"ADASPEC_STATUS_STRUCT_SIZE\0",
            adaspec_status::InvalidUtf8 => b"ADASPEC_STATUS_INVALID_UTF8\0",
            adaspec_status::ModelFile => b"ADASPEC_STATUS_MODEL_FILE\0",
            adaspec_status::IncompatibleVocab => b"ADASPEC_STATUS_INCOMPATIBLE_VOCAB\0",
            adaspec_status::ContextFull => b"ADASPEC_STATUS_CONTEXT_FULL\0",
            adaspec_status::Busy => b"ADASPEC_STATUS_BUSY\0",
            adaspec_status::BufferTooSmall => b"ADASPEC_STATUS_BUFFER_TOO_SMALL\0",
            adaspec_status::Backend => b"ADASPEC_STATUS_BACKEND\0",
            adaspec_status::Panic => b"ADASPEC_STATUS_PANIC\0",
            adaspec_status::InvalidHandle => b"ADASPEC_STATUS_INVALID_HANDLE\0",
        }
    }
}

/// An error on its way to C: a status and the message stored as the last error.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: adaspec_status,
    pub message: String,
}

impl FfiError {
    pub(crate) fn new(status: adaspec_status, message: impl Into<String>) -> Self {
        FfiError { status, message: message.into() }
    }
    pub(crate) fn null(arg: &str) -> Self {
        FfiError::new(adaspec_status::NullArgument, format!("argument `{arg}` is NULL"))
    }
    pub(crate) fn param(arg: &str, why: impl std::fmt::Display) -> Self {
        FfiError::new(adaspec_status::InvalidParam, format!("invalid parameter `{arg}`: {why}"))
    }
}

impl From<engine::Error> for FfiError {
    fn from(e: engine::Error) -> Self {
        use engine::Error as E;
        let status = match &e {
            E::ModelFile { .. } | E::InvalidGguf { .. } | E::ModelLoad { .. } => adaspec_status::ModelFile,
            E::IncompatibleVocab(_) => adaspec_status::IncompatibleVocab,
            E::InvalidParam { .. } => adaspec_status::InvalidParam,
            E::ContextFull { .. } => adaspec_status::ContextFull,
            E::Busy(_) => adaspec_status::Busy,
            _ => adaspec_status::Backend,
        };
        FfiError::new(status, e.to_string())
    }
}

pub(crate) type FfiResult<T> = Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn to_cstring(message: &str) -> CString {
    let bytes: Vec<u8> = message.bytes().filter(|&b| b != 0).collect();
    CString::new(bytes).unwrap_or_default()
}

/// Stores `message` as this thread's last error.
pub(crate) fn set_last_error(message: &str) {
    let c = to_cstring(message);
    let _ = LAST_ERROR.try_with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            *slot = c;
        }
    });
}

/// Empties this thread's last error (done at the start of every fallible call).
pub(crate) fn clear_last_error() {
    set_last_error("");
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs a fallible export body: clears the last error, catches panics, turns errors into a
/// status and a last-error message.
pub(crate) fn boundary<F>(fn_name: &str, body: F) -> adaspec_status
where
    F: FnOnce() -> FfiResult<()>,
{
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => adaspec_status::Ok,
        Ok(Err(e)) => {
            set_last_error(&format!("{fn_name}: {}", e.message));
            e.status
        }
        Err(payload) => {
            set_last_error(&format!("{fn_name}: internal panic: {}", panic_message(payload.as_ref())));
            adaspec_status::Panic
        }
    }
}

/// Runs an infallible export body that returns a plain value; a panic returns `fallback`
/// and sets the last error. Does not clear the last error.
pub(crate) fn boundary_value<T, F>(fn_name: &str, fallback: T, body: F) -> T
where
    F: FnOnce() -> T,
{
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => {
            set_last_error(&format!("{fn_name}: internal panic: {}", panic_message(payload.as_ref())));
            fallback
        }
    }
}

/// Returns early with `ADASPEC_STATUS_NULL_ARGUMENT` when a pointer is NULL.
macro_rules! check_null {
    ($($p:ident),+ $(,)?) => {
        $(
            if $p.is_null() {
                return Err($crate::status::FfiError::null(stringify!($p)));
            }
        )+
    };
}

/// Returns the static, NUL-terminated name of a status (e.g. "ADASPEC_STATUS_BUSY"), or
/// "ADASPEC_STATUS_UNKNOWN" for a number this library does not know. Never NULL.
#[no_mangle]
pub extern "C" fn adaspec_status_name(status: i32) -> *const c_char {
    boundary_value("adaspec_status_name", std::ptr::null(), || {
        let name: &'static [u8] = adaspec_status::ALL
            .iter()
            .find(|s| **s as i32 == status)
            .map(|s| s.name())
            .unwrap_or(b"ADASPEC_STATUS_UNKNOWN\0");
        name.as_ptr() as *const c_char
    })
}

/// The message of the last failed call on this thread ("" if the last fallible call
/// succeeded). Never NULL. The pointer stays valid until the next adaspec call on this thread;
/// copy it (or use `adaspec_last_error_copy`) to keep it.
#[no_mangle]
pub extern "C" fn adaspec_last_error() -> *const c_char {
    static EMPTY: [u8; 1] = [0];
    boundary_value("adaspec_last_error", EMPTY.as_ptr() as *const c_char, || {
        LAST_ERROR
            .try_with(|cell| cell.try_borrow().map(|s| s.as_ptr()).unwrap_or(EMPTY.as_ptr() as *const c_char))
            .unwrap_or(EMPTY.as_ptr() as *const c_char)
    })
}

/// Copies the last error message of this thread into `buf` (NUL-terminated, truncated to
/// `buf_len - 1` bytes). Returns the full message length in bytes without the NUL, so a
/// return value >= `buf_len` means it was truncated. `buf` may be NULL when `buf_len` is 0.
#[no_mangle]
pub extern "C" fn adaspec_last_error_copy(buf: *mut c_char, buf_len: usize) -> usize {
    boundary_value("adaspec_last_error_copy", 0, || {
        let msg: Vec<u8> = LAST_ERROR
            .try_with(|cell| cell.try_borrow().map(|s| s.as_bytes().to_vec()).unwrap_or_default())
            .unwrap_or_default();
        if !buf.is_null() && buf_len > 0 {
            let n = msg.len().min(buf_len - 1);
            // SAFETY: the caller promises `buf` has `buf_len` writable bytes; we write n + 1 <= buf_len.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: adaspec_last_error never returns NULL and the string is NUL-terminated.
        unsafe { CStr::from_ptr(adaspec_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn panic_becomes_status_and_message() {
        let s = boundary("adaspec_test", || panic!("boom {}", 42));
        assert_eq!(s, adaspec_status::Panic);
        assert!(last().contains("boom 42"), "{}", last());
        assert!(last().starts_with("adaspec_test: internal panic"));
        let v = boundary_value("adaspec_test", 7, || -> i32 { panic!("x") });
        assert_eq!(v, 7);
    }

    #[test]
    fn errors_and_success_set_and_clear_message() {
        let s = boundary("f", || Err(FfiError::param("n_ctx", "must be >= 16")));
        assert_eq!(s, adaspec_status::InvalidParam);
        assert_eq!(last(), "f: invalid parameter `n_ctx`: must be >= 16");
        let mut buf = [0 as c_char; 4];
        let n = adaspec_last_error_copy(buf.as_mut_ptr(), buf.len());
        assert_eq!(n, last().len());
        // SAFETY: the copy is NUL-terminated within buf.
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(), "f: ");
        assert_eq!(adaspec_last_error_copy(std::ptr::null_mut(), 0), last().len());
        assert_eq!(boundary("f", || Ok(())), adaspec_status::Ok);
        assert_eq!(last(), "");
    }

    #[test]
    fn status_names_are_distinct_and_numbers_stable() {
        for (i, s) in adaspec_status::ALL.iter().enumerate() {
            assert_eq!(*s as i32, i as i32);
        }
        // SAFETY: static NUL-terminated strings.
        let name = |x| unsafe { CStr::from_ptr(adaspec_status_name(x)) }.to_str().unwrap().to_string();
        assert_eq!(name(8), "ADASPEC_STATUS_BUSY");
        assert_eq!(name(99), "ADASPEC_STATUS_UNKNOWN");
        assert_eq!(name(-1), "ADASPEC_STATUS_UNKNOWN");
    }
}
